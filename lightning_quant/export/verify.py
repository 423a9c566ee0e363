"""Verification gate for exported artefacts: run the file and the fake-quant model on the same batches.

Reports max/mean output difference (also in output quantization steps), top-1 agreement, accuracy of each
when labels are given, median latency at fixed threads, and file size against a float export when a float
model is given. Raises :class:`ExportVerificationError` when agreement falls below the threshold, or when
either side produced a NaN or inf output (a non-finite output never counts as agreeing).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize, export_torchscript
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    >>> data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    >>> qmodel = quantize(model, data, progress=False)
    >>> path = export_torchscript(qmodel, tempfile.mkdtemp() + "/model.pt", data[0], verify=False)
    >>> report = verify_export(qmodel, path, data, latency_runs=2)
    >>> report.top1_agreement
    1.0
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_quant.calibration import call_model, default_transform
from lightning_quant.export._jit_warnings import quiet_jit_deprecation

__all__ = [
    "gate_export",
    "gate_inputs",
    "ExportVerificationError",
    "VerificationReport",
    "load_runner",
    "runs_on_cpu_int8_kernels",
    "verify_export",
    "verify_onnx",
]


class ExportVerificationError(RuntimeError):
    """The exported artefact disagrees with the fake-quant model beyond the allowed threshold."""

    def at(self, temporary: str | Path, final: str | Path) -> ExportVerificationError:
        """The same error naming the file the user asked for instead of the exporter's temporary file (which is
        removed: an earlier file at ``final`` is kept as it was)."""
        text = str(self).replace(str(temporary), str(final))
        return ExportVerificationError(f"{text} Nothing was written; an earlier {Path(final).name} is kept as it was.")


@dataclass
class VerificationReport:
    path: str
    num_samples: int
    max_abs_diff: float
    mean_abs_diff: float
    max_diff_steps: float | None
    top1_agreement: float | None
    artifact_accuracy: float | None
    model_accuracy: float | None
    latency_ms: float | None
    float_latency_ms: float | None
    file_bytes: int
    float_file_bytes: int | None
    near_tie_flips: int | None = None
    nonfinite_outputs: int = 0  # NaN/inf values in the artefact's outputs
    model_nonfinite_outputs: int = 0  # NaN/inf values in the fake-quant model's outputs

    @property
    def tolerant_agreement(self) -> float | None:
        """Top-1 agreement counting near-tie flips as agreeing (what the gate checks)."""
        if self.top1_agreement is None:
            return None
        return self.top1_agreement + (self.near_tie_flips or 0) / max(self.num_samples, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        def fmt(v: Any, spec: str = ".4g") -> str:
            return "-" if v is None else format(v, spec)

        rows = [
            ("samples", str(self.num_samples)),
            ("max |diff|", f"{fmt(self.max_abs_diff)} ({fmt(self.max_diff_steps, '.2f')} output steps)"),
            ("mean |diff|", fmt(self.mean_abs_diff)),
            ("top-1 agreement", f"{fmt(self.top1_agreement, '.2%')} (near-tie flips: {fmt(self.near_tie_flips, 'd')})"),
            ("accuracy artefact / model", f"{fmt(self.artifact_accuracy, '.2%')} / {fmt(self.model_accuracy, '.2%')}"),
            ("latency ms (float)", f"{fmt(self.latency_ms, '.2f')} ({fmt(self.float_latency_ms, '.2f')})"),
            ("file bytes (float)", f"{self.file_bytes:,} ({fmt(self.float_file_bytes, ',')})"),
        ]
        return "\n".join(f"{k:<27}{v}" for k, v in [(f"verified {self.path}", "")] + rows)


def _flatten_inputs(inputs: Any) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    if isinstance(inputs, dict):
        return [], inputs
    if isinstance(inputs, tuple):
        return list(inputs), {}
    return [inputs], {}


def _onnx_feed(names: list[str], inputs: Any) -> dict[str, np.ndarray]:
    """Map model inputs onto ONNX graph inputs: top-level kwargs by name, anything else (nested tuples/dicts
    included) by the order of its tensor leaves, which is the order ``torch.export`` flattens them in."""
    from torch.utils._pytree import tree_leaves

    args, kwargs = _flatten_inputs(inputs)
    if kwargs and not args and set(names) <= set(kwargs):
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, leaves, strict=False)}


def load_runner(path: str | Path, threads: int = 2, *, int8_kernels: bool = True) -> Callable[[Any], np.ndarray]:
    """A callable that runs an exported file on model inputs: ``.onnx`` with onnxruntime, ``.pt`` with torch.jit,
    ``.xmodel`` (an uncompiled XIR graph) with the project's numpy interpreter.

    ``int8_kernels=False`` stops onnxruntime from fusing Q/DQ pairs into its integer kernels, so it evaluates the
    graph by its ONNX definition (what a GPU runtime such as TensorRT computes); the default runs the fused
    kernels a CPU deployment uses.

    Raises:
        ValueError: unknown file type.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not int8_kernels:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(inputs: Any) -> np.ndarray:
            return session.run(None, _onnx_feed(names, inputs))[0]

        return run_onnx
    if suffix in (".pt", ".pth", ".torchscript"):  # the suffixes export_torchscript writes
        with warnings.catch_warnings():
            quiet_jit_deprecation()
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_script(inputs: Any) -> np.ndarray:
            with _torch_threads(threads), torch.inference_mode():
                return call_model(module, inputs).detach().cpu().numpy()

        return run_script
    if suffix == ".xmodel":  # the uncompiled XIR graph, run by the project's numpy interpreter
        from lightning_quant.export.xmodel_interpreter import load_xmodel, run_xmodel

        graph = load_xmodel(path)

        def run_xir(inputs: Any) -> np.ndarray:
            args, kwargs = _flatten_inputs(inputs)
            tensors = [t.detach().cpu().float().numpy() for t in [*args, *kwargs.values()]]
            return np.asarray(run_xmodel(graph, *tensors)[0], dtype=np.float32)

        return run_xir
    raise ValueError(f"cannot verify {str(path)!r}: use a .onnx, .pt, .pth, .torchscript or .xmodel file.")


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, then give the caller its own setting back (a verification must not
    change the thread count the rest of the process trains or calibrates with)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _labels(item: Any, inputs: Any, batch: int) -> np.ndarray | None:
    """Class labels of an ``(input, label, ...)`` item: one per sample; None when the item is the input itself
    (``transform_fn`` returned it whole, e.g. a multi-input tuple) or holds no per-sample label tensor."""
    if inputs is item or not isinstance(item, (tuple, list)) or len(item) < 2:
        return None
    labels = item[1]
    if not isinstance(labels, torch.Tensor) or labels.shape != (batch,):
        return None
    return labels.cpu().numpy()


def _median_ms(run: Callable[[], Any], runs: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _activation_quantizers(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if hasattr(m, "observer") and hasattr(m, "scale") and not m.name.endswith(".weight")
    ]


def runs_on_cpu_int8_kernels(model: nn.Module) -> bool:
    """Whether the model's scheme is one onnxruntime's CPU integer kernels execute as deployed: uint8 activations
    (the ``x86`` targets). Signed activations (``tensorrt``) deploy on GPUs; on the CPU they only emulate them, and
    without VNNI onnxruntime's u8s8 kernels saturate on them, so they are verified against the ONNX definition."""
    quantizers = _activation_quantizers(model)
    return not quantizers or not any(q.spec.signed for q in quantizers)


def _output_step(model: nn.Module) -> float | None:
    """Quantization step of the model output when its last op is an activation quantizer."""
    quantizers = _activation_quantizers(model)
    return float(quantizers[-1].scale.detach().flatten()[0]) if quantizers else None


@dataclass
class _Tally:
    """Running comparison of artefact and model outputs over batches."""

    diff_max: float = 0.0
    diff_sum: float = 0.0
    count: int = 0
    agree: int = 0
    near_ties: int = 0
    total: int = 0
    correct_artifact: int = 0
    correct_model: int = 0
    labelled: int = 0
    nonfinite: int = 0
    model_nonfinite: int = 0

    def add(self, expected: np.ndarray, got: np.ndarray, labels: np.ndarray | None, tie: float) -> None:
        self.nonfinite += int(got.size - np.isfinite(got).sum())
        self.model_nonfinite += int(expected.size - np.isfinite(expected).sum())
        diff = np.abs(got - expected)
        if np.isfinite(diff).all():
            self.diff_max = max(self.diff_max, float(diff.max()) if diff.size else 0.0)
            self.diff_sum += float(diff.sum())
        else:  # max() would drop a NaN and report the finite part: the difference is unbounded
            self.diff_max = self.diff_sum = math.inf
        self.count += diff.size
        if expected.ndim != 2:
            return
        ref, art = expected.argmax(1), got.argmax(1)
        same = art == ref
        rows = np.arange(len(ref))
        margin = expected[rows, ref] - expected[rows, art]  # how far apart the model itself keeps the two classes
        self.agree += int(same.sum())
        self.near_ties += int((~same & (margin <= tie)).sum())
        self.total += expected.shape[0]
        if labels is not None:
            self.correct_artifact += int((art == labels).sum())
            self.correct_model += int((ref == labels).sum())
            self.labelled += labels.shape[0]


@torch.inference_mode()
def verify_export(
    qmodel: nn.Module,
    path: str | Path,
    data: Iterable[Any],
    *,
    transform_fn: Callable[[Any], Any] | None = None,
    min_top1_agreement: float = 0.99,
    max_diff_steps: float | None = None,
    tie_steps: float = 4.0,
    float_path: str | Path | None = None,
    threads: int = 2,
    latency_runs: int = 20,
    int8_kernels: bool | None = None,
) -> VerificationReport:
    """Compare an exported file with the fake-quant model on ``data`` (batches; labels used when present).

    Integer runtimes round a few values that lie within float noise of a rounding tie the other way (different
    summation order, ``x / s`` versus ``x * (1 / s)``); such one-step differences can flip the top-1 class of a
    sample whose two best logits the model itself keeps within a few output steps. Those flips are counted as
    ``near_tie_flips`` and do not fail the gate; every other flip does.

    Args:
        qmodel: the fake-quant model that was exported.
        path: the ``.onnx`` / ``.pt`` artefact.
        data: iterable of batches; ``(input, label)`` pairs also give accuracies.
        transform_fn: maps a batch to the model input (default: first element of pairs).
        min_top1_agreement: fail when the fraction of samples whose argmax agrees (near-tie flips included)
            falls below this (2-D outputs).
        max_diff_steps: also fail when the max difference exceeds this many output quantization steps.
        tie_steps: a flip is a near tie when the model's margin between the two classes is at most this many
            output quantization steps (0 counts every flip).
        float_path: a float export of the same model, for latency/size comparison.
        threads: intra-op threads for both runtimes (torch's own setting is restored afterwards).
        latency_runs: repetitions for the median latency on the first batch (0 skips timing).
        int8_kernels: run ONNX files with onnxruntime's fused integer kernels. Default: when the scheme is one
            they deploy on (:func:`runs_on_cpu_int8_kernels`); otherwise the graph is checked by its definition.

    Raises:
        ExportVerificationError: agreement or difference outside the thresholds, or a NaN/inf in the outputs of
            the artefact or of the model (never counted as agreeing; the report's ``nonfinite_outputs`` and
            ``model_nonfinite_outputs`` count them).
        ValueError: ``data`` is empty, or ``tie_steps`` is negative.
    """
    if tie_steps < 0:
        raise ValueError(f"tie_steps={tie_steps!r} must be >= 0 (0 counts every top-1 flip as a disagreement).")
    transform = transform_fn or default_transform
    if int8_kernels is None:
        int8_kernels = runs_on_cpu_int8_kernels(qmodel)
    run = load_runner(path, threads, int8_kernels=int8_kernels)
    step = _output_step(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    tally, first = _Tally(), None
    with _torch_threads(threads):
        for item in data:
            inputs = transform(item)
            first = inputs if first is None else first
            expected = call_model(qmodel, inputs).detach().float().cpu().numpy()
            got = np.asarray(run(inputs), dtype=np.float32)
            tally.add(expected, got, _labels(item, inputs, expected.shape[0]), tie_steps * (step or 0.0))
        qmodel.train(was_training)
        if first is None:
            raise ValueError("verification data is empty; pass at least one batch.")
        report = _report(path, tally, step)
        if latency_runs:
            report.latency_ms = _median_ms(lambda: run(first), latency_runs)
        if float_path is not None:
            report.float_file_bytes = os.path.getsize(float_path)
            if latency_runs:
                float_run = load_runner(float_path, threads)
                report.float_latency_ms = _median_ms(lambda: float_run(first), latency_runs)
    _check(report, min_top1_agreement, max_diff_steps)
    return report


def _report(path: str | Path, t: _Tally, step: float | None) -> VerificationReport:
    return VerificationReport(
        path=str(path),
        num_samples=t.total or t.count,
        max_abs_diff=t.diff_max,
        mean_abs_diff=t.diff_sum / max(t.count, 1),
        max_diff_steps=t.diff_max / step if step else None,
        top1_agreement=t.agree / t.total if t.total else None,
        artifact_accuracy=t.correct_artifact / t.labelled if t.labelled else None,
        model_accuracy=t.correct_model / t.labelled if t.labelled else None,
        latency_ms=None,
        float_latency_ms=None,
        file_bytes=os.path.getsize(path),
        float_file_bytes=None,
        near_tie_flips=t.near_ties if t.total else None,
        nonfinite_outputs=t.nonfinite,
        model_nonfinite_outputs=t.model_nonfinite,
    )


def _check(report: VerificationReport, min_top1_agreement: float, max_diff_steps: float | None) -> None:
    if report.nonfinite_outputs or report.model_nonfinite_outputs:
        raise ExportVerificationError(
            f"{report.path}: NaN/inf outputs on the {report.num_samples} verification sample(s): "
            f"{report.nonfinite_outputs} value(s) from the artefact, {report.model_nonfinite_outputs} from the "
            "fake-quant model; a non-finite output never counts as agreeing. Check the verification inputs for "
            "NaN/inf, then the model's calibration (a scale of 0 or inf) and the exporter, before deploying."
        )
    agreement = report.tolerant_agreement
    if agreement is not None and agreement < min_top1_agreement:
        raise ExportVerificationError(
            f"{report.path}: top-1 agreement with the fake-quant model on {report.num_samples} samples is "
            f"{agreement:.2%} (< {min_top1_agreement:.2%}; "
            f"{report.top1_agreement:.2%} before excusing {report.near_tie_flips} near-tie flips); max |diff| "
            f"{report.max_abs_diff:.4g}. The runtime does not compute what the model computes: check the target (x86 "
            "for onnxruntime on any x86-64 CPU; x86_vnni only where the CPU has VNNI) and report this with the model."
        )
    if max_diff_steps is not None and report.max_diff_steps is not None and report.max_diff_steps > max_diff_steps:
        raise ExportVerificationError(
            f"{report.path}: max difference is {report.max_diff_steps:.2f} output quantization steps "
            f"(> {max_diff_steps}); the artefact drifts from the fake-quant model."
        )


def gate_inputs(
    example_input: Any,
    verification_data: Iterable[Any] | None,
    transform_fn: Callable[[Any], Any] | None,
    max_batches: int,
) -> tuple[list[Any], Callable[[Any], Any]]:
    """What an exporter's verification gate runs on: the first ``max_batches`` items of ``verification_data`` (with
    ``transform_fn``, default: the first element of ``(input, label)`` pairs), or ``example_input`` alone.

    One example says little about a model whose outputs sit near its decision boundaries: rounding differences between
    runtimes then flip classes on a large share of images (a degraded ResNet50: 24-26 %) while the example agrees.

    Example:
        >>> gate_inputs("x", None, None, 8)[0], gate_inputs(None, [("a", 0), ("b", 1), ("c", 2)], None, 2)[0]
        (['x'], [('a', 0), ('b', 1)])

    Raises:
        ValueError: ``max_batches`` < 1, or ``verification_data`` that yields nothing.
    """
    if verification_data is None:
        return [example_input], lambda item: item
    if max_batches < 1:
        raise ValueError(f"max_verify_batches={max_batches} must be >= 1 (8 is typical).")
    batches = list(itertools.islice(iter(verification_data), max_batches))
    if not batches:
        raise ValueError("verification_data yielded no batch; pass a few held-out batches (or leave it None).")
    return batches, transform_fn or default_transform


def gate_export(
    qmodel: nn.Module,
    written: str | Path,
    final: str | Path,
    example_input: Any,
    *,
    verification_data: Iterable[Any] | None,
    transform_fn: Callable[[Any], Any] | None,
    max_batches: int,
    min_top1_agreement: float,
) -> VerificationReport:
    """An exporter's verification gate: :func:`verify_export` of the file just ``written`` (the exporter's temporary
    file) on :func:`gate_inputs`; a failure names the ``final`` path the user asked for.

    Raises:
        ExportVerificationError: the file disagrees with the model (nothing is written at ``final``).
        ValueError: see :func:`gate_inputs`.
    """
    batches, transform = gate_inputs(example_input, verification_data, transform_fn, max_batches)
    try:
        return verify_export(
            qmodel, written, batches, transform_fn=transform, min_top1_agreement=min_top1_agreement, latency_runs=0
        )
    except ExportVerificationError as err:
        raise err.at(written, final) from None


def verify_onnx(qmodel: nn.Module, path: str | Path, data: Iterable[Any], **kwargs: Any) -> VerificationReport:
    """:func:`verify_export` for an ONNX file (kept as a named entry point)."""
    return verify_export(qmodel, path, data, **kwargs)
