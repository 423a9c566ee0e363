"""Variants of the default call's bias correction on the peers' protocol: top-1 and agreement with the float model.

The default PTQ call corrects every Conv/Linear bias for the mean error its weight quantization causes, measured on
the quantized model's own inputs over the first ``QuantOptions.refinement_batches`` (4) calibration batches. This
script asks whether another variant keeps more accuracy on every offline model. Some variants are not options of the
library and are built here from its internals (:mod:`lightning_quant.algorithms.bias_correction`):

* ``default``: ``quantize(model, data, target=...)``, nothing else;
* ``off``: the same with ``QuantOptions(bias_correction=False)``;
* ``float_inputs``: no correction pass; during calibration every layer's float input is summed over all calibration
  images, and each bias is corrected by ``(W_q - W) @ mean input`` (free: no extra forward pass, every image);
* ``float_inputs_2se``: the same, but a channel is corrected only where its mean error exceeds twice its standard
  error across images (per-image errors from per-image channel sums; borders ignored for the variance);
* ``depthwise``: the default's correction on depthwise convolutions only (``groups == in_channels > 1``);
* ``fan_in<N>``: the default's correction only on layers with at most ``N`` weights per output channel (depthwise
  convs, stems, narrow pointwise layers);
* ``minmax`` / ``minmax_bc``: plain min/max activation ranges (the peers' ORT / PT2E choice) without / with the
  default's correction.

Protocol: ``bench_peers.py``'s (512 seeded train images in batches of ``--batch-size`` 32, the whole evaluation split,
each model in torch fake-quant). Agreement: percent of evaluation images classified as the float model does, a
measure of fidelity that label noise does not blur.

Usage:
    PYTHONPATH=. python scripts/bench_bias_correction.py --models resnet20 --targets x86 --variants default off
    PYTHONPATH=. python scripts/bench_bias_correction.py --models mobilenet_v2 resnet50 --targets x86 tensorrt
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_accuracy import MODELS, load
from paired_comparison import agreement
from results_io import RESULTS_DIR, run_header, write_results
from torch import nn

import lightning_quant.algorithms.bias_correction as bias_correction
from lightning_quant import QuantOptions, quantize, scheme_for_target
from lightning_quant.algorithms.layerwise import weight_layers
from lightning_quant.calibration import calibrate
from lightning_quant.config import QuantMode, resolve_scheme
from lightning_quant.quantizers import prepare
from lightning_quant.quantizers.modules import QuantLinear

VARIANTS = ("default", "off", "float_inputs", "float_inputs_2se", "depthwise", "fan_in32", "minmax", "minmax_bc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["resnet20"])
    parser.add_argument("--targets", nargs="+", choices=["x86", "x86_vnni", "tensorrt"], default=["x86", "tensorrt"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--calibration-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_bias_correction.json")
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant not in VARIANTS and not re.fullmatch(r"fan_in\d+", variant):
            parser.error(f"unknown variant {variant!r}; use {', '.join(VARIANTS)} or fan_in<N>.")
    return args


@contextlib.contextmanager
def correcting_only(keep: Any) -> Iterator[None]:
    """The default's bias correction limited to the layers ``keep(layer)`` accepts (the layer list it walks)."""
    every_layer = bias_correction.weight_layers
    bias_correction.weight_layers = lambda model, who: {n: m for n, m in every_layer(model, who).items() if keep(m)}
    try:
        yield
    finally:
        bias_correction.weight_layers = every_layer


def is_depthwise(layer: nn.Module) -> bool:
    groups = getattr(layer, "groups", 1)
    return groups > 1 and groups == layer.in_channels


@torch.no_grad()
def quantize_with_float_input_correction(
    model: nn.Module, data: Any, target: str, *, min_standard_errors: float | None
) -> nn.Module:
    """Calibrate with every layer's float input summed over the calibration images, then correct each bias by the
    weight error on the mean input (optionally only the channels whose mean error exceeds ``min_standard_errors``
    standard errors across images)."""
    qmodel = prepare(model, resolve_scheme(target, None, QuantMode.PTQ), mode=QuantMode.PTQ)
    layers = weight_layers(qmodel, "bench_bias_correction")
    sums: dict[str, dict[str, Any]] = {}

    def record(name: str) -> Any:
        def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].double()
            state = sums.setdefault(name, {"total": 0.0, "images": 0, "per_image": []})
            if isinstance(layer, QuantLinear):
                x = x.reshape(-1, x.shape[-1])
            else:
                state["per_image"].append(x.flatten(2).sum(2))  # per-image channel sums, for the variance
            state["total"] = state["total"] + x.sum(0, keepdim=True)
            state["images"] += x.shape[0]

        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        calibrate(qmodel, data, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    corrector = bias_correction._Corrector(qmodel, bias_correction.BiasCorrectionReport())
    for name, layer in layers.items():
        if name not in sums:
            continue
        state = sums[name]
        delta = (layer.weight_fake_quant(layer.weight) - layer.weight).double()
        if isinstance(layer, QuantLinear):
            positions = state["images"]
            error = F.linear(state["total"], delta).reshape(-1)
        else:
            y = layer._conv_forward(state["total"], delta, None)
            positions = state["images"] * y[0, 0].numel()
            error = y.movedim(1, -1).reshape(-1, y.shape[1]).sum(0)
        mean = error / positions
        if min_standard_errors is not None and not isinstance(layer, QuantLinear):
            per_image = torch.cat(state["per_image"])  # (images, in_channels)
            images, groups = per_image.shape[0], layer.groups
            kernel_sums = delta.flatten(2).sum(2).reshape(groups, delta.shape[0] // groups, -1)
            errors = torch.einsum("ngc,goc->ngo", per_image.reshape(images, groups, -1), kernel_sums)
            errors = errors.reshape(images, -1) / (positions / images)
            keep = mean.abs() > min_standard_errors * errors.std(0) / images**0.5
            mean = torch.where(keep, mean, torch.zeros_like(mean))
        corrector._set_bias(name, layer, mean)
    return qmodel.eval()


def quantize_variant(model: nn.Module, data: Any, target: str, variant: str) -> nn.Module:
    if variant == "default":
        return quantize(model, data, target=target, progress=False)
    if variant == "off":
        return quantize(model, data, target=target, options=QuantOptions(bias_correction=False), progress=False)
    if variant.startswith("float_inputs"):
        gate = 2.0 if variant == "float_inputs_2se" else None
        return quantize_with_float_input_correction(model, data, target, min_standard_errors=gate)
    if variant in ("minmax", "minmax_bc"):
        scheme = scheme_for_target(target, activation_observer="minmax")
        options = QuantOptions(bias_correction=variant == "minmax_bc")
        return quantize(model, data, scheme=scheme, options=options, progress=False)
    keep = is_depthwise if variant == "depthwise" else (lambda m, n=int(variant[6:]): m.weight[0].numel() <= n)
    with correcting_only(keep):
        return quantize(model, data, target=target, progress=False)


@torch.no_grad()
def predictions(model: nn.Module, loader: Any) -> np.ndarray:
    return torch.cat([model(x).argmax(1) for x, _ in loader]).numpy()


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | target | variant | top-1 % | agrees with float % | PTQ s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['variant']} | {r['top1']:.2f} | {r['agree_float']:.2f} | "
            f"{r['ptq_s']:.1f} |"
            if r["variant"] != "float"
            else f"| {r['model']} | - | float | {r['top1']:.2f} | - | - |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    header = run_header("scripts/bench_bias_correction.py", argv, args)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model, dm = load(name, args)
        labels = torch.cat([y for _, y in dm.val_dataloader()]).numpy()
        float_predicted = predictions(model, dm.val_dataloader())
        rows.append({"model": name, "variant": "float", "top1": agreement(float_predicted, labels)})
        for target in args.targets:
            for variant in args.variants:
                start = time.perf_counter()
                qmodel = quantize_variant(model, dm.calibration_dataloader(), target, variant)
                seconds = time.perf_counter() - start
                predicted = predictions(qmodel, dm.val_dataloader())
                top1, agree = agreement(predicted, labels), agreement(predicted, float_predicted)
                row = {"model": name, "target": target, "variant": variant, "ptq_s": seconds}
                rows.append(row | {"top1": top1, "agree_float": agree})
                write_results(args.out, {**header, "complete": False, "rows": rows}, table(rows))
                print(f"[bench] {name} {target} {variant} {top1:.2f} (agrees {agree:.2f} %)", file=sys.stderr)
    write_results(args.out, {**header, "complete": True, "rows": rows}, table(rows))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
