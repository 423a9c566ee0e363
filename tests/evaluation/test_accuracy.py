"""top1_accuracy: counts, percentage, and the empty-data error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_quant.evaluation import top1_accuracy


def test_top1_accuracy_counts_and_rejects_empty():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    batches = [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))]
    result = top1_accuracy(model, batches)
    assert (result["correct"], result["images"]) == (2, 3) and abs(result["top1"] - 200 / 3) < 1e-9
    with pytest.raises(ValueError, match="no images"):
        top1_accuracy(model, [])
