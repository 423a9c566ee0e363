"""FakeQuantize: an observer plus quantize-dequantize with a straight-through gradient.

Example:
    >>> import torch
    >>> from lightning_quant.config import QuantSpec
    >>> fq = FakeQuantize(QuantSpec(symmetric=False, signed=False), name="demo")
    >>> y = fq(torch.linspace(0, 1, 5))            # observes, then fake-quantizes with the new range
    >>> fq.disable_observer(); bool(fq.calibrated)
    True
    >>> round(fq.scale.item() * 255, 4)
    1.0
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_quant.config import QuantSpec
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.quantizers.observers import build_observer
from lightning_quant.quantizers.state_flags import BufferFlags

__all__ = ["FakeQuantize"]


class FakeQuantize(BufferFlags, nn.Module):
    """Observe ranges and/or fake-quantize one tensor.

    State (all saved in ``state_dict``): ``scale``, ``zero_point``, the observer's buffers, and the flags
    ``observer_enabled``, ``fake_quant_enabled``, ``calibrated`` (switch them with the methods below: a compiled
    forward reads their Python mirrors, see :mod:`~lightning_quant.quantizers.state_flags`). With
    ``spec.learnable`` the scale is an ``nn.Parameter`` trained by LSQ once the observer is switched off.

    Args:
        spec: how the tensor is quantized.
        num_channels: channel count for per-channel specs.
        name: the model location, used in error messages and reports.

    Raises:
        FloatingPointError: NaN/inf reached the observer; the message names this quantizer.
        TypeError: the observer was given something other than a tensor (a numpy array, a list, None).
    """

    def __init__(self, spec: QuantSpec, num_channels: int | None = None, name: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.observer = build_observer(spec, num_channels)
        shape = (num_channels,) if spec.per_channel else ()
        scale = torch.ones(shape)
        if spec.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self._register_flag("observer_enabled", True)
        self._register_flag("fake_quant_enabled", True)
        self._register_flag("calibrated", False)
        self._stale = False  # observed since the qparams were last estimated (not state: recomputed from buffers)

    # -- switches -------------------------------------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> None:
        self._set_flag("observer_enabled", bool(enabled))

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True, estimate: bool = True) -> None:
        """Switch fake-quant on or off; switching it on estimates qparams from what was observed since the last
        estimate, at once (``estimate=False``: at the next forward, or after a distributed merge)."""
        self._set_flag("fake_quant_enabled", bool(enabled))
        if enabled and estimate and self._stale:
            self.refresh_qparams()

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        """Observe ``x`` (when the observer is on and ``observe``), then fake-quantize it (when on and calibrated).

        ``observe=False`` is for a second use of the same quantizer on values already on its grid (a max pool's
        output, see :func:`~lightning_quant.capture.patterns.shared_quant_points`): counting them again would skew
        histogram estimates.
        """
        observed = observe and self._flag("observer_enabled") and self._observe(x)
        leader = self.leader
        if leader is not None:  # see follow: mirror the leader's scale (it may have been set directly since)
            self._copy_qparams(leader)
            if leader._flag("observer_enabled"):
                return x  # the leader, which fixes these values downstream, is estimating: show it their whole range
        fake_quant = self._flag("fake_quant_enabled")
        if self._stale and fake_quant:
            self.refresh_qparams(observed=observed)
        if fake_quant and self._flag("calibrated"):
            scale = self.scale if leader is None else self.scale.clone()  # the leader may update ours in place
            return fake_quantize(x, scale, self.zero_point, self.spec, grad_scale=self._lsq_grad_scale(x))
        return x

    def _observe(self, x: torch.Tensor) -> bool:
        """Record ``x`` in the observer; True when it held values (the observer is then initialized)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"quantizer {self.name or '<unnamed>'!r} received a {type(x).__module__}.{type(x).__name__}, not a "
                "torch.Tensor; convert batches to tensors (e.g. torch.as_tensor in transform_fn or the dataset)."
            )
        try:
            self.observer(x)
        except FloatingPointError as err:
            raise FloatingPointError(
                f"{err} at quantizer {self.name or '<unnamed>'!r}: the model produced non-finite values during "
                "calibration/QAT. Check the input normalization and the learning rate, or exclude this layer."
            ) from None
        if x.numel() == 0:
            return False
        # estimated when next needed: at once in QAT (fake-quant on, see forward), once after calibration
        self._stale = True
        return True

    def refresh_qparams(self, observed: bool = False) -> None:
        """Set ``scale``/``zero_point`` from the observer's state (after observing, or after a distributed sync);
        a no-op while the observer has seen nothing.

        While fake-quant is off (calibration) observing only records statistics, and the estimate (a histogram
        search for ``percentile``/``mse``/``entropy``) runs once, here, when fake-quant is switched back on
        (``calibrate()`` does), or at the next forward with fake-quant on. ``observed``: the observer has just seen
        values, so it is initialized (saves a data-dependent check, which ``torch.compile`` cannot trace).
        """
        self._stale = False
        leader = self.leader
        if leader is not None:  # a follower (see follow) takes the leader's, estimated first if that is due
            if leader._stale:
                leader.refresh_qparams()
            self._copy_qparams(leader)
            return
        if not observed and not self.observer.initialized:
            return
        scale, zero_point = self.observer.calculate_qparams()
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.device))
            self.zero_point.copy_(zero_point.to(self.zero_point.device))
        self._set_flag("calibrated", True)
        for follower in self.__dict__.get("_followers", ()):
            follower._copy_qparams(self)

    # -- a scale taken from a quantizer downstream -----------------------------------------------------------
    @property
    def leader(self) -> FakeQuantize | None:
        """The quantizer whose scale this one takes (:meth:`follow`), or None."""
        return self.__dict__.get("_leader")

    def follow(self, leader: FakeQuantize | None) -> None:
        """Take ``leader``'s scale and zero point from now on; ``leader`` must fix these values again downstream, on
        the same grid (``None``: this quantizer's own scale again).

        For a concat on the DPU target (:mod:`~lightning_quant.quantizers.dpu_concat`): an input that only the concat
        reads takes the concat output's fix position. Fixing the input at that position and then the concat output
        again gives the same values as fixing the output alone (rounding to a grid twice is rounding once; a ReLU
        between them commutes with it), which is how vai_q_pytorch quantizes such inputs: through the concat's entry.
        So while ``leader``'s observer is on (calibration, QAT before the observers freeze), this quantizer passes its
        input through unchanged, and ``leader`` sees the inputs' whole range (fixed here first, they would be clipped to
        its current range, and its position could never grow); otherwise it fake-quantizes as usual, with the
        leader's scale, as the exported ``fix`` op of this input does.

        The scale, zero point and ``calibrated`` flag are copied at once (when ``leader`` is calibrated), whenever
        ``leader`` re-estimates them, and at every forward of this quantizer (so a scale set on ``leader`` directly
        reaches it too). This quantizer's observer still records its own range, for reports. The link is not state
        (``state_dict`` holds the copied values); it survives ``copy.deepcopy`` of the model.

        Example:
            >>> from lightning_quant.config import scheme_for_target
            >>> spec = scheme_for_target("dpu").activation
            >>> a, b = FakeQuantize(spec, name="a"), FakeQuantize(spec, name="b")
            >>> _ = a(torch.tensor([3.0])), b(torch.tensor([0.1]))
            >>> b.follow(a); b.scale.item() == a.scale.item(), b.leader is a
            (True, True)
            >>> x = torch.tensor([0.1]); b(x) is x  # a is still observing: passed through
            True
            >>> a.disable_observer(); b(torch.tensor([0.1])).item()  # on a's grid (2**-5)
            0.09375

        Raises:
            ValueError: ``leader`` is this quantizer or follows another one, others follow this quantizer, either
                scale is learnable, or the two quantize differently (bits, signedness, symmetry, per-tensor or
                per-channel, narrow range, scale type, rounding).
        """
        if leader is not None:
            self._check_leader(leader)
        old = self.leader
        if old is not None:
            old.__dict__["_followers"] = [f for f in old.__dict__.get("_followers", ()) if f is not self]
        self.__dict__.pop("_leader", None)
        if leader is None:
            return
        object.__setattr__(self, "_leader", leader)  # a plain reference, not a submodule
        leader.__dict__["_followers"] = [*leader.__dict__.get("_followers", ()), self]
        self._copy_qparams(leader)

    def _check_leader(self, leader: FakeQuantize) -> None:
        problem = None
        if leader is self:
            problem = "it is this quantizer"
        elif leader.leader is not None or self.__dict__.get("_followers"):
            problem = "chains are not supported: follow the last quantizer of the chain"
        elif self.spec.learnable or leader.spec.learnable:
            problem = "a learnable (LSQ) scale cannot be shared"
        else:
            grid = ("bits", "symmetric", "signed", "granularity", "narrow_range", "scale_type", "rounding")
            differ = [f for f in grid if getattr(self.spec, f) != getattr(leader.spec, f)]
            if differ or self.scale.shape != leader.scale.shape:
                problem = f"the specs differ in {', '.join(differ) or 'the scale shape'}"
        if problem is not None:
            raise ValueError(
                f"quantizer {self.name or '<unnamed>'!r} cannot follow {leader.name or '<unnamed>'!r}: {problem}."
            )

    def _copy_qparams(self, leader: FakeQuantize) -> None:
        if leader._flag("calibrated"):
            with torch.no_grad():
                self.scale.copy_(leader.scale)
                self.zero_point.copy_(leader.zero_point)
            self._set_flag("calibrated", True)

    def _lsq_grad_scale(self, x: torch.Tensor) -> float | None:
        if not self.spec.learnable:
            return None
        per_scale = x.numel() / max(self.scale.numel(), 1)
        return 1.0 / math.sqrt(per_scale * self.spec.quant_range()[1])

    def extra_repr(self) -> str:
        s = self.spec
        kind = "sym" if s.symmetric else "asym"
        sign = "int" if s.signed else "uint"
        return f"{self.name!r}, {sign}{s.bits} {kind} {s.granularity.value} {s.scale_type.value}"

    def describe(self) -> dict[str, Any]:
        """Scale/zero-point/range summary for reports."""
        scale = self.scale.detach().float()
        return {
            "scale_min": scale.min().item(),
            "scale_max": scale.max().item(),
            "zero_point": int(self.zero_point.flatten()[0].item()) if self.zero_point.numel() else 0,
            "range_min": self.observer.min_val.min().item(),
            "range_max": self.observer.max_val.max().item(),
        }
