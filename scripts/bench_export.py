"""Latency and file size: our INT8 ONNX export vs onnxruntime's own ``quantize_static`` vs FP32, on CPU.

Models: the pretrained offline Imagenette ResNet50 (128 px input) and MobileNetV2 (224 px), as their weights
the docs say. Both quantizers calibrate on the same images (``--calibration-size`` Imagenette train images, or
seeded noise when the data is missing). onnxruntime's quantizer runs the documented recipe:
``quant_pre_process`` on the FP32 model, then ``quantize_static(QuantFormat.QDQ, per_channel=True,
activation_type=QUInt8, weight_type=QInt8)``. The FP32 baseline is saved with weights inline and exporter
metadata stripped (``lightning_quant.export.onnx.strip_metadata``), so file sizes compare like with like.

Latency: onnxruntime CPU provider, ``intra_op_num_threads=--threads`` (2), ``inter_op_num_threads=1``, default graph
optimizations; the three models of one batch size are timed in alternating blocks of consecutive runs (25 at batch 1,
3 at batch 32, two untimed runs before each block, order rotated each round) so that load from other processes and
clock drift hit all of them alike; median (and p10-p90) of the timed runs is reported. The machine's load average
and any other busy processes are recorded with the results.

Usage:
    PYTHONPATH=. python scripts/bench_export.py
    PYTHONPATH=. python scripts/bench_export.py --models resnet50 --runs-b1 200 --runs-b32 30
Writes ``scripts/results/bench_export.json`` and ``scripts/results/bench_export.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from results_io import cpu_model

import lightning_quant
from lightning_quant import export_onnx, quantize
from lightning_quant.export.onnx import export_float_onnx
from lightning_quant.models import IMAGENETTE_EVAL_SIZES, IMAGENETTE_MODELS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = ("fp32", "ours_int8", "ort_int8")
LABELS = {"fp32": "FP32", "ours_int8": "INT8 lightning_quant", "ort_int8": "INT8 ORT quantize_static"}
GOAL_SPEEDUP = {"resnet50": 3.0, "mobilenet_v2": 1.9}
GOAL_SIZE = 0.27
FUSED_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "ReduceMean", "GlobalAveragePool")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(IMAGENETTE_MODELS), default=["resnet50", "mobilenet_v2"])
    parser.add_argument("--calibration-size", type=int, default=32, help="train images used by both quantizers")
    parser.add_argument("--eval-size", type=int, default=256, help="val images for top-1 (0 skips accuracy)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs-b1", type=int, default=100, help="timed repeats at batch 1")
    parser.add_argument("--runs-b32", type=int, default=20, help="timed repeats at batches > 1")
    parser.add_argument("--block-b1", type=int, default=25, help="consecutive timed runs per model at batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the .onnx files here (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for bench_export.json / .md")
    parser.add_argument("--render", metavar="JSON", default=None, help="only rewrite the report from a results file")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- environment
def machine_load() -> dict[str, Any]:
    """Load average and the other processes using CPU right now (this benchmark's own process excluded)."""
    load = os.getloadavg()
    busy = []
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in out.splitlines()[1:]:
            pid, pcpu, etime, args = line.split(None, 3)
            if int(pid) != os.getpid() and float(pcpu) >= 10.0:
                busy.append({"pid": int(pid), "cpu_percent": float(pcpu), "elapsed": etime, "command": args[:120]})
    return {"loadavg_1_5_15": [round(v, 2) for v in load], "cpus": os.cpu_count(), "busy_processes": busy}


# ------------------------------------------------------------------------------------------------------ data
def image_batches(name: str, calib_size: int, eval_size: int) -> tuple[list, list, str]:
    """Calibration batches (train split) and labelled eval batches (val split); seeded noise without the data."""
    size = IMAGENETTE_EVAL_SIZES[name]["image_size"]
    try:
        from torch.utils.data import DataLoader

        from lightning_quant.data import calibration_subset
        from lightning_quant.data.imagenette import imagenette_datasets

        datasets = imagenette_datasets(**IMAGENETTE_EVAL_SIZES[name])
        calib = [x for x, _ in DataLoader(calibration_subset(datasets["train_eval"], calib_size, seed=0), 16)]
        evals = []
        if eval_size:
            evals = list(DataLoader(calibration_subset(datasets["val"], eval_size, seed=1), batch_size=32))
        return calib, evals, f"Imagenette train ({calib_size} images, seed 0)"
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"[bench] no Imagenette data ({error}); calibrating on seeded noise, accuracy skipped", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(min(16, calib_size), 3, size, size, generator=g) for _ in range(max(1, calib_size // 16))]
        return calib, [], f"seeded Gaussian noise ({calib_size} images)"


# --------------------------------------------------------------------------------------------------- exports
def export_ort_quantized(fp32: Path, path: Path, calib: list[torch.Tensor], per_channel: bool = True) -> Path:
    """onnxruntime's own static quantizer on a float export: ``quant_pre_process`` then ``quantize_static`` (QDQ,
    per-channel unless told otherwise, uint8 activations, int8 weights, min/max). Batches are converted to numpy one
    at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {input_name: x.numpy()}

    pre = path.with_name(path.stem + "_preprocessed.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return path


# ---------------------------------------------------------------------------------------------- measurement
def session(path: Path, threads: int, optimized_to: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_to is not None:  # the graph the CPU provider runs, without the machine-specific NCHWc layout pass
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_op_counts(path: Path, threads: int) -> dict[str, int]:
    optimized = path.with_name(path.stem + ".ort_optimized.onnx")
    session(path, threads, optimized_to=optimized)
    counts = collections.Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    keep = FUSED_OPS + FLOAT_OPS + ("QuantizeLinear", "DequantizeLinear")
    result = {op: counts[op] for op in keep if counts[op]}
    result["total_nodes"] = sum(counts.values())
    return result


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes by role: weights, biases, Q/DQ scales, zero points, other constants, and the graph itself."""
    model = onnx.load(str(path))
    roles: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            roles.update({node.input[1]: "scales"} | ({node.input[2]: "zero_points"} if len(node.input) > 2 else {}))
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            roles.update({name: "weights" if i == 1 else "biases" for i, name in enumerate(node.input[1:3], 1)})
    consumers: dict[str, str] = {}
    for node in model.graph.node:  # int8 weights and int32 biases feed a DequantizeLinear, not the Conv itself
        if node.op_type == "DequantizeLinear" and roles.get(node.output[0]) in ("weights", "biases"):
            consumers[node.input[0]] = roles[node.output[0]]
    out: dict[str, int] = collections.Counter()
    for init in model.graph.initializer:
        role = consumers.get(init.name) or roles.get(init.name) or "other_constants"
        out[role] += len(init.raw_data) or init.ByteSize()
    del model.graph.initializer[:]
    out["graph_and_names"] = model.ByteSize()
    return dict(out)


def graph_conv_count(path: Path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(str(path), load_external_data=False).graph.node)


def time_round_robin(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int, block: int
) -> dict[str, dict]:
    """Blocks of ``block`` timed runs per model, models alternating block by block (order rotated each round).

    Each block starts with two untimed runs: onnxruntime's worker threads keep spinning for a moment after a run,
    and on 2 cores the previous model's spinning threads would otherwise slow the next model's run (measured
    here: single-run round-robin inflated ResNet50 batch-1 latency 2-3x). Alternating blocks still spreads slow
    drifts of the machine (other processes, clock) over all models alike.
    """
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for round_index in range(-(-runs // block)):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate: no model always runs right after the same one
            sess = sessions[key]
            for _ in range(2):
                sess.run(None, feeds[key])
            for _ in range(min(block, runs - round_index * block)):
                start = time.perf_counter()
                sess.run(None, feeds[key])
                times[key].append((time.perf_counter() - start) * 1e3)
    return {
        k: {
            "median_ms": statistics.median(v),
            "p10_ms": float(np.percentile(v, 10)),
            "p90_ms": float(np.percentile(v, 90)),
            "runs": len(v),
        }
        for k, v in times.items()
    }


def top1(sessions: dict[str, ort.InferenceSession], batches: list) -> dict[str, Any]:
    if not batches:
        return {}
    preds: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
    labels = []
    for x, y in batches:
        labels.append(y.numpy())
        for key, sess in sessions.items():
            preds[key].append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].argmax(1))
    y = np.concatenate(labels)
    fp32 = np.concatenate(preds["fp32"])
    return {
        k: {
            "top1": float((np.concatenate(p) == y).mean()),
            "agreement_with_fp32": float((np.concatenate(p) == fp32).mean()),
            "images": int(y.size),
        }
        for k, p in preds.items()
    }


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    size = IMAGENETTE_EVAL_SIZES[name]["image_size"]
    model = IMAGENETTE_MODELS[name]()
    calib, evals, calib_source = image_batches(name, args.calibration_size, args.eval_size)
    example = calib[0][:2]
    paths = {k: workdir / f"{name}_{k}.onnx" for k in VARIANTS}
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    export_float_onnx(model, paths["fp32"], example)
    seconds["fp32_export"] = time.perf_counter() - start
    start = time.perf_counter()
    qmodel = quantize(model, calib, progress=False)
    export_onnx(qmodel, paths["ours_int8"], example)  # verify=True: onnxruntime vs fake-quant gate
    seconds["ours_quantize_export"] = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_ort_quantized(paths["fp32"], paths["ort_int8"], calib)
    seconds["ort_preprocess_quantize"] = time.perf_counter() - start

    sessions = {k: session(p, args.threads) for k, p in paths.items()}
    latency = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).numpy()
        runs = args.runs_b1 if batch == 1 else args.runs_b32
        latency[f"b{batch}"] = time_round_robin(sessions, x, runs, block=args.block_b1 if batch == 1 else 3)
    fp32_bytes = paths["fp32"].stat().st_size
    return {
        "model": name,
        "input": f"{size}x{size}",
        "calibration": calib_source,
        "convs_in_graph": graph_conv_count(paths["fp32"]),
        "file_bytes": {k: p.stat().st_size for k, p in paths.items()},
        "size_vs_fp32": {k: p.stat().st_size / fp32_bytes for k, p in paths.items()},
        "latency": latency,
        "speedup_vs_fp32": {
            b: {k: v["fp32"]["median_ms"] / v[k]["median_ms"] for k in VARIANTS} for b, v in latency.items()
        },
        "ort_optimized_ops": {k: fused_op_counts(p, args.threads) for k, p in paths.items()},
        "size_breakdown_bytes": {k: size_breakdown(p) for k, p in paths.items()},
        "accuracy": top1(sessions, evals),
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    batches = results["config"]["batches"]
    head = ["model", "input", "variant", "file MB", "% of FP32"]
    for b in batches:
        head += [f"b{b} ms (p10-p90)", f"b{b} speedup"]
    head += ["QLinearConv / Conv", "top-1 (agree w/ FP32)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["models"]:
        for k in VARIANTS:
            row = [
                r["model"],
                r["input"],
                LABELS[k],
                f"{r['file_bytes'][k] / 1e6:.2f}",
                f"{100 * r['size_vs_fp32'][k]:.1f}%",
            ]
            for b in batches:
                t = r["latency"][f"b{b}"][k]
                row += [f"{t['median_ms']:.2f} ({t['p10_ms']:.1f}-{t['p90_ms']:.1f})"]
                row += [f"{r['speedup_vs_fp32'][f'b{b}'][k]:.2f}x"]
            ops = r["ort_optimized_ops"][k]
            row += [f"{ops.get('QLinearConv', 0)} / {r['convs_in_graph']}"]
            acc = r["accuracy"].get(k)
            row += [f"{100 * acc['top1']:.1f}% ({100 * acc['agreement_with_fp32']:.1f}%)" if acc else "-"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[str]:
    out = []
    for r in results["models"]:
        name = r["model"]
        for b, speed in r["speedup_vs_fp32"].items():
            ours, theirs = speed["ours_int8"], speed["ort_int8"]
            verdict = "met" if ours >= theirs else f"MISSED by {100 * (1 - ours / theirs):.1f}%"
            lat = r["latency"][b]
            if ours < theirs and lat["ours_int8"]["p10_ms"] <= lat["ort_int8"]["p90_ms"]:
                verdict += " (inside the p10-p90 spread)"
            out.append(
                f"{name} {b}: ours {ours:.2f}x vs ORT quantizer {theirs:.2f}x over FP32 -> as fast as ORT: {verdict}"
            )
        b1 = r["speedup_vs_fp32"].get("b1", {}).get("ours_int8")
        if b1 is not None:
            verdict = "met" if b1 >= GOAL_SPEEDUP[name] else "MISSED"
            out.append(f"{name} b1: ours {b1:.2f}x faster than FP32 (goal >= {GOAL_SPEEDUP[name]}x): {verdict}")
        size = r["size_vs_fp32"]["ours_int8"]
        verdict = "met" if size <= GOAL_SIZE else "MISSED"
        out.append(f"{name}: ours {100 * size:.1f}% of FP32 file size (goal <= {100 * GOAL_SIZE:.0f}%): {verdict}")
    return out


def op_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for r in results["models"]:
        for k in VARIANTS:
            ops = ", ".join(f"{op} {n}" for op, n in r["ort_optimized_ops"][k].items())
            out.append(f"{r['model']} {LABELS[k]}: {ops}")
    return out


def analysis(results: dict[str, Any]) -> list[str]:
    """Facts that explain the numbers, computed from this run (no hand-written conclusions)."""
    out = []
    for r in results["models"]:
        ops = r["ort_optimized_ops"]
        same = ops["ours_int8"] == ops["ort_int8"]
        out.append(
            f"{r['model']}: onnxruntime runs {'the same' if same else 'different'} fused graphs for both INT8 files "
            f"({ops['ours_int8'].get('QLinearConv', 0)} vs {ops['ort_int8'].get('QLinearConv', 0)} QLinearConv of "
            f"{r['convs_in_graph']} convs, {ops['ours_int8'].get('QGemm', 0)} vs {ops['ort_int8'].get('QGemm', 0)} "
            f"QGemm, {ops['ours_int8'].get('QLinearAdd', 0)} vs {ops['ort_int8'].get('QLinearAdd', 0)} QLinearAdd, "
            f"{ops['ours_int8'].get('total_nodes')} vs {ops['ort_int8'].get('total_nodes')} nodes)."
        )
        for b, lat in r["latency"].items():
            ours, theirs = lat["ours_int8"], lat["ort_int8"]
            overlap = ours["p10_ms"] <= theirs["p90_ms"] and theirs["p10_ms"] <= ours["p90_ms"]
            out.append(
                f"{r['model']} {b}: ours {ours['median_ms']:.1f} ms vs ORT's {theirs['median_ms']:.1f} ms median "
                f"(p10 {ours['p10_ms']:.1f} vs {theirs['p10_ms']:.1f}); p10-p90 ranges "
                f"{'overlap' if overlap else 'do not overlap'}."
            )
        if same:
            out.append(
                f"{r['model']}: both INT8 files run as the same onnxruntime kernels, so the latency gap between them "
                "is measurement noise at this load, not a difference in the exported graphs."
            )
        fp32 = r["file_bytes"]["fp32"]
        for k in ("ours_int8", "ort_int8"):
            parts = ", ".join(
                f"{role} {100 * n / fp32:.2f}%" for role, n in sorted(r["size_breakdown_bytes"][k].items())
            )
            out.append(f"{r['model']} {LABELS[k]} file, as % of the FP32 file: {parts}.")
        ours = r["size_breakdown_bytes"]["ours_int8"]
        floor = ours.get("weights", 0) + ours.get("biases", 0) + ours.get("scales", 0)
        out.append(
            f"{r['model']}: int8 weights + int32 biases + per-channel scales (all needed for QLinearConv/QGemm "
            f"fusion) are {100 * floor / fp32:.2f}% of the FP32 file before any graph node is counted."
        )
    return out


def write_report(results: dict[str, Any], out_dir: Path) -> str:
    env, load = results["environment"], results["load"]
    busy = "; ".join(f"{p['command'][:60]} ({p['cpu_percent']:.0f}% CPU)" for p in load["after"]["busy_processes"])
    text = "\n".join(
        [
            "# INT8 ONNX export benchmark",
            "",
            f"{env['date']} - {env['cpu']} ({env['cpus']} CPUs), onnxruntime {env['onnxruntime']}, "
            f"torch {env['torch']}, {results['config']['threads']} intra-op threads, inter-op 1.",
            f"Load average before / after: {load['before']['loadavg_1_5_15']} / {load['after']['loadavg_1_5_15']}; "
            f"other busy processes at the end: {busy or 'none'}.",
            "Latency: median of timed runs in alternating per-model blocks "
            f"({results['config']['runs_b1']} at batch 1, {results['config']['runs_b32']} at larger batches), "
            "random input; top-1 on Imagenette val images with each file run by onnxruntime.",
            "",
            markdown(results),
            "",
            "## Goals",
            *[f"- {line}" for line in goals(results)],
            "",
            "## Measured facts behind the numbers",
            *[f"- {line}" for line in analysis(results)],
            "",
            "## onnxruntime's optimized graphs (ORT_ENABLE_EXTENDED, op counts)",
            *[f"- {line}" for line in op_lines(results)],
            "",
        ]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_export.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "bench_export.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(write_report(json.loads(Path(args.render).read_text()), Path(args.out)))
        return 0
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("workdir", "out", "render")},
        "environment": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "lightning_quant": lightning_quant.__version__,
        },
        "load": {"before": machine_load()},
        "models": [],
    }
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results["models"].append(bench_model(name, args, workdir))
    results["load"]["after"] = machine_load()
    print(write_report(results, Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
