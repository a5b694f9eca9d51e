"""The engine on a GPU (Triton kernels, CUDA-graph decode) against Hugging Face and its own float32
path: the device check's stages (``bench/device_check.py``) asserted under plain ``pytest``. Skips
without CUDA; a test whose model or pinned transformers is missing skips with the reason.

bfloat16 is judged against a float32 reference relative to Hugging Face bfloat16's own error (two
correct bf16 implementations differ about as much as bf16 differs from fp32); exact agreement is asked
only in float32 (1e-4, decode steps against Hugging Face and against our own prefill) and between
graph replays and plain launches of the same kernels (bit-identical)."""

import pytest
import torch

from bench import device_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run(check, *args):
    try:
        return check(torch.device("cuda"), *args)
    except device_check.Skip as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("stage", ["dispatch", "graph_replay", "tiles", "fp32_parity", "bf16_graph_vs_plain",
                                   "bf16_vs_fp32", "generate_vs_hf", "graph_captures"])
def test_device_check_stage(stage):
    run(device_check.STAGES[stage], False)


def test_bf16_smollm2_relative_to_hugging_face():
    from model.default_model import default_model_dir

    path = default_model_dir()
    if not (path / "config.json").exists():
        pytest.skip(f"the default model is not imported at {path}")
    run(device_check.bf16_vs_fp32, path, 512)
