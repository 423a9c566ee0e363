"""Extract a dataset archive once into a cache folder, atomically and safely.

The archive is unpacked into a temporary folder beside the destination, a marker file is written last,
and the folder is then renamed into place with ``os.replace``. A folder without the marker (an interrupted
run, a hand-made copy) is never used. Two processes extracting at once both succeed: the first rename
wins and the second discards its copy. Members that would land outside the destination (absolute paths,
``..``, links pointing out, device files) are refused.

Example:
    >>> import io, tarfile, tempfile
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> with tarfile.open(tmp / "demo.tar.gz", "w:gz") as tar:
    ...     info = tarfile.TarInfo("demo/hello.txt"); info.size = 2
    ...     tar.addfile(info, io.BytesIO(b"hi"))
    >>> root = extract_archive(tmp / "demo.tar.gz", tmp / "cache")
    >>> root.name, (root / "demo" / "hello.txt").read_text()
    ('demo', 'hi')
    >>> extract_archive(tmp / "demo.tar.gz", tmp / "cache") == root   # second call: no work
    True
    >>> import shutil; shutil.rmtree(tmp)
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from lightning_quant.paths import cache_dir

__all__ = ["MARKER_NAME", "archive_stem", "extract_archive", "is_extracted"]

MARKER_NAME = ".lightning_quant_extracted"
_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def archive_stem(archive: str | os.PathLike[str]) -> str:
    """The archive's file name without its ``.tar.gz`` / ``.tgz`` / ``.tar`` suffix.

    Example:
        >>> archive_stem("data/imagenette_val.tar.gz")
        'imagenette_val'
    """
    name = Path(archive).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_extracted(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds a complete extraction (its marker file exists).

    Example:
        >>> is_extracted("/nonexistent/folder")
        False
    """
    return (Path(folder) / MARKER_NAME).is_file()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse members that could write outside the destination folder."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or member.name.startswith(("/", "\\")):
        raise ValueError(f"unsafe member {member.name!r} in {archive}: it would be written outside the destination.")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        resolved = target if member.islnk() else path.parent / target
        if target.is_absolute() or ".." in PurePosixPath(os.path.normpath(str(resolved))).parts:
            raise ValueError(f"unsafe link {member.name!r} -> {member.linkname!r} in {archive}: it points outside.")
    if member.isdev():
        raise ValueError(f"unsafe member {member.name!r} in {archive}: device files are not extracted.")


def _extract_to(archive: Path, folder: Path) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            _check_member(member, archive)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the stdlib's own safety filter as well
            tar.extractall(folder, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; members were checked above
            tar.extractall(folder, members=members)


def extract_archive(archive: str | os.PathLike[str], dest_root: str | os.PathLike[str] | None = None) -> Path:
    """Extract ``archive`` once into ``dest_root/<archive stem>`` and return that folder.

    Example:
        >>> from lightning_quant.paths import shared_dir
        >>> shared = shared_dir()
        >>> if shared is not None:  # doctest: +SKIP
        ...     root = extract_archive(shared / "data" / "imagenette_val.tar.gz")   # -> <cache>/imagenette_val
        ...     sorted(p.name for p in (root / "val").iterdir())[:2]
        ['n01440764', 'n02102040']

    Args:
        archive: a ``.tar.gz`` / ``.tgz`` / ``.tar`` file (read-only is fine).
        dest_root: folder that receives the extracted folder; default :func:`lightning_quant.paths.cache_dir`
            (``LIGHTNING_QUANT_CACHE`` or ``~/.cache/lightning_quant``).

    Returns:
        The extracted root, ``dest_root/<archive stem>``, holding the archive's top-level entries.

    Raises:
        FileNotFoundError: ``archive`` does not exist; the message says how to point at the shared folder or
            at your own data.
        ValueError: the archive holds a member that would be written outside the destination.
        FileExistsError: ``dest_root/<stem>`` exists but is not a complete extraction (no marker file);
            delete it and retry.
        tarfile.TarError: the archive is corrupt.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(
            f"data archive not found: {archive}. Set LIGHTNING_QUANT_SHARED=/path/to/shared (the folder whose "
            f"data/ holds {archive.name}), or pass root=/path/to/your/data (an ImageFolder layout) to the data "
            "module to use your own copy."
        )
    dest_root = Path(dest_root) if dest_root is not None else cache_dir()
    dest = dest_root / archive_stem(archive)
    if is_extracted(dest):
        return dest
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest_root))
    try:
        _extract_to(archive, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; give the folder the usual permissions
        stat = archive.stat()
        marker = {"archive": str(archive.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
        (tmp / MARKER_NAME).write_text(json.dumps(marker) + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:
            if is_extracted(dest):  # another process finished first: use its copy
                return dest
            raise FileExistsError(
                f"{dest} exists but is not a complete extraction of {archive.name} (no {MARKER_NAME} marker); "
                "delete it and retry."
            ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
