"""Atomic file writes: an export that fails leaves no partial file and keeps the earlier artefact."""

from __future__ import annotations

import contextlib
import os
import shutil
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

    The temporary file has ``path``'s own name, inside a private hidden folder in the same directory (removed
    afterwards), and is created by the writer itself. So the result is exactly what writing ``path`` directly
    gives: the usual permissions (the umask's, not the owner-only mode of a ``mkstemp`` file), and the same bytes
    for formats that record their own file name (a TorchScript zip names its top folder after the file), whatever
    the temporary name was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text(), tmp.name, [p.name for p in target.parent.iterdir()]
        ('done', 'a.txt', ['a.txt'])

    Raises:
        FileNotFoundError: the body of the ``with`` block did not write the temporary file.
        OSError: the folder does not accept new files (read-only, full); ``path`` is then left as it was.
    """
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp = folder / path.name
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
