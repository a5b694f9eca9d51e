"""The one atomic directory install for every writer (export, GGUF import, healing, caches).

    with install_dir(out, replace=force, inputs=[checkpoint, plan_file]) as tmp:
        ...write files into tmp...
    # out now holds exactly what was written, or (on any exception) is as it was

* The target is checked first (``check_out_path``): it may not equal, contain or sit inside any input
  (symlinks resolved); an existing non-empty target needs ``replace``; an uncreatable or unwritable
  parent is a ``UserError`` naming the path.
* The temporary directory sits beside the target, is named ``.<target>.sublayer-tmp-<pid>-<hex>`` and
  holds a lock file (``fcntl.flock``) for as long as its writer lives (it is locked under a
  ``.sublayer-new-`` name first, so no other run sees it unlocked). A temporary whose lock can be
  taken belongs to a killed run: the next install in the same parent removes it and says so on stderr.
* On success the old target (if any) is renamed aside (``.<target>.sublayer-old-<pid>-<hex>``), the
  new one renamed in, the old one removed last. A run killed between the two renames leaves the old
  directory aside; the next install puts it back where the target is missing, else removes it.
* Modes follow the user's umask (read from ``/proc/self/status``), so other users can read an export
  under the usual 022 umask and cannot under 077.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from model.errors import UserError

LOCK_NAME = ".sublayer-lock"
_TEMP = re.compile(r"^\.(?P<target>.+)\.sublayer-(?P<kind>tmp|new|old)-(?P<pid>\d+)-[0-9a-f]+$")
# OSErrors inside the writer that are the environment's fault, not a bug: reported as UserError.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_path(out, inputs=()) -> Path:
    """``out`` resolved; a ``UserError`` if it equals, contains or sits inside any input, or is a file."""
    if not str(out).strip():
        raise UserError("--out: an empty path; name the output directory")
    given = Path(out).expanduser()
    target = given.resolve()
    for inp in inputs:
        if inp is None:
            continue
        src = Path(inp).expanduser().resolve()
        if target == src or target in src.parents or src in target.parents:
            relation = ("is" if target == src else "contains" if target in src.parents else "sits inside")
            raise UserError(f"{given}: the output directory {relation} the input {inp}; "
                            f"choose an --out outside every input")
    if target.exists() and not target.is_dir():
        raise UserError(f"{given}: exists and is not a directory")
    return target


def check_target(target, *, replace: bool = False, inputs=()) -> Path:
    """``check_out_path``, and an existing non-empty ``target`` needs ``replace``: what ``install_dir``
    checks first, for callers that want to fail before any slow work."""
    target = check_out_path(target, inputs)
    if _nonempty_dir(target) and not replace:
        raise UserError(f"{target}: already exists and is not empty (pass --force to replace it)")
    return target


def _nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(entry: Path, pid: int) -> bool:
    """Whether a temporary's writer is gone: its lock can be taken (or, without a lock file, its pid is dead)."""
    try:
        fd = os.open(entry / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return not _pid_alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we took


def remove_stale(parent: Path) -> list[Path]:
    """Clear what killed installs left in ``parent``; returns the paths removed or restored."""
    done = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m["pid"])
        if m["kind"] in ("tmp", "new"):
            if not (_stale(entry, pid) if m["kind"] == "tmp" else not _pid_alive(pid)):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            print(f"removed stale temporary directory {entry} (left by process {pid}, no longer running)",
                  file=sys.stderr)
        else:
            if _pid_alive(pid):
                continue
            target = parent / m["target"]
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
                print(f"removed stale directory {entry} (the replaced copy of {target}, left by process {pid})",
                      file=sys.stderr)
            else:
                try:
                    os.rename(entry, target)
                except OSError:  # another run restored it first
                    continue
                print(f"restored {target} from {entry} (process {pid} was stopped while replacing it)",
                      file=sys.stderr)
        done.append(entry)
    return done


def fix_modes(root: Path, umask: int | None = None) -> None:
    """Directories 0777 and files 0666 (exec bits kept) under ``root``, less the umask."""
    umask = current_umask() if umask is None else umask
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask, follow_symlinks=False)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            os.chmod(p, (0o666 | (os.stat(p).st_mode & 0o111)) & ~umask)


def writable_dir(path: Path, label: str, hint: str = "") -> Path:
    """``path`` as a directory this process can write (created if need be), else a UserError:
    ``label`` names it after the path (``{path}: cannot create {label}``), ``hint`` ends the message."""
    hint = f"; {hint}" if hint else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create {label} ({e.strerror}){hint}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: {label} is not writable{hint}")
    return path


@contextlib.contextmanager
def install_dir(target, *, replace: bool = False, inputs=()):
    """Yield a fresh temporary directory beside ``target``; install it as ``target`` on normal exit.

    ``replace``: an existing non-empty ``target`` is replaced (moved aside, removed after the new one
    is in place); without it that is a ``UserError``. On any exception (Ctrl-C included) the
    temporary is removed and the exception re-raised; permission / disk-full errors become a
    ``UserError`` naming the target.
    """
    target = check_target(target, replace=replace, inputs=inputs)
    parent = writable_dir(target.parent, f"the parent directory of {target}")
    remove_stale(parent)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{target.name}.sublayer-tmp-{tag}"
    new = parent / f".{target.name}.sublayer-new-{tag}"  # locked before it takes the name others check
    lock = None
    try:
        new.mkdir()
        lock = os.open(new / LOCK_NAME, os.O_CREAT | os.O_WRONLY, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(new, tmp)
    except OSError as e:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(new, ignore_errors=True)
        raise UserError(f"{target}: cannot write in {parent} ({e.strerror})") from None
    try:
        try:
            yield tmp
        except OSError as e:
            if e.errno in _USER_ERRNOS:
                raise UserError(f"{target}: cannot write the output ({e.strerror}: {e.filename or tmp})") from None
            raise
        os.unlink(tmp / LOCK_NAME)  # still held through the open descriptor until the rename is done
        fix_modes(tmp)
        _swap_in(tmp, target, tag, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _swap_in(tmp: Path, target: Path, tag: str, replace: bool) -> None:
    """Rename ``tmp`` to ``target``; an existing target is moved aside first and removed last."""
    old = None
    if target.exists():
        if _nonempty_dir(target) and not replace:  # another process finished the same job first
            raise UserError(f"{target}: already exists and is not empty (pass --force to replace it)")
        old = target.with_name(f".{target.name}.sublayer-old-{tag}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:  # Ctrl-C included: put the old one back
        if old is not None and not target.exists():
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
