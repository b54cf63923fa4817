"""ONNX for deployment: export rewritten models with each method as an ONNX local function."""

from .export import OnnxExport, OnnxValidationError, export_onnx, onnxruntime_error
from .functions import DOMAIN
from .fusion import rewrite_onnx

__all__ = [
    "DOMAIN",
    "OnnxExport",
    "OnnxValidationError",
    "export_onnx",
    "onnxruntime_error",
    "rewrite_onnx",
]
