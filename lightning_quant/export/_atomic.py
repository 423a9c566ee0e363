"""Atomic file writes: an export that fails leaves no partial file and keeps the earlier artefact."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_output_path"]


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...]) -> Path:
    """Validate an export destination before any work is done.

    Raises:
        ValueError: the path is a directory or has an unexpected suffix.
        PermissionError: the folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a directory; pass a file path such as {str(path / ('model' + suffixes[0]))!r}."
        )
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{str(path)!r} should end with {' or '.join(suffixes)}.")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write to {str(parent)!r}: the folder is read-only; choose another output path.")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step, on error it is removed.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
