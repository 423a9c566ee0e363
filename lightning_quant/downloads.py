"""Download a file once into a cache, atomically and checked against a recorded SHA-256; say what to do offline.

:func:`download_file` streams into a temporary file beside the destination (with a progress bar), compares the
SHA-256 and only then renames it into place, so the cache never holds a partial or wrong file. Offline
(``LIGHTNING_QUANT_OFFLINE=1``, or the host cannot be reached), callers raise :class:`AssetUnavailableError`, whose
message names the Python keyword arguments that provide the file instead; the Hydra app spells the same fixes as
overrides (``model.model.weights_path=...``, ``data.root=...``) from its ``arguments`` field.

Example:
    >>> import hashlib, tempfile
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / "src.bin").write_bytes(b"weights")
    >>> digest = hashlib.sha256(b"weights").hexdigest()
    >>> path = download_file((tmp / "src.bin").as_uri(), tmp / "cache" / "w.bin", digest, progress=False)
    >>> path.read_bytes()
    b'weights'
    >>> err = AssetUnavailableError("w.bin is not cached; offline.", arguments={"weights_path": "/w"})
    >>> str(err)
    "w.bin is not cached; offline. Pass weights_path='/w'."
    >>> err.with_fixes(lambda name, value: f"model.{name}={value}")
    'w.bin is not cached; offline. Pass model.weights_path=/w.'
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["AssetUnavailableError", "ChecksumMismatchError", "download_file", "is_offline", "sha256_of"]

_CHUNK = 1 << 16


class ChecksumMismatchError(RuntimeError):
    """A downloaded file's SHA-256 is not the recorded one; nothing was written to the cache.

    Attributes:
        url: where the file came from.
        expected: the recorded SHA-256 (hex).
        actual: the SHA-256 of what was downloaded.
    """

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {url}: expected SHA-256 {expected}, got {actual}. The download was discarded "
            "(nothing cached); retry, or download the file yourself and pass its path."
        )
        self.url, self.expected, self.actual = url, expected, actual

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (spawned processes send exceptions back)
        return type(self), (self.url, self.expected, self.actual)


class AssetUnavailableError(FileNotFoundError):
    """Weights or data are neither given, in the shared folder, in the cache, nor downloadable (e.g. offline).

    The message is ``problem`` plus the fix, each entry of ``arguments`` spelled as a Python keyword argument
    (or ``message`` verbatim); :meth:`with_fixes` spells them otherwise (the Hydra app writes overrides).

    Attributes:
        problem: what is missing and why it cannot be had, one or more sentences.
        arguments: ``{keyword: value}`` that provide it, alternatives in order (``{"root": "/path/to/cifar10"}``).
        also: a further way, already spelled (``"set LIGHTNING_QUANT_SHARED=/path/to/shared"``), or empty.
    """

    def __init__(self, problem: str, *, arguments: dict[str, Any], also: str = "", message: str | None = None) -> None:
        self.problem, self.arguments, self.also = problem, dict(arguments), also
        super().__init__(self.with_fixes(lambda name, value: f"{name}={value!r}") if message is None else message)

    def with_fixes(self, spell: Callable[[str, Any], str]) -> str:
        """The message with each argument written by ``spell(name, value)``."""
        fixes = " or ".join(spell(name, value) for name, value in self.arguments.items())
        return f"{self.problem} Pass {fixes}" + (f", or {self.also}" if self.also else "") + "."

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_unavailable, (self.problem, self.arguments, self.also, str(self))


def _rebuild_unavailable(problem: str, arguments: dict[str, Any], also: str, message: str) -> AssetUnavailableError:
    return AssetUnavailableError(problem, arguments=arguments, also=also, message=message)


def is_offline(url: str = "https://download.pytorch.org", timeout: float = 3.0) -> bool:
    """True when ``LIGHTNING_QUANT_OFFLINE`` is set (not ``0``) or ``url``'s host cannot be reached in ``timeout`` s.

    The port is the URL's own (``http://127.0.0.1:8000/...``), else 80 for ``http`` and 443 otherwise; a ``file://``
    URL is never offline.

    Example:
        >>> os.environ["LIGHTNING_QUANT_OFFLINE"] = "1"; is_offline()
        True
        >>> del os.environ["LIGHTNING_QUANT_OFFLINE"]
    """
    flag = os.environ.get("LIGHTNING_QUANT_OFFLINE", "")
    if flag and flag != "0":
        return True
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return False
    host = parsed.hostname or url
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except OSError:
        return True


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file.

    Example:
        >>> import tempfile; f = tempfile.mktemp(); _ = open(f, "wb").write(b"")
        >>> sha256_of(f)[:16]
        'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` exists; the file appears only complete and checked.

    Example:
        >>> # download_file("https://host/resnet20-12fca82f.th", hub_dir / "resnet20-12fca82f.th", "12fca82f0b...")

    Args:
        url: ``https://``, ``http://`` or ``file://`` address.
        dest: the cached file; its folder is created.
        sha256: expected hex SHA-256 of the file.
        progress: show a tqdm progress bar (on stderr).
        timeout: seconds a connection or read may stall.

    Raises:
        ChecksumMismatchError: the downloaded bytes have another SHA-256 (the temporary file is deleted).
        urllib.error.URLError: the server could not be reached or answered with an error (nothing is left behind).
    """
    dest = Path(dest).expanduser()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as fh, _open(url, timeout) as response, _bar(response, dest.name, progress) as bar:
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != sha256.lower():
            raise ChecksumMismatchError(url, sha256.lower(), actual)
        os.replace(tmp, dest)  # atomic: readers see no file or the whole, checked file
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _open(url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"User-Agent": "lightning-quant"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s)/file URLs by design


def _bar(response: Any, name: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    total = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    size = int(total) if total else None
    return tqdm(total=size, desc=name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
