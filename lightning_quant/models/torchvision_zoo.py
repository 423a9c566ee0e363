"""torchvision classification models by name, with their weight enums, failing fast when offline.

Before anything is downloaded, the weight file is looked up in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``). When it is not there and the machine is offline (``LIGHTNING_QUANT_OFFLINE=1``,
or ``download.pytorch.org`` cannot be reached within a few seconds), :class:`WeightsUnavailableError` is raised at
once, naming the offline alternative, instead of a long download failure.

Example:
    >>> model = torchvision_model("resnet18", weights=None, num_classes=10)
    >>> model.fc.out_features
    10
    >>> weights_cache_file("mobilenet_v2", "DEFAULT").name
    'mobilenet_v2-7ebf99e0.pth'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from lightning_quant.downloads import is_offline  # re-exported: it was defined here

__all__ = ["WeightsUnavailableError", "is_offline", "torchvision_model", "weights_cache_file"]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the torch hub cache nor downloadable (offline)."""


def _weights_enum(name: str, weights: str) -> Any:
    from torchvision.models import get_model_weights  # lazy: torchvision is an optional dependency

    try:
        enum = get_model_weights(name)
    except ValueError as err:
        import torchvision.models as classification

        known = sorted(classification.list_models(module=classification))
        raise ValueError(f"unknown torchvision model {name!r}; use one of {', '.join(known)}.") from err
    if weights == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[weights.split(".")[-1]]
    except KeyError:
        raise ValueError(
            f"weights={weights!r} is not a weight of {name}; use 'DEFAULT', None or one of {[w.name for w in enum]}."
        ) from None


def weights_cache_file(name: str, weights: str = "DEFAULT") -> Path:
    """Where torch hub keeps (or would keep) the weight file of ``name`` / ``weights``.

    Example:
        >>> weights_cache_file("resnet50", "IMAGENET1K_V1").name
        'resnet50-0676ba61.pth'

    Raises:
        ValueError: unknown model or weight name.
    """
    import torch.hub

    url = _weights_enum(name, weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def torchvision_model(
    name: str,
    weights: str | None = "DEFAULT",
    num_classes: int | None = None,
    *,
    offline_hint: str | None = None,
) -> nn.Module:
    """A torchvision classification model with its pretrained weights (eval mode).

    Example:
        >>> torchvision_model("mobilenet_v2", weights=None).classifier[1].out_features
        1000

    Args:
        name: a ``torchvision.models.list_models()`` name (``resnet50``, ``mobilenet_v2``, ...).
        weights: ``DEFAULT``, a weight enum member name (``IMAGENET1K_V2``), or None for random init.
        num_classes: None keeps the weights' classes (1000 for ImageNet); with pretrained weights it must match.
        offline_hint: what to use instead when the weights cannot be had offline, e.g.
            ``recipe=resnet50_ptq_imagenette`` (added to the error message).

    Raises:
        ValueError: unknown model or weight name, or ``num_classes`` differs from the pretrained weights'.
        WeightsUnavailableError: the weights are not in the torch hub cache and the machine is offline; the
            message names the cache file, ``offline_hint`` and ``weights=null``.
    """
    from torchvision.models import get_model  # lazy: torchvision is an optional dependency

    enum = _weights_enum(name, "DEFAULT" if weights is None else weights)  # also checks the name
    if weights is None:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return get_model(name, weights=None, **kwargs).eval()
    classes = len(enum.meta.get("categories") or [])
    if num_classes is not None and classes and num_classes != classes:
        raise ValueError(
            f"{name} weights {enum} have {classes} classes but num_classes={num_classes}; drop num_classes "
            "(or set weights=null to train from scratch)."
        )
    cached = weights_cache_file(name, weights)
    if not cached.is_file() and is_offline(enum.url):
        alternative = f" Use {offline_hint} (offline weights and data) instead," if offline_hint else " Use"
        raise WeightsUnavailableError(
            f"{name} weights {enum} are not in the torch hub cache ({cached}) and this machine is offline, so they "
            f"cannot be downloaded.{alternative} copy {cached.name} into {cached.parent} (or set TORCH_HOME), or "
            "pass weights=null for a randomly initialized model."
        )
    return get_model(name, weights=enum).eval()
