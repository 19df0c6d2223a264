"""Load any model file zkd evaluates: a student file, an exported ONNX graph, or a teacher spec.

Its own module (not :mod:`zeroshot_kd.evaluate`) because it sits *above* the model formats: it imports
:mod:`zeroshot_kd.quant.student` (whose package imports the training loop, which imports the evaluator),
:mod:`zeroshot_kd.teachers` and :mod:`zeroshot_kd.export.runtime`. Keeping the evaluator free of these imports keeps
the package's import graph acyclic (``tests/test_layering.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .export.runtime import load_onnx_model
from .quant.student import is_student_file, load_student
from .teachers import load_teacher

__all__ = ["load_model"]


def load_model(spec: str, device: torch.device | str = "cpu", **teacher_kwargs: Any) -> tuple[nn.Module, Any, dict]:
    """Load ``spec`` as an ONNX graph (``*.onnx``), a student file (``zkd calibrate --out``) or else a teacher spec.

    ``trust_builders=True`` (among ``teacher_kwargs``) applies to students and teachers: see
    :mod:`zeroshot_kd.modelspec`.

    Returns:
        (model in eval mode, its InputSpec, a description dict with ``kind`` "onnx", "student" or "teacher").
    """
    if str(spec).lower().endswith(".onnx"):  # a 'zkd export' graph, run by ONNX Runtime (kind "onnx")
        return load_onnx_model(spec)
    if Path(spec).is_file() and is_student_file(spec):
        student = load_student(spec, device=device, trust_builders=teacher_kwargs.get("trust_builders", False))
        return student, student.zkd_spec, {"kind": "student", "spec": spec,
                                           "convention": student.zkd_info["config"].get("convention")}
    t = load_teacher(spec, device=device, **teacher_kwargs)
    return t.model, t.spec, {"kind": "teacher", "spec": spec, "weights_sha256": t.weights_sha256}
