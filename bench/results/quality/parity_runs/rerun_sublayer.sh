#!/bin/bash
# Re-run of the two sublayer runs of run_parity.sh with the final adapter code (the HF runs are unchanged).
cd "$(dirname "$0")/../../../.."  # the repository root (the task YAMLs read ../shared from there)
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# the default model as a relative directory name, so that lm-eval records runs under the name
# (no home directory in results); HF's from_pretrained and ours both read the directory
M=smollm2-135m-instruct
ln -sfn "$(.venv/bin/python -c 'from model.default_model import resolve_model; print(resolve_model(None))')" $M
trap 'rm -f $M' EXIT
OUT=bench/results/quality/parity_runs
T=../shared/data/lm_eval_tasks
run() { name=$1; shift; s=$(date +%s); "$@" > $OUT/$name.log 2>&1; rc=$?; printf '### %s (re-run)\n$ OMP_NUM_THREADS=1 %s\nrc=%s wall_s=%s\n' "$name" "$*" $rc $(( $(date +%s) - s )) >> $OUT/commands.log; }
run sublayer_mc .venv/bin/python -m tools.lm_eval --model sublayer --model_args pretrained=$M,dtype=float32,device=cpu,batch_size=16 --include_path $T --tasks arc_easy_local,hellaswag_local --limit 200 --output_path $OUT/sublayer_mc
run sublayer_wt .venv/bin/python -m tools.lm_eval --model sublayer --model_args pretrained=$M,dtype=float32,device=cpu,batch_size=1 --include_path $T --tasks wikitext2_local --limit 2 --output_path $OUT/sublayer_wt
