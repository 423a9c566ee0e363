"""Side-by-side PTQ benchmark: lightning_quant against NNCF, torchao PT2E, MCT and onnxruntime ``quantize_static``.

Protocol (the same for every method, not tuned per tool):
- models: MobileNetV2 and ResNet50 (Imagenette), ResNet-20/56 (CIFAR-10), pretrained weights from ``<shared>/weights``;
- calibration: ``--calibration-size`` (512) images of the *train* split, seeded subset
  (:func:`lightning_quant.data.calibration_subset`, seed ``--seed``), batches of 32 (NNCF: single images, its
  documented recommendation, ``subset_size`` = all of them);
- evaluation: the whole val/test split (``--limit-eval N``: a seeded subset of N images; the JSON marks it partial),
  each tool's model run where the tool runs it: ours, NNCF, PT2E and MCT in torch (fake-quant / reference q-dq ops),
  onnxruntime ``quantize_static`` in onnxruntime;
- images are decoded once into uint8 arrays and normalized on the fly with exactly the ops of ToTensor + Normalize,
  so every method sees bit-identical inputs (checked at start-up against the datasets' own transform).

Methods: ``ours`` (our default call, ``quantize(model, data, target="x86")`` with nothing else: what a user gets
without choosing; ``ours_tensorrt`` the same call with ``target="tensorrt"``), ``ours_recipe`` (the model's recipe,
its scheme and ``quant.options`` read from the recipe file as the app reads them (:func:`recipe_settings`), e.g.
``recipes/recipe/mobilenetv2_ptq_imagenette.yaml``; the recipe's activation settings and options hold in every
variant below but ``ours_dpu``),
``ours_per_tensor`` (same with per-tensor weights), ``ours_pow2`` (power-of-two scales, symmetric int8 activations),
``ours_per_tensor_cle`` (8-bit per-tensor weights with the data-free recipe: ReLU6 -> ReLU, cross-layer
equalization, bias correction; ``recipes/recipe/mobilenetv2_ptq_imagenette_per_tensor.yaml``), ``ours_dpu`` (the Vitis
AI DPU scheme, power-of-two per-tensor, with the same three algorithms, as Vitis AI applies CLE and bias correction),
``ours_best`` (our most accurate per-channel PTQ in ``scripts/bench_accuracy.py``: ``x86_vnni`` 8-bit per-channel
weights, bias correction, and the model's best activation estimator: MSE for MobileNetV2 as
``recipes/recipe/mobilenetv2_ptq_imagenette_mse_bc.yaml``, ``mean_minmax`` for ResNet50, min/max otherwise),
``nncf`` (``nncf.quantize`` defaults), ``pt2e`` (``torch.export`` + ``prepare_pt2e`` with torchao's
``X86InductorQuantizer`` default config + ``convert_pt2e``), ``mct`` (``mct.ptq.pytorch_post_training_quantization``
defaults), ``ort`` (float ONNX -> ``quant_pre_process`` -> ``quantize_static``: QDQ, per-channel, QUInt8 activations,
QInt8 weights, MinMax); ``nncf_per_tensor`` and ``ort_per_tensor`` are the same two calls with per-tensor weights
(NNCF: ``weights_quantization_params=QuantizationParameters(per_channel=False)``; ORT: ``per_channel=False``), the
peers' side of the per-tensor comparison. A ``float`` row is always measured first (torch top-1, FP32 ONNX latency
and size).

Each method runs in a fresh ``spawn`` subprocess, so a missing peer is a "not installed" row, a crashing one a row
with its error, and memory is measured per method. Calibration s: wall time of the tool's quantization call
(ours: ``quantize``; ORT: ``quant_pre_process`` + ``quantize_static``, the float ONNX export excluded).
Peak RSS MB: growth of the process's peak resident set during that call (``/proc/self/clear_refs`` resets
``VmHWM`` to the current RSS after model and calibration images are loaded; the number is ``VmHWM`` after the call
minus ``VmRSS`` before it). ONNX INT8 ms: onnxruntime CPU provider, batch 1, ``--threads`` intra-op threads, median
of ``--latency-runs`` runs; once a model's methods are done, all its ONNX files are timed again in alternating blocks
of 10 runs (order rotated each round) so that load from other processes hits them alike, and that figure is reported
(the first, sequential one stays in the JSON as ``onnx_ms_sequential``; the load average is recorded with each).
``--retime JSON --workdir DIR`` redoes only that timing for the files a run kept in ``--workdir``.
Agrees with float %: the images a method classifies as the float model does (every row keeps its predictions, base64
in the JSON); a top-1 loss of an ``ours`` row names the images only the peer and only ours get right and their exact
McNemar p-value, "within noise" when p >= 0.05 (``scripts/paired_comparison.py``).

Usage:
    PYTHONPATH=. .venv-bench/bin/python scripts/bench_peers.py --smoke
    PYTHONPATH=. .venv-bench/bin/python scripts/bench_peers.py --models resnet20 resnet56 mobilenet_v2
    PYTHONPATH=. .venv-bench/bin/python scripts/bench_peers.py --models resnet50 --methods ours ort --limit-eval 1000
    PYTHONPATH=. .venv-bench/bin/python scripts/bench_peers.py --retime scripts/results/bench_peers.json --workdir DIR
    PYTHONPATH=. .venv-bench/bin/python scripts/bench_peers.py --summary scripts/results/bench_peers_*_full.json
Writes ``--out`` (default ``scripts/results/bench_peers.json``) and the table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from paired_comparison import agreement, compare, decode_predictions, encode_predictions
from results_io import RESULTS_DIR, repo_relative

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # ImageNet mean/std: every model here uses them
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
# Each model's scheme and options come from its recipe (recipe_settings): only the data, the recipe's name and the
# calibration batching are stated here.
MODELS: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {"data": "imagenette", "recipe": "mobilenetv2_ptq_imagenette"},
    "resnet50": {
        "data": "imagenette",
        "recipe": "resnet50_ptq_imagenette",
        "calib_batch": 128,  # the recipe's batch size (mean_minmax does not depend on it; the DPU vote does)
    },
    "resnet20": {"data": "cifar10", "recipe": "resnet20_ptq_cifar10"},
    "resnet56": {"data": "cifar10", "recipe": "resnet20_ptq_cifar10", "note": "settings (no resnet56 recipe)"},
}
METHODS = ("ours", "ours_tensorrt", "ours_recipe")  # our default call (x86, tensorrt), then the model's recipe
METHODS += ("ours_per_tensor", "ours_pow2", "ours_per_tensor_cle", "ours_dpu", "ours_best")
METHODS += ("nncf", "pt2e", "mct", "ort", "nncf_per_tensor", "ort_per_tensor")
# the data-free recipe of the ours_per_tensor_cle and ours_dpu variants
DATA_FREE = {"replace_relu6": True, "cross_layer_equalization": True, "bias_correction": True}
VARIANT_OPTIONS = {"ours_per_tensor_cle": DATA_FREE, "ours_dpu": DATA_FREE, "ours_best": {"bias_correction": True}}
NOTES = {"replace_relu6": "ReLU6 -> ReLU", "cross_layer_equalization": "CLE", "bias_correction": "bias correction"}
NOTES |= {"range_search": "activation range search", "adaround": "AdaRound", "fast_finetune": "fast finetune"}
NOTES |= {"adaround_per_sample": "per-sample AdaRound"}
PEERS = {"nncf": "nncf", "pt2e": "torchao", "mct": "model_compression_toolkit", "ort": "onnxruntime.quantization"}
PEERS |= {"nncf_per_tensor": "nncf", "ort_per_tensor": "onnxruntime.quantization"}  # the same calls, per-tensor weights
PIP_NAMES = {"nncf": "nncf", "pt2e": "torchao", "mct": "model-compression-toolkit", "ort": "onnxruntime"}
VERSIONED = ("lightning-quant", "torch", "torchvision", "onnx", "onnxruntime", "nncf", "torchao")
VERSIONED += ("model-compression-toolkit", "mct-quantizers", "numpy")
CALIB_BATCH = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all; smoke: resnet20")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--calibration-size", type=int, default=512, help="train images, the same for every method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset (and of --limit-eval)")
    parser.add_argument("--limit-eval", type=int, default=None, help="evaluate a seeded subset of N images (partial)")
    parser.add_argument("--smoke", action="store_true", help="wiring check: 32 calibration / 64 eval images, 3 runs")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 onnxruntime runs per model")
    parser.add_argument("--method-timeout", type=float, default=3600.0, help="seconds before a method is stopped")
    parser.add_argument("--workdir", type=Path, default=None, help="keep decoded data and .onnx files here")
    parser.add_argument("--retime", type=Path, default=None, help="only re-time the ONNX files of this results JSON")
    parser.add_argument(
        "--summary", type=Path, nargs="+", default=None, help="only print the top-1 of each model's defaults (JSONs)"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: scripts/results/bench_peers.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.calibration_size = min(args.calibration_size, 32)
        args.limit_eval = min(args.limit_eval or 64, 64)
        args.latency_runs = min(args.latency_runs, 3)
        args.models = args.models or ["resnet20"]
    args.models = args.models or list(MODELS)
    if args.out is None:  # a smoke run never overwrites the measured results
        smoke_out = Path(tempfile.gettempdir()) / "bench_peers_smoke.json"
        args.out = smoke_out if args.smoke else RESULTS_DIR / "bench_peers.json"
    return args


# ------------------------------------------------------------------------------------------------- environment
def cpu_info() -> dict[str, Any]:
    """CPU model, core count and the int8 dot-product extensions onnxruntime's kernels care about."""
    name, flags = platform.processor() or "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {"cpu": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "vnni": vnni or "none"}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_commit() -> str:
    """The repository's HEAD (``+dirty`` with uncommitted changes), or ``unknown``."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def installed(method: str) -> bool:
    module = PEERS.get(method)
    if module is None:
        return True
    with contextlib.suppress(ModuleNotFoundError, ValueError):
        return importlib.util.find_spec(module) is not None
    return False


# -------------------------------------------------------------------------------------------------------- data
def _raw_datasets(name: str) -> tuple[Any, Any]:
    """(train_eval, val) datasets of the model's data, transform cut to uint8 pixels after resize/crop."""
    from torchvision import transforms

    if MODELS[name]["data"] == "cifar10":
        from lightning_quant.data import CIFAR10DataModule

        datasets = CIFAR10DataModule(num_workers=0).build_datasets()
    else:
        from lightning_quant.data import imagenette_datasets
        from lightning_quant.models import IMAGENETTE_EVAL_SIZES

        datasets = imagenette_datasets(**IMAGENETTE_EVAL_SIZES[name])
    for key in ("train_eval", "val"):
        full = datasets[key].transform
        geometric = list(full.transforms[:-2])  # everything before ToTensor + Normalize
        assert [type(t).__name__ for t in full.transforms[-2:]] == ["ToTensor", "Normalize"], full
        datasets[key].transform = transforms.Compose([*geometric, transforms.PILToTensor()])
        datasets[key].full_transform = full
    return datasets["train_eval"], datasets["val"]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW pixels -> model input, with the same float ops as ToTensor + Normalize (bit-identical)."""
    return pixels.float().div(255).sub_(MEAN).div_(STD)


def _decode(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=256, num_workers=2):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def prepare_data(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Decode the calibration subset and the evaluation images once into ``workdir/<name>_*.npy``."""
    from lightning_quant.data import calibration_subset

    train, val = _raw_datasets(name)
    calib = calibration_subset(train, args.calibration_size, seed=args.seed)
    evaluation = calibration_subset(val, args.limit_eval, seed=args.seed) if args.limit_eval else val
    for ds, base in ((calib, train), (evaluation, val)):  # the uint8 route must equal the datasets' own transform
        index = ds.indices[0] if hasattr(ds, "indices") else 0
        expected = base.full_transform(base.loader(base.samples[index][0]))
        if not torch.equal(normalize(base[index][0].unsqueeze(0))[0], expected):
            raise RuntimeError(f"{name}: uint8 + normalize differs from the dataset transform; fix normalize()")
    paths = {}
    for key, ds in (("calib", calib), ("val", evaluation)):
        x, y = _decode(ds)
        paths[f"{key}_x"], paths[f"{key}_y"] = workdir / f"{name}_{key}_x.npy", workdir / f"{name}_{key}_y.npy"
        np.save(paths[f"{key}_x"], x)
        np.save(paths[f"{key}_y"], y)
    return {k: str(v) for k, v in paths.items()} | {"eval_images": len(evaluation), "val_split": len(val)}


class Data:
    """What a worker needs: calibration batches (float, in memory) and the evaluation split (uint8, memory-mapped)."""

    def __init__(self, paths: dict[str, Any], batch_size: int) -> None:
        calib = torch.from_numpy(np.load(paths["calib_x"]))
        self.calib = [normalize(calib[i : i + CALIB_BATCH]) for i in range(0, len(calib), CALIB_BATCH)]
        self.val_x = np.load(paths["val_x"], mmap_mode="r")
        self.val_y = np.load(paths["val_y"])
        self.batch_size = batch_size

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        for i in range(0, len(self.val_y), self.batch_size):
            yield (
                normalize(torch.from_numpy(np.array(self.val_x[i : i + self.batch_size]))),
                self.val_y[i : i + self.batch_size],
            )

    def example(self, batch: int = 1) -> torch.Tensor:
        return normalize(torch.from_numpy(np.array(self.val_x[:batch])))


# ------------------------------------------------------------------------------------------------- measurement
def build_model(name: str) -> torch.nn.Module:
    if MODELS[name]["data"] == "cifar10":
        from lightning_quant.models import cifar_resnet

        return cifar_resnet(int(name.removeprefix("resnet"))).eval()
    from lightning_quant.models import IMAGENETTE_MODELS

    return IMAGENETTE_MODELS[name]().eval()


def evaluate(predict: Callable[[torch.Tensor], Any], data: Data) -> dict[str, Any]:
    """Top-1 (percent) of ``predict`` (a batch of inputs -> logits, tensor or array) over the evaluation images, and
    every image's predicted class (:func:`paired_comparison.encode_predictions`: the table compares rows image by
    image)."""
    predictions, labels = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for x, y in data.eval_batches():
            logits = predict(x)
            logits = logits.detach().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
            predictions.append(logits.argmax(1))
            labels.append(y)
    predicted, labels = np.concatenate(predictions), np.concatenate(labels)
    return {
        "top1": 100.0 * float((predicted == labels).mean()),
        "eval_images": len(labels),
        "eval_s": time.perf_counter() - start,
        "predictions": encode_predictions(predicted),
    }


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def calibration_cost(result: dict[str, Any]) -> Iterator[None]:
    """Wall time and peak-RSS growth of the block, into ``result`` (``calibration_s``, ``peak_rss_mb``)."""
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    except OSError:
        reset = False
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    yield
    result["calibration_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = (_status_kb("VmHWM") - before) / 1024 if reset else None
    result["rss_before_mb"] = before / 1024


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(session: Any) -> Callable[[torch.Tensor], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def onnx_cost(path: Path, data: Data, opts: dict[str, Any]) -> dict[str, Any]:
    """File size and batch-1 latency (median of ``latency_runs`` after 5 warm-up runs) of an ONNX file."""
    session = ort_session(path, opts["threads"])
    name, x = session.get_inputs()[0].name, data.example(1).numpy()
    for _ in range(5):
        session.run(None, {name: x})
    times = []
    for _ in range(opts["latency_runs"]):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "onnx_ms": statistics.median(times),
        "onnx_ms_p10_p90": [float(np.percentile(times, 10)), float(np.percentile(times, 90))],
        "onnx_mb": path.stat().st_size / 2**20,
        "loadavg_at_latency": round(os.getloadavg()[0], 2),
    }


def first_line(error: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return f"{type(error).__name__}: {(text[0] if text else '')[:limit]}"


def attempt(result: dict[str, Any], what: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run an optional step (an export); a failure becomes a note instead of failing the row."""
    try:
        result.update(fn())
    except Exception as error:  # noqa: BLE001 - peer exporters raise anything; the row records it
        result["notes"].append(f"{what} failed: {first_line(error)}")


# ----------------------------------------------------------------------------------------------------- methods
def run_float(name: str, data: Data, opts: dict[str, Any]) -> dict[str, Any]:
    from lightning_quant.export import export_float_onnx

    model = build_model(name)
    result = evaluate(model, data) | {"notes": ["FP32 model in torch; ONNX: FP32 export"]}
    path = Path(opts["workdir"]) / f"{name}_fp32.onnx"
    attempt(result, "float ONNX export", lambda: onnx_cost(export_float_onnx(model, path, data.example(1)), data, opts))
    return result


@functools.cache
def recipe_settings(name: str) -> tuple[Any, Any]:
    """``(scheme, options)`` of the model's recipe, built as the app builds them (``python train.py recipe=...``
    calibrates with exactly these), so that the ``ours`` row cannot drift from the recipe it names."""
    from lightning_quant.app import compose_config
    from lightning_quant.app.main import quant_options, quant_scheme

    cfg = compose_config([f"recipe={MODELS[name]['recipe']}"])
    return quant_scheme(cfg, "ptq"), quant_options(cfg, "ptq")


def activation_overrides(scheme: Any) -> dict[str, Any]:
    """The ``activation_<field>`` overrides that turn the target's default scheme into ``scheme``'s activations (the
    model's activation settings, kept by the variants with another target or weight format)."""
    from lightning_quant import scheme_for_target

    default = scheme_for_target(scheme.target, "ptq").activation.to_dict()
    return {f"activation_{k}": v for k, v in scheme.activation.to_dict().items() if default[k] != v}


DEFAULT_CALLS = {"ours": "x86", "ours_tensorrt": "tensorrt"}  # quantize(model, data, target=...) and nothing else


def ours_scheme(name: str, variant: str) -> Any:
    from lightning_quant import scheme_for_target

    recipe, _ = recipe_settings(name)
    if variant == "ours_recipe":
        return recipe
    if variant == "ours_dpu":
        return scheme_for_target("dpu")
    act = activation_overrides(recipe)
    if variant == "ours_per_tensor_cle":
        return scheme_for_target("x86_vnni", weight_granularity="per_tensor", **act)
    if variant == "ours_best":
        return scheme_for_target("x86_vnni", **act)
    overrides = dict(act)
    if variant == "ours_per_tensor":
        overrides["weight_granularity"] = "per_tensor"
    elif variant == "ours_pow2":
        overrides |= {"weight_scale_type": "power_of_two", "activation_scale_type": "power_of_two"}
        overrides |= {"activation_symmetric": True, "activation_signed": True}
    return scheme_for_target(recipe.target, **overrides)


def ours_options(name: str, variant: str) -> Any:
    """The recipe's options (none for ``ours_dpu``) with the variant's switches on top."""
    import dataclasses

    from lightning_quant import QuantOptions

    base = QuantOptions() if variant == "ours_dpu" else recipe_settings(name)[1]
    return dataclasses.replace(base, **VARIANT_OPTIONS.get(variant, {}))


def option_notes(options: Any) -> list[str]:
    """The switches ``options`` turns on, in the order they run, as the table's notes name them."""
    on = [*options.network_transforms, *options.refinements]
    if options.adaround_per_sample:
        on.insert(on.index("adaround") + 1, "adaround_per_sample")
    return [NOTES[k] for k in on]


def run_ours(name: str, data: Data, opts: dict[str, Any], variant: str = "ours_recipe") -> dict[str, Any]:
    from lightning_quant import export_onnx, quantize

    if variant in DEFAULT_CALLS:
        return run_default_call(name, data, opts, variant)
    model, scheme, options = build_model(name), ours_scheme(name, variant), ours_options(name, variant)
    entry = MODELS[name]
    recipe = f"recipe {entry['recipe']}" + (f" {entry['note']}" if "note" in entry else "")
    result: dict[str, Any] = {"notes": [recipe if variant == "ours_recipe" else variant]}
    w, a = scheme.weight, scheme.activation
    result["notes"].append(
        f"w {w.bits}-bit {w.granularity.value} {w.scale_type.value}, a {'u' if not a.signed else ''}int8 "
        f"{'sym' if a.symmetric else 'asym'} {a.scale_type.value} {a.observer}"
        + (f" {a.percentile}" if a.observer == "percentile" else "")
    )
    per = MODELS[name].get("calib_batch", CALIB_BATCH) // CALIB_BATCH  # the same images, in the recipe's batches
    calib = [torch.cat(data.calib[i : i + per]) for i in range(0, len(data.calib), per)]
    with calibration_cost(result):
        qmodel = quantize(model, calib, scheme=scheme, options=options, progress=False)
    if option_notes(options):
        result["notes"].append(", ".join(option_notes(options)))
    result |= evaluate(qmodel, data)
    path = Path(opts["workdir"]) / f"{name}_{variant}.onnx"
    attempt(result, "export_onnx", lambda: onnx_cost(export_onnx(qmodel, path, data.example(8)), data, opts))
    return result


def run_default_call(name: str, data: Data, opts: dict[str, Any], variant: str) -> dict[str, Any]:
    """``quantize(model, data, target=...)`` with nothing else, in batches of 32 as the peers calibrate."""
    from lightning_quant import export_onnx, quantize
    from lightning_quant.quantizers.prepare import prepare_info

    target = DEFAULT_CALLS[variant]
    model = build_model(name)
    result: dict[str, Any] = {"notes": [f'default call: quantize(model, data, target="{target}")']}
    with calibration_cost(result):
        qmodel = quantize(model, data.calib, target=target, progress=False)
    info = prepare_info(qmodel)
    w, a = info.scheme.weight, info.scheme.activation
    result["notes"].append(
        f"w {w.bits}-bit {w.granularity.value}, a {'u' if not a.signed else ''}int8 {a.observer}; "
        + (", ".join(NOTES.get(s, s) for s in info.refinements) or "no refinement")
    )
    result |= evaluate(qmodel, data)
    path = Path(opts["workdir"]) / f"{name}_{variant}.onnx"
    attempt(result, "export_onnx", lambda: onnx_cost(export_onnx(qmodel, path, data.example(8)), data, opts))
    return result


def run_nncf(name: str, data: Data, opts: dict[str, Any], per_channel: bool = True) -> dict[str, Any]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # its 60 s default is shorter than a 2-core build
    with contextlib.suppress(ImportError):  # build (once, cached) and load the C++ CPU kernels before timing
        from nncf.torch.quantization.extensions import QuantizedFunctionsCPULoader

        QuantizedFunctionsCPULoader.load()
    model = build_model(name)
    singles = [x[i : i + 1] for x in data.calib for i in range(len(x))]  # NNCF recommends batch-1 items
    result: dict[str, Any] = {"notes": [f"nncf.quantize defaults, {len(singles)} batch-1 items = subset_size"]}
    advanced = {}
    if not per_channel:  # the one change: weights_quantization_params=QuantizationParameters(per_channel=False)
        params = QuantizationParameters(per_channel=False)
        advanced["advanced_parameters"] = AdvancedQuantizationParameters(weights_quantization_params=params)
        result["notes"].append("but per-tensor weights (QuantizationParameters(per_channel=False))")
    with calibration_cost(result):
        qmodel = nncf.quantize(model, nncf.Dataset(singles), subset_size=len(singles), **advanced)
    result |= evaluate(qmodel, data)
    path = Path(opts["workdir"]) / f"{name}_{ONNX_FILES['nncf' if per_channel else 'nncf_per_tensor']}.onnx"

    def export() -> dict[str, Any]:
        from nncf.torch.quantization.layers import QuantizerExportMode

        for module in qmodel.modules():  # the default FakeQuantize export is an OpenVINO op onnxruntime cannot run
            if hasattr(module, "set_export_mode"):
                module.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
        torch.onnx.export(qmodel, (data.example(1),), str(path), dynamo=False, opset_version=13)
        result["notes"].append("ONNX: torch.onnx.export (TorchScript exporter), NNCF's Q/DQ-pair export mode")
        return onnx_cost(path, data, opts)

    attempt(result, "ONNX export", export)
    return result


def run_pt2e(name: str, data: Data, opts: dict[str, Any]) -> dict[str, Any]:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = build_model(name)
    result: dict[str, Any] = {"notes": ["X86InductorQuantizer default config; converted model run in torch eager"]}
    with calibration_cost(result):
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(model, (data.calib[0],), dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x in data.calib:
                prepared(x)
        qmodel = convert_pt2e(prepared)
    result |= evaluate(qmodel, data)
    result["notes"].append("no ONNX: PT2E deploys through torch.compile/inductor (not timed here)")
    return result


def run_mct(name: str, data: Data, opts: dict[str, Any]) -> dict[str, Any]:
    import model_compression_toolkit as mct

    model = build_model(name)
    result: dict[str, Any] = {"notes": ["mct.ptq.pytorch_post_training_quantization defaults (IMX500 TPC)"]}

    def representative() -> Iterator[list[torch.Tensor]]:
        for x in data.calib:
            yield [x]

    with calibration_cost(result):
        qmodel, _ = mct.ptq.pytorch_post_training_quantization(model, representative)
    qmodel.eval()
    result |= evaluate(lambda x: qmodel(x.to(next(qmodel.parameters()).device)).cpu(), data)
    path = Path(opts["workdir"]) / f"{name}_mct.onnx"

    def export() -> dict[str, Any]:
        mct.exporter.pytorch_export_model(
            qmodel,
            save_model_path=str(path),
            repr_dataset=lambda: iter([[data.example(1)]]),
            quantization_format=mct.exporter.QuantizationFormat.FAKELY_QUANT,
        )
        result["notes"].append("ONNX: MCT FAKELY_QUANT export (weights stored as float)")
        return onnx_cost(path, data, opts)

    attempt(result, "ONNX export", export)
    return result


def run_ort(name: str, data: Data, opts: dict[str, Any], per_channel: bool = True) -> dict[str, Any]:
    from bench_export import export_ort_quantized  # the same quantize_static call as the export benchmark

    from lightning_quant.export import export_float_onnx

    work = Path(opts["workdir"])
    fp32 = export_float_onnx(build_model(name), work / f"{name}_ort_fp32.onnx", data.example(1))
    path = work / f"{name}_{ONNX_FILES['ort' if per_channel else 'ort_per_tensor']}.onnx"
    weights = "per-channel" if per_channel else "per-tensor (per_channel=False)"
    result: dict[str, Any] = {"notes": [f"quant_pre_process + quantize_static QDQ, {weights}, U8 act / S8 w, MinMax"]}
    with calibration_cost(result):
        export_ort_quantized(fp32, path, data.calib, per_channel=per_channel)
    result |= evaluate(ort_predict(ort_session(path, opts["threads"])), data)
    result["notes"].append("evaluated in onnxruntime (fused integer kernels)")
    result |= onnx_cost(path, data, opts)
    return result


RUNNERS: dict[str, Callable[[str, Data, dict[str, Any]], dict[str, Any]]] = {
    "float": run_float,
    "ours": functools.partial(run_ours, variant="ours"),
    "ours_tensorrt": functools.partial(run_ours, variant="ours_tensorrt"),
    "ours_recipe": run_ours,
    "ours_per_tensor": functools.partial(run_ours, variant="ours_per_tensor"),
    "ours_pow2": functools.partial(run_ours, variant="ours_pow2"),
    "ours_per_tensor_cle": functools.partial(run_ours, variant="ours_per_tensor_cle"),
    "ours_dpu": functools.partial(run_ours, variant="ours_dpu"),
    "ours_best": functools.partial(run_ours, variant="ours_best"),
    "nncf": run_nncf,
    "pt2e": run_pt2e,
    "mct": run_mct,
    "ort": run_ort,
    "nncf_per_tensor": functools.partial(run_nncf, per_channel=False),
    "ort_per_tensor": functools.partial(run_ort, per_channel=False),
}


# ---------------------------------------------------------------------------------------------------- isolation
def _worker(name: str, method: str, paths: dict[str, Any], opts: dict[str, Any], conn: Any) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(opts["threads"])
    try:
        result = RUNNERS[method](name, Data(paths, opts["batch_size"]), opts) | {"status": "ok"}
    except ImportError as error:
        result = {"status": "not installed", "notes": [f"{type(error).__name__}: {error}"]}
    except Exception as error:  # noqa: BLE001 - a crashing peer becomes a row with its error
        tb = traceback.format_exc(limit=-3)
        result = {"status": "error", "notes": [first_line(error, 300)]}
        result["traceback"] = tb
    conn.send(result)
    conn.close()


def run_isolated(name: str, method: str, paths: dict[str, Any], opts: dict[str, Any], timeout: float) -> dict:
    """Run one method in a fresh spawned process; a timeout or a hard crash becomes an error row."""
    if not installed(method):
        return {"status": "not installed", "notes": [f"pip install {PIP_NAMES[method]} (or '.[bench]')"]}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(name, method, paths, opts, child), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    result: dict[str, Any] | None = None
    if parent.poll(timeout):
        with contextlib.suppress(EOFError):
            result = parent.recv()
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        why = f"timed out after {timeout:.0f} s" if time.perf_counter() - start >= timeout else "process died"
        result = {"status": "error", "notes": [f"{why} (exit code {proc.exitcode})"]}
    result["wall_s"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------------------- report
COLUMNS = (
    "model",
    "method",
    "top-1 %",
    "drop vs float (points)",
    "agrees with float %",
    "calibration s",
    "peak RSS MB",
    "ONNX INT8 ms (b1, median)",
    "ONNX MB",
    "notes",
)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


LOSS_CHECKS = (  # (key, label, unit), all costs: lower is better; lost when a peer is more than 5 % lower
    ("onnx_ms", "ONNX latency", "ms"),
    ("onnx_mb", "ONNX file", "MB"),
    ("calibration_s", "calibration", "s"),
    ("peak_rss_mb", "calibration memory", "MB"),
)


def annotate_losses(rows: list[dict[str, Any]], labels: dict[str, np.ndarray] | None = None) -> None:
    """Add "LOSS" notes to each ``ours`` / ``ours_tensorrt`` / ``ours_recipe`` / ``ours_best`` row: peers with a
    higher top-1 (any margin) or a cost lower by > 5 %. With the model's ``labels`` and both rows' predictions, a
    top-1 loss says whether it is more than noise (:func:`paired_comparison.compare`: the images only the peer and
    only ours get right, and the McNemar p-value of that split)."""
    ours = ("ours", "ours_tensorrt", "ours_recipe", "ours_best")
    labels = labels or {}
    for row in (r for r in rows if r["method"] in ours and r["status"] == "ok"):
        row["notes"] = [n for n in row["notes"] if not n.startswith("LOSS:")]  # idempotent: re-rendered rows
        peers = [r for r in rows if r["model"] == row["model"] and r["method"] in PEERS and r["status"] == "ok"]
        for peer in peers:
            if peer["top1"] > row["top1"]:
                note = f"LOSS: {peer['method']} top-1 +{peer['top1'] - row['top1']:.2f}"
                if row["model"] in labels and "predictions" in row and "predictions" in peer:
                    paired = compare(
                        decode_predictions(peer["predictions"]), decode_predictions(row["predictions"]),
                        labels[row["model"]],
                    )  # fmt: skip
                    note += f" ({paired.describe()}{'' if paired.significant else ': within noise'})"
                row["notes"].append(note)
            for key, label, unit in LOSS_CHECKS:
                mine, theirs = row.get(key), peer.get(key)
                if mine is not None and theirs is not None and theirs < 0.95 * mine:
                    row["notes"].append(f"LOSS: {peer['method']} {label} {theirs:.2f} vs {mine:.2f} {unit}")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ok = r["status"] == "ok"
        notes = "; ".join(r.get("notes", [])) if ok else f"**{r['status']}**: " + "; ".join(r.get("notes", []))
        cells = [
            r["model"],
            r["method"],
            _fmt(r.get("top1"), ".2f"),
            _fmt(r.get("drop_points"), "+.2f") if r["method"] != "float" else "-",
            _fmt(r.get("agree_float"), ".2f") if r["method"] != "float" else "-",
            _fmt(r.get("calibration_s"), ".1f"),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            _fmt(r.get("onnx_ms"), ".2f"),
            _fmt(r.get("onnx_mb"), ".2f"),
            notes.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ONNX_FILES = {"float": "fp32", "ours": "ours", "ours_per_tensor": "ours_per_tensor", "ours_pow2": "ours_pow2",
              "ours_per_tensor_cle": "ours_per_tensor_cle", "ours_dpu": "ours_dpu"}  # fmt: skip
ONNX_FILES |= {"ours_best": "ours_best", "ours_tensorrt": "ours_tensorrt", "ours_recipe": "ours_recipe"}
ONNX_FILES |= {"nncf": "nncf", "mct": "mct", "ort": "ort_int8", "nncf_per_tensor": "nncf_per_tensor"}
ONNX_FILES |= {"ort_per_tensor": "ort_per_tensor_int8"}  # <workdir>/<model>_<this>.onnx, as the runners write


def retime_latency(rows: list[dict[str, Any]], workdir: Path, name: str, threads: int, runs: int) -> None:
    """Re-time all ONNX files of one model in alternating blocks of 10 runs (2 untimed runs before each block, order
    rotated each round), so load from other processes hits every method alike; replaces ``onnx_ms`` of its rows
    (the first, sequential measurement stays in ``onnx_ms_sequential``)."""
    timed = {}
    for row in rows:
        path = workdir / f"{name}_{ONNX_FILES.get(row['method'], '')}.onnx"
        if row["model"] == name and row.get("onnx_ms") is not None and path.is_file():
            timed[row["method"]] = (row, ort_session(path, threads))
    pixels = torch.from_numpy(np.array(np.load(workdir / f"{name}_val_x.npy", mmap_mode="r")[:1]))
    x, keys, times = normalize(pixels).numpy(), list(timed), {k: [] for k in timed}
    for round_index in range(-(-runs // 10)):
        shift = round_index % max(len(keys), 1)
        for key in keys[shift:] + keys[:shift]:
            session = timed[key][1]
            feed = {session.get_inputs()[0].name: x}
            for _ in range(2):
                session.run(None, feed)
            for _ in range(min(10, runs - round_index * 10)):
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append((time.perf_counter() - start) * 1e3)
    for key, (row, _) in timed.items():
        row.setdefault("onnx_ms_sequential", row["onnx_ms"])
        row["onnx_ms"] = statistics.median(times[key])
        row["onnx_ms_p10_p90"] = [float(np.percentile(times[key], 10)), float(np.percentile(times[key], 90))]
        row["latency_timing"] = f"round-robin over {len(timed)} files, loadavg {os.getloadavg()[0]:.2f}"


def retime_main(args: argparse.Namespace) -> int:
    """``--retime JSON --workdir DIR``: re-time the ONNX files a finished (or stopped) run left in its workdir."""
    if args.workdir is None:
        raise SystemExit("--retime needs --workdir, the folder the measured run kept its .onnx files in")
    result = json.loads(args.retime.read_text())
    for name in result["data"]:
        retime_latency(result["rows"], args.workdir, name, args.threads, args.latency_runs)
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    result["latency_command"] = f"PYTHONPATH=. python scripts/{cmd}"
    write_results(result, args.retime)
    print(table(json.loads(args.retime.read_text())["rows"]))
    return 0


def markdown(result: dict[str, Any]) -> str:
    env, cpu = result["versions"], result["machine"]
    peer_versions = ", ".join(f"{k} {env[k]}" for k in VERSIONED if k in env)
    partial = [f"{m}: {d['eval_images']} of {d['val_split']}" for m, d in result["data"].items() if d["partial"]]
    head = [
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date_utc']}; machine: {cpu['cpu']}, {cpu['cores']} cores, VNNI: {cpu['vnni']}; "
        f"load average at start / end: {result['loadavg_start']} / {result['loadavg_end']}  ",
        f"Versions: {peer_versions}  ",
        *([f"Latency re-timed: `{result['latency_command']}`  "] if "latency_command" in result else []),
        f"Calibration: {result['calibration_size']} train images (seed {result['seed']}); evaluation: "
        + ("partial, " + "; ".join(partial) if partial else "the whole val/test split")
        + "  ",
        "",
    ]
    if not result.get("complete"):
        head.insert(-1, "**Incomplete run**: stopped before every model and method was measured; these rows are all.")
    return "\n".join(head) + "\n" + table(result["rows"]) + "\n"


SUMMARY_METHODS = ("ours", "nncf", "pt2e", "mct", "ort")  # every tool's default, one column each


def summary(results: list[dict[str, Any]]) -> str:
    """One line per model of the finished runs ``results``: top-1 (gain vs float) of each tool's default, the best
    in bold; "fails" for a method that ran and failed, "-" for one that was not run.

    Example:
        >>> rows = [{"model": "m", "method": "float", "status": "ok", "top1": 80.0},
        ...         {"model": "m", "method": "ours", "status": "ok", "top1": 80.5, "drop_points": -0.5},
        ...         {"model": "m", "method": "pt2e", "status": "error"}]
        >>> print(summary([{"rows": rows}]).splitlines()[-1])
        | m (80.00) | **80.50 (+0.50)** | - | fails | - | - |
    """
    lines = ["| model (float top-1) | " + " | ".join(SUMMARY_METHODS) + " |", "|---" * (len(SUMMARY_METHODS) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for result in results for r in result["rows"]):
        rows = {r["method"]: r for result in results for r in result["rows"] if r["model"] == model}
        ok = {m: r for m, r in rows.items() if m in SUMMARY_METHODS and r["status"] == "ok"}
        best = max((r["top1"] for r in ok.values()), default=None)
        cells = []
        for method in SUMMARY_METHODS:
            if method not in ok:
                cells.append("fails" if method in rows else "-")
                continue
            text = f"{ok[method]['top1']:.2f} ({-ok[method]['drop_points']:+.2f})"
            cells.append(f"**{text}**" if ok[method]["top1"] == best else text)
        lines.append(f"| {model} ({rows['float']['top1']:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def finish_rows(rows: list[dict[str, Any]], data: dict[str, Any] | None = None) -> None:
    """Derived columns from the raw rows: the drop vs float, the agreement with the float model's predictions
    (``agree_float``: percent of images classified as the float model does) and the loss notes; ``data`` is the
    result's ``data`` entry (each model's labels)."""
    floats = {r["model"]: r for r in rows if r["method"] == "float" and r["status"] == "ok"}
    labels = {m: decode_predictions(d["labels"]) for m, d in (data or {}).items() if "labels" in d}
    for r in rows:
        reference = floats.get(r["model"])
        if r["method"] == "float" or r.get("top1") is None or reference is None:
            continue
        r["drop_points"] = reference["top1"] - r["top1"]
        if "predictions" in r and "predictions" in reference:
            r["agree_float"] = agreement(*(decode_predictions(x["predictions"]) for x in (r, reference)))
    annotate_losses(rows, labels)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"  {r['model']:<13} {r['method']:<16} {r['status']:<13} top-1 {_fmt(r.get('top1'), '6.2f')}  "
        f"calib {_fmt(r.get('calibration_s'), '7.1f')} s  rss {_fmt(r.get('peak_rss_mb'), '6.0f')} MB  "
        f"onnx {_fmt(r.get('onnx_ms'), '6.2f')} ms  ({r['wall_s']:.0f} s)",
        flush=True,
    )
    if r["status"] != "ok":
        print("    " + "; ".join(r.get("notes", [])), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retime is not None:
        return retime_main(args)
    if args.summary is not None:
        print(summary([json.loads(path.read_text()) for path in args.summary]))
        return 0
    cmd = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    result: dict[str, Any] = {
        "command": f"PYTHONPATH=. python scripts/{cmd}",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "versions": versions(),
        "threads": args.threads,
        "calibration_size": args.calibration_size,
        "calibration_split": "train",
        "seed": args.seed,
        "smoke": args.smoke,
        "limit_eval": args.limit_eval,
        "python_executable": sys.executable,
        "git_commit": git_commit(),
        "complete": False,
        "loadavg_start": round(os.getloadavg()[0], 2),
        "data": {},
        "rows": [],
    }
    opts = {"threads": args.threads, "batch_size": args.batch_size, "latency_runs": args.latency_runs}
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_peers_")))
        workdir.mkdir(parents=True, exist_ok=True)
        opts["workdir"] = str(workdir)
        for name in args.models:
            start = time.perf_counter()
            paths = prepare_data(name, args, workdir)
            info = {k: paths[k] for k in ("eval_images", "val_split")}
            result["data"][name] = info | {"partial": info["eval_images"] < info["val_split"]}
            result["data"][name]["labels"] = encode_predictions(np.load(paths["val_y"]))  # for the paired comparison
            print(f"{name}: {info['eval_images']} eval images, data ready in {time.perf_counter() - start:.0f} s")
            for method in ("float", *args.methods):
                row = {"model": name, "method": method} | run_isolated(name, method, paths, opts, args.method_timeout)
                row["partial"] = result["data"][name]["partial"]
                result["rows"].append(row)
                print_row(row)
                write_results(result, args.out)  # after every row: a long run that is stopped keeps what it measured
            retime_latency(result["rows"], workdir, name, args.threads, args.latency_runs)
            write_results(result, args.out)
    result["complete"] = True
    write_results(result, args.out)
    print("\n" + table(json.loads(args.out.read_text())["rows"]))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def write_results(result: dict[str, Any], out: Path) -> None:
    """JSON and Markdown table of the rows measured so far (drops and loss notes recomputed from the raw rows)."""
    rows = [dict(r, notes=list(r.get("notes", []))) for r in result["rows"]]
    finish_rows(rows, result.get("data"))
    final = result | {"rows": rows, "loadavg_end": round(os.getloadavg()[0], 2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(repo_relative(json.dumps(final, indent=2, default=str)) + "\n")
    out.with_suffix(".md").write_text(repo_relative(markdown(final)))


if __name__ == "__main__":
    sys.exit(main())
