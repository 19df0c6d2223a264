"""Quantized Conv2d / Linear modules and :func:`quantize_model`, which turns a (folded) float model into a student.

Each quantized layer fake-quantizes its **weight** per output channel (symmetric narrow grid
``[-(2^(b-1)-1), 2^(b-1)-1]`` by default, asymmetric ``[0, 2^b-1]`` plus an integer zero point per channel with
``w_asym``) and its **input activation** per tensor (unsigned ``[0, 2^b-1]`` when the calibration data shows it is
non-negative, asymmetric with an integer zero point otherwise; 0.0 is always exactly representable). Outputs are
not quantized, so logits stay in float; residual additions happen in float between quantized layers.

Bit-width convention (``keep_8bit``): ``first`` keeps the first layer's weights at 8 bits and leaves the network
input unquantized; ``last`` keeps the last layer's weights and its input at 8 bits. Both are the default, as in
BRECQ/QDrop; ``keep_8bit=()`` quantizes every layer, including the network input, at the requested bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, option
from ..errors import ZkdError
from .fakequant import FakeQuantizer, int_range
from .fold import set_module

__all__ = [
    "KEEP_8BIT_CHOICES",
    "LayerConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "check_supported",
    "parse_keep_8bit",
    "quant_layers",
    "quantize_model",
]

KEEP_8BIT_CHOICES = ("first", "last")


def parse_keep_8bit(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"first,last"`` / ``"none"`` / ``""`` -> a tuple of exempt roles; unknown names raise ZkdError."""
    if value is None:
        return ()
    items = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if items in ([], ["none"]):
        return ()
    bad = [v for v in items if v not in KEEP_8BIT_CHOICES]
    if bad:
        raise ZkdError(f"unknown --keep-8bit entry {bad[0]!r}; use first, last, first,last or none")
    return tuple(r for r in KEEP_8BIT_CHOICES if r in items)


@dataclass
class QuantConfig(Config):
    """What to quantize and how (the part of a calibration that defines the student's structure).

    Attributes:
        w_bits, a_bits: weight / activation bits of ordinary layers (2..8).
        w_asym: asymmetric per-channel weight grid ``[0, 2^b-1]`` + zero point, instead of symmetric narrow.
        keep_8bit: exempt roles, a subset of ``("first", "last")``.
        fold_bn: fold BatchNorm into the preceding conv (otherwise BN stays, in eval mode).
    """

    w_bits: int = 4
    a_bits: int = 4
    w_asym: bool = option(False, "Asymmetric per-channel weight grid [0, 2^b-1] + zero point (default: symmetric "
                          "narrow [-(2^(b-1)-1), 2^(b-1)-1]).")
    keep_8bit: tuple[str, ...] = option(("first", "last"), "Layers kept at 8 bits: first = first layer W8 and "
                                        "network input unquantized; last = last layer W8 with A8 input. none "
                                        "quantizes everything.", kind="str", metavar="first,last|first|last|none")
    fold_bn: bool = option(True, "Fold BatchNorm into the student's convs (without folding, BN stays in eval mode).",
                           flag="--fold", secondary="--no-fold")

    def __post_init__(self) -> None:
        for what, b in (("weight", self.w_bits), ("activation", self.a_bits)):
            if not isinstance(b, int) or not 2 <= b <= 8:
                raise ZkdError(f"{what} bits must be an integer in 2..8, got {b}; pass --bits/--w-bits/--a-bits 2..8")
        self.keep_8bit = parse_keep_8bit(self.keep_8bit)

    def convention(self) -> str:
        """A one-line statement of the bit convention, printed in every report."""
        hi = 2 ** (self.w_bits - 1) - 1
        grid = f"asymmetric [0,{2 ** self.w_bits - 1}]+zp" if self.w_asym else f"symmetric narrow [{-hi},{hi}]"
        parts = [f"W{self.w_bits}A{self.a_bits}", "weights per-channel " + grid,
                 "activations per-tensor on layer inputs (unsigned if >= 0, else asymmetric+zp)"]
        if "first" in self.keep_8bit:
            parts.append("first layer W8, network input not quantized")
        else:
            parts.append(f"first layer W{self.w_bits}, network input quantized A{self.a_bits}")
        if "last" in self.keep_8bit:
            parts.append("last layer W8 with A8 input")
        parts.append("logits not quantized")
        parts.append("BN folded" if self.fold_bn else "BN not folded (eval mode)")
        return "; ".join(parts)



@dataclass
class LayerConfig:
    """Bits and grids of one quantized layer (recorded in student files and reports)."""

    name: str
    kind: str  # "conv" or "linear"
    w_bits: int
    a_bits: int | None  # None: input not quantized
    w_asym: bool
    role: str = ""  # "first", "last" or ""
    a_signed: bool = False  # set by calibration: input has negative values -> asymmetric with zero point
    extra: dict[str, Any] = field(default_factory=dict)


class _QuantMixin:
    """Shared setup of the weight and input quantizers."""

    wq: FakeQuantizer
    aq: FakeQuantizer | None
    weight: nn.Parameter

    def _copy_float(self, float_layer: nn.Module, w_bits: int, a_bits: int | None, w_asym: bool) -> Any:
        """Take ``float_layer``'s weight and bias, set up the quantizers, and return self on its device (the
        shared tail of ``from_float``)."""
        with torch.no_grad():
            self.weight.copy_(float_layer.weight)
            if float_layer.bias is not None:
                self.bias.copy_(float_layer.bias)
        self._setup_quant(w_bits, a_bits, w_asym)
        return self.to(float_layer.weight.device)  # type: ignore[attr-defined]

    def _setup_quant(self, w_bits: int, a_bits: int | None, w_asym: bool) -> None:
        qmin, qmax = int_range(w_bits, signed=not w_asym)
        self.wq = FakeQuantizer(w_bits, qmin, qmax, symmetric=not w_asym, axis=0, channels=self.weight.shape[0],
                                kind="weight")
        if a_bits is None:
            self.aq = None
        else:
            self.aq = FakeQuantizer(a_bits, 0, 2**a_bits - 1, symmetric=True, axis=None, channels=1, kind="act")

    def set_act_signed(self, signed: bool) -> None:
        """Unsigned grid with zero point 0 (``signed=False``) or asymmetric grid with a learned-free zero point."""
        if self.aq is not None:
            self.aq.symmetric = not signed

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``(q - z) * s`` the layer computes with."""
        return self.wq(self.weight)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.aq(x) if self.aq is not None else x


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """Conv2d (any groups, including depthwise) with per-output-channel weight and per-tensor input fake-quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._input(x), self.wq(self.weight), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int | None, w_asym: bool) -> "QuantConv2d":
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        return q._copy_float(conv, w_bits, a_bits, w_asym)


class QuantLinear(_QuantMixin, nn.Linear):
    """Linear with per-output-channel weight and per-tensor input fake-quant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self.wq(self.weight), self.bias)

    @classmethod
    def from_float(cls, lin: nn.Linear, w_bits: int, a_bits: int | None, w_asym: bool) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        return q._copy_float(lin, w_bits, a_bits, w_asym)


QUANT_TYPES = (QuantConv2d, QuantLinear)


def _plain(m: nn.Module, base: type) -> bool:
    """``m`` is a ``base`` whose forward is the stock one (subclasses with custom math are not supported)."""
    return isinstance(m, base) and type(m).forward is base.forward


def check_supported(model: nn.Module) -> None:
    """Raise ZkdError naming the first module that holds parameters zkd cannot quantize.

    Supported: Conv2d (any groups), Linear, BatchNorm (folded or kept in eval mode); parameter-free modules
    (activations, pooling, dropout, ...) pass through unquantized.
    """
    for name, m in model.named_modules():
        if isinstance(m, QUANT_TYPES) or isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        if _plain(m, nn.Conv2d) or _plain(m, nn.Linear):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            raise ZkdError(f"module {name or '<root>'!r} ({type(m).__name__}) is not supported for quantization; "
                           "zkd quantizes Conv2d and Linear (BatchNorm is folded) -- replace or remove that module")


def quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """The quantized layers of a student, in module (registration) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)]


def quantize_model(model: nn.Module, config: QuantConfig,
                   layer_overrides: dict[str, LayerConfig] | None = None) -> dict[str, LayerConfig]:
    """Replace every Conv2d and Linear of ``model`` by its quantized counterpart, in place.

    Args:
        model: the (folded) float student; never the teacher.
        config: bits, grids and the 8-bit convention.
        layer_overrides: exact per-layer configs (used when rebuilding a saved student).

    Returns:
        The per-layer configs, keyed by module path, in module order.

    Raises:
        ZkdError: the model holds a module with parameters that cannot be quantized, or no Conv2d/Linear at all.
    """
    check_supported(model)
    names = [n for n, m in model.named_modules() if _plain(m, nn.Conv2d) or _plain(m, nn.Linear)]
    if not names:
        raise ZkdError("the model has no Conv2d or Linear layer to quantize")
    layers: dict[str, LayerConfig] = {}
    for i, name in enumerate(names):
        m = model.get_submodule(name)
        if layer_overrides is not None:
            if name not in layer_overrides:
                raise ZkdError(f"student file has no configuration for layer {name!r}; the architecture differs")
            lc = layer_overrides[name]
        else:
            role = "first" if i == 0 else ("last" if i == len(names) - 1 else "")
            w_bits, a_bits = config.w_bits, config.a_bits
            if role == "first" and "first" in config.keep_8bit:
                w_bits, a_bits = 8, None
            if role == "last" and "last" in config.keep_8bit:
                w_bits, a_bits = 8, 8
            kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
            lc = LayerConfig(name, kind, w_bits, a_bits, config.w_asym, role)
        cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
        q = cls.from_float(m, lc.w_bits, lc.a_bits, lc.w_asym)
        q.set_act_signed(lc.a_signed)
        set_module(model, name, q)
        layers[name] = lc
    return layers
