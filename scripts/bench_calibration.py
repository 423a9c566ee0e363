"""Calibration cost against plain float inference over the same batches: time, images/s and peak memory.

For each model, range estimator and calibration size, the same pre-decoded batches go through
(a) the float model under ``torch.inference_mode`` and (b) ``calibrate()`` on a freshly prepared copy (observers
on, fake-quant off, range estimate at the end). Image decoding and ``prepare()`` are outside both timings
(``prepare`` is reported on its own). Times are the median of ``--repeats`` runs; the ratio is (b) / (a).
Peak memory: each measurement runs once more in a fresh process that samples its resident set every 2 ms;
the reported figure is the peak above the resident set just before the run (model and batches already loaded).

Usage:
    PYTHONPATH=. python scripts/bench_calibration.py                                   # resnet20 + mobilenet_v2
    PYTHONPATH=. python scripts/bench_calibration.py --models resnet50 --images 128 512 --observers minmax
    PYTHONPATH=. python scripts/bench_calibration.py --models mobilenet_v2 --observers dpu   # the DPU scheme
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from bench_ddp_calibration import build_batches, build_model
from results_io import RESULTS_DIR, run_header, write_results

from lightning_quant import scheme_for_target
from lightning_quant.calibration import calibrate
from lightning_quant.quantizers import prepare

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", choices=["resnet20", "mobilenet_v2", "resnet50"], default=["resnet20", "mobilenet_v2"]
    )
    parser.add_argument(
        "--observers", nargs="+", default=["minmax", "percentile", "entropy"], help="x86 activation observers, or dpu"
    )
    parser.add_argument("--images", nargs="+", type=int, default=[64, 256, 512], help="calibration sizes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_calibration.json")
    return parser.parse_args(argv)


def scheme_for(observer: str) -> Any:
    """The x86 scheme with ``observer`` for activations; ``dpu``: the Vitis AI DPU scheme (its fix-position search)."""
    return scheme_for_target("dpu") if observer == "dpu" else scheme_for_target("x86", activation_observer=observer)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakSampler:
    """Peak resident set above the start, sampled every ``interval`` s on a thread (Linux ``/proc``)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> PeakSampler:
        gc.collect()
        self.start = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def float_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        for batch in batches:
            model(batch)


def calibration_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    calibrate(model, batches, progress=False)


def _timed(fn: Any, make_input: Any, repeats: int) -> float:
    """Median seconds of ``fn(make_input())``; ``make_input`` (e.g. copying a prepared model) is not timed."""
    times = []
    for _ in range(repeats):
        arg = make_input()
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memory_worker(model_name: str, observer: str, images: int, batch_size: int, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    model = build_model(model_name)
    batches, _ = build_batches(model_name, images // batch_size, batch_size)
    prepared = prepare(model, scheme_for(observer))
    float_pass(model, batches[:1])  # first-call allocations outside the measurement
    with PeakSampler() as float_mem:
        float_pass(model, batches)
    with PeakSampler() as calib_mem:
        calibration_pass(prepared, batches)  # the only use of ``prepared``: no copy needed
    queue.put((float_mem.mb, calib_mem.mb))


def peak_memory(model_name: str, observer: str, images: int, batch_size: int, threads: int) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(model_name, observer, images, batch_size, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    model = build_model(name)
    batches, source = build_batches(name, max(args.images) // args.batch_size, args.batch_size)
    float_pass(model, batches[:1])
    rows = []
    for observer in args.observers:
        start = time.perf_counter()
        prepared = prepare(model, scheme_for(observer))
        prepare_s = time.perf_counter() - start
        calibration_pass(copy.deepcopy(prepared), batches[:1])  # warm-up
        for images in args.images:
            subset = batches[: images // args.batch_size]
            float_s = _timed(lambda m, s=subset: float_pass(m, s), lambda: model, args.repeats)
            calib_s = _timed(
                lambda m, s=subset: calibration_pass(m, s), lambda p=prepared: copy.deepcopy(p), args.repeats
            )
            row = {
                "model": name,
                "observer": observer,
                "images": len(subset) * args.batch_size,
                "float_s": round(float_s, 3),
                "calibration_s": round(calib_s, 3),
                "ratio": round(calib_s / float_s, 3),
                "float_images_per_s": round(len(subset) * args.batch_size / float_s, 1),
                "calibration_images_per_s": round(len(subset) * args.batch_size / calib_s, 1),
                "prepare_s": round(prepare_s, 3),
            }
            if not args.no_memory and images == max(args.images):
                row["float_peak_mb"], row["calibration_peak_mb"] = (
                    round(v, 1) for v in peak_memory(name, observer, images, args.batch_size, args.threads)
                )
            rows.append(row)
            print(
                f"[bench] {name} {observer} {row['images']} images: float {float_s:.2f} s, calibration "
                f"{calib_s:.2f} s ({row['ratio']:.2f}x)",
                file=sys.stderr,
                flush=True,
            )
    return rows, source


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | estimator | images | float s | calibration s | ratio | calibration img/s | peak MB float / calib |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        memory = f"{r['float_peak_mb']:.0f} / {r['calibration_peak_mb']:.0f}" if "float_peak_mb" in r else "-"
        lines.append(
            f"| {r['model']} | {r['observer']} | {r['images']} | {r['float_s']:.2f} | {r['calibration_s']:.2f} | "
            f"{r['ratio']:.2f}x | {r['calibration_images_per_s']:.0f} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, sources = [], {}
    for name in args.models:
        model_rows, sources[name] = bench_model(name, args)
        rows.extend(model_rows)
    text = table(rows)
    print(f"batch size {args.batch_size}, {args.threads} threads, median of {args.repeats}\n{text}")
    payload = {**run_header("scripts/bench_calibration.py", argv, args), "data": sources, "rows": rows, "table": text}
    write_results(args.out, payload, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
