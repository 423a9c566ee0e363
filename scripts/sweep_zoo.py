"""torchvision zoo sweep: every model through prepare -> calibrate -> ONNX export -> onnxruntime parity.

Random weights (nothing is downloaded; BatchNorm statistics re-estimated so outputs are not constant), random
inputs, the ``x86`` target by default. Prints one line per model as it finishes, then a Markdown table
(``model, quantized conv/linear, ORT top-1 agreement, status, kept float``) and writes JSON + Markdown.
A failing model is reported in the table and the exit status is 1; the sweep itself never stops early.

Usage:
    PYTHONPATH=. python scripts/sweep_zoo.py                              # the torchvision table, ~5 min on 2 cores
    PYTHONPATH=. python scripts/sweep_zoo.py --models resnet18 vit_b_16 --target tensorrt
    PYTHONPATH=. python scripts/sweep_zoo.py --zoo timm --out scripts/results/sweep_timm.json   # one per timm family
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from results_io import RESULTS_DIR, run_header, write_results

from lightning_quant.evaluation.zoo_sweep import TIMM_SWEEP_MODELS, ZOO_SWEEP_MODELS, check_zoo_model, zoo_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="model names (timm: prefix for timm models)")
    parser.add_argument("--zoo", choices=["torchvision", "timm"], default="torchvision", help="the default model list")
    parser.add_argument("--target", choices=["x86", "x86_vnni", "tensorrt"], default="x86")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (as many again check parity)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sweep_zoo.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = args.models or list(TIMM_SWEEP_MODELS if args.zoo == "timm" else ZOO_SWEEP_MODELS)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torchvision's GoogLeNet/Inception init notice
    results = []
    for name in models:
        result = check_zoo_model(
            name,
            image_size=args.image_size,
            batch_size=args.batch_size,
            batches=args.batches,
            target=args.target,
            seed=args.seed,
        )
        results.append(result)
        print(
            f"{name:<28} {result.status:<16} {result.quantized_layers}/{result.weight_layers} layers  "
            f"{result.seconds:6.1f} s",
            flush=True,
        )
        if result.error and result.status.startswith("failed"):
            print("    " + result.error.replace("\n", "\n    "), flush=True)
    table = zoo_table(results)
    print("\n" + table)
    payload = run_header("scripts/sweep_zoo.py", argv, args)
    payload["created"] = payload["date"]
    payload["machine"] |= {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    payload |= {"results": [r.to_dict() for r in results], "total_seconds": round(sum(r.seconds for r in results), 1)}
    write_results(args.out, payload, table)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')} ({time.strftime('%H:%M:%S')})")
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
