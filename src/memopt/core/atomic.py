"""Writes that never leave a half-written output: a temporary name beside the target, then a rename.

Every file and folder memopt writes goes through here: :func:`atomic_path` for a file written by
someone else's writer (safetensors, matplotlib), :func:`atomic_write_bytes` / ``_text`` for bytes in
hand, :class:`staged_folder` for a whole output folder. A failure removes the temporary; the target
is either the old one or the complete new one.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from memopt.core.errors import MemoptError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output",
    "lock_output",
    "releases_outputs",
    "save_figure",
    "staged_folder",
    "unlock_output",
]


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """``with atomic_path(out) as tmp:`` write the file ``tmp``; on success it becomes ``out``.

    ``tmp`` is in ``out``'s folder (created if missing), so the rename is atomic; ``suffix`` keeps
    the extension a writer looks at (matplotlib chooses the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name: never a half-written file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` (a matplotlib figure) through a temporary name; the figure is closed."""
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png" if not path.suffix else "") as tmp:
            fig.savefig(str(tmp), **kwargs)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def check_output(out_dir: str | Path, marker: str) -> Path:
    """Refuse an output folder that is a file, or a non-empty folder without ``marker`` (the file
    that says memopt wrote it), or whose parent does not exist; then take the output's lock
    (:func:`lock_output`) for the rest of this run, so that a second run into the same output
    refuses at its start instead of both reporting success."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MemoptError(f"output {out_dir} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise MemoptError(f"output {out_dir} is a non-empty folder that memopt did not write")
    if not out.parent.exists():
        raise MemoptError(f"output {out_dir}: its parent folder does not exist")
    lock_output(out)
    return out


F = TypeVar("F", bound=Callable[..., Any])

# output (resolved) -> the open file descriptor holding its lock, for the life of this process
_LOCKS: dict[Path, tuple[int, Path]] = {}  # (descriptor, the lock file's path)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def lock_output(out: Path) -> None:
    """Hold ``.OUT.lock`` beside ``out`` (an exclusive ``flock``) until :func:`unlock_output` or
    the end of the process (the kernel drops the lock of a killed process; the file left behind
    is taken over and removed by the next run). Re-entrant within one process. A lock held by
    another process: MemoptError naming it. Then the temporary folders of earlier, killed runs
    into ``out`` (``.OUT.tmp-*``, ``.OUT.old-*``) are removed: no live writer owns them."""
    key = out.resolve()
    if key in _LOCKS:
        return
    path = _lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise MemoptError(
                    f"output {out}: cannot write beside it ({exc.strerror})"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MemoptError(
                f"output {out} is being written by another memopt run (it holds {path})"
            ) from None
        try:  # the file we locked is still the one at the path (a finishing run unlinks it)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _LOCKS[key] = (fd, path)
    atexit.register(unlock_output, out)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    # and atomic_path's temporary files for a file output (mkstemp: 8 random characters)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(out.suffix)}")
    for stale in out.parent.glob(f".{out.name}.*"):
        if pattern.fullmatch(stale.name) and stale.is_file():
            stale.unlink(missing_ok=True)


def releases_outputs(fn: F) -> F:
    """Decorate a function that takes output locks (:func:`check_output`): whatever locks it took
    and still holds when it returns or raises are given back (a run that fails before writing
    leaves no lock behind; one that succeeded gave its lock back already, in staged_folder)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = set(_LOCKS)
        try:
            return fn(*args, **kwargs)
        finally:
            for out in [k for k in _LOCKS if k not in before]:
                unlock_output(out)

    return wrapper  # type: ignore[return-value]


def unlock_output(out: Path) -> None:
    """Give the lock of ``out`` back, removing its file (while still holding it: a waiting run
    then finds the path gone or new and locks again)."""
    held = _LOCKS.pop(Path(out).resolve(), None)
    if held is None:
        return
    fd, path = held
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)


class staged_folder:  # noqa: N801 (a context manager used like a function)
    """``with staged_folder(out, marker) as tmp:`` write into ``tmp``; on success it becomes
    ``out`` (replacing an earlier memopt output there: one with ``marker``), on any failure it is
    removed. ``marker=None``: a cache folder, created where missing, never checked or replaced
    (when another process made it first, its copy is kept and ours dropped)."""

    def __init__(self, out_dir: str | Path, marker: str | None) -> None:
        if marker is None:
            self.out = Path(out_dir)
            self.out.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.out = check_output(out_dir, marker)
        self.cache = marker is None
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._finish(exc_type)
        finally:
            if not self.cache:
                unlock_output(self.out)

    def _finish(self, exc_type: Any) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.cache:
            try:
                os.rename(self.tmp, self.out)
            except OSError:  # another process got there first: its copy is as good as ours
                shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():  # an earlier output: move it aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "x")
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
