"""CIFAR ResNet-20/32/44/56 (He et al. 2016, CIFAR variant with option-A shortcuts) and their published weights.

Three stages of 16/32/64 channels, ``n`` basic blocks each (depth = 6n + 2). Downsampling blocks use the
parameter-free option-A shortcut: stride-2 subsampling plus ``planes // 4`` zero channels on each side.
Parameter names match the published checkpoints ``resnet{20,32,44,56}-*.th`` of the ``akamaster/pytorch_resnet_cifar10``
release (a dict with ``state_dict`` whose keys are prefixed ``module.``); the prefix is stripped on load.
The weights file is, in order: ``weights_path=``, ``<shared>/weights/``, the torch hub cache
(``torch.hub.get_dir()/checkpoints``), else downloaded from :data:`CIFAR_RESNET_URLS` into that cache and checked
against :data:`CIFAR_RESNET_SHA256`.

Example:
    >>> import torch
    >>> model = cifar_resnet(20, pretrained=False)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> sum(p.numel() for p in model.parameters())
    269722
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.downloads import AssetUnavailableError, download_file, is_offline
from lightning_quant.models.weights import load_weights
from lightning_quant.paths import shared_dir

__all__ = [
    "CIFAR_RESNET_SHA256",
    "CIFAR_RESNET_URLS",
    "CIFAR_RESNET_WEIGHTS",
    "CifarResNet",
    "cifar_resnet",
    "cifar_resnet_weights_file",
    "load_cifar_resnet_weights",
]

CIFAR_RESNET_WEIGHTS: dict[int, str] = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
_RELEASE = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# where each file is downloaded from when it is neither given, shared nor cached (tests point these elsewhere)
CIFAR_RESNET_URLS: dict[int, str] = {depth: _RELEASE + name for depth, name in CIFAR_RESNET_WEIGHTS.items()}
# SHA-256 of the published files (== the files in <shared>/weights; each starts with the hex in its name)
CIFAR_RESNET_SHA256: dict[int, str] = {
    20: "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    32: "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
    44: "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
    56: "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
}


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        needs_shortcut = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = _PadShortcut(planes // 4) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet: conv 3x3 (16) -> 3 stages of ``blocks`` basic blocks -> global average pool -> linear.

    Example:
        >>> CifarResNet(blocks=3).linear.in_features
        64

    Args:
        blocks: basic blocks per stage (``(depth - 2) / 6``: 3 for ResNet-20, 9 for ResNet-56).
        num_classes: outputs of the final linear layer.

    Raises:
        ValueError: ``blocks`` or ``num_classes`` is not a positive integer.
    """

    def __init__(self, blocks: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        for name, value in (("blocks", blocks), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [_BasicBlock(in_planes, planes, stride)]
        layers += [_BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet_weights_file(depth: int = 20, *, progress: bool = True) -> Path:
    """The published CIFAR-10 weights of ResNet-``depth``: shared folder, else torch hub cache, else downloaded.

    A download goes to ``torch.hub.get_dir()/checkpoints/<file>`` (atomically, after its SHA-256 was checked), so
    later calls find it there.

    Example:
        >>> cifar_resnet_weights_file(20).name  # doctest: +SKIP
        'resnet20-12fca82f.th'

    Raises:
        ValueError: ``depth`` has no published weights.
        AssetUnavailableError: (a ``FileNotFoundError``) not shared nor cached, and offline or the download failed;
            the message names ``weights_path=``, ``LIGHTNING_QUANT_SHARED`` and the cache folder.
        ChecksumMismatchError: the downloaded file is not the published one (nothing is cached).
    """
    if depth not in CIFAR_RESNET_WEIGHTS:
        raise ValueError(f"no published weights for depth={depth}; use one of {sorted(CIFAR_RESNET_WEIGHTS)}.")
    name = CIFAR_RESNET_WEIGHTS[depth]
    shared = shared_dir()
    if shared is not None and (shared / "weights" / name).is_file():
        return shared / "weights" / name
    import torch.hub

    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return cached
    url = CIFAR_RESNET_URLS[depth]
    reason = "this machine is offline" if is_offline(url) else None
    if reason is None:
        try:
            return download_file(url, cached, CIFAR_RESNET_SHA256[depth], progress=progress)
        except OSError as err:  # urllib.error.URLError is an OSError: no route, DNS, HTTP 404, timeout
            reason = f"the download failed ({err})"
    shared_weights = shared / "weights" if shared else "none found"
    raise AssetUnavailableError(
        f"cifar_resnet({depth}): weights file {name} is not in the shared folder ({shared_weights}) nor in the torch "
        f"hub cache ({cached.parent}), and {reason}, so it cannot be downloaded from {url}.",
        arguments={"weights_path": f"/path/to/{name}", "pretrained": False},
        also=f"copy {name} into {cached.parent}, or set LIGHTNING_QUANT_SHARED=/path/to/shared (the folder whose "
        "weights/ holds it)",
    )


def load_cifar_resnet_weights(model: CifarResNet, path: str | os.PathLike[str]) -> CifarResNet:
    """Load a published CIFAR ResNet checkpoint (``{'state_dict': {'module.conv1.weight': ...}}``) into ``model``.

    Example:
        >>> import tempfile
        >>> src = cifar_resnet(20, pretrained=False)
        >>> f = tempfile.mkdtemp() + "/r20.th"
        >>> torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, f)
        >>> dst = load_cifar_resnet_weights(cifar_resnet(20, pretrained=False), f)
        >>> bool(torch.equal(dst.linear.weight, src.linear.weight))
        True

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: keys or shapes do not match (e.g. a ResNet-56 file loaded into a ResNet-20).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR ResNet weights not found: {path}; pass the path of a resnetNN-*.th file.")
    return load_weights(model, path)  # type: ignore[return-value]


def cifar_resnet(
    depth: int = 20,
    *,
    pretrained: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
    num_classes: int = 10,
) -> CifarResNet:
    """Build CIFAR ResNet-``depth``, loading the offline CIFAR-10 weights when ``pretrained`` (eval mode).

    Example:
        >>> model = cifar_resnet(56, pretrained=False)
        >>> len(model.layer1)
        9

    Args:
        depth: 20, 32, 44 or 56 for the published weights; any ``6n + 2`` with ``pretrained=False``.
        pretrained: load ``weights_path``, else the published weights (:func:`cifar_resnet_weights_file`: shared
            folder, torch hub cache, or a checked download).
        weights_path: explicit checkpoint file (wins over the shared folder, the cache and the download).
        num_classes: must stay 10 with the published weights.

    Raises:
        ValueError: ``depth`` is not ``6n + 2``, or has no published weights while ``pretrained`` without a path.
        FileNotFoundError: ``weights_path`` does not exist.
        AssetUnavailableError: (a ``FileNotFoundError``) no weights file given, shared or cached, and offline; the
            message names ``weights_path``, the shared folder and the cache.
        ChecksumMismatchError: a downloaded file is not the published one.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} must be 6n + 2 (20, 32, 44, 56 have published weights).")
    model = CifarResNet(blocks=(depth - 2) // 6, num_classes=num_classes)
    if pretrained:
        if weights_path is None and depth not in CIFAR_RESNET_WEIGHTS:
            raise ValueError(
                f"no published weights for depth={depth}; use one of {sorted(CIFAR_RESNET_WEIGHTS)}, pass "
                "weights_path=..., or pretrained=False."
            )
        load_cifar_resnet_weights(model, weights_path if weights_path is not None else cifar_resnet_weights_file(depth))
    return model.eval()
