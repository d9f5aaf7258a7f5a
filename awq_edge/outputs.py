"""Output folders: refuse a bad -o before any work, and swap a finished folder into place without leftovers."""

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from awq_edge.errors import AwqEdgeError


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_output_dir(out, *, inputs=(), is_ours=lambda folder: False, our_files=frozenset(), what="output",
                     need_bytes: int = 0) -> Path:
    """The absolute -o folder, once it is known that writing it loses nothing and can succeed.

    Refused: a path that is a file; a folder equal to or holding an input; a non-empty folder that
    `is_ours` does not recognise; one of ours holding files we never write (a user's notes would be lost);
    a place that is not writable; less free space than `need_bytes`.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise AwqEdgeError(f"-o {out} exists and is a file, not a folder", f"choose a new folder for the {what}")
    real = out.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if _inside(src, real):  # replacing out would delete the input (a folder inside the input is harmless)
            where = "is" if real == src else "holds"
            raise AwqEdgeError(f"-o {out} {where} the input {source}, which writing it would destroy",
                               f"choose an -o folder that is not {source} or a folder above it")
    if out.is_dir() and any(out.iterdir()):
        if not is_ours(out):
            raise AwqEdgeError(f"-o {out} is not empty and not an awq-edge {what}, so it is not replaced",
                               "choose a new or empty -o folder")
        extra = sorted(p.name for p in out.iterdir() if p.name not in our_files)
        if extra:
            raise AwqEdgeError(f"-o {out} holds files awq-edge did not write ({', '.join(extra[:5])}), "
                               f"which replacing the {what} would delete", "move them out, or choose another -o folder")
    parent = _existing_ancestor(out.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "a file" if not parent.is_dir() else "not writable (read-only, or not yours)"
        raise AwqEdgeError(f"could not write -o {out}: {parent} is {why}", "choose an -o folder in a writable place")
    free = shutil.disk_usage(parent).free
    if need_bytes > free:
        raise AwqEdgeError(f"-o {out} needs about {need_bytes / 2**20:.0f} MiB, but {parent} has "
                           f"{free / 2**20:.0f} MiB free", "free disk space or choose an -o folder on another disk")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` folders left beside out by a process that was killed."""
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def temp_dir(out: Path) -> Path:
    """A fresh `.NAME.tmp-PID` folder beside out, after clearing leftovers of killed runs."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so a swap is never left half done. Python runs signal
    handlers in the main thread whichever thread the kernel picked, so the handlers are swapped (a signal
    mask would miss the signals delivered to torch's and onnxruntime's threads)."""
    held = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished tmp folder at out; the folder there before is swapped out and removed, never half-deleted."""
    out = Path(out).absolute()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    with signals_deferred():
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def write_failed(out: Path, e: OSError) -> AwqEdgeError:
    return AwqEdgeError(f"could not write {out}: {e.strerror or e}", "free disk space or choose a writable -o folder")


def write_atomic(path: Path, data: bytes) -> None:
    """Write one small file whole or not at all (a temporary beside it, renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
