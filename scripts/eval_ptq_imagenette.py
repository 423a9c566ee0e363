"""Float vs INT8 (fake-quant PTQ) top-1 on the full Imagenette val split, for one pretrained model.

Calibration: ``--calibration-size`` images drawn from the *train* split (seeded); evaluation: all 3,925 val images.

Usage:
    PYTHONPATH=. python scripts/eval_ptq_imagenette.py --model mobilenet_v2 --targets x86 tensorrt
    PYTHONPATH=. python scripts/eval_ptq_imagenette.py --model resnet50 --out /tmp/r50.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import lightning_quant
from lightning_quant import quantization_report, quantize, scheme_for_target
from lightning_quant.data import ImagenetteDataModule, calibration_subset
from lightning_quant.evaluation import top1_accuracy
from lightning_quant.models import IMAGENETTE_EVAL_SIZES, IMAGENETTE_MODELS

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(IMAGENETTE_MODELS), default="mobilenet_v2")
    parser.add_argument("--targets", nargs="+", default=["x86", "tensorrt"], help="x86, tensorrt and/or dpu")
    parser.add_argument("--root", default=None, help="own Imagenette folder with train/ and val/ (default: shared)")
    parser.add_argument("--weights", default=None, help="weights file (default: <shared>/weights/...)")
    parser.add_argument("--calibration-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--limit-val-batches", type=int, default=None, help="smoke runs only: evaluate fewer batches")
    parser.add_argument(
        "--report-images",
        type=int,
        default=32,
        help="val images for the per-layer SQNR report of each INT8 model (0: no report)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default: scripts/results/eval_ptq_imagenette_<model>.json)"
    )
    return parser.parse_args(argv)


def sqnr_summary(qmodel: torch.nn.Module, dm: ImagenetteDataModule, images: int) -> dict:
    sample = calibration_subset(dm.val_dataset, min(images, len(dm.val_dataset)), seed=0)  # all classes, seeded
    batch = torch.stack([sample[i][0] for i in range(len(sample))])
    report = quantization_report(qmodel, batch)
    worst = sorted(report.rows, key=lambda r: r.sqnr_db)[:5]
    return {
        "images": int(batch.shape[0]),
        "output_sqnr_db": report.output_sqnr_db,
        "min_layer_sqnr_db": report.min_sqnr(),
        "worst_layers": [{"name": r.name, "kind": r.kind, "sqnr_db": r.sqnr_db} for r in worst],
        "float_layers": report.float_layers,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS_DIR / f"eval_ptq_imagenette_{args.model}.json"
    sizes = IMAGENETTE_EVAL_SIZES[args.model]
    dm = ImagenetteDataModule(
        args.root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        calibration_size=args.calibration_size,
        seed=args.seed,
        **sizes,
    )
    dm.setup()
    model = IMAGENETTE_MODELS[args.model](args.weights)
    n_val = len(dm.val_dataset)
    print(
        f"{args.model}: {len(dm.train_dataset)} train / {n_val} val images, input {sizes}, "
        f"calibration {args.calibration_size} train images (seed {args.seed}), {args.threads} threads",
        flush=True,
    )

    fp = top1_accuracy(
        model, dm.val_dataloader(), num_batches=args.limit_val_batches, progress=True, desc=f"{args.model} float"
    )
    print(f"float top-1 {fp['top1']:.2f} % on {fp['images']} images ({fp['seconds']:.1f} s)", flush=True)
    rows = []
    for target in args.targets:
        start = time.perf_counter()
        qmodel = quantize(model, dm.calibration_dataloader(), target=target, progress=True)
        calib_s = time.perf_counter() - start
        q = top1_accuracy(
            qmodel,
            dm.val_dataloader(),
            num_batches=args.limit_val_batches,
            progress=True,
            desc=f"{args.model} int8 {target}",
        )
        row = {
            "model": args.model,
            "target": target,
            "float_top1": fp["top1"],
            "int8_top1": q["top1"],
            "drop_points": fp["top1"] - q["top1"],
            "calibration_s": calib_s,
            "eval_s": q["seconds"],
            "float_eval_s": fp["seconds"],
            "val_images": q["images"],
            "correct_float": fp["correct"],
            "correct_int8": q["correct"],
            "scheme": scheme_for_target(target).to_dict(),
        }
        if args.report_images > 0:
            row["sqnr"] = sqnr_summary(qmodel, dm, args.report_images)
        rows.append(row)
        print(
            f"{target}: int8 top-1 {q['top1']:.2f} % (drop {row['drop_points']:.2f} points), "
            f"calibration {calib_s:.1f} s, eval {q['seconds']:.1f} s",
            flush=True,
        )

    header = (
        f"{'model':<13} {'target':<9} {'float top-1':>11} {'int8 top-1':>10} {'drop':>6} {'calib s':>8} {'eval s':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<13} {r['target']:<9} {r['float_top1']:>11.2f} {r['int8_top1']:>10.2f} "
            f"{r['drop_points']:>6.2f} {r['calibration_s']:>8.1f} {r['eval_s']:>7.1f}"
        )
    for r in rows:
        if "sqnr" in r:
            worst = ", ".join(f"{w['name']} {w['sqnr_db']:.1f} dB" for w in r["sqnr"]["worst_layers"][:3])
            print(f"{r['target']}: output SQNR {r['sqnr']['output_sqnr_db']:.1f} dB; lowest layers: {worst}")

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lightning_quant": lightning_quant.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "calibration_size": args.calibration_size,
        "seed": args.seed,
        "calibration_split": "train",
        "eval_split": "val",
        "val_images": fp["images"],
        "input": sizes,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
