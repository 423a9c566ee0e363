"""Accuracy of our PTQ methods under one protocol: INT8 per-channel / per-tensor / power-of-two, W4A8, W6A8.

``default_<target>`` (``default_x86``, ``default_x86_vnni``, ``default_tensorrt``) is the library's default call,
``quantize(model, data, target=<target>)`` with nothing else: the scheme and options a user gets without choosing.
Every other method states its settings in full: activations use min/max ranges unless an estimator token names
another, and bias correction runs only with ``bc`` (the defaults' choices are not applied behind a method's name).

Protocol (the same for every method): ``--calibration-size`` (512) images drawn from the *train* split with a fixed
seed, top-1 on the full evaluation split (CIFAR-10 test, Imagenette val) unless ``--limit-batches`` is given
(then the JSON marks the run as partial). Methods are ``<scheme>[+<algorithm>...]``:

* schemes: ``int8_pc`` (x86_vnni: int8 per-channel weights, uint8 activations), ``int7_pc`` (x86, the recipes'
  target: 7-bit per-channel weights), ``trt`` (tensorrt: int8 symmetric activations),
  ``int8_pt`` (``int8_pc`` with per-tensor
  weights), ``pow2`` (the Vitis AI DPU scheme), ``w4a8`` / ``w6a8`` (4/6-bit per-channel weights, 8-bit activations);
* algorithms: ``relu`` (ReLU6 -> ReLU, so CLE pairs MobileNet layers), ``cle`` (cross-layer equalization), ``rs``
  (activation range search: the clipping percentile per group of activations, with ``pct``; with ``pow2``, the fix
  position shift per group), ``bc`` (bias correction), ``adaround`` (``ps``: with every calibration image's error
  weighing the same), ``ff`` (fast finetune);
* mixed precision: ``dw8`` keeps depthwise convolutions (``groups == in_channels > 1``) at 8-bit weights
  (``layer_weight_bits``), the usual choice for W4A8 MobileNets; ``fl8`` keeps the first and the last Conv/Linear
  layer at 8-bit weights, the convention of the low-bit literature (AdaRound, BRECQ report W4A8 that way);
* activation range estimators (default min/max): ``mse`` (MSE-optimal clipping), ``pct`` (99.99th percentile;
  ``pct99.9`` names another), ``kl`` (entropy / KL), ``meanmm`` (the mean of every image's min and max, NNCF's
  activation default). Drops are against the unmodified float model.

Usage:
    PYTHONPATH=. python scripts/bench_accuracy.py --models resnet20                 # CIFAR-10, the default methods
    PYTHONPATH=. python scripts/bench_accuracy.py --models mobilenet_v2 --methods int8_pt int8_pt+relu+cle+bc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from results_io import RESULTS_DIR, run_header, write_results

from lightning_quant import QuantOptions, quantize, scheme_for_target
from lightning_quant.config import Granularity
from lightning_quant.evaluation import top1_accuracy
from lightning_quant.quantizers.prepare import prepare_info

CIFAR_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")  # 32 and 44: no recipe of ours covers them
MODELS = (*CIFAR_MODELS, "mobilenet_v2", "resnet50")
DEFAULT_METHODS = ("int8_pc", "int8_pt", "pow2", "w6a8", "w4a8", "w4a8+adaround")
ALGORITHMS = {
    "relu": "replace_relu6",
    "cle": "cross_layer_equalization",
    "rs": "range_search",
    "bc": "bias_correction",
    "adaround": "adaround",
    "ps": "adaround_per_sample",
    "ff": "fast_finetune",
}
ESTIMATORS = {"mse": "mse", "pct": "percentile", "kl": "entropy", "meanmm": "mean_minmax"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["resnet20"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--calibration-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit-batches", type=int, default=None, help="smoke runs only: evaluate fewer batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_accuracy.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out; measure only the rest")
    parser.add_argument(
        "--replace", action="store_true", help="with --resume: measure --methods again and replace their rows"
    )
    return parser.parse_args(argv)


def scheme_for(name: str, **overrides: Any) -> tuple[Any, str]:
    """The QuantScheme of a scheme name (plus ``scheme_for_target`` overrides), and the target it deploys on."""
    if name == "int8_pc":
        return scheme_for_target("x86_vnni", **overrides), "x86_vnni"
    if name == "int7_pc":
        return scheme_for_target("x86", **overrides), "x86"
    if name == "trt":
        return scheme_for_target("tensorrt", **overrides), "tensorrt"
    if name == "int8_pt":
        return scheme_for_target("x86_vnni", weight_granularity=Granularity.PER_TENSOR, **overrides), "x86_vnni"
    if name == "pow2":
        return scheme_for_target("dpu", **overrides), "dpu"
    if name in ("w4a8", "w6a8"):
        return scheme_for_target("x86_vnni", weight_bits=int(name[1]), **overrides), "x86_vnni"
    raise ValueError(f"unknown scheme {name!r}; use int8_pc, int7_pc, trt, int8_pt, pow2, w4a8 or w6a8.")


DEFAULT_CALLS = {"default_x86": "x86", "default_x86_vnni": "x86_vnni", "default_tensorrt": "tensorrt"}


def parse_method(method: str) -> tuple[str, dict[str, Any], QuantOptions]:
    """``(scheme name, scheme overrides, quantize() options)`` of ``<scheme>[+<token>...]``; a ``default_<target>``
    method has neither overrides nor options (:data:`DEFAULT_CALLS`).

    Raises:
        ValueError: an unknown token, two activation estimators, or options that cannot go together (``ps``
            without ``adaround``), before anything is measured.
    """
    if method in DEFAULT_CALLS:
        return method, {}, QuantOptions()
    scheme, *tokens = method.split("+")
    overrides: dict[str, Any] = {}
    for token in (t for t in tokens if t not in ALGORITHMS and t not in MIXED_PRECISION):
        name, value = ("pct", token[3:]) if token.startswith("pct") and token[3:] else (token, None)
        if name not in ESTIMATORS or (value is not None and not value.replace(".", "", 1).isdigit()):
            known = ", ".join([*ALGORITHMS, *ESTIMATORS, "pct<percentile>", *MIXED_PRECISION])
            raise ValueError(f"unknown algorithm {token!r} in {method!r}; use {known}.")
        if overrides:
            choices = ", ".join(ESTIMATORS)
            raise ValueError(f"{method!r} names more than one activation estimator; pick one of {choices}.")
        overrides["activation_observer"] = ESTIMATORS[name]
        if value is not None:
            overrides["activation_percentile"] = float(value)
    if not overrides and scheme != "pow2":  # stated in full: min/max unless a token names another estimator
        overrides["activation_observer"] = "minmax"
    scheme_for(scheme, **overrides)  # QuantSpec validates the percentile
    switches = {ALGORITHMS[t]: True for t in tokens if t in ALGORITHMS}
    return scheme, overrides, QuantOptions(**{"bias_correction": False, **switches})


def load(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    common = dict(batch_size=args.batch_size, calibration_size=args.calibration_size, seed=args.seed, num_workers=2)
    if name in CIFAR_MODELS:
        from lightning_quant.data.cifar10 import CIFAR10DataModule
        from lightning_quant.models.cifar_resnet import cifar_resnet

        dm, model = CIFAR10DataModule(**common), cifar_resnet(int(name[6:]))
    else:
        from lightning_quant.data import ImagenetteDataModule
        from lightning_quant.models import IMAGENETTE_EVAL_SIZES, IMAGENETTE_MODELS

        dm, model = ImagenetteDataModule(**common, **IMAGENETTE_EVAL_SIZES[name]), IMAGENETTE_MODELS[name]()
    dm.setup()
    return model.eval(), dm


def run_method(model: torch.nn.Module, dm: Any, method: str, args: argparse.Namespace) -> dict[str, Any]:
    scheme_name, overrides, options = parse_method(method)
    if scheme_name in DEFAULT_CALLS:  # the call a user makes without choosing anything
        start = time.perf_counter()
        qmodel = quantize(model, dm.calibration_dataloader(), target=DEFAULT_CALLS[scheme_name], progress=False)
        seconds = time.perf_counter() - start
        top1 = top1_accuracy(qmodel, dm.val_dataloader(), num_batches=args.limit_batches, progress=False)
        info = prepare_info(qmodel)
        notes = f"{info.scheme.activation.observer}, {', '.join(info.refinements) or 'no refinement'}"
        row = {"method": method, "target": DEFAULT_CALLS[scheme_name], "top1": top1["top1"], "images": top1["images"]}
        return row | {"ptq_s": seconds, "default": notes}
    scheme, target = scheme_for(scheme_name, **overrides)
    eight_bit = [
        name for token in method.split("+") if token in MIXED_PRECISION for name in MIXED_PRECISION[token](model)
    ]
    layer_weight_bits = dict.fromkeys(eight_bit, 8) if eight_bit else None
    start = time.perf_counter()
    qmodel = quantize(
        model,
        dm.calibration_dataloader(),
        scheme=scheme,
        options=options,
        layer_weight_bits=layer_weight_bits,
        progress=False,
    )
    seconds = time.perf_counter() - start
    top1 = top1_accuracy(qmodel, dm.val_dataloader(), num_batches=args.limit_batches, progress=False)
    row = {"method": method, "target": target, "top1": top1["top1"], "images": top1["images"], "ptq_s": seconds}
    search = prepare_info(qmodel).range_search
    if search is not None:  # what the range search chose, per group of activations
        chosen = search.chosen.items()
        row["range_search"] = {g: {search.parameter: p, "quantizers": len(search.groups[g])} for g, p in chosen}
    return row


def depthwise_layers(model: torch.nn.Module) -> list[str]:
    """Names of the depthwise convolutions (one input channel per group, more than one group)."""
    convs = ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    return [n for n, m in convs if m.groups > 1 and m.groups == m.in_channels]


def end_layers(model: torch.nn.Module) -> list[str]:
    """Names of the first and the last Conv2d/Linear layer, in module order (the stem and the classifier)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return list(dict.fromkeys(layers[:1] + layers[-1:]))


# mixed-precision tokens: the layers each one keeps at 8-bit weights
MIXED_PRECISION = {"dw8": depthwise_layers, "fl8": end_layers}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | top-1 % | vs float (points) | PTQ s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['top1']:.2f} | {r['drop']:+.2f} | {r['ptq_s']:.0f} |"
            if "drop" in r
            else f"| {r['model']} | float | {r['top1']:.2f} | - | - |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for method in args.methods:
        parse_method(method)  # fail before any evaluation
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = resumed_rows(args)
    done = {(r["model"], r["method"]) for r in rows if not (args.replace and r["method"] in args.methods)}
    for name in args.models:
        model, dm = load(name, args)
        if (name, "float") not in done:
            result = top1_accuracy(model, dm.val_dataloader(), num_batches=args.limit_batches, progress=False)
            rows.append({"model": name, "method": "float", "top1": result["top1"], "images": result["images"]})
            save(args, argv, rows, complete=False)
        float_top1 = next(r for r in rows if r["model"] == name and r["method"] == "float")
        print(f"[bench] {name} float {float_top1['top1']:.2f}", file=sys.stderr, flush=True)
        for method in (m for m in args.methods if (name, m) not in done):
            row = {"model": name, **run_method(model, dm, method, args)}
            row["drop"] = row["top1"] - float_top1["top1"]
            row["measured"] = time.strftime("%Y-%m-%d", time.gmtime())
            old = next((i for i, r in enumerate(rows) if (r["model"], r["method"]) == (name, method)), None)
            if old is None:
                rows.append(row)
            else:  # --replace: the new row takes the old one's place in the table
                rows[old] = row
            save(args, argv, rows, complete=False)  # a stopped run keeps every finished row
            print(f"[bench] {name} {method} {row['top1']:.2f} ({row['drop']:+.2f})", file=sys.stderr, flush=True)
    print(save(args, argv, rows, complete=True))
    print(f"wrote {args.out}")
    return 0


def resumed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """With ``--resume``: the rows of ``--out`` measured under the same protocol (else a clear error)."""
    if not args.resume or not args.out.is_file():
        return []
    previous = json.loads(args.out.read_text())
    keys = ("calibration_size", "seed", "batch_size", "limit_batches")
    changed = [k for k in keys if previous["settings"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume: {args.out} was measured with other {', '.join(changed)}; use another --out.")
    return list(previous["rows"])


def save(args: argparse.Namespace, argv: list[str] | None, rows: list[dict[str, Any]], *, complete: bool) -> str:
    """Write the JSON and the Markdown table of ``rows`` (``complete=False`` while the run is still going)."""
    text = table(rows)
    payload = {
        **run_header("scripts/bench_accuracy.py", argv, args),
        "partial": args.limit_batches is not None,
        "complete": complete,
        "rows": rows,
        "table": text,
    }
    write_results(args.out, payload, text, "" if complete else "\n(run not complete)\n")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
