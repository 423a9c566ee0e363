"""Exporters: INT8 QDQ ONNX, TorchScript with int8 weights, and the verification gate."""

from lightning_quant.export.onnx import export_onnx
from lightning_quant.export.torchscript import export_torchscript
from lightning_quant.export.verify import ExportVerificationError, VerificationReport, verify_export

__all__ = ["ExportVerificationError", "VerificationReport", "export_onnx", "export_torchscript", "verify_export"]
