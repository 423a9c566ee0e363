"""Dynamic quantization of Linear layers: onnxruntime latency, file size and output error vs the float model.

For each model: the float ONNX file, ours (``quantize_dynamic`` + ``export_onnx``: DynamicQuantizeLinear ->
MatMulInteger) and onnxruntime's own ``quantize_dynamic`` on the float file (int8 weights, per-channel, its
defaults otherwise), timed round-robin in one process with the same input. Output SQNR (dB) against the float
ONNX output, on ``--samples`` random inputs.

Models (random weights; dynamic quantization needs no calibration data, and the SQNR compares like with like):

* ``ffn``: a transformer feed-forward stack, 4 x (768 -> 3072 -> GELU -> 768), on ``(1, 197, 768)`` tokens;
* ``mlp_head``: a classifier head 2048 -> 1024 -> ReLU -> 1000 on a batch of 32 feature vectors.

Usage:
    PYTHONPATH=. python scripts/bench_dynamic.py                    # both models, 300 timed runs each
    PYTHONPATH=. python scripts/bench_dynamic.py --runs 30          # quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from bench_export import session, time_round_robin
from results_io import RESULTS_DIR, run_header, write_results
from torch import nn

from lightning_quant import export_onnx, quantize_dynamic
from lightning_quant.export import export_float_onnx


def ffn() -> tuple[nn.Module, torch.Tensor]:
    blocks = [nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)) for _ in range(4)]
    return nn.Sequential(*blocks).eval(), torch.randn(1, 197, 768)


def mlp_head() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1000)).eval(), torch.randn(32, 2048)


MODELS = {"ffn": ffn, "mlp_head": mlp_head}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--target", default="x86", choices=["x86", "x86_vnni"])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "bench_dynamic.json")
    return parser.parse_args(argv)


def sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference - approx) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference**2)) / noise)


def ort_dynamic(fp32: Path, path: Path) -> Path:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    ort_quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return path


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model, x = MODELS[name]()
    files = {
        "float": export_float_onnx(model, workdir / f"{name}_fp32.onnx", x),
        "ours": export_onnx(quantize_dynamic(model, args.target), workdir / f"{name}_ours.onnx", x),
    }
    files["onnxruntime"] = ort_dynamic(files["float"], workdir / f"{name}_ort.onnx")
    sessions = {k: session(p, args.threads) for k, p in files.items()}
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(x.shape, generator=g).numpy() for _ in range(args.samples)]
    outputs = {k: np.concatenate([s.run(None, {s.get_inputs()[0].name: i})[0].ravel() for i in inputs])
               for k, s in sessions.items()}  # fmt: skip
    timing = time_round_robin(sessions, x.numpy(), args.runs, args.block)
    rows = {}
    for key, path in files.items():
        rows[key] = {
            "median_ms": timing[key]["median_ms"],
            "p90_ms": timing[key]["p90_ms"],
            "bytes": path.stat().st_size,
            "sqnr_db": None if key == "float" else sqnr(outputs["float"], outputs[key]),
        }
    for key in rows:
        rows[key]["speedup"] = rows["float"]["median_ms"] / rows[key]["median_ms"]
    return {"input_shape": list(x.shape), "rows": rows}


def table(results: dict[str, Any]) -> str:
    lines = ["| model | method | median ms | vs float | size MB | SQNR vs float dB |", "|---|---|---|---|---|---|"]
    for name, result in results.items():
        for key, r in result["rows"].items():
            sq = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
            lines.append(f"| {name} {tuple(result['input_shape'])} | {key} | {r['median_ms']:.2f} | "
                         f"{r['speedup']:.2f}x | {r['bytes'] / 1e6:.2f} | {sq} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = bench_model(name, args, Path(tmp))
            print(f"[bench] {name} done", file=sys.stderr, flush=True)
    text = table(results)
    payload = {**run_header("scripts/bench_dynamic.py", argv, args), "ort_version": ort.__version__,
               "results": results, "table": text}  # fmt: skip
    load = os.getloadavg()[0]
    write_results(args.out, payload, text, f"\n1-minute load average at the end: {load:.2f}\n")
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
