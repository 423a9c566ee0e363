"""Exporters: INT8 QDQ ONNX, TorchScript with int8 weights, Vitis AI XModel (uncompiled XIR), and verification;
the DPU inspector (which ops the Vitis AI DPU runs, before calibration)."""

from lightning_quant.export.dpu_inspector import DPUInspection, inspect_dpu
from lightning_quant.export.onnx import export_float_onnx, export_onnx
from lightning_quant.export.torchscript import export_torchscript
from lightning_quant.export.verify import ExportVerificationError, VerificationReport, verify_export
from lightning_quant.export.xmodel import export_xmodel

__all__ = [
    "DPUInspection",
    "ExportVerificationError",
    "VerificationReport",
    "export_float_onnx",
    "export_onnx",
    "export_torchscript",
    "export_xmodel",
    "inspect_dpu",
    "verify_export",
]
