"""Deployable students: ONNX export (QDQ graphs for ONNX Runtime) and running exported graphs.

Needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install zeroshot_kd[export]``); importing this
package works without them, exporting fails with one line saying what to install.
"""

from .api import DEFAULT_MIN_AGREEMENT, ExportResult, check_images, export_onnx
from .runtime import OrtModel, is_onnx_file, load_onnx_model, optimized_op_counts, ort_session

__all__ = ["DEFAULT_MIN_AGREEMENT", "ExportResult", "OrtModel", "check_images", "export_onnx", "is_onnx_file",
           "load_onnx_model", "optimized_op_counts", "ort_session"]
