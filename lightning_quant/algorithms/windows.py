"""Random spatial windows of a conv layer's held samples: cheaper steps for layer-wise tuning (AdaRound, fast finetune).

A tuning step needs the layer's output error, not whole feature maps. For a 2-D convolution, any ``size x size``
block of output pixels depends only on one block of the (zero-padded) input, so a step can run the convolution on
that block alone (padding 0) and compare it with the same block of the float target. On MobileNetV2 at 224 px the
first layers' 112 x 112 maps cost 49x less per step with 16-pixel windows; the loss is the same function of the
weights, sampled over positions as well as images.

The held input is zero-padded once (a zero stays exactly zero through the layer's input fake-quant, whose range
always holds zero), so whole-map evaluation (:meth:`HeldSamples.forward` on every row) gives exactly the layer's
own output. Layers where windows do not apply (linear, 1-D/3-D conv, ``padding="same"``, non-zero padding modes,
or maps no larger than the window) fall back to whole maps.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant.config import scheme_for_target
    >>> from lightning_quant.quantizers.modules import quantized_layer_from_float
    >>> layer = quantized_layer_from_float(nn.Conv2d(3, 4, 3, padding=1), scheme_for_target("x86"), "conv")
    >>> x = torch.randn(8, 3, 20, 20); y = layer(x).detach()
    >>> held = HeldSamples.of(layer, x, y, window=8)
    >>> xw, yw = held.draw(torch.arange(4), torch.Generator().manual_seed(0))
    >>> tuple(xw.shape), tuple(yw.shape)
    ((4, 3, 10, 10), (4, 4, 8, 8))
    >>> weight = layer.weight_fake_quant(layer.weight)  # whole maps, padded once: exactly the layer's output
    >>> torch.allclose(held.forward(layer, held.x, weight, layer.bias), y, atol=1e-6)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_quant.algorithms.layerwise import check_positive, held_mse, layer_forward, pairs_mse
from lightning_quant.quantizers.modules import QuantConv2d

__all__ = ["HeldSamples", "check_window"]


def check_window(window: int | None) -> None:
    """``window`` must be None (whole maps) or an integer >= 1.

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if window is not None:
        check_positive("window", window)


def _windowable(layer: nn.Module, y: torch.Tensor, window: int | None) -> bool:
    return (
        window is not None
        and isinstance(layer, QuantConv2d)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and y.dim() == 4
        and max(y.shape[-2:]) > window
    )


@dataclass
class HeldSamples:
    """One layer's held inputs ``x`` and float targets ``y``, with random ``window``-pixel output blocks per step.

    When windows apply, ``x`` is the zero-padded input, ``geometry`` the conv's (stride, dilation, kernel size) and
    :meth:`forward` runs the convolution without padding; otherwise ``x`` is the input itself, ``window`` is None
    and :meth:`forward` is the layer's own computation.
    """

    x: torch.Tensor
    y: torch.Tensor
    window: int | None = None
    geometry: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def of(cls, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, window: int | None) -> HeldSamples:
        """Hold ``x`` / ``y`` for ``layer``, padding ``x`` once when ``window``-pixel blocks apply to it."""
        if not _windowable(layer, y, window):
            return cls(x, y)
        ph, pw = layer.padding
        geometry = (tuple(layer.stride), tuple(layer.dilation), tuple(layer.kernel_size))
        return cls(F.pad(x, (pw, pw, ph, ph)), y, window, geometry)

    @property
    def rows(self) -> int:
        """Number of held samples (dim 0)."""
        return self.x.shape[0]

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` of the input and target, cut to one random output block (the same block for every row)."""
        if self.window is None:
            return self.x[idx], self.y[idx]
        (sh, sw), (dh, dw), (kh, kw) = self.geometry
        out_h, out_w = self.y.shape[-2:]
        size_h, size_w = min(self.window, out_h), min(self.window, out_w)
        top = int(torch.randint(out_h - size_h + 1, (1,), generator=generator))
        left = int(torch.randint(out_w - size_w + 1, (1,), generator=generator))
        rows = (size_h - 1) * sh + dh * (kh - 1) + 1
        cols = (size_w - 1) * sw + dw * (kw - 1) + 1
        x = self.x[idx, :, top * sh : top * sh + rows, left * sw : left * sw + cols]
        return x, self.y[idx, :, top : top + size_h, left : left + size_w]

    def forward(
        self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``layer``'s computation on held rows or blocks ``x`` (already padded when windows apply)."""
        if self.window is None:
            return layer_forward(layer, x, weight, bias)
        x = layer._maybe_quantize_input(x)
        return F.conv2d(x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)

    def probe(self, batch_size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed sample for comparing iterates cheaply: every held row, in chunks of ``batch_size`` rows, each
        chunk cut to its own random output block (:meth:`draw`). Only for windows: whole maps need no copy."""
        if self.window is None:
            raise ValueError("HeldSamples.probe is for windowed samples; use HeldSamples.mse on whole maps.")
        starts = range(0, self.rows, batch_size)
        return [self.draw(torch.arange(i, min(i + batch_size, self.rows)), generator) for i in starts]

    def probe_mse(
        self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
        probe: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> float:  # fmt: skip
        """Mean squared error of :meth:`forward` over the blocks of :meth:`probe` (summed in float64)."""
        return pairs_mse(lambda rows: self.forward(layer, rows, weight, bias), probe)

    def mse(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, batch_size: int) -> float:
        """Mean squared error of :meth:`forward` with ``weight`` / ``bias`` against ``y``, over every held sample
        and pixel (whole maps, in chunks of ``batch_size`` rows)."""
        return held_mse(lambda rows: self.forward(layer, rows, weight, bias), self.x, self.y, batch_size)
