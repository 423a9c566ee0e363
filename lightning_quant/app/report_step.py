"""The report of one run: ``report.json``, ``report.md`` and a per-layer SQNR plot (``sqnr.png``).

Float vs quantized accuracy, model sizes, calibration cost, per-layer SQNR and the parts kept in float, written
next to the run's other outputs. matplotlib is imported only when the plot is drawn.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lightning_quant import quantize
    >>> from lightning_quant.report import quantization_report
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> qmodel = quantize(net, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> sizes = model_sizes(qmodel)  # 108 7-bit weights (x86) + 4 scales + 4 float biases
    >>> sizes["float_bytes"], sizes["quantized_bytes"]
    (448, 127)
    >>> out = tempfile.mkdtemp()
    >>> paths = write_run_report(out, {"name": "demo", "float_top1": 90.0, "int8_top1": 89.5},
    ...                          quantization_report(qmodel, torch.randn(2, 3, 8, 8)))
    >>> sorted(paths)
    ['json', 'markdown', 'plot']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_quant.export._atomic import atomic_path
from lightning_quant.report import QuantReport

__all__ = ["accuracy_rows", "model_sizes", "plot_sqnr", "report_markdown", "summary_table", "write_run_report"]

_QUANT_BUFFER_MARKERS = ("fake_quant", "activation_quantizers", "observer")


def model_sizes(network: nn.Module) -> dict[str, int]:
    """Bytes of the float parameters and of the same model deployed with its quantized weights.

    Quantized weights count ``bits / 8`` bytes per element plus a float32 scale per channel; everything else
    (biases, unquantized layers) counts as float32. Quantizer state is not model data and is left out.
    """
    float_bytes = 0
    quantized_bytes = 0
    quantized_weights: dict[str, Any] = {}
    for name, module in network.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is None:
            continue
        prefix = f"{name}." if name else ""
        if getattr(module, "weight", None) is not None:
            quantized_weights[f"{prefix}weight"] = fq
        elif isinstance(getattr(module, "conv", None), nn.Module):  # QAT conv+BN: the conv holds the weight
            quantized_weights[f"{prefix}conv.weight"] = fq
    for name, param in network.named_parameters():
        if any(marker in name for marker in _QUANT_BUFFER_MARKERS):
            continue
        size = param.numel() * 4
        float_bytes += size
        fq = quantized_weights.get(name)
        quantized_bytes += size if fq is None else (param.numel() * fq.spec.bits + 7) // 8 + fq.scale.numel() * 4
    return {"float_bytes": float_bytes, "quantized_bytes": quantized_bytes}


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def accuracy_rows(metrics: dict[str, Any], delta_label: str = "delta") -> list[str]:
    """The float / INT8 top-1 and top-5 table (and the top-1 delta) of one run, as Markdown lines."""
    lines = ["| model | top-1 % | top-5 % |", "|---|---|---|"]
    for key in ("float", "int8"):
        if metrics.get(f"{key}_top1") is not None:
            lines.append(f"| {key} | {_fmt(metrics[f'{key}_top1'])} | {_fmt(metrics.get(f'{key}_top5'))} |")
    if metrics.get("float_top1") is not None and metrics.get("int8_top1") is not None:
        lines.append(f"| {delta_label} | {metrics['int8_top1'] - metrics['float_top1']:+.2f} | |")
    return lines


def accuracy_control_line(control: dict[str, Any]) -> str:
    """One line on what accuracy control chose (``metrics["accuracy_control"]``).

    Example:
        >>> accuracy_control_line({"kept_float": ["fc"], "quantized_layers": 20, "metric_float": 90.0,
        ...                        "metric_final": 89.7, "max_accuracy_drop": 0.5, "met": True})
        'accuracy control: 1 of 20 layers kept in float (fc); tuning top-1 90.00 -> 89.70, bound 0.5 points: met'
    """
    bits = control.get("fallback_weight_bits")
    chosen, where = (control["kept_float"], "kept in float") if bits is None else (
        control["higher_bits"], f"given {bits}-bit weights")  # fmt: skip
    names = ", ".join(chosen[:6]) + (", ..." if len(chosen) > 6 else "")
    return (
        f"accuracy control: {len(chosen)} of {control['quantized_layers']} layers {where}"
        + (f" ({names})" if names else "")
        + f"; tuning top-1 {control['metric_float']:.2f} -> {control['metric_final']:.2f}, bound "
        f"{control['max_accuracy_drop']:g} points: {'met' if control['met'] else 'NOT met'}"
    )


def range_search_line(chosen: dict[str, float], parameter: str = "percentile") -> str:
    """One line naming what the activation range search chose per group: the clipping percentile, or (power-of-two
    scales, ``parameter="fix_pos_offset"``) the shift of the calibrated fix positions.

    Example:
        >>> range_search_line({"signed": 99.5, "non_negative": 99.9})
        'activation range search: clipping percentile 99.5 for signed, 99.9 for non_negative activations'
        >>> range_search_line({"signed": 1, "non_negative": 0}, "fix_pos_offset")[25:]
        'fix position shift +1 for signed, +0 for non_negative activations (+1: half the scale)'
    """
    if parameter == "fix_pos_offset":
        parts = ", ".join(f"{p:+g} for {group}" for group, p in chosen.items())
        return f"activation range search: fix position shift {parts} activations (+1: half the scale)"
    parts = ", ".join(f"{p:g} for {group}" for group, p in chosen.items())
    return f"activation range search: clipping percentile {parts} activations"


def summary_table(metrics: dict[str, Any]) -> str:
    """A one-screen text table of the float and INT8 accuracy (and artefacts) of one run (the app prints it).

    Example:
        >>> print(summary_table({"name": "r20", "mode": "ptq", "target": "x86", "float_top1": 81.0, "int8_top1": 80.5}))
        r20 (mode=ptq, target=x86)
        | model | top-1 % | top-5 % |
        |---|---|---|
        | float | 81.00 | - |
        | int8 | 80.50 | - |
        | delta | -0.50 | |
    """
    lines = [f"{metrics['name']} (mode={metrics['mode']}, target={metrics['target']})", *accuracy_rows(metrics)]
    for fmt, art in (metrics.get("artefacts") or {}).items():
        if art.get("top1") is None:
            lines.append(f"| {fmt} artefact ({art['bytes'] / 1e6:.2f} MB) | - | |")
            continue
        lines.append(
            f"| {fmt} artefact ({art['bytes'] / 1e6:.2f} MB), on {art['verify_images']} val images | {art['top1']:.2f} "
            f"(int8 model on them: {art['model_top1']:.2f}) | |"
        )
    control = metrics.get("accuracy_control")
    if control:
        lines.append(accuracy_control_line(control))
    if metrics.get("range_search"):
        lines.append(range_search_line(metrics["range_search"], metrics.get("range_search_parameter", "percentile")))
    sizes = metrics.get("sizes")
    if sizes:
        lines.append(
            f"model size: float {sizes['float_bytes'] / 1e6:.2f} MB -> {sizes['quantized_bytes'] / 1e6:.2f} MB"
        )
    if metrics.get("calibration_seconds") is not None:
        lines.append(f"calibration: {metrics['calibration_seconds']:.1f} s; run: {metrics.get('wall_seconds', '-')} s")
    if metrics.get("output_dir"):
        lines.append(f"outputs: {metrics['output_dir']} (report.md, report.json, sqnr.png, metrics.json)")
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any], report: QuantReport | None, plot_name: str | None = None) -> str:
    """The run as Markdown: accuracy, sizes, calibration, artefacts, per-layer SQNR, float parts."""
    lines = [
        f"# {metrics.get('name', 'run')}: mode={metrics.get('mode', '-')}, target={metrics.get('target', '-')}",
        "",
    ]
    lines += accuracy_rows(metrics, delta_label="delta (points)")
    if metrics.get("accuracy_control"):
        line = accuracy_control_line(metrics["accuracy_control"])
        lines += ["", line[0].upper() + line[1:] + "."]  # not str.capitalize(): it lowercases "NOT met"
    if metrics.get("range_search"):
        line = range_search_line(metrics["range_search"], metrics.get("range_search_parameter", "percentile"))
        lines += ["", "A" + line[1:] + "."]
    sizes = metrics.get("sizes") or {}
    if sizes:
        fp, q = sizes["float_bytes"], sizes["quantized_bytes"]
        lines += ["", f"Model size: float {fp / 1e6:.2f} MB, quantized weights {q / 1e6:.2f} MB ({q / fp:.1%})."]
    if metrics.get("calibration_seconds") is not None:
        lines.append(
            f"Calibration: {metrics.get('calibration_batches')} batches of {metrics.get('batch_size')} "
            f"in {metrics['calibration_seconds']:.1f} s."
        )
    for fmt, art in (metrics.get("artefacts") or {}).items():
        lines.append(
            f"Artefact {fmt}: `{Path(art['path']).name}` {art['bytes'] / 1e6:.2f} MB, top-1 agreement with the "
            f"fake-quant model {_fmt(art.get('top1_agreement'), '.2%')}, top-1 {_fmt(art.get('top1'))} % on "
            f"{art.get('verify_images', '-')} val images (fake-quant model on them: {_fmt(art.get('model_top1'))} %)."
        )
        if art.get("deploy_check"):
            lines.append(
                f"Deploy check: the {fmt} file reproduces the fake-quant model op by op on the first example input "
                f"({art['deploy_check']['ops']} quantized ops; `deploy_check/report.txt`)."
            )
    if report is not None:
        lines += [
            "",
            f"Model output SQNR: {report.output_sqnr_db:.2f} dB ({report.median_note()}; fake-quant vs float, same "
            "batch).",
            "",
        ]
        if plot_name:
            lines += [f"![per-layer SQNR]({plot_name})", ""]
        lines += ["| layer | type | SQNR dB | weight scale min | weight scale max |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.name} | {r.kind} | {r.sqnr_db:.2f} | {r.weight_scale_min:.3e} | {r.weight_scale_max:.3e} |"
            for r in report.rows
        ]
        kept = {**report.untraced, **report.float_layers}
        if kept:
            lines += ["", "Kept in float:", *[f"- `{name}`: {why}" for name, why in kept.items()]]
    return "\n".join(lines) + "\n"


def plot_sqnr(report: QuantReport, path: str | os.PathLike[str], title: str = "") -> Path:
    """Horizontal bar chart of per-layer SQNR (dB), deepest layer at the bottom; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = report.rows
    height = max(3.0, 0.18 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height))
    try:
        names = [r.name for r in rows][::-1]
        values = [min(r.sqnr_db, 99.0) for r in rows][::-1]  # an exact layer (inf dB) is drawn at 99
        colors = ["tab:red" if v < 20 else "tab:orange" if v < 30 else "tab:blue" for v in values]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=6 if len(rows) > 30 else 8)
        ax.set_xlabel("SQNR (dB), fake-quant vs float; red < 20 dB, orange < 30 dB")
        ax.set_title(title or f"per-layer SQNR (model output {report.output_sqnr_db:.1f} dB)")
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def write_run_report(
    out_dir: str | os.PathLike[str], metrics: dict[str, Any], report: QuantReport | None
) -> dict[str, str]:
    """Write ``report.json`` (metrics + per-layer rows), ``report.md`` and, with a report, ``sqnr.png``.

    Returns the written paths by kind (``json``, ``markdown``, ``plot``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    plot_name = None
    if report is not None and report.rows:
        paths["plot"] = str(plot_sqnr(report, out / "sqnr.png", title=f"{metrics.get('name', '')} per-layer SQNR"))
        plot_name = "sqnr.png"
    payload = dict(metrics)
    if report is not None:
        payload["layers"] = [
            {
                "name": r.name,
                "type": r.kind,
                "sqnr_db": r.sqnr_db,
                "weight_scale_min": r.weight_scale_min,
                "weight_scale_max": r.weight_scale_max,
            }
            for r in report.rows  # fmt: skip
        ]
        payload["output_sqnr_db"] = report.output_sqnr_db
        payload["output_sqnr_median_db"] = report.output_sqnr_median_db
        payload["float_parts"] = {**report.untraced, **report.float_layers}
    for kind, name, text in (
        ("json", "report.json", json.dumps(payload, indent=2, default=str) + "\n"),
        ("markdown", "report.md", report_markdown(metrics, report, plot_name)),
    ):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(text)
        paths[kind] = str(out / name)
    return paths
