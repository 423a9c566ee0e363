"""Where the project's offline assets live: the ``shared`` folder beside the repository, and a cache.

``LIGHTNING_QUANT_SHARED`` overrides the shared folder; ``LIGHTNING_QUANT_CACHE`` the cache
(default ``~/.cache/lightning_quant``), where data archives are extracted once.

Example:
    >>> import os
    >>> cache_dir().name
    'lightning_quant'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "shared_dir"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir(required: bool = False) -> Path | None:
    """The shared assets folder (``data/``, ``weights/``, ``reference/``), or None when absent.

    Raises:
        FileNotFoundError: ``required`` and no folder was found; the message says how to point at one.
    """
    env = os.environ.get("LIGHTNING_QUANT_SHARED")
    candidates = [Path(env)] if env else [_REPO_ROOT.parent / "shared", _REPO_ROOT / "shared"]
    for path in candidates:
        if (path / "data").is_dir() or (path / "weights").is_dir():
            return path
    if required:
        raise FileNotFoundError(
            f"no shared assets folder found (looked at {', '.join(map(str, candidates))}); set "
            "LIGHTNING_QUANT_SHARED=/path/to/shared (the folder holding data/ and weights/)."
        )
    return None


def cache_dir() -> Path:
    """Writable cache for extracted datasets (created on first use by the code that writes there)."""
    return Path(os.environ.get("LIGHTNING_QUANT_CACHE", Path.home() / ".cache" / "lightning_quant"))
