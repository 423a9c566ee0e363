"""Per-quantizer sensitivity: which weight or activation quantizer costs the most, alone and in context.

For every quantizer of a calibrated model two numbers are measured on the same batches:

- ``alone_sqnr_db``: the model-output SQNR with *only* this quantizer on (every other tensor in float): the
  error this tensor's quantization injects by itself;
- ``without_sqnr_db``: the output SQNR with *every quantizer but this one* on: how much keeping this tensor in
  float (or at higher precision) would recover. With ``metric_fn``, the metric in that state is measured too,
  for the ``metric_top`` quantizers with the lowest ``alone_sqnr_db`` (each costs one evaluation).

The same two numbers are measured per kind of tensor (``report.kinds``: all weight, all activation, all bias
quantizers at once), with the metric alone and without when ``metric_fn`` is given: which part of a scheme costs
the accuracy (e.g. on the DPU target: power-of-two weights, signed activations, or 8-bit biases).

The model is left exactly as it was (fake-quant switches restored). ``report.plot(path)`` writes a bar chart;
:func:`plot_quantizer_histograms` draws the value histograms of chosen quantizers (e.g. the most sensitive) with
their clipping range, which shows whether outliers or a too-wide range are to blame.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    >>> data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    >>> report = sensitivity_analysis(quantize(model, data, progress=False), data, progress=False)
    >>> len(report.rows), sorted({row.kind for row in report.rows})  # 2 weight + 3 activation quantizers
    (5, ['activation', 'weight'])
    >>> report.rows[0].alone_sqnr_db <= report.rows[-1].alone_sqnr_db  # most sensitive first
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_quant.algorithms.float_reference import float_parameters_swapped_in
from lightning_quant.algorithms.layerwise import bounded_inputs, check_positive
from lightning_quant.calibration import call_model
from lightning_quant.errors import NotCalibratedError
from lightning_quant.quantizers.fake_quant import FakeQuantize
from lightning_quant.quantizers.functional import sqnr_db
from lightning_quant.quantizers.prepare import iter_quantizers

__all__ = [
    "KindSensitivity",
    "QuantizerSensitivity",
    "SensitivityReport",
    "plot_quantizer_histograms",
    "sensitivity_analysis",
]


@dataclass
class QuantizerSensitivity:
    """One quantizer's row; ``metric_without`` is ``None`` when it was not evaluated."""

    name: str
    kind: str  # "weight" | "activation" | "bias"
    alone_sqnr_db: float
    without_sqnr_db: float
    metric_without: float | None = None


@dataclass
class KindSensitivity:
    """All quantizers of one kind switched together; the metrics are ``None`` without ``metric_fn``."""

    kind: str  # "weight" | "activation" | "bias"
    count: int
    alone_sqnr_db: float
    without_sqnr_db: float
    metric_alone: float | None = None
    metric_without: float | None = None


@dataclass
class SensitivityReport:
    """Rows sorted from the most to the least sensitive (lowest ``alone_sqnr_db`` first)."""

    rows: list[QuantizerSensitivity]
    all_on_sqnr_db: float
    metric_all_on: float | None = None
    metric_float: float | None = None
    notes: list[str] = field(default_factory=list)
    kinds: list[KindSensitivity] = field(default_factory=list)

    def most_sensitive(self, n: int = 5) -> list[QuantizerSensitivity]:
        return self.rows[:n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_on_sqnr_db": self.all_on_sqnr_db,
            "metric_all_on": self.metric_all_on,
            "metric_float": self.metric_float,
            "rows": [asdict(r) for r in self.rows],
            "kinds": [asdict(k) for k in self.kinds],
            "notes": list(self.notes),
        }

    def to_table(self, limit: int | None = 20) -> str:
        """Markdown table of the ``limit`` most sensitive quantizers (all when None)."""
        lines = [
            f"model output SQNR with every quantizer on: {self.all_on_sqnr_db:.2f} dB"
            + (
                f"; metric float {self.metric_float:.4g}, quantized {self.metric_all_on:.4g}"
                if self.metric_float is not None and self.metric_all_on is not None
                else ""
            ),  # fmt: skip
            "",
            *self._kinds_table(),
            "| quantizer | kind | SQNR alone dB | SQNR without it dB | metric without it |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows[:limit] if limit else self.rows:
            metric = "" if r.metric_without is None else f"{r.metric_without:.4g}"
            lines.append(f"| {r.name} | {r.kind} | {r.alone_sqnr_db:.2f} | {r.without_sqnr_db:.2f} | {metric} |")
        return "\n".join(lines)

    def _kinds_table(self) -> list[str]:
        if not self.kinds:
            return []
        lines = [
            "| kind (all at once) | quantizers | SQNR alone dB | SQNR without dB | metric alone | metric without |",
            "|---|---|---|---|---|---|",
        ]
        for k in self.kinds:
            alone, without = ("" if v is None else f"{v:.4g}" for v in (k.metric_alone, k.metric_without))
            sqnr = f"{k.alone_sqnr_db:.2f} | {k.without_sqnr_db:.2f}"
            lines.append(f"| {k.kind} | {k.count} | {sqnr} | {alone} | {without} |")
        return [*lines, ""]

    def __str__(self) -> str:
        return self.to_table()

    def plot(self, path: str | Path, limit: int = 40) -> Path:
        """Horizontal bar chart of ``alone_sqnr_db`` for the ``limit`` most sensitive quantizers (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows[:limit]
        path = Path(path)
        fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.5))
        colors = {"weight": "tab:blue", "activation": "tab:orange", "bias": "tab:green"}
        ax.barh([r.name for r in rows][::-1], [r.alone_sqnr_db for r in rows][::-1],
                color=[colors.get(r.kind, "grey") for r in rows][::-1])  # fmt: skip
        ax.set_xlabel("model output SQNR with only this quantizer on (dB; lower = more sensitive)")
        ax.set_title(f"Quantizer sensitivity (all on: {self.all_on_sqnr_db:.1f} dB; blue weights, orange activations)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _kind(name: str) -> str:
    if name.endswith("weight_fake_quant"):
        return "weight"
    if name.endswith("bias_fake_quant"):
        return "bias"
    return "activation"


@contextlib.contextmanager
def restored_switches(quantizers: list[FakeQuantize]) -> Iterator[None]:
    """Observers off inside the block; every fake-quant/observer switch restored on exit (errors included)."""
    saved = [(bool(fq.fake_quant_enabled.item()), bool(fq.observer_enabled.item())) for fq in quantizers]
    try:
        for fq in quantizers:
            fq.disable_observer()
        yield
    finally:
        for fq, (fake, obs) in zip(quantizers, saved, strict=True):
            fq.enable_fake_quant(fake, estimate=False)
            fq.enable_observer(obs)


@torch.no_grad()
def model_outputs(model: nn.Module, inputs: list[Any], action: str = "sensitivity_analysis") -> list[torch.Tensor]:
    """The model's float32 output tensor for each input (a clear error, naming ``action``, when it is not a tensor)."""
    outs = []
    for x in inputs:
        out = call_model(model, x)
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"{action} compares tensor outputs; the model returned {type(out).__name__}. Wrap it so "
                "forward returns one tensor (e.g. the logits)."
            )
        outs.append(out.detach().float())
    return outs


def outputs_sqnr(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """SQNR in dB of ``outputs`` against ``reference`` over all batches together."""
    return float(sqnr_db(torch.cat([r.flatten() for r in reference]), torch.cat([o.flatten() for o in outputs])))


def sensitivity_analysis(
    qmodel: nn.Module,
    data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 2,
    metric_fn: Callable[[nn.Module], float] | None = None,
    metric_top: int = 10,
    progress: bool = True,
) -> SensitivityReport:
    """Measure every quantizer's sensitivity on ``num_batches`` batches of ``data`` (see the module docstring).

    Args:
        qmodel: a calibrated (or QAT) model from ``quantize()`` / ``prepare()``.
        data: batches, as for ``quantize`` (evaluation or calibration data).
        transform_fn: maps one item of ``data`` to the model input.
        num_batches: batches used for the SQNR measurements.
        metric_fn: optional ``metric_fn(model) -> float`` (e.g. top-1 on a held-out loader; higher is better),
            evaluated with the model in float, fully quantized, without each of the ``metric_top`` most
            sensitive quantizers, and with each kind of quantizer alone and without (2 calls per kind present).
        metric_top: how many quantizers get a metric evaluation.
        progress: show a progress bar over quantizers.

    Returns:
        A :class:`SensitivityReport` (rows most sensitive first; ``.plot(path)``, ``.to_table()``, ``.to_dict()``).

    Raises:
        ValueError: no quantizer in ``qmodel``, empty data, ``num_batches``/``metric_top`` not an integer >= 1, or a
            model whose output is not a tensor.
        NotCalibratedError: a quantizer never saw data (calibrate first).
    """
    check_positive("num_batches", num_batches)
    check_positive("metric_top", metric_top)
    named = [(n, fq) for n, fq in iter_quantizers(qmodel)]
    if not named:
        raise ValueError("sensitivity_analysis: the model holds no quantizer; pass a model from quantize()/prepare().")
    missing = [n for n, fq in named if not fq.calibrated.item()]
    if missing:
        raise NotCalibratedError(
            f"sensitivity_analysis: {len(missing)} quantizer(s) never saw data ({', '.join(missing[:3])}); "
            "calibrate the model first (quantize() or calibrate())."
        )
    inputs = bounded_inputs(data, transform_fn, num_batches, qmodel, "sensitivity_analysis")
    quantizers = [fq for _, fq in named]
    was_training = qmodel.training
    qmodel.eval()

    def switch(on: Callable[[int], bool]) -> None:
        for i, fq in enumerate(quantizers):
            fq.enable_fake_quant(on(i))

    notes = []
    try:
        with restored_switches(quantizers):
            switch(lambda i: False)
            with float_parameters_swapped_in(qmodel):  # the float model, also after bias correction & co.
                reference = model_outputs(qmodel, inputs)
                metric_float = metric_fn(qmodel) if metric_fn else None
            switch(lambda i: True)
            all_on = outputs_sqnr(reference, model_outputs(qmodel, inputs))
            metric_all_on = metric_fn(qmodel) if metric_fn else None
            rows = []
            for k, (name, _) in enumerate(tqdm(named, desc="Sensitivity", disable=not progress, leave=False)):
                switch(lambda i, k=k: i == k)
                alone = outputs_sqnr(reference, model_outputs(qmodel, inputs))
                switch(lambda i, k=k: i != k)
                without = outputs_sqnr(reference, model_outputs(qmodel, inputs))
                rows.append(QuantizerSensitivity(name, _kind(name), alone, without))
            rows.sort(key=lambda r: r.alone_sqnr_db)
            kinds = _by_kind(qmodel, named, reference, inputs, switch, metric_fn)
            if metric_fn:
                index = {n: i for i, (n, _) in enumerate(named)}
                for row in rows[:metric_top]:
                    switch(lambda i, k=index[row.name]: i != k)
                    row.metric_without = float(metric_fn(qmodel))
                notes.append(f"metric evaluated without each of the {min(metric_top, len(rows))} most sensitive")
    finally:
        qmodel.train(was_training)
    return SensitivityReport(rows, all_on, metric_all_on, metric_float, notes, kinds)


def _by_kind(
    qmodel: nn.Module, named: list, reference: list[torch.Tensor], inputs: list[Any], switch: Callable,
    metric_fn: Callable[[nn.Module], float] | None,
) -> list[KindSensitivity]:  # fmt: skip
    kinds = [_kind(n) for n, _ in named]
    out = []
    for kind in ("weight", "activation", "bias"):
        if kind not in kinds:
            continue
        measured = []
        for on in (lambda i, kind=kind: kinds[i] == kind, lambda i, kind=kind: kinds[i] != kind):
            switch(on)
            measured.append(outputs_sqnr(reference, model_outputs(qmodel, inputs)))
            measured.append(float(metric_fn(qmodel)) if metric_fn else None)
        alone, metric_alone, without, metric_without = measured
        out.append(KindSensitivity(kind, kinds.count(kind), alone, without, metric_alone, metric_without))
    return out


def _clip_range(fq: FakeQuantize) -> tuple[float, float]:
    """The float range the quantizer represents (the widest channel's, for per-channel quantizers)."""
    qmin, qmax = fq.spec.quant_range()
    scale, zero_point = fq.scale.detach().float().flatten(), fq.zero_point.detach().float().flatten()
    return float(((qmin - zero_point) * scale).min()), float(((qmax - zero_point) * scale).max())


def plot_quantizer_histograms(
    qmodel: nn.Module,
    data: Iterable[Any],
    path: str | Path,
    names: Iterable[str],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    num_batches: int = 1,
    bins: int = 100,
    max_values: int = 1_000_000,
) -> Path:
    """PNG grid of histograms of the float values each named quantizer sees, with its clipping range (red).

    Weights and activations alike: the values are captured at the quantizer's input on ``num_batches`` batches
    (at most ``max_values`` per quantizer, evenly subsampled). Log-scaled counts show the tails.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from lightning_quant import quantize
        >>> data = [torch.randn(4, 3, 12, 12) for _ in range(2)]
        >>> qmodel = quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), data, progress=False)
        >>> report = sensitivity_analysis(qmodel, data, progress=False)
        >>> names = [row.name for row in report.most_sensitive(2)]
        >>> plot_quantizer_histograms(qmodel, data, tempfile.mkdtemp() + "/hist.png", names).suffix
        '.png'

    Raises:
        ValueError: an unknown quantizer name (the message lists some known ones), no names, or empty data.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_positive("num_batches", num_batches)
    quantizers = dict(iter_quantizers(qmodel))
    names = list(names)
    unknown = [n for n in names if n not in quantizers]
    if not names or unknown:
        known = ", ".join(list(quantizers)[:4])
        raise ValueError(f"plot_quantizer_histograms: unknown quantizer(s) {unknown} (known: {known}, ...); pass "
                         "names from iter_quantizers(qmodel) or a SensitivityReport's rows.")  # fmt: skip
    inputs = bounded_inputs(data, transform_fn, num_batches, qmodel, "plot_quantizer_histograms")
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if kwargs.get("observe") is False:  # a shared use (max pool output): values already counted
                return
            values = args[0].detach().float().flatten()
            step = max(1, values.numel() * num_batches // max_values)
            captured[name].append(values[::step].cpu())

        return record

    handles = [quantizers[n].register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        model_outputs(qmodel.eval(), inputs)
    finally:
        for handle in handles:
            handle.remove()
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        values = torch.cat(captured[name]).numpy()
        low, high = _clip_range(quantizers[name])
        ax.hist(values, bins=bins, color="tab:blue" if _kind(name) == "weight" else "tab:orange", log=True)
        for bound in (low, high):
            ax.axvline(bound, color="tab:red", linestyle="--", linewidth=1)
        clipped = float(((values < low) | (values > high)).mean())
        ax.set_title(f"{name}\nrange [{low:.3g}, {high:.3g}], clipped {clipped:.2%}", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
