"""Spell the library's "pass weights_path=..." fixes as the Hydra overrides a user types on the command line.

The library's :class:`~lightning_quant.downloads.AssetUnavailableError` names Python keyword arguments; the app
knows where each keyword sits in its config (``cifar_resnet``'s ``weights_path`` is ``model.model.weights_path``).

Example:
    >>> from omegaconf import OmegaConf
    >>> from lightning_quant.downloads import AssetUnavailableError
    >>> cfg = OmegaConf.create({"model": {"model": {"weights_path": None}}, "data": {"download": False}})
    >>> err = AssetUnavailableError("No weights; offline.", arguments={"weights_path": "/w.th"})
    >>> str(app_unavailable_error(cfg, ("model", err)))
    'No weights; offline. Pass model.model.weights_path=/w.th.'
    >>> override(cfg, "data", "download", True)
    'data.download=true'
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_quant.downloads import AssetUnavailableError

__all__ = ["app_unavailable_error", "override"]


def _key_path(node: Any, name: str) -> str | None:
    """Dotted path of the first key ``name`` in a nested dict, breadth first."""
    queue: list[tuple[str, Any]] = [("", node)]
    while queue:
        prefix, value = queue.pop(0)
        if not isinstance(value, dict):
            continue
        if name in value:
            return prefix + name
        queue += [(f"{prefix}{key}.", child) for key, child in value.items()]
    return None


def override(cfg: DictConfig, group: str, name: str, value: Any) -> str:
    """The override that sets keyword ``name`` of the object built from ``cfg[group]`` (``data.download=true``)."""
    node = OmegaConf.to_container(cfg[group], resolve=False) if group in cfg else {}
    path = _key_path(node, name) or name
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    return f"{group}.{path}={'null' if value is None else text}"


def app_unavailable_error(cfg: DictConfig, *errors: tuple[str, AssetUnavailableError]) -> AssetUnavailableError:
    """One error for the app run: each ``(group, error)``'s fix spelled as overrides of config group ``group``."""
    texts = [err.with_fixes(lambda name, value, g=group: override(cfg, g, name, value)) for group, err in errors]
    message = texts[0] if len(texts) == 1 else "\n".join(["this run cannot get its files:", *(f"- {t}" for t in texts)])
    first = errors[0][1]
    return AssetUnavailableError(first.problem, arguments=first.arguments, also=first.also, message=message)
