"""Writes that never leave a half-written output: a temporary name beside the target, then a rename.

Every file and folder memopt writes goes through here: :func:`atomic_path` for a file written by
someone else's writer (safetensors, matplotlib), :func:`atomic_write_bytes` / ``_text`` for bytes in
hand, :class:`staged_folder` for a whole output folder. A failure removes the temporary; the target
is either the old one or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memopt.core.errors import MemoptError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output",
    "save_figure",
    "staged_folder",
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
    that says memopt wrote it), or whose parent does not exist."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise MemoptError(f"output {out_dir} is an existing file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise MemoptError(f"output {out_dir} is a non-empty folder that memopt did not write")
    if not out.parent.exists():
        raise MemoptError(f"output {out_dir}: its parent folder does not exist")
    return out


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
