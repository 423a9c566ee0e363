"""The export step of an app run (``deploy=true``): write the ``export.formats`` artefacts and check each one
against the fake-quant model on validation images spread over the whole evaluation set.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    >>> [len(b[0]) for b in verification_batches(DataLoader(data, batch_size=4), 2)]
    [4, 4]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

__all__ = ["export_artefacts", "verification_batches"]


def export_artefacts(cfg: DictConfig, network: torch.nn.Module, dm: Any, out_dir: Path) -> dict[str, Any]:
    """Write the artefacts listed in ``export.formats`` (verification gate on) and check them on val batches.

    Each artefact is written under a staging name and gets its final name (``model_int8.onnx`` ...) only once it
    passed the check on the validation batches; one that fails is kept as ``rejected_<name>`` for inspection, so
    a file under the deployable name has always been verified. The reference is the network as it deploys
    (:func:`~lightning_quant.quantizers.convert`): a QAT network's conv + BatchNorm folded, and on the DPU its
    folded bias quantized, which training does not simulate. An XModel moves together with its quant_info file
    (``model_int8.xmodel`` + ``model_int8.quant_info.json``). With ``deploy_check=true`` the XModel must also
    reproduce the fake-quant model layer by layer on the first example input (:mod:`.deploy_check_step`).
    """
    from lightning_quant.app.deploy_check_step import run_deploy_check
    from lightning_quant.export import (
        ExportVerificationError,
        export_onnx,
        export_torchscript,
        export_xmodel,
        verify_export,
    )
    from lightning_quant.export._atomic import replace_together
    from lightning_quant.export.deploy_check import DeployCheckError
    from lightning_quant.export.xmodel import quant_info_path_for
    from lightning_quant.quantizers import convert

    def move(src: Path, dst: Path) -> None:  # an XModel and its quant_info file move as one
        pairs = [(src, dst)]
        if src.suffix == ".xmodel" and quant_info_path_for(src).exists():
            pairs.append((quant_info_path_for(src), quant_info_path_for(dst)))
        replace_together(pairs)

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # its per-initializer INFO lines flood Hydra's log
    batches = verification_batches(dm.val_dataloader(), max(1, cfg.export.verify_batches))
    example = batches[0][0][:1]
    network = network.cpu().eval()
    deployed = convert(network)  # what every file computes; the same model for a PTQ network
    artefacts: dict[str, Any] = {}
    for fmt in cfg.export.formats:
        final = out_dir / {"onnx": "model_int8.onnx", "xmodel": "model_int8.xmodel"}.get(fmt, "model_int8.pt")
        staged = final.with_name(f"unverified_{final.name}")
        if fmt == "onnx":
            export_onnx(network, staged, example, opset=cfg.export.opset, verify=cfg.export.verify,
                        min_top1_agreement=cfg.export.min_top1_agreement)  # fmt: skip
        elif fmt == "xmodel":
            export_xmodel(network, staged, example)
        else:
            export_torchscript(network, staged, example, verify=cfg.export.verify,
                               min_top1_agreement=cfg.export.min_top1_agreement)  # fmt: skip
        entry: dict[str, Any] = {"path": str(final), "bytes": staged.stat().st_size}
        if fmt == "xmodel":
            entry["quant_info"] = str(quant_info_path_for(final))
        if cfg.export.verify and cfg.export.verify_batches > 0:
            try:
                report = verify_export(deployed, staged, batches, min_top1_agreement=cfg.export.min_top1_agreement,
                                       latency_runs=0)  # fmt: skip
            except ExportVerificationError as error:
                rejected = final.with_name(f"rejected_{final.name}")
                move(staged, rejected)
                raise ExportVerificationError(
                    f"{error} Nothing was written as {final.name}; the rejected file is {rejected}. If the "
                    f"disagreement is a few images of {_images_in(batches)}, check on more images with "
                    "export.verify_batches=N."
                ) from error
            entry.update(
                top1_agreement=report.top1_agreement,
                near_tie_flips=report.near_tie_flips,
                top1=_pct(report.artifact_accuracy),
                model_top1=_pct(report.model_accuracy),
                verify_images=report.num_samples,
            )
        if fmt == "xmodel" and cfg.get("deploy_check", False):
            try:
                entry["deploy_check"] = run_deploy_check(network, staged, example, out_dir)
            except DeployCheckError as error:
                rejected = final.with_name(f"rejected_{final.name}")
                move(staged, rejected)
                message = f"{error} Nothing was written as {final.name}; the rejected file is {rejected}."
                raise DeployCheckError(message) from error
        move(staged, final)
        artefacts[fmt] = entry
    return artefacts


def _images_in(batches: list[Any]) -> int:
    """How many images ``batches`` (``(images, labels)`` pairs or image tensors) hold."""
    return sum(len(b[0]) if isinstance(b, (list, tuple)) else len(b) for b in batches)


def verification_batches(loader: DataLoader, num_batches: int) -> list[Any]:
    """``num_batches`` batches of images spread evenly over the evaluation set (not its first, one-class files).

    Image folders list their files class by class, so the first batches would check the artefacts on one class.
    """
    dataset = loader.dataset
    count = min(len(dataset), num_batches * (loader.batch_size or 1))  # type: ignore[arg-type]
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()  # type: ignore[arg-type]
    subset = torch.utils.data.Subset(dataset, indices)
    spread = DataLoader(subset, batch_size=loader.batch_size, num_workers=0, collate_fn=loader.collate_fn)
    return list(spread)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value
