"""Top-1 accuracy of a classifier over labelled batches: the evaluation harness of scripts, the app and tests.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> top1_accuracy(model, [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))])["images"]
    8
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_quant.calibration import default_transform, move_to_device

__all__ = ["top1_accuracy"]


@torch.inference_mode()
def top1_accuracy(
    model: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = False,
    desc: str = "Evaluating",
) -> dict[str, float]:
    """Top-1 accuracy (percent) of a classifier over ``(images, labels)`` batches, in eval mode.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> batches = [(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))]
        >>> sorted(top1_accuracy(model, batches))
        ['correct', 'images', 'seconds', 'top1']

    Args:
        model: returns ``(N, num_classes)`` logits.
        data: iterable of ``(images, labels)`` batches (e.g. a val DataLoader).
        num_batches: stop after this many batches (all when None).
        progress: show a tqdm bar.
        desc: bar label.

    Returns:
        ``{"top1": percent, "correct": n, "images": n, "seconds": wall time}``.

    Raises:
        ValueError: ``data`` yielded no images.
    """
    from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter(data) early, starting extra workers

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    correct = seen = 0
    start = time.perf_counter()
    try:
        for i, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, unit="batch")):
            if num_batches is not None and i >= num_batches:
                break
            images, labels = move_to_device(default_transform(batch), device), batch[1].to(device)
            correct += int((model(images).argmax(dim=1) == labels).sum())
            seen += labels.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no images were evaluated: the data yielded no batch.")
    return {"top1": 100.0 * correct / seen, "correct": correct, "images": seen, "seconds": time.perf_counter() - start}
