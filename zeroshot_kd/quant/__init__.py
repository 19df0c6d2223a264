"""Low-bit fake-quantized students: quantizer modules, BN folding, range calibration, block reconstruction,
KD fine-tuning, student files and reports (``zkd calibrate``)."""

from .fakequant import FakeQuantizer, int_range, sqnr_db
from .finetuning import finetune
from .fold import fold_bn
from .modules import LayerConfig, QuantConfig, QuantConv2d, QuantLinear, quant_layers, quantize_model
from .student import load_student, save_student

__all__ = [
    "FakeQuantizer",
    "LayerConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "finetune",
    "fold_bn",
    "int_range",
    "load_student",
    "quant_layers",
    "quantize_model",
    "save_student",
    "sqnr_db",
]
