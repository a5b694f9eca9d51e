"""model.atomic.install_dir: all or nothing, inputs never touched, stale temporaries cleared, umask modes."""

import os
import stat
import subprocess
import sys

import pytest

from model.atomic import LOCK_NAME, check_out_path, current_umask, install_dir
from model.errors import UserError


def listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_installs_and_replaces(tmp_path):
    out = tmp_path / "out"
    with install_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.sublayer-tmp-")
        (tmp / "a").write_text("1")
    assert listing(tmp_path) == ["out", "out/a"]
    with pytest.raises(UserError, match=r"out: already exists and is not empty \(pass --force"):
        with install_dir(out):
            pass
    with install_dir(out, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert listing(tmp_path) == ["out", "out/b"]
    (tmp_path / "empty").mkdir()
    with install_dir(tmp_path / "empty") as tmp:  # an empty directory needs no replace
        (tmp / "c").write_text("3")
    assert (tmp_path / "empty" / "c").read_text() == "3"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_old_target_untouched(tmp_path, exc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(exc):
        with install_dir(out, replace=True) as tmp:
            (tmp / "half").write_text("x")
            raise exc()
    assert listing(tmp_path) == before and (out / "keep").read_text() == "mine"


def test_out_may_not_touch_inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    gguf = src / "x.gguf"
    gguf.write_text("g")
    link = tmp_path / "link"
    link.symlink_to(src)
    before = listing(tmp_path)
    for out, inputs, word in ((src, [src], "is"), (tmp_path, [src], "contains"), (src / "sub", [src], "sits inside"),
                              (src, [gguf], "contains"), (link, [src], "is"), (tmp_path / "o", [None, tmp_path / "o"], "is")):
        with pytest.raises(UserError, match=f"output directory {word} the input"):
            with install_dir(out, replace=True, inputs=inputs):
                pass
    assert listing(tmp_path) == before
    assert check_out_path(tmp_path / "new", [src]) == (tmp_path / "new").resolve()


def test_unwritable_parent(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserError, match=r"file/sub: cannot create the parent directory of .*file/sub/out"):
        with install_dir(afile / "sub" / "out"):
            pass
    with pytest.raises(UserError, match="exists and is not a directory"):
        with install_dir(afile):
            pass


def test_stale_temporary_removed_live_one_kept(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.sublayer-tmp-{dead_pid}-00aa"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("")
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    # a live writer: another process holds the lock of its temporary
    live = tmp_path / f".other.sublayer-tmp-{os.getpid()}-00bb"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"), str(live / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with install_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("1")
        assert not stale.exists() and live.is_dir()
        assert f"removed stale temporary directory {stale}" in capsys.readouterr().err
    finally:
        holder.communicate("")
    # a replaced copy left aside by a run killed between its two renames is put back
    aside = tmp_path / f".gone.sublayer-old-{dead_pid}-00cc"
    aside.mkdir()
    (aside / "w").write_text("old")
    with install_dir(tmp_path / "new"):
        pass
    assert (tmp_path / "gone" / "w").read_text() == "old" and not aside.exists()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_modes_follow_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        with install_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            f = tmp / "sub" / "w.safetensors"
            f.write_text("x")
            os.chmod(f, 0o600)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out, out / "sub", out / "sub" / "w.safetensors")}
    assert modes == {"out": 0o777 & ~mask, "sub": 0o777 & ~mask, "w.safetensors": 0o666 & ~mask}
    assert listing(out) == ["sub", "sub/w.safetensors"]  # the lock file is not installed


def test_interrupt_between_renames_puts_old_back(tmp_path, monkeypatch):
    import model.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    real = os.rename

    def rename(src, dst):
        if ".sublayer-tmp-" in str(src):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with install_dir(out, replace=True) as tmp:
            (tmp / "new").write_text("x")
    assert listing(tmp_path) == ["out", "out/keep"]


def test_empty_out_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious").write_text("x")
    with pytest.raises(UserError, match="--out: an empty path"):
        with install_dir("", replace=True):
            pass
    assert listing(tmp_path) == ["precious"]


def test_unlocked_name_of_a_dead_run_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".x.sublayer-new-{int(dead.stdout)}-00dd"
    leftover.mkdir()
    live = tmp_path / f".y.sublayer-new-{os.getpid()}-00ee"  # ours: alive, kept
    live.mkdir()
    with install_dir(tmp_path / "out"):
        pass
    assert not leftover.exists() and live.is_dir()
