"""Atomic file writes: an export that fails leaves no partial file and keeps the earlier artefact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_paths", "check_output_path", "replace_together"]


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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`atomic_path` for a folder: yield a new empty folder beside ``path``; once the block has filled it, it
    replaces ``path`` (and everything in it) whole. On any error ``path`` is left as it was.

    The folder is made by ``mkdir`` (the umask's permissions) inside a private hidden folder in the same directory;
    an earlier ``path`` is moved aside first and back if the replacement fails.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "dump"
        >>> with atomic_dir(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> [p.name for p in target.iterdir()], [p.name for p in target.parent.iterdir()]
        (['a.txt'], ['dump'])

    Raises:
        OSError: the folder does not accept new files (read-only, full); ``path`` is then left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp = holder / path.name
    tmp.mkdir()
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        earlier = holder / f"{path.name}.earlier"
        os.replace(path, earlier)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(earlier, path)
            raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together (an XModel and its ``quant_info.json``): yield one
    temporary path per destination; once the block has written them all, they replace the destinations together.

    On any error in the block no destination is touched. If a replacement itself fails (a full or read-only
    folder), the destinations already replaced get their earlier files back, so an earlier set stays a set.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_paths(folder / "a.bin", folder / "a.json") as (data, meta):
        ...     _ = data.write_bytes(b"1"), meta.write_text("{}")
        >>> sorted(p.name for p in folder.iterdir())
        ['a.bin', 'a.json']

    Raises:
        FileNotFoundError: the block did not write one of the temporary files (nothing is replaced).
        OSError: the folder does not accept new files; the destinations are then left as they were.
    """
    targets = [Path(p) for p in paths]
    folders: list[Path] = []
    try:
        for target in targets:
            folders.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent)))
        temps = [folder / target.name for folder, target in zip(folders, targets, strict=True)]
        yield temps
        missing = [str(t) for t, tmp in zip(targets, temps, strict=True) if not tmp.exists()]
        if missing:
            raise FileNotFoundError(f"nothing was written for {', '.join(missing)}; no file was replaced.")
        replace_together(list(zip(temps, targets, strict=True)))
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def replace_together(moves: list[tuple[Path, Path]]) -> None:
    """``os.replace(src, dst)`` for every pair, all or none: when one fails, the destinations replaced before it
    get their earlier files back (or are removed when there was none) and the error is raised.

    Raises:
        OSError: a replacement failed (the destinations are as they were before the call).
    """
    folders: dict[Path, Path] = {}  # destination folder -> its private backup folder (same file system)
    restore: list[tuple[Path, Path | None]] = []
    try:
        for src, dst in moves:
            backup = None
            if dst.exists():
                parent = dst.parent
                if parent not in folders:
                    folders[parent] = Path(tempfile.mkdtemp(prefix=f".{dst.name}.backup-", dir=parent))
                backup = folders[parent] / f"{len(restore)}-{dst.name}"
                try:
                    os.link(dst, backup)  # the earlier file stays in place until it is replaced
                except OSError:
                    shutil.copy2(dst, backup)
            os.replace(src, dst)
            restore.append((dst, backup))
    except BaseException:
        for dst, backup in reversed(restore):
            if backup is not None:
                os.replace(backup, dst)
            else:
                dst.unlink(missing_ok=True)
        raise
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
