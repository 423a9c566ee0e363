"""torchvision zoo on the DPU target: every classification model through inspect_dpu -> quantize(target="dpu") ->
export_xmodel -> the XModel interpreter against the fake-quant model.

Random weights (nothing is downloaded; BatchNorm statistics re-estimated), seeded random inputs, 64 px (or the size
a model needs, ``DPU_SWEEP_SIZES``), 2 calibration batches of 2 and 2 more to check the XModel. Each model runs in its
own process with a time limit; models above ``--max-params`` million parameters are skipped (their size is read
from torchvision's weight metadata, nothing is built). Prints one line per model as it finishes, then a Markdown
table, and writes JSON + Markdown. The exit status is 1 when a model failed (the XModel differs from the fake-quant
model, the inspector and the export disagree, a stage raised); a model with CPU ops is a finding, not a failure.

Usage:
    PYTHONPATH=. nice -n 10 python scripts/sweep_dpu_zoo.py                 # the whole zoo, ~10 min on 2 cores
    PYTHONPATH=. python scripts/sweep_dpu_zoo.py --models mobilenet_v3_small resnet18 --out /tmp/dpu.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from results_io import RESULTS_DIR, run_header, write_results

from lightning_quant.evaluation.dpu_zoo_sweep import DPUZooResult, check_dpu_zoo_model, dpu_zoo_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="torchvision model names (default: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="calibration batches (as many again check the XModel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-params", type=float, default=100.0, help="skip models above this many million params")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per model")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each model's process")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sweep_dpu_zoo.json")
    return parser.parse_args(argv)


def _params_millions(name: str) -> float | None:
    """The parameter count torchvision's weight metadata gives for ``name`` (no model is built), or None."""
    from torchvision.models import get_model_weights

    try:
        return next(iter(get_model_weights(name))).meta["num_params"] / 1e6
    except (ValueError, KeyError, StopIteration):
        return None


def _worker(name: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # shift moves, float layers: the table has what matters
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = check_dpu_zoo_model(
        name, image_size=args.image_size, batch_size=args.batch_size, batches=args.batches, seed=args.seed
    )
    queue.put(result.to_dict())


def _run_one(name: str, args: argparse.Namespace, context) -> DPUZooResult:
    """``name`` in a child process (a crash or a hang costs that model only), killed after ``args.timeout``."""
    start = time.perf_counter()
    queue = context.Queue()
    process = context.Process(target=_worker, args=(name, args, queue), daemon=True)
    process.start()
    process.join(args.timeout)
    if process.is_alive():
        process.kill()
        process.join()
        seconds = round(time.perf_counter() - start, 1)
        return DPUZooResult(model=name, status="timeout", seconds=seconds, error=f"over {args.timeout:g} s")
    if queue.empty():
        return DPUZooResult(model=name, status="failed: crashed", error=f"exit code {process.exitcode}")
    return DPUZooResult(**queue.get())


def _summary(results: list[DPUZooResult]) -> str:
    counts = Counter(r.status for r in results)
    run = [r for r in results if not r.status.startswith("skipped")]
    kinds = Counter()
    for r in run:
        kinds.update(r.cpu_reasons.keys())
    lines = [
        "",
        f"{len(results)} models: {len(run)} run, {counts['all DPU, bit-exact']} whole on the DPU and bit-exact, "
        f"{counts['CPU ops']} with CPU ops (export refused at the inspector's first CPU op), "
        f"{sum(v for k, v in counts.items() if k.startswith('skipped'))} skipped, "
        f"{sum(v for k, v in counts.items() if k.startswith('failed') or k == 'timeout')} failed or timed out.",
        "",
        "CPU op kinds (number of models): " + "; ".join(f"{kind}: {n}" for kind, n in kinds.most_common()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torchvision  # lazy: the listing needs it, the parent process builds no model

    models = args.models or torchvision.models.list_models(module=torchvision.models)
    context = multiprocessing.get_context("fork")  # the parent runs no torch op, so forking is safe and fast
    results = []
    for name in models:
        params = _params_millions(name)
        if params is not None and params > args.max_params:
            result = DPUZooResult(model=name, status=f"skipped: {params:.0f}M parameters", params_m=round(params, 1))
        else:
            result = _run_one(name, args, context)
        results.append(result)
        print(
            f"{name:<22} {result.status:<40} DPU {result.dpu_ops:>4} / CPU {result.cpu_ops:>4} ops, "
            f"{result.partitions:>3} DPU subgraphs  {result.seconds:6.1f} s",
            flush=True,
        )
        if result.error and result.status.startswith(("failed", "timeout")):
            print("    " + result.error.replace("\n", "\n    "), flush=True)
    table = dpu_zoo_table(results)
    footer = _summary(results)
    print("\n" + table + "\n" + footer)
    payload = run_header("scripts/sweep_dpu_zoo.py", argv, args)
    payload["machine"] |= {"cpu": platform.processor() or platform.machine(), "threads": args.threads}
    payload |= {"results": [r.to_dict() for r in results], "total_seconds": round(sum(r.seconds for r in results), 1)}
    write_results(args.out, payload, table, footer)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({time.strftime('%H:%M:%S')})")
    return 1 if any(r.status.startswith("failed") or r.status == "timeout" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
