"""Student files: one ``torch.save`` file holding everything needed to rebuild the fake-quantized student.

Contents (all plain containers and tensors, so ``torch.load(..., weights_only=True)`` reads it)::

    format           "zkd-student"
    format_version   2 (version 1 files still load; see below)
    zkd_version      version that wrote it
    config           QuantConfig (bits, w_asym, keep_8bit, fold_bn) and "convention", the one-line statement
    teacher          the teacher's provenance (source, weights_sha256, input_spec)
    architecture     how to build the float skeleton: a zeroshot_kd.modelspec.ModelRecord.to_dict() (older files:
                     {"torchvision": name, "kwargs": {...}}); None when it cannot be recorded (pass model=)
    folded           [[conv_path, bn_path], ...] BatchNorm layers folded into convs (replaced by Identity)
    layers           per quantized layer: kind, w_bits, a_bits, w_asym, role, a_signed, grids
    codes            per quantized layer: integer weight codes q. 8-bit layers: an int8 tensor (uint8 for asymmetric
                     8-bit grids) of the weight's shape. Layers of b < 8 bits: {"bits": b, "qmin": q_min,
                     "shape": [...], "packed": uint8 tensor}, the codes ``q - q_min`` (in [0, 2^b - 1]) flattened in
                     C order and bit-packed little-endian by :func:`zeroshot_kd.quant.packing.pack_bits`
    state            the rest of the state_dict: biases, weight scales/zero points (``*.wq.*``), activation
                     scales/zero points (``*.aq.*``), any BatchNorm kept unfolded. Scales are float32 (their
                     precision); zero points, integers, are stored in the smallest integer dtype holding them
                     (uint8 for every zkd grid)
    size             {"fp32_bytes": bytes of the float teacher's state_dict} when known (model-size reports)
    calibration      summary of how it was made (data, methods, timing)
    channel_clips    (only when cross-layer equalization rescaled ReLU6 clip points) module paths replaced by
                     ``ChannelClip``; their per-channel bounds are ``<path>.upper`` in ``state``

Version 1 (zkd 0.1.0) stored every code as one int8/uint8 byte and zero points as float32, with no ``size``.
:func:`read_student_file` returns both versions in the version-1 layout (codes as integer tensors of the weight's
shape, zero points as float32), so code reading a student file needs no version check.

The weight of a quantized layer is rebuilt as ``(q - z) * s``; fake-quantizing it again gives the same codes, so
the reloaded student reproduces the saved one's outputs bit for bit.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..version import __version__
from ..errors import ZkdError
from ..io import atomic_write_bytes, load_versioned
from ..modelspec import ModelRecord, build_model, spec_record
from ..spec import InputSpec
from .equalize import ChannelClip
from .fold import set_module
from .modules import LayerConfig, QuantConfig, quant_layers, quantize_model
from .packing import pack_bits, unpack_bits

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "architecture_record", "build_architecture", "is_student_file",
           "load_student", "read_student_file", "save_student", "student_spec"]

FORMAT = "zkd-student"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def architecture_record(teacher: Any) -> dict[str, Any] | None:
    """How to build an untrained copy of ``teacher``'s architecture (a :meth:`ModelRecord.to_dict`); None if unknown.

    Uses ``teacher.record`` (set by :func:`~zeroshot_kd.load_teacher`), else the spec in its provenance.
    """
    record = getattr(teacher, "record", None)
    if record is None:
        src = getattr(teacher, "source", None) or {}
        spec = src.get("arch") if src.get("kind") == "file" else src.get("spec")
        if src.get("kind") not in ("builtin", "torchvision", "module", "file") or not spec:
            return None
        record = spec_record(spec, teacher.spec.num_classes)
    return None if record is None else record.to_dict()


def build_architecture(record: dict[str, Any], trust_builders: bool = False, where: str = "student file") -> nn.Module:
    """Build the float skeleton described by an :func:`architecture_record` (or a version-1 student file's record).

    The builder is named by a file, so it must be on :mod:`zeroshot_kd.modelspec`'s allow-list unless
    ``trust_builders`` is set.
    """
    return build_model(ModelRecord.from_dict(record, where=where), trust_builders=trust_builders, where=where)


def _layer_record(lc: LayerConfig, layer: nn.Module) -> dict[str, Any]:
    d = {"kind": lc.kind, "w_bits": lc.w_bits, "a_bits": lc.a_bits, "w_asym": lc.w_asym, "role": lc.role,
         "a_signed": bool(layer.aq is not None and not layer.aq.symmetric),
         "w_grid": [layer.wq.qmin, layer.wq.qmax]}
    if layer.aq is not None:
        d["a_grid"] = [layer.aq.qmin, layer.aq.qmax]
    return d


def _pack_codes(q: torch.Tensor, bits: int, qmin: int, qmax: int) -> torch.Tensor | dict[str, Any]:
    """A layer's codes as stored in format version 2 (see the module docstring)."""
    if bits >= 8:
        dtype = torch.uint8 if qmin >= 0 and qmax > 127 else (
            torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16)
        return q.to(torch.int16).to(dtype).cpu().contiguous()
    return {"bits": int(bits), "qmin": int(qmin), "shape": list(q.shape),
            "packed": pack_bits(q.to(torch.int64) - qmin, bits)}


def _unpack_codes(entry: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    """Codes of one layer as an integer tensor of the weight's shape (either storage form)."""
    if isinstance(entry, torch.Tensor):
        return entry
    shape = [int(d) for d in entry["shape"]]
    count = 1
    for d in shape:
        count *= d
    bits, qmin = int(entry["bits"]), int(entry["qmin"])
    q = unpack_bits(entry["packed"], bits, count) + qmin
    return q.to(torch.int8 if qmin >= -128 and qmin + (1 << bits) - 1 <= 127 else torch.int16).view(shape)


def _is_zero_point(key: str) -> bool:
    return key.endswith((".wq.zero_point", ".aq.zero_point"))


def _compact_zero_point(t: torch.Tensor) -> torch.Tensor:
    """Integer-valued float zero points in the smallest integer dtype holding them exactly (else unchanged)."""
    if t.numel() == 0 or not torch.equal(t, torch.round(t)):
        return t
    lo, hi = float(t.min()), float(t.max())
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t


def _fp32_bytes(teacher: Any) -> int | None:
    model = getattr(teacher, "model", None)
    if not isinstance(model, nn.Module):
        return None
    return int(sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                   for t in model.state_dict().values()))


def save_student(path: str | os.PathLike, student: nn.Module, config: QuantConfig, layers: dict[str, LayerConfig],
                 teacher: Any, folded: list[tuple[str, str]], architecture: dict[str, Any] | None,
                 calibration: dict[str, Any] | None = None) -> None:
    """Write a student file atomically (see the module docstring for the format)."""
    qlayers = dict(quant_layers(student))
    codes: dict[str, Any] = {}
    for name, layer in qlayers.items():
        q = layer.wq.quantize(layer.weight)
        codes[name] = _pack_codes(q, layer.wq.bits, layer.wq.qmin, layer.wq.qmax)
    skip = {f"{name}.weight" for name in qlayers}
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k not in skip}
    state = {k: _compact_zero_point(v) if _is_zero_point(k) else v for k, v in state.items()}
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zkd_version": __version__,
        "config": {**config.to_dict(), "convention": config.convention()},
        "teacher": teacher.to_dict() if hasattr(teacher, "to_dict") else dict(teacher),
        "architecture": architecture,
        "folded": [list(p) for p in folded],
        "layers": {name: _layer_record(layers[name], layer) for name, layer in qlayers.items()},
        "codes": codes,
        "state": state,
        "size": {"fp32_bytes": _fp32_bytes(teacher)},
        "calibration": json.loads(json.dumps(calibration or {}, default=str)),
    }
    clips = [n for n, m in student.named_modules() if isinstance(m, ChannelClip)]
    if clips:  # cross-layer equalization replaced ReLU6 modules (the per-channel bounds are in ``state``)
        obj["channel_clips"] = clips
    # Serialize to memory first: torch.save names the zip archive after the file it writes, and the temporary
    # name holds the PID, so saving to a file directly would make the bytes differ from run to run.
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_student_file(path: str | os.PathLike, decode: bool = True) -> dict[str, Any] | None:
    """The contents of a student file; None if ``path`` is a readable torch file of another kind.

    Args:
        path: the file.
        decode: return codes unpacked and zero points as float32 (the version-1 layout, whatever the file's
            version); False returns the stored objects as they are (packed codes, integer zero points).

    Raises:
        ZkdError: missing/unreadable file, or a student file of an unknown format version.
    """
    if not Path(path).is_file():
        raise ZkdError(f"student file {path} does not exist; pass the --out of 'zkd calibrate'")
    obj = load_versioned(path, FORMAT, READABLE_VERSIONS, "student", "re-run 'zkd calibrate'")
    if obj is None or not decode:
        return obj
    try:
        obj["codes"] = {name: _unpack_codes(entry) for name, entry in obj["codes"].items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ZkdError(f"{path}: damaged weight codes ({type(e).__name__}: {e}); re-run 'zkd calibrate'") from None
    obj["state"] = {k: v.to(torch.float32) if _is_zero_point(k) and not v.is_floating_point() else v
                    for k, v in obj["state"].items()}
    return obj


def is_student_file(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file written by :func:`save_student` (any format version)."""
    if not Path(path).is_file():
        return False
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def student_spec(obj: dict[str, Any]) -> InputSpec:
    """The input spec recorded in a student file's contents."""
    return InputSpec.from_dict(obj["teacher"]["input_spec"])


def load_student(path: str | os.PathLike, model: nn.Module | None = None,
                 device: str | torch.device = "cpu", trust_builders: bool = False) -> nn.Module:
    """Rebuild a saved fake-quantized student as an eval-mode module (no CLI needed).

    Args:
        path: a file written by ``zkd calibrate --out``.
        model: an (untrained) float instance of the teacher's architecture, needed only when the file does not
            record how to build it (teachers given as arbitrary objects).
        device: where to put the module.
        trust_builders: build the architecture even if the file names a builder that is not on the allow-list of
            :mod:`zeroshot_kd.modelspec` (warns); only for files whose author you trust, as it runs their code.

    Returns:
        The student, in eval mode with gradients off; ``student.zkd_spec`` is its InputSpec and
        ``student.zkd_info`` the file's config/teacher/calibration records.

    Raises:
        ZkdError: missing or unreadable file, unknown format version, an architecture that does not match, or a
            builder not on the allow-list.
    """
    obj = read_student_file(path)
    if obj is None:
        raise ZkdError(f"{path} is not a zkd student file (format {FORMAT!r}); pass the --out of 'zkd calibrate'")
    if model is None:
        if not obj.get("architecture"):
            raise ZkdError(f"{path} does not record how to build its architecture; call "
                           "load_student(path, model=<untrained instance of the teacher's architecture>)")
        model = build_architecture(obj["architecture"], trust_builders, f"student file {path}")
    model = model.cpu().eval()
    for conv_name, bn_name in obj["folded"]:
        try:
            conv = model.get_submodule(conv_name)
            model.get_submodule(bn_name)
        except AttributeError:
            raise ZkdError(f"{path}: the architecture has no layer {conv_name!r}/{bn_name!r}; it does not match "
                           "the student") from None
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        set_module(model, bn_name, nn.Identity())
    if obj.get("channel_clips"):
        for clip_path in obj["channel_clips"]:
            upper = obj["state"].get(f"{clip_path}.upper")
            if upper is None:
                raise ZkdError(f"{path}: the file lacks the clip bounds of {clip_path!r}; it is damaged")
            set_module(model, clip_path, ChannelClip(upper.numel(), upper))
    config = QuantConfig.from_dict({k: v for k, v in obj["config"].items() if k != "convention"},
                                    where=f"{path}: config")
    overrides = {name: LayerConfig(name, d["kind"], int(d["w_bits"]), None if d["a_bits"] is None else int(d["a_bits"]),
                                   bool(d["w_asym"]), d.get("role", ""), bool(d.get("a_signed", False)))
                 for name, d in obj["layers"].items()}
    layers = quantize_model(model, config, overrides)
    if set(layers) != set(overrides):
        extra = sorted(set(overrides) - set(layers))[:3]
        raise ZkdError(f"{path}: student layers {extra} are not in the architecture; it does not match the file")
    result = model.load_state_dict(obj["state"], strict=False)
    expected_missing = {f"{name}.weight" for name in layers}
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        bad = sorted(missing)[:2] + sorted(result.unexpected_keys)[:2]
        raise ZkdError(f"{path}: state does not fit the architecture ({', '.join(bad)}); the file is damaged or "
                       "was written for another model")
    with torch.no_grad():
        for name, layer in quant_layers(model):
            q = obj["codes"][name].to(torch.float32)
            shape = [-1] + [1] * (layer.weight.dim() - 1)
            s, z = layer.wq.scale.view(shape), layer.wq.zero_point.view(shape)
            if tuple(q.shape) != tuple(layer.weight.shape):
                raise ZkdError(f"{path}: codes of {name} have shape {tuple(q.shape)}, the layer "
                               f"{tuple(layer.weight.shape)}; the file does not match the architecture")
            layer.weight.copy_(((q - z) * s).to(layer.weight.dtype))
    model.eval().requires_grad_(False).to(device)
    model.zkd_spec = student_spec(obj)  # type: ignore[attr-defined]
    model.zkd_info = {k: obj[k] for k in ("config", "teacher", "calibration", "layers")}  # type: ignore[attr-defined]
    return model
