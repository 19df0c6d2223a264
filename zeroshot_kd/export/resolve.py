"""What ``zkd export --model X --format F`` exports: the student of a student file, or a float teacher.

``--format onnx`` needs a student file. ``--format onnx-fp32`` takes a teacher spec, or a student file, whose
recorded teacher (source and input spec) is reloaded and checked against the recorded weight hash, so the FP32
baseline is the very model the student was made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ZkdError
from ..spec import InputSpec

__all__ = ["resolve_export_model", "teacher_of_student"]


def teacher_of_student(obj: dict[str, Any]) -> Any:
    """Reload the teacher a student file records (its source spec, weights and input spec).

    Raises:
        ZkdError: the teacher cannot be found here, or its weights differ from the recorded hash.
    """
    from ..teachers import load_teacher

    t = obj["teacher"]
    spec = InputSpec.from_dict(t["input_spec"])
    if not t.get("spec"):
        raise ZkdError("the student file does not record its teacher's spec; pass the teacher as --model SPEC")
    teacher = load_teacher(t["spec"], weights=t.get("weights"), arch=t.get("arch"), num_classes=spec.num_classes,
                           image_size=spec.image_size, channels=spec.channels, mean=spec.mean, std=spec.std)
    random_init = t.get("kind") in ("torchvision", "module") and not t.get("weights")
    if t.get("weights_sha256") and teacher.weights_sha256 != t["weights_sha256"] and not random_init:
        raise ZkdError(f"teacher {t['spec']} here has other weights than the student was made from "
                       "(sha256 differs); pass the right teacher as --model SPEC")
    return teacher


def resolve_export_model(model_spec: str, fmt: str,
                         teacher_kwargs: dict[str, Any]) -> tuple[nn.Module, InputSpec, str, dict[str, Any]]:
    """The model to export, its input spec, the default check-data source and a description.

    Args:
        model_spec: a student file or (onnx-fp32 only) a teacher spec.
        fmt: ``onnx`` (QDQ student) or ``onnx-fp32`` (float teacher).
        teacher_kwargs: ``load_teacher`` overrides for a teacher spec (``spec`` itself is ignored).

    Returns:
        (model, spec, check-data source, {"what": one-line description, "meta": metadata for the file}).
    """
    from ..quant.student import is_student_file, load_student, read_student_file
    from ..teachers import load_teacher

    student_file = Path(model_spec).is_file() and is_student_file(model_spec)
    if fmt == "onnx":
        if not student_file:
            raise ZkdError(f"--format onnx exports a student file and {model_spec} is none; pass the --out of "
                           "'zkd calibrate', or use --format onnx-fp32 for a float model")
        student = load_student(model_spec)
        cal = student.zkd_info.get("calibration") or {}
        source = cal.get("data") or "gaussian:256"
        meta = {"teacher": student.zkd_info["teacher"], "student_file": Path(model_spec).name}
        what = f"student {model_spec}: {student.zkd_info['config'].get('convention', '')}"
        return student, student.zkd_spec, source, {"what": what, "meta": meta}
    if fmt != "onnx-fp32":
        raise ZkdError(f"unknown export format {fmt!r}; use onnx or onnx-fp32")
    if student_file:
        obj = read_student_file(model_spec)
        teacher = teacher_of_student(obj)
        source = (obj.get("calibration") or {}).get("data") or "gaussian:256"
        what = f"FP32 teacher {obj['teacher'].get('spec')} of student {model_spec}"
    else:
        kw = {k: v for k, v in teacher_kwargs.items() if k != "spec"}
        teacher = load_teacher(model_spec, **kw)
        source = "gaussian:256"
        what = f"FP32 teacher {model_spec}"
    model = teacher.model
    model.zkd_spec = teacher.spec  # type: ignore[attr-defined]
    return model, teacher.spec, source, {"what": what, "meta": {"teacher": teacher.to_dict()}}
