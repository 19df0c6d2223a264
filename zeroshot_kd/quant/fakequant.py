"""Uniform affine fake quantization with a clipped straight-through estimator and LSQ step-size gradients.

The forward pass is torch's definition (``torch.fake_quantize_per_{tensor,channel}_affine``)::

    q = clamp(nearbyint(x * (1 / s)) + z, q_min, q_max)      x_hat = (q - z) * s

computed in float32 with the same operation order, so the outputs match torch's kernels bit for bit.
Backward (when gradients are needed):

* ``x``: clipped STE, ``d x_hat / d x = 1`` where ``q_min <= round(x / s) + z <= q_max`` and 0 elsewhere;
* ``s``: LSQ (Esser et al., 2020): ``round(x / s) - x / s`` inside the range, ``q_min - z`` / ``q_max - z`` where
  clipped, multiplied by the gradient scale ``g = 1 / sqrt(numel_per_scale * q_max)``;
* the zero point is an integer and is not learned.

A weight quantizer can also run AdaRound (Nagel et al., 2020): ``q = clamp(floor(w / s) + h(V) + z, ...)`` with the
rectified sigmoid ``h``; :meth:`FakeQuantizer.finish_adaround` turns the learned rounding into fixed codes.

GENIE-M (Jeon et al., 2023) learns the per-channel weight step jointly with the rounding: the integer base
``B = floor(w / s0)`` is fixed at the start step ``s0`` and ``w_hat = (clamp(B + h(V) + z, q_min, q_max) - z) * s``
with ``s`` learnable, so ``d w_hat / d s = clamp(B + h(V) + z) - z`` (the soft code; exact, no STE involved).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = [
    "ADAROUND_GAMMA",
    "ADAROUND_ZETA",
    "FakeQuantizer",
    "bernoulli_mask",
    "clamp_ste",
    "grad_scale",
    "int_range",
    "rectified_sigmoid",
    "round_ste",
    "sqnr_db",
]

SCALE_EPS = 1e-8  # smallest step size; degenerate (all-zero) channels get this scale
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


class _RoundSTE(torch.autograd.Function):
    """``round`` (half to even, as ``nearbyint``) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g


class _GradScale(torch.autograd.Function):
    """Identity forward (bit-exact), gradient multiplied by a constant backward (LSQ gradient scaling)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g * ctx.factor, None


class _FakeQuantLSQ(torch.autograd.Function):
    """Fake quantization with the clipped STE and LSQ's step gradient (and QDrop's keep mask) in one node.

    Forward is the plain definition (``clamp(round(x * (1 / s)) + z) - z) * s``, then ``where(keep, x_hat, x)``),
    bit-identical to the no-gradient path. Backward, from two tensors saved in the forward:
    ``d/dx = keep * inside + (1 - keep)`` and ``d/ds = factor * sum(g * keep * ((q_c - z) - inside * x / s))`` over
    each scale's elements. One node instead of a chain of ``where``/``clamp``/``round`` nodes: the reconstruction
    step's forward+backward on CPU is dominated by these element-wise passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qmin: int,  # type: ignore[override]
                qmax: int, factor: float, keep: torch.Tensor | None) -> torch.Tensor:
        y = x * (1.0 / s)
        q = torch.round(y)
        if z is not None:
            q.add_(z)
        qc = torch.clamp(q, qmin, qmax)
        inside = qc == q
        if z is not None:
            qc.sub_(z)
        out = qc * s
        need_s = ctx.needs_input_grad[1]
        ds = qc.sub_(y.mul_(inside)) if need_s else None  # (q_c - z) - inside * x / s; y and qc are not needed after
        if keep is not None:
            out = torch.where(keep, out, x)
            inside.logical_or_(~keep)
            if ds is not None:
                ds.mul_(keep)
        ctx.save_for_backward(inside, ds if ds is not None else torch.empty(0), s)
        ctx.factor, ctx.need_s = factor, need_s
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        gx, ds, s = ctx.saved_tensors
        grad_x = g * gx if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.need_s:
            prod = g * ds
            if s.dim() == 0:
                grad_s = prod.sum() * ctx.factor
            else:
                dims = [d for d in range(prod.dim()) if s.shape[d] == 1]
                grad_s = prod.sum(dims, keepdim=True) * ctx.factor
        return grad_x, grad_s, None, None, None, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, pass the gradient through unchanged."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Return ``x`` unchanged; its gradient is multiplied by ``factor`` (LSQ's ``g``)."""
    return _GradScale.apply(x, factor)


def bernoulli_mask(shape: Sequence[int], p: float, generator: torch.Generator | None,
                   device: torch.device | str) -> torch.Tensor:
    """A boolean mask, each element True with probability ``p`` rounded to a multiple of 1/256 (exact for QDrop's
    0.5), drawn on ``device`` from ``generator``.

    Why not ``torch.rand(shape) < p``: on a CPU the generator is serial and a float per element made QDrop's
    masks the largest single cost of a depthwise block's reconstruction step (3.4 of 29 s in a profile, more
    than its convolutions). Here one 64-bit draw gives eight uniform bytes, compared with ``round(256 p)``:
    8x fewer draws, measured 3.8x faster on CPU for a 262k-element mask.
    """
    numel = math.prod(shape)
    k = round(p * 256)
    if k <= 0 or k >= 256:
        return torch.full(tuple(shape), k >= 256, dtype=torch.bool, device=device)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((numel + 7) // 8,), generator=generator, device=device)
    return words.view(torch.uint8)[:numel].view(tuple(shape)) < k


def clamp_ste(q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(q, qmin, qmax)`` whose gradient is 1 on the closed interval ``[qmin, qmax]`` and 0 outside.

    (``torch.clamp``'s backward is 0 *at* the bounds; torch's fake-quant mask, and this one, include them.)
    """
    with torch.no_grad():
        inside = (q >= qmin) & (q <= qmax)
    return torch.where(inside, q, torch.clamp(q.detach(), qmin, qmax))


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def int_range(bits: int, signed: bool, narrow: bool = True) -> tuple[int, int]:
    """Integer grid of a ``bits``-bit quantizer.

    Args:
        bits: 2..8.
        signed: symmetric signed grid (zero point 0) if True, else unsigned ``[0, 2^b - 1]``.
        narrow: for signed grids, drop the most negative code (``[-(2^(b-1)-1), 2^(b-1)-1]``).
    """
    if signed:
        hi = 2 ** (bits - 1) - 1
        return (-hi if narrow else -hi - 1), hi
    return 0, 2**bits - 1


def sqnr_db(signal_sq: float, noise_sq: float) -> float:
    """``20 log10(||x|| / ||x - x_hat||) = 10 log10(sum x^2 / sum (x - x_hat)^2)``; inf when exact."""
    if noise_sq <= 0:
        return math.inf
    if signal_sq <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


class FakeQuantizer(nn.Module):
    """Per-tensor or per-channel uniform fake quantizer with a learnable step size.

    Args:
        bits: bit width (2..8).
        qmin, qmax: the integer grid.
        symmetric: zero point fixed at 0 (symmetric signed grid, or unsigned grid for non-negative tensors).
        axis: channel axis for per-channel scales, None for one scale per tensor.
        channels: number of scales (1 for per-tensor).
        kind: ``"weight"`` or ``"act"`` (bookkeeping for reports).

    Attributes:
        scale: step sizes, a Parameter (learnable when ``requires_grad`` is on).
        zero_point: integer zero points stored as float32 (a buffer).
        enabled: when False the quantizer is the identity.
        drop_prob: QDrop: with this probability an element keeps its full-precision value (reconstruction only).
        drop_generator: generator of QDrop's masks, on the device of the quantized tensors (the masks are drawn
            there: no per-step host-to-device copy); None uses the device's default generator.
    """

    def __init__(self, bits: int, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
                 channels: int = 1, kind: str = "act") -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.bits, self.qmin, self.qmax, self.symmetric, self.axis, self.kind = bits, qmin, qmax, symmetric, axis, kind
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True
        self.drop_prob = 0.0
        self.drop_generator: torch.Generator | None = None
        self.adaround: nn.Parameter | None = None
        self.adaround_soft = True
        self.adaround_base: torch.Tensor | None = None  # GENIE-M: floor(w / s0), fixed while s is learned

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        return f"{self.kind}, bits={self.bits}, [{self.qmin}, {self.qmax}], {gran}, symmetric={self.symmetric}"

    # -- parameters -------------------------------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set step sizes (clamped to >= 1e-8) and integer zero points (rounded, clamped to the grid)."""
        with torch.no_grad():
            self.scale.copy_(scale.detach().float().reshape(self.scale.shape).clamp_min(SCALE_EPS))
            if zero_point is None or self.symmetric:
                self.zero_point.zero_()
            else:
                z = zero_point.detach().float().reshape(self.zero_point.shape)
                self.zero_point.copy_(torch.clamp(torch.round(z), self.qmin, self.qmax))

    def clamp_scale_(self) -> None:
        """Keep step sizes positive after an optimizer step."""
        with torch.no_grad():
            self.scale.clamp_(min=SCALE_EPS)

    def _shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.view(shape)

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ gradient scale ``1 / sqrt(numel_per_scale * q_max)``."""
        per_scale = x.numel() / self.scale.numel()
        return 1.0 / math.sqrt(max(per_scale, 1.0) * max(self.qmax, 1))

    # -- forward ----------------------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(x / s) + z, q_min, q_max)`` (float tensor holding integers; no gradient)."""
        with torch.no_grad():
            xf = x.detach().float()
            s, z = self._shaped(self.scale.detach(), xf), self._shaped(self.zero_point, xf)
            if self.adaround is not None:
                base = self.adaround_base if self.adaround_base is not None else torch.floor(xf * (1.0 / s))
                return torch.clamp(base + (self.adaround >= 0).float() + z, self.qmin, self.qmax)
            return torch.clamp(torch.round(xf * (1.0 / s)) + z, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        xf = x.float()
        s, z = self.scale, self.zero_point
        need_grad = torch.is_grad_enabled() and (xf.requires_grad or s.requires_grad or self.adaround is not None)
        if need_grad and self.adaround is None:
            keep = (bernoulli_mask(xf.shape, 1.0 - self.drop_prob, self.drop_generator, xf.device)
                    if self.drop_prob > 0 else None)
            factor = self.grad_factor(xf) if s.requires_grad else 1.0
            out = _FakeQuantLSQ.apply(xf, self._shaped(s, xf), self._shaped(z, xf), self.qmin, self.qmax, factor,
                                      keep)
            return out.to(x.dtype)
        if need_grad and s.requires_grad and self.adaround is None:
            s = grad_scale(s, self.grad_factor(xf))  # LSQ; GENIE-M's weight step takes its plain gradient
        s, z = self._shaped(s, xf), self._shaped(z, xf)
        inv = 1.0 / s
        if self.adaround is not None:
            h = rectified_sigmoid(self.adaround) if self.adaround_soft else (self.adaround >= 0).to(xf.dtype)
            base = self.adaround_base if self.adaround_base is not None else torch.floor(xf.detach() * inv.detach())
            q = clamp_ste(base + h + z, self.qmin, self.qmax)
        elif need_grad:
            q = clamp_ste(round_ste(xf * inv) + z, self.qmin, self.qmax)
        else:
            q = torch.clamp(torch.round(xf * inv) + z, self.qmin, self.qmax)
        out = (q - z) * s
        if self.drop_prob > 0:
            keep_q = bernoulli_mask(out.shape, 1.0 - self.drop_prob, self.drop_generator, out.device)
            out = torch.where(keep_q, out, xf)
        return out.to(x.dtype)

    # -- AdaRound ---------------------------------------------------------------------------------------------
    def start_adaround(self, w: torch.Tensor, learn_scale: bool = False) -> None:
        """Initialize learned rounding so that ``h(V) = frac(w / s)`` (the soft start of AdaRound).

        Args:
            w: the layer's weight.
            learn_scale: GENIE-M: fix the integer base ``floor(w / s)`` at the current step and make the step
                size a trainable parameter (the caller puts it in an optimizer); plain AdaRound otherwise.
        """
        with torch.no_grad():
            s = self._shaped(self.scale.detach(), w)
            y = w.detach().float() * (1.0 / s)
            base = torch.floor(y)
            frac = (y - base).clamp(1e-4, 1 - 1e-4)
            v = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac - ADAROUND_GAMMA) - 1)
        self.adaround = nn.Parameter(v)
        self.adaround_soft = True
        self.adaround_base = base if learn_scale else None
        self.scale.requires_grad_(learn_scale)

    def adaround_reg(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regularizer ``sum(1 - |2 h(V) - 1|^beta)``."""
        assert self.adaround is not None
        return (1 - (2 * rectified_sigmoid(self.adaround) - 1).abs().pow(beta)).sum()

    def finish_adaround(self, weight: nn.Parameter) -> None:
        """Replace the weight by its hard-rounded fake-quantized value and drop the rounding variables.

        Afterwards ``round(w / s)`` reproduces the learned codes exactly, so plain fake quantization holds them.
        """
        with torch.no_grad():
            q = self.quantize(weight)
            s, z = self._shaped(self.scale.detach(), weight), self._shaped(self.zero_point, weight)
            weight.copy_(((q - z) * s).to(weight.dtype))
        self.adaround = None
        self.adaround_base = None
        self.scale.requires_grad_(False)
