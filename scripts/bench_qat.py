"""QAT training-step cost against the float step: our QAT vs torchao PT2E QAT, same model, batch and optimizer.

One step = forward + cross-entropy + backward + SGD update, on a fixed random batch (the cost does not depend on
the pixel values). Each (model, method) runs in a fresh process: ``--warmup`` steps, then the median of
``--steps`` timed steps, and the peak resident set above the level before the model was built (model, optimizer
state, preparation and every step included; sampled every 2 ms).

Methods:
* ``float``: the plain model;
* ``ours``: ``prepare(model, scheme_for_target("x86", mode="qat"), mode="qat")``, as ``QuantCallback(mode="qat")``
  prepares: per-channel weight fake-quant, conv+BN kept as a QAT unit with BatchNorm folding simulated,
  moving-average activation ranges;
* ``ours_frozen``: the same after ``QATSchedule``'s freezes (torchvision's reference: from epoch 3 on), observers
  off and BatchNorm on running statistics, where each conv+BN is the deployed conv (folded weight and bias); weights
  and activations still fake-quantized every step;
* ``pt2e``: torchao ``prepare_qat_pt2e`` with ``X86InductorQuantizer`` in its QAT config (needs
  ``pip install -e ".[bench]"``; reported as not installed otherwise);
* ``<method>_compiled``: the same model wrapped in ``torch.compile`` (Inductor), as
  ``trainer.fit(torch.compile(model))`` trains it; compiling happens in the warmup steps (minutes for ResNet50 on 2
  cores). With ``--interleave`` a compiled method alternates with the compiled float model (a user who compiles
  compiles both), and ``float_compiled`` with the eager float model (what compiling gains).

Usage:
    PYTHONPATH=. python scripts/bench_qat.py                                    # mobilenet_v2 and resnet50
    PYTHONPATH=. python scripts/bench_qat.py --models mobilenet_v2 --batch-size 32 --image-size 224
    PYTHONPATH=. python scripts/bench_qat.py --interleave --steps 15   # ratios against a float model in-process
    PYTHONPATH=. python scripts/bench_qat.py --interleave --methods float_compiled ours_compiled ours_frozen_compiled
    PYTHONPATH=. python scripts/bench_qat.py --interleave --channels-last     # oneDNN's native CPU layout
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from bench_calibration import PeakSampler
from results_io import RESULTS_DIR, run_header, write_results
from torch import nn

EAGER_METHODS = ("float", "ours", "ours_frozen", "pt2e")
METHODS = EAGER_METHODS + tuple(f"{m}_compiled" for m in EAGER_METHODS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", choices=["mobilenet_v2", "resnet50"], default=["mobilenet_v2", "resnet50"]
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(EAGER_METHODS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128, help="the Imagenette recipes' size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time each method's steps alternating with a float model's steps in the same process (ratios against "
        "that float median; on a machine whose speed drifts, separate processes give ratios 20 %% apart)",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="models and batch in channels-last memory format (oneDNN's native layout on CPU), every method alike",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_qat.json")
    return parser.parse_args(argv)


def build(model_name: str, method: str, example: torch.Tensor) -> nn.Module:
    if method.endswith("_compiled"):
        return torch.compile(build(model_name, method.removesuffix("_compiled"), example))
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10).train()
    if method == "float":
        return model
    if method in ("ours", "ours_frozen"):
        from lightning_quant import scheme_for_target
        from lightning_quant.quantizers import freeze_bn, prepare, set_observers

        # mode="qat" as QuantCallback(mode="qat") prepares (conv+BN kept as QuantConvBn); before 2026-12-07 this row
        # prepared for PTQ, BatchNorm folded away, and so timed a cheaper network than QAT trains
        qmodel = prepare(model, scheme_for_target("x86", mode="qat"), mode="qat")
        with torch.no_grad():  # one observed batch so the first timed step is not the initialising one
            qmodel(example)
        if method == "ours_frozen":
            set_observers(qmodel, False)
            freeze_bn(qmodel, True)
        return qmodel.train()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    exported = torch.export.export(model, (example,)).module()
    prepared = prepare_qat_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(example)
    return prepared


def _import_for(method: str) -> None:
    import torchvision  # noqa: F401

    if method.startswith("ours"):
        import lightning_quant.quantizers  # noqa: F401
    elif method.startswith("pt2e"):
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def _stepper(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def _timed(step: Any) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _worker(model_name: str, method: str, args: argparse.Namespace, queue: Any) -> None:
    try:
        torch.set_num_threads(args.threads)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
        labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=layout)
        _import_for(method)  # library code is not the method's memory
        times = []
        # from before the model is built: weights, optimizer state, the preparation and the steps' working set all
        # count (a baseline taken after building would hide whatever ``build`` allocated, e.g. a traced graph)
        with PeakSampler() as memory:
            step = _stepper(build(model_name, method, images).to(memory_format=layout), images, labels)
            for _ in range(args.warmup):
                step()
            for _ in range(args.steps):
                times.append(_timed(step))
        result = {"step_s": statistics.median(times), "peak_mb": memory.mb, "error": None}
        if args.interleave and method != "float":
            reference = "float_compiled" if method.endswith("_compiled") and method != "float_compiled" else "float"
            float_model = build(model_name, reference, images).to(memory_format=layout)
            float_step, float_times, times = _stepper(float_model, images, labels), [], []
            for _ in range(args.warmup):
                float_step()
            for _ in range(args.steps):
                float_times.append(_timed(float_step))
                times.append(_timed(step))
            result.update(
                step_s=statistics.median(times), float_step_s=statistics.median(float_times), float_method=reference
            )
        queue.put(result)
    except ImportError as error:
        queue.put({"error": f"not installed ({error.name or error}); pip install -e '.[bench]'"})
    except Exception as error:  # noqa: BLE001 - a peer that fails is a row with its error, the run goes on
        queue.put({"error": f"{type(error).__name__}: {str(error)[:200]}", "trace": traceback.format_exc(limit=-3)})


def measure(model_name: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(model_name, method, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return {"model": model_name, "method": method, **result}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | step s | vs float | peak MB | vs float | notes |", "|---|---|---|---|---|---|---|"]
    floats = {r["model"]: r for r in rows if r["method"] == "float" and not r.get("error")}
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | - | - | - | - | {r['error']} |")
            continue
        base = floats.get(r["model"])
        base_step = r.get("float_step_s") or (base["step_s"] if base else None)  # interleaved: its own float median
        time_ratio = f"{r['step_s'] / base_step:.2f}x" if base_step else "-"
        mem_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and base["peak_mb"] > 0 else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['step_s']:.3f} | {time_ratio} | {r['peak_mb']:.0f} | {mem_ratio} | "
            + (
                f"{r.get('float_method', 'float')} {r['float_step_s']:.3f} s interleaved |"
                if r.get("float_step_s")
                else "|"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for model_name in args.models:
        for method in args.methods:
            row = measure(model_name, method, args)
            rows.append(row)
            shown = row.get("error") or f"{row['step_s']:.3f} s/step, peak {row['peak_mb']:.0f} MB"
            print(f"[bench] {model_name} {method}: {shown}", file=sys.stderr, flush=True)
    text = table(rows)
    layout = ", channels-last" if args.channels_last else ""
    print(f"batch {args.batch_size} x 3 x {args.image_size}^2{layout}, {args.threads} threads, median of {args.steps}")
    print(text)
    payload = {**run_header("scripts/bench_qat.py", argv, args), "rows": rows, "table": text}
    try:
        import torchao

        payload["versions"]["torchao"] = torchao.__version__
    except ImportError:
        payload["versions"]["torchao"] = None
    write_results(args.out, payload, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
