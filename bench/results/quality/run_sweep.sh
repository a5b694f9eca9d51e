#!/bin/bash
# The SmolLM2 quality sweep as run (resumable: rerun this script to continue an interrupted sweep).
cd "$(dirname "$0")/../../.."  # the repository root
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
exec .venv/bin/python -m bench.quality sweep --model smollm2-135m-instruct \
  --plans full,attn66,mlp66,block66,attn75,mlp75,block75,attn90,mlp90,block90,attn66-keeplast,mlp66-keeplast,block66-keeplast,attn75-keeplast,mlp75-keeplast,block75-keeplast,attn90-keeplast,mlp90-keeplast,block90-keeplast \
  --tasks arc_easy_local,arc_challenge_local,hellaswag_local,truthfulqa_mc2_local,mmlu_local \
  --plan-files plans/imp-attn10.json plans/imp-attn5.json \
  --limit 100 --mmlu-limit 1 --ppl-windows 8 --ppl-seq-len 512 --batch-size 32 --dtype float32 --device cpu --threads 1
