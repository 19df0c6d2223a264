"""Resolving ``--teacher`` (and any other model spec) into a frozen, eval-mode module and its input spec.

A spec is tried, in order, as:

1. an existing **file**: a checkpoint (bare state_dict, ``{"model": ...}``, ``{"state_dict": ...}``, ``module.``
   prefixes), loaded with ``weights_only=True``. Its architecture comes from ``arch=`` (any spec of forms 2-4) or a
   JSON card beside it (``NAME.json``, as shipped in ``assets/`` and written by ``zkd distill``);
2. ``module:function``: a callable returning an ``nn.Module`` (``weights=`` may then name a state-dict file);
3. a **torchvision** model name (``torchvision.models.get_model``) with ``weights=`` a weights enum name
   (``DEFAULT``, ``IMAGENET1K_V2``, ...), a local state-dict file, or ``none``;
4. a **built-in** teacher shipped in ``assets/`` (``fmnist_resnet14``, the default; ``fmnist_mobilenetv2``).

How architectures are named, recorded and re-built is :mod:`zeroshot_kd.modelspec`'s: the builder a card names
must be on its allow-list unless ``trust_builders=True``; a ``module:function`` passed here as ``spec``/``arch``
is the user's own choice and always allowed. The returned model is in eval mode with ``requires_grad`` off;
nothing in zkd modifies it, and ``Teacher.record`` says how to rebuild its architecture.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ZkdError
from .io import safe_torch_load
from .modelspec import (TORCHVISION_GET_MODEL, ModelRecord, assets_dir, build_model, builtin_teachers,
                        is_module_function, read_card, torchvision_names)
from .spec import InputSpec

__all__ = [
    "DEFAULT_TEACHER",
    "Teacher",
    "assets_dir",
    "builtin_teachers",
    "file_sha256",
    "load_checkpoint_state",
    "load_teacher",
    "state_sha256",
]

DEFAULT_TEACHER = "fmnist_resnet14"
IMAGENET_SPEC = InputSpec(3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1000)


@dataclass
class Teacher:
    """A frozen classifier with everything needed to feed it and to record where it came from.

    Attributes:
        model: the module, eval mode, no gradients.
        spec: its input specification.
        source: provenance written into manifests and reports (kind, spec, weights, sha256 of the file).
        weights_sha256: hash of the state_dict tensors; identifies the weights whatever the file format.
        classes: class names where known (shipped card, torchvision weights meta), for previews and reports.
        record: how to rebuild the untrained architecture (:class:`~zeroshot_kd.modelspec.ModelRecord`), with
            the weights' provenance, the input spec and the first/last layers; None for hand-made Teachers.
    """

    model: nn.Module
    spec: InputSpec
    source: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    classes: list[str] | None = None
    record: ModelRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.source, "weights_sha256": self.weights_sha256, "input_spec": self.spec.to_dict()}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's state_dict, in order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state_dict from a checkpoint file, unwrapping the common containers and ``module.`` prefixes."""
    obj = safe_torch_load(path, "cannot read checkpoint {path} with weights_only=True ({error}); save a "
                                "state_dict with torch.save(model.state_dict(), PATH)",
                          missing="checkpoint {path} does not exist")
    for key in ("model", "state_dict", "model_state_dict", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ZkdError(f"checkpoint {path} holds no state_dict (a dict of tensors); save model.state_dict()")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ZkdError(f"weights {where} do not fit the architecture ({first}); check --arch / --num-classes") from None
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) + ("..." if len(result.missing_keys) > 3 else "")
        unexpected = ", ".join(result.unexpected_keys[:3]) + ("..." if len(result.unexpected_keys) > 3 else "")
        raise ZkdError(f"weights {where} do not fit the architecture (missing: {missing or '-'}; unexpected: "
                       f"{unexpected or '-'}); check --arch / --num-classes")


def _spec_from_options(base: InputSpec, num_classes: int | None, image_size: int | None, channels: int | None,
                       mean: Sequence[float] | None, std: Sequence[float] | None) -> InputSpec:
    c = channels or (len(mean) if mean else base.channels)
    mean_t = tuple(mean) if mean else (base.mean if c == base.channels else (0.5,) * c)
    std_t = tuple(std) if std else (base.std if c == base.channels else (0.5,) * c)
    size = image_size or base.image_size
    resize = base.resize_size if size == base.image_size else None  # the weights' margin holds for their crop only
    try:
        return InputSpec(c, size, mean_t, std_t, num_classes or base.num_classes, resize)
    except ValueError as e:
        raise ZkdError(f"bad input spec: {e}; pass --channels, --mean and --std consistently") from None


def _size(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def _torchvision_teacher(name: str, weights: str | None, num_classes: int | None
                         ) -> tuple[nn.Module, InputSpec, dict, ModelRecord]:
    import torchvision

    source: dict[str, Any] = {"kind": "torchvision", "spec": name}
    kwargs = {"num_classes": num_classes} if num_classes else {}
    if weights is None or weights.lower() == "none" or Path(weights).is_file():
        record = ModelRecord(TORCHVISION_GET_MODEL, {"name": name, **kwargs})
        model = build_model(record, user_spec=True)
        if weights is None or weights.lower() == "none":
            source["weights"] = None
        else:
            _load_state(model, load_checkpoint_state(weights), weights)
            source.update(weights=str(weights), sha256=file_sha256(weights))
            record = replace(record, weights=str(weights))
        return model, IMAGENET_SPEC, source, record
    try:
        enum_cls = torchvision.models.get_model_weights(name)
        w = enum_cls[weights.split(".")[-1]]
    except (KeyError, ValueError):
        options = ", ".join(["DEFAULT", "none", "PATH"] + [e.name for e in torchvision.models.get_model_weights(name)])
        raise ZkdError(f"unknown --weights {weights!r} for {name}; use one of: {options}") from None
    from torch.hub import get_dir

    cached = Path(get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        model = torchvision.models.get_model(name, weights=w)
    except Exception as e:  # no network: URLError, socket errors, HTTP errors
        raise ZkdError(f"cannot download {w} ({type(e).__name__}): put the file at {cached} "
                       f"or pass --weights PATH to a local state_dict") from None
    t = w.transforms()
    resize = getattr(t, "resize_size", None)
    spec = InputSpec(len(t.mean), _size(t.crop_size), tuple(t.mean), tuple(t.std), len(w.meta["categories"]),
                     None if resize is None else _size(resize))
    enum_name = f"{type(w).__name__}.{w.name}"
    source.update(weights=enum_name, url=w.url,
                  sha256=file_sha256(cached) if cached.is_file() else None, classes=list(w.meta["categories"]))
    return model, spec, source, ModelRecord(TORCHVISION_GET_MODEL, {"name": name}, weights=enum_name)


def load_teacher(
    spec: str | None = None,
    weights: str | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    trust_builders: bool = False,
) -> Teacher:
    """Resolve a teacher spec into a frozen :class:`Teacher` (see the module docstring for the forms).

    Args:
        spec: file path, ``module:function``, torchvision name, or built-in name; None = the shipped default.
        weights: torchvision weights enum name, a state-dict path, or ``none``.
        arch: architecture for a checkpoint file that does not carry one (forms 2-4).
        num_classes, image_size, channels, mean, std: input-spec overrides for custom teachers.
        device: where to put the model.
        trust_builders: call a builder that the card beside a checkpoint names even if it is not on the allow-list
            of :mod:`zeroshot_kd.modelspec` (warns). Only for files whose author you trust: it runs their code.

    Raises:
        ZkdError: unknown spec, unreadable file, weights that do not fit, a card naming a builder not on the
            allow-list (without ``trust_builders``).
    """
    spec = spec or DEFAULT_TEACHER
    base = IMAGENET_SPEC
    source: dict[str, Any]
    classes: list[str] | None = None
    path = Path(spec)
    if path.is_file():
        state = load_checkpoint_state(path)
        card_path = path.with_suffix(".json")
        if arch:
            t = load_teacher(arch, weights="none", num_classes=num_classes, image_size=image_size,
                             channels=channels, mean=mean, std=std, trust_builders=trust_builders)
            model, base, record = t.model, t.spec, t.record
        elif (card := read_card(card_path)) is not None:
            record = ModelRecord.from_dict(card, where=f"card {card_path}")
            if record.input_spec is None:
                raise ZkdError(f"card {card_path} has no input_spec; add one or pass --arch")
            model, base = build_model(record, trust_builders=trust_builders, where=f"card {card_path}"), \
                record.input_spec
        else:
            raise ZkdError(f"checkpoint {spec} holds only weights; pass --arch NAME (a torchvision model name, "
                           f"module:function, or one of: {', '.join(builtin_teachers()) or 'none'})")
        _load_state(model, state, str(path))
        assert record is not None
        record = replace(record, weights=str(path))
        source = {"kind": "file", "spec": str(path), "arch": arch or record.builder, "sha256": file_sha256(path)}
    elif is_module_function(spec):
        record = ModelRecord(spec, {"num_classes": num_classes} if num_classes else {})
        model = build_model(record, user_spec=True)
        source = {"kind": "module", "spec": spec, "weights": None}
        if weights and weights.lower() != "none":
            if not Path(weights).is_file():
                raise ZkdError(f"--weights {weights} does not exist; pass a state_dict file or 'none'")
            _load_state(model, load_checkpoint_state(weights), weights)
            source.update(weights=str(weights), sha256=file_sha256(weights))
            record = replace(record, weights=str(weights))
        if channels is None and mean is None:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            if first is not None:
                channels = first.in_channels
    elif spec in builtin_teachers():
        ckpt = assets_dir() / f"{spec}.pt"
        card_path = ckpt.with_suffix(".json")
        card = read_card(card_path) or {}
        record = replace(ModelRecord.from_dict(card, where=f"card {card_path}"), weights=spec)
        if record.input_spec is None:
            raise ZkdError(f"card {card_path} has no input_spec; reinstall zkd's assets")
        model, base = build_model(record, trust_builders=trust_builders, where=f"card {card_path}"), record.input_spec
        _load_state(model, load_checkpoint_state(ckpt), str(ckpt))
        source = {"kind": "builtin", "spec": spec, "sha256": file_sha256(ckpt),
                  "test_accuracy": card.get("test_accuracy")}
        classes = card.get("classes")
    elif spec in torchvision_names():
        model, base, source, record = _torchvision_teacher(spec, weights, num_classes)
        classes = source.pop("classes", None)
    elif ":" in spec or os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise ZkdError(f"teacher {spec!r} is neither an existing file nor an importable module:function")
    else:
        raise ZkdError(f"unknown teacher {spec!r}: not a file, module:function, torchvision model or built-in "
                       f"({', '.join(builtin_teachers()) or 'none shipped'})")
    input_spec = _spec_from_options(base, num_classes, image_size, channels, mean, std)
    model.eval().requires_grad_(False).to(device)
    if classes is not None and len(classes) != input_spec.num_classes:
        classes = None
    record = replace(record, input_spec=input_spec).with_layers(model)
    return Teacher(model, input_spec, source, state_sha256(model), classes, record)
