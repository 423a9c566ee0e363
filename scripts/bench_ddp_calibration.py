"""Calibration wall time in one process vs sharded across N processes (gloo, CPU), same batches, same result.

Each configuration calibrates the same ``--batches`` batches: one process with ``--threads`` threads, or N
processes with ``threads // N`` threads each, every rank on its share (``lightning_quant.distributed``), then
merges the observers. Timed from a barrier before calibration to a barrier after the merge (process start-up
and model loading excluded, they are reported separately as ``spawn_s``). The script also checks that every
configuration produced the same qparams as the single process (exactly for min/max; histogram estimators are
merged on a shared grid, so their scales agree within ``max_rel_scale_diff``).

Usage:
    PYTHONPATH=. python scripts/bench_ddp_calibration.py                       # resnet20, CIFAR-10 test images
    PYTHONPATH=. python scripts/bench_ddp_calibration.py --model resnet50 --observers minmax entropy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lightning_quant
from lightning_quant import scheme_for_target
from lightning_quant.calibration import calibrate
from lightning_quant.distributed import shard_batches, sync_quantizers
from lightning_quant.quantizers import iter_quantizers, prepare, set_observers

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["resnet20", "resnet50"], default="resnet20")
    parser.add_argument("--observers", nargs="+", default=["minmax", "entropy"])
    parser.add_argument("--batches", type=int, default=16, help="calibration batches (all processes together)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="threads in total (split over the processes)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_ddp_calibration.json")
    return parser.parse_args(argv)


def build_model(name: str) -> torch.nn.Module:
    """The pretrained network (``resnet20``, ``mobilenet_v2``, ``resnet50``) when the shared weights are there, else
    the same architecture, seeded."""
    torch.manual_seed(0)
    try:
        if name == "resnet20":
            from lightning_quant.models.cifar_resnet import cifar_resnet

            return cifar_resnet(20).eval()
        from lightning_quant.models import imagenette

        return getattr(imagenette, f"{name}_imagenette")().eval()
    except (FileNotFoundError, OSError, ValueError) as error:
        print(f"[bench] no pretrained weights ({error}); random weights", file=sys.stderr)
        if name == "resnet20":
            from lightning_quant.models.cifar_resnet import cifar_resnet

            return cifar_resnet(20, pretrained=False).eval()
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10).eval()


def build_batches(name: str, count: int, batch_size: int) -> tuple[list[torch.Tensor], str]:
    """``count`` batches of real test images (CIFAR-10 / Imagenette val) when the shared data is there."""
    try:
        from torch.utils.data import DataLoader

        from lightning_quant.data import calibration_subset

        if name == "resnet20":
            from lightning_quant.data.cifar10 import CIFAR10DataModule

            dm = CIFAR10DataModule(batch_size=batch_size)
        else:
            from lightning_quant.data import ImagenetteDataModule
            from lightning_quant.models import IMAGENETTE_EVAL_SIZES

            dm = ImagenetteDataModule(batch_size=batch_size, **IMAGENETTE_EVAL_SIZES[name])
        dm.setup()
        subset = calibration_subset(dm.val_dataset, count * batch_size, seed=0)
        return [x for x, _ in DataLoader(subset, batch_size=batch_size)], "real val images"
    except (FileNotFoundError, ImportError, ValueError, TypeError) as error:
        print(f"[bench] no shared data ({error}); seeded noise", file=sys.stderr)
        size = 32 if name == "resnet20" else 224
        g = torch.Generator().manual_seed(0)
        return [torch.randn(batch_size, 3, size, size, generator=g) for _ in range(count)], "seeded noise"


def qparams(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.scale": fq.scale.detach().clone() for n, fq in iter_quantizers(model)} | {
        f"{n}.zero_point": fq.zero_point.clone() for n, fq in iter_quantizers(model)
    }


def calibrate_timed(model: torch.nn.Module, data: Any, warmup: torch.Tensor) -> float:
    with torch.no_grad():  # first-call overheads (allocator, kernels) outside the timing; observers see nothing
        set_observers(model, False)
        model(warmup)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    calibrate(model, data, progress=False, shard=dist.is_initialized())
    sync_quantizers(model)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, observer: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, args.threads // world))
        model = prepare(build_model(args.model), scheme_for_target("x86", activation_observer=observer))
        batches, _ = build_batches(args.model, args.batches, args.batch_size)
        seconds = calibrate_timed(model, shard_batches(batches, args.batches), batches[0][:2])
        if rank == 0:
            torch.save({"seconds": seconds, "qparams": qparams(model)}, Path(out) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace, observer: str, world: int) -> dict[str, Any]:
    start = time.perf_counter()
    if world == 1:
        torch.set_num_threads(args.threads)
        model = prepare(build_model(args.model), scheme_for_target("x86", activation_observer=observer))
        batches, _ = build_batches(args.model, args.batches, args.batch_size)
        seconds, result = calibrate_timed(model, batches, batches[0][:2]), qparams(model)
    else:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(
                _worker, args=(world, free_port(), args, observer, out), nprocs=world, start_method="spawn"
            )
            saved = torch.load(Path(out) / "rank0.pt", weights_only=True)
        seconds, result = saved["seconds"], saved["qparams"]
    total = time.perf_counter() - start
    return {"processes": world, "observer": observer, "calibration_s": seconds, "total_s": total, "qparams": result}


def compare(row: dict[str, Any], base: dict[str, Any]) -> float:
    worst = 0.0
    for key, value in base["qparams"].items():
        if key.endswith(".scale"):
            rel = ((row["qparams"][key] - value).abs() / value.abs().clamp_min(1e-12)).max().item()
            worst = max(worst, rel)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _, source = build_batches(args.model, 1, 1)
    rows = []
    for observer in args.observers:
        base = None
        for world in args.processes:
            row = run(args, observer, world)
            base = base or row
            row["max_rel_scale_diff"] = compare(row, base)
            row["identical_qparams"] = all(torch.equal(row["qparams"][k], v) for k, v in base["qparams"].items())
            row["speedup"] = base["calibration_s"] / row["calibration_s"]
            rows.append(row)
            print(f"[bench] {observer} x{world}: {row['calibration_s']:.2f} s", file=sys.stderr, flush=True)
    header = "| observer | processes x threads | calibration s | speedup | spawn+load s | qparams vs 1 process |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        same = "identical" if r["identical_qparams"] else f"max rel scale diff {r['max_rel_scale_diff']:.2e}"
        threads = max(1, args.threads // r["processes"])
        lines.append(
            f"| {r['observer']} | {r['processes']} x {threads} | {r['calibration_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['total_s'] - r['calibration_s']:.1f} | {same} |"
        )
    table = "\n".join(lines)
    print(f"{args.model}, {args.batches} batches of {args.batch_size} ({source}), {os.cpu_count()} CPUs\n{table}")
    payload = {
        "script": "scripts/bench_ddp_calibration.py",
        "argv": sys.argv[1:],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "versions": {"torch": torch.__version__, "lightning_quant": lightning_quant.__version__},
        "model": args.model,
        "data": source,
        "rows": [{k: v for k, v in r.items() if k != "qparams"} for r in rows],
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
