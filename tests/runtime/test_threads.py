"""The OpenMP wait ``import runtime`` sets before torch loads OpenMP, and what it leaves alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.threads import SPIN_COUNT

ROOT = Path(__file__).resolve().parents[2]
SHOW = "import os, sys; {first}; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def child(first: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SHOW.format(first=first)], cwd=ROOT, env={**base, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_runtime_sets_a_bounded_spin():
    assert child("import runtime") == f"{SPIN_COUNT} None"


@pytest.mark.parametrize("env, expected", [({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE"),
                                           ({"GOMP_SPINCOUNT": "0"}, "0 None")])
def test_an_explicit_setting_wins(env, expected):
    assert child("import runtime", **env) == expected


def test_too_late_once_torch_is_loaded():
    assert child("import torch; import runtime") == "None None"
