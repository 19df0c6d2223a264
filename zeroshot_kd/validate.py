"""Up-front checks of user input: numbers, output locations and a teacher's input spec, before any work or output.

Each check raises :class:`~zeroshot_kd.errors.ZkdError` with one line naming the problem, so a bad option never
ends in a shape error deep inside a forward pass or a half-made output folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ZkdError
from .spec import InputSpec

__all__ = ["check_finite", "check_teacher_input", "check_writable", "smallest_input_problem"]


def check_finite(values: Mapping[str, Any]) -> None:
    """Refuse NaN or infinite numbers among ``{option name: value}`` (tuples and lists are checked item-wise)."""
    for name, v in values.items():
        items = v if isinstance(v, (list, tuple)) else [v]
        for x in items:
            if isinstance(x, float) and not math.isfinite(x):
                raise ZkdError(f"{name} {x} is not a finite number; pass a finite value")


def check_writable(path: str | os.PathLike, option: str, folder: bool = False) -> None:
    """Refuse an output location zkd could not create: its nearest existing ancestor must be a writable folder.

    Args:
        path: the output file (``folder=False``) or folder (``folder=True``) to be created.
        option: the option's name for the message, e.g. ``--out``.
        folder: whether ``path`` itself is a folder (created with its parents) or a file in an existing folder.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise ZkdError(f"{option} {p} exists and is not a folder; choose another {option}")
    probe = p if folder else p.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        if probe.is_symlink():
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ZkdError(f"{option} {p}: {probe} is not a folder; choose another {option}")
    if not folder and not p.parent.is_dir():
        raise ZkdError(f"{option} {p}: folder {p.parent} does not exist; create it first")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ZkdError(f"{option} {p}: folder {probe} is not writable; choose another {option} or fix permissions")


def _first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d))), None)


def smallest_input_problem(model: nn.Module, spec: InputSpec, size: int | None = None) -> str | None:
    """Run one dummy forward at ``size`` (default: the spec's); describe why it is too small, or None.

    An input is too small when the forward fails, or when a strided layer (convolution or pooling with stride s > 1)
    receives a feature map smaller than s: from there on the network sees only padding, whatever the image.
    """
    size = size or spec.image_size
    strided: list[str] = []
    hooks = []

    def watch(name: str, stride: int):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if x.dim() >= 3 and min(x.shape[-2:]) < stride and not strided:
                strided.append(f"layer {name or type(module).__name__} (stride {stride}) receives "
                               f"{x.shape[-2]}x{x.shape[-1]}")
        return hook

    for name, m in model.named_modules():
        stride = getattr(m, "stride", None)
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and stride is not None:
            s = stride if isinstance(stride, int) else max(stride)
            if s > 1:
                hooks.append(m.register_forward_pre_hook(watch(name, s)))
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, spec.channels, size, size, device=device, dtype=dtype))
    except Exception as e:  # any failure of the dummy forward is the user's spec not fitting the model
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"the teacher cannot take a {spec.channels}x{size}x{size} input ({type(e).__name__}: {msg[:200]})"
    finally:
        for h in hooks:
            h.remove()
    if strided:
        return f"a {size}x{size} input is too small for the teacher: {strided[0]}"
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != spec.num_classes:
        return f"the teacher outputs {out.shape[1]} classes, not {spec.num_classes} (--num-classes)"
    return None


def check_teacher_input(model: nn.Module, spec: InputSpec, multires: bool = False) -> None:
    """Check an input spec against the teacher before any output: numbers, first layer, output width, smallest size.

    Args:
        model: the teacher (or any classifier the spec is meant for).
        spec: the input spec it will be fed (after --channels/--mean/--std/--image-size/--num-classes overrides).
        multires: also check the half-resolution input of a multi-resolution first stage.
    """
    for key in ("mean", "std"):
        vals = getattr(spec, key)
        if not all(math.isfinite(v) for v in vals):
            raise ZkdError(f"--{key} {','.join(map(str, vals))} holds a non-finite value; pass finite numbers")
    first = _first_conv(model)
    if first is not None and first.in_channels != spec.channels:
        raise ZkdError(f"the teacher's first layer takes {first.in_channels} channel(s), but the input spec has "
                       f"{spec.channels} (--channels / one --mean value per channel); pass --channels "
                       f"{first.in_channels} with that many --mean/--std values")
    problem = smallest_input_problem(model, spec)
    if problem:
        raise ZkdError(f"{problem}; check --image-size / --num-classes against the teacher")
    if multires:
        if spec.image_size < 2:
            raise ZkdError(f"--multires-iterations needs an image of at least 2x2 (half resolution), got "
                           f"{spec.image_size}; pass --multires-iterations 0")
        problem = smallest_input_problem(model, spec, spec.image_size // 2)
        if problem:
            raise ZkdError(f"--multires-iterations optimizes at half resolution, but {problem}; pass "
                           "--multires-iterations 0 or a larger --image-size")
