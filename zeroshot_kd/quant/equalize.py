"""Data-free pre-steps of Nagel et al. 2019 (Data-Free Quantization, DFQ): cross-layer equalization (CLE) of
consecutive conv pairs on the folded float copy, and bias correction of the quantized weights' output shift.

**Cross-layer equalization.** For a pair ``A -> [Identity/ReLU/ReLU6] -> B`` where A's output feeds only B (found
with ``torch.fx``), dividing A's output channel ``i`` (weight row and bias) by ``s_i > 0`` and multiplying B's input
channel ``i`` by ``s_i`` leaves the network unchanged through ReLU (positive homogeneity). With
``r1_i = max|W_A[i]|`` (A's output channel range) and ``r2_i = max|W_B[:, i]|`` (B's input channel range; for a
depthwise B its filter ``i``), DFQ's choice ``s_i = sqrt(r1_i * r2_i) / r2_i`` makes both equal:
``r1_i / s_i = r2_i * s_i = sqrt(r1_i r2_i)``. B may be an ordinary conv (``groups = 1``) or depthwise; A any conv
whose output channels are independent rows (ordinary or depthwise). Chains (``expand -> dw -> project``) share the
middle conv, so the pairs are swept ``iterations`` times (DFQ iterates to convergence).

*ReLU6 caveat*: ``ReLU6(x / s) != ReLU6(x) / s``; the clip point moves to ``6 / s_i`` per channel. ``relu6``
chooses how such pairs are handled:

* ``"clip"`` (default): replace that ReLU6 by :class:`ChannelClip` -- ``min(max(x, 0), u_i)`` with ``u_i = 6 / s_i``
  (accumulated over sweeps). The float network is unchanged (to float rounding); student files record these
  modules (``channel_clips``) and :func:`~zeroshot_kd.quant.student.load_student` rebuilds them.
* ``"relu"``: replace it by a plain ReLU (``u_i = inf``), as the DFQ paper does for MobileNetV2. This changes the
  float network; use only where the benchmark shows it harmless.
* ``"skip"``: leave pairs through ReLU6 alone.

**Bias correction** (:func:`correct_bias`): quantizing W to ``W_q`` shifts each layer's expected output by
``E[(W_q - W) x]``; DFQ subtracts it from the bias. Here the expectation is *empirical*: the mean over calibration
images (batch and positions) of ``layer(x; W_q - W, no bias)``, with the float inputs ``x`` the student sees with
activation quantizers off -- exact for a linear layer (``(W_q - W) E[x]``) and for convs including padding
effects. (DFQ's analytic form from BN statistics assumes Gaussian pre-activations; with synthetic or real images
available, the empirical mean is exact for the data, so only it is offered.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import Capture
from ..errors import ZkdError
from .fold import module_call_counts, set_module
from .modules import quant_layers

__all__ = ["EQUALIZE_CRITERIA", "RELU6_MODES", "ChannelClip", "activation_ranges", "correct_bias", "equalize", "find_equalization_pairs"]

RELU6_MODES = ("clip", "relu", "skip")
EQUALIZE_CRITERIA = ("activation", "weight")


class ChannelClip(nn.Module):
    """``min(max(x, 0), upper_c)`` per channel (dim 1): a ReLU6 whose clip point was rescaled by equalization."""

    def __init__(self, channels: int, upper: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("upper", torch.full((channels,), 6.0) if upper is None else upper.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return torch.minimum(torch.relu(x), self.upper.view(shape).to(x.dtype))


_PASS = (nn.Identity, nn.ReLU, nn.ReLU6, ChannelClip)


def _is_dw(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _ok_a(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and (m.groups == 1 or _is_dw(m)) and m.bias is not None


def _ok_b(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and (m.groups == 1 or _is_dw(m))


def find_equalization_pairs(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """``(A, B, [modules between])`` for every conv pair that can be equalized, in graph order.

    A must have a bias (it does after BN folding); the modules between are Identity (a folded BN), ReLU, ReLU6 or
    :class:`ChannelClip`, each with a single consumer and called once. Untraceable models give no pairs.
    """
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return []
    modules = dict(model.named_modules())
    calls = module_call_counts(gm)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _ok_a(modules.get(node.target)) or calls[node.target] != 1:
            continue
        between: list[str] = []
        cur = node
        while True:
            if len(cur.users) != 1:
                break
            nxt = next(iter(cur.users))
            if nxt.op != "call_module" or calls.get(nxt.target, 0) != 1:
                break
            m = modules.get(nxt.target)
            if isinstance(m, _PASS):
                between.append(str(nxt.target))
                cur = nxt
                continue
            a, b = modules[node.target], m
            if _ok_b(b) and b.in_channels == a.out_channels:
                pairs.append((str(node.target), str(nxt.target), between))
            break
    return pairs


def _in_range(b: nn.Conv2d) -> torch.Tensor:
    w = b.weight.detach().abs()
    return w.flatten(1).amax(1) if _is_dw(b) else w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def _scale_pair(a: nn.Conv2d, b: nn.Conv2d, s: torch.Tensor) -> None:
    a.weight.div_(s.view(-1, *([1] * (a.weight.dim() - 1))).to(a.weight.dtype))
    a.bias.div_(s.to(a.bias.dtype))
    if _is_dw(b):
        b.weight.mul_(s.view(-1, 1, 1, 1).to(b.weight.dtype))
    else:
        b.weight.mul_(s.view(1, -1, 1, 1).to(b.weight.dtype))


@torch.no_grad()
def activation_ranges(model: nn.Module, pairs: Sequence[tuple[str, str, list[str]]],
                      batches: Sequence[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-channel ``max |x|`` of each pair's B input (the activation between A and B) over ``batches``."""
    out: dict[str, torch.Tensor] = {}

    pair_of = {f"{b}@in": a for a, b, _ in pairs}

    def observe(addr: str, x: torch.Tensor) -> None:
        name = pair_of[addr]
        red = [0] + list(range(2, x.dim()))
        v = x.float().abs().amax(red).double().cpu()
        out[name] = torch.maximum(out[name], v) if name in out else v

    with Capture(model, list(pair_of), reduce=observe, detach=True):
        for x in batches:
            model(x.to(device))
    return out


@torch.no_grad()
def equalize(model: nn.Module, relu6: str = "clip", iterations: int = 20,
             s_range: tuple[float, float] = (1e-3, 1e3), batches: Sequence[torch.Tensor] | None = None,
             device: torch.device | None = None) -> dict[str, object]:
    """Cross-layer equalization of every pair of :func:`find_equalization_pairs`, in place (float model only).

    Args:
        model: the folded float student copy (before quantization), eval mode.
        relu6: ``"clip"``, ``"relu"`` or ``"skip"`` (see the module docstring).
        iterations: sweeps over all pairs.
        s_range: clamp of each step's scales (channels with zero range keep ``s = 1``).
        batches: calibration images. When given, the criterion is *activation-aware* (a deliberate deviation from
            DFQ, for per-channel weight grids): A's weight rows are quantized per channel, so their scaling does
            not matter to A; what a per-tensor activation grid and B's per-output-channel grid see are the
            activation channel ranges ``a_i`` (measured here, ``max |x_i|``) and B's input column ranges ``r2_i``.
            ``r1_i`` is then ``a_i`` (tracked as ``a_i / s_i`` through the sweeps, exact by positive
            homogeneity), so ``a_i / s_i = r2_i * s_i``. Without batches: DFQ's weight criterion.
        device: where to run ``batches``.

    Returns:
        ``{"pairs": [[A, B], ...], "relu6": mode, "replaced": [paths of ChannelClip modules]}``.
    """
    if relu6 not in RELU6_MODES:
        raise ZkdError(f"unknown ReLU6 handling {relu6!r} for equalization; use one of {', '.join(RELU6_MODES)}")
    pairs = find_equalization_pairs(model)
    used: list[tuple[str, str, list[str]]] = []
    replaced: list[str] = []
    for a_name, b_name, between in pairs:
        r6 = [p for p in between if isinstance(model.get_submodule(p), nn.ReLU6)]
        if r6 and relu6 == "skip":
            continue
        for p in r6:
            ch = model.get_submodule(a_name).out_channels
            upper = torch.full((ch,), 6.0 if relu6 == "clip" else math.inf)
            set_module(model, p, ChannelClip(ch, upper).to(model.get_submodule(a_name).weight.device))
            replaced.append(p)
        used.append((a_name, b_name, between))
    acts = None
    if batches is not None:
        model.eval()
        acts = activation_ranges(model, used, batches, device or torch.device("cpu"))
    for _ in range(iterations):
        for a_name, b_name, between in used:
            a, b = model.get_submodule(a_name), model.get_submodule(b_name)
            if acts is not None and a_name in acts:
                r1 = acts[a_name].to(a.weight.device)
            else:
                r1 = a.weight.detach().abs().flatten(1).amax(1).double()
            r2 = _in_range(b).double()
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))
            s = s.clamp(*s_range)
            _scale_pair(a, b, s)
            if acts is not None and a_name in acts:
                acts[a_name] = acts[a_name] / s.to(acts[a_name].device)
            for p in between:
                m = model.get_submodule(p)
                if isinstance(m, ChannelClip):
                    m.upper.div_(s.to(m.upper.dtype).to(m.upper.device))
    return {"pairs": [[a, b] for a, b, _ in used], "relu6": relu6, "replaced": replaced,
            "criterion": "weight" if acts is None else "activation"}


def _delta_out(layer: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, dw, None)
    return F.linear(x, dw)


@torch.no_grad()
def correct_bias(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Empirical DFQ bias correction of every quantized layer with a bias, in place.

    Runs ``batches`` through the student with activation quantizers off and weights quantized; for each layer the
    per-channel mean of ``layer(x; W_q - W)`` over images and positions is subtracted from the bias, so that the
    layer's mean output equals the float layer's on these inputs.

    Returns:
        Per layer: the largest absolute bias change.
    """
    layers = [(n, l) for n, l in quant_layers(model) if l.bias is not None]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    modules = dict(layers)

    def accumulate(addr: str, x: torch.Tensor) -> None:
        name = addr[: -len("@in")]
        m = modules[name]
        dw = m.wq(m.weight).float() - m.weight.float()
        d = _delta_out(m, x.float(), dw)
        red = [0] + list(range(2, d.dim()))
        sums[name] = sums.get(name, 0) + d.sum(red).double()
        counts[name] = counts.get(name, 0) + d.numel() // d.shape[1]

    saved = {}
    for n, l in quant_layers(model):
        if l.aq is not None:
            saved[n] = l.aq.enabled
            l.aq.enabled = False
    model.eval()
    try:
        with Capture(model, [f"{n}@in" for n, _ in layers], reduce=accumulate, detach=True):
            for x in batches:
                model(x.to(device))
    finally:
        for n, l in quant_layers(model):
            if n in saved:
                l.aq.enabled = saved[n]
    out = {}
    for n, l in layers:
        if n not in sums:
            continue
        delta = (sums[n] / counts[n]).to(l.bias.dtype)
        l.bias.sub_(delta)
        out[n] = float(delta.abs().max())
    return out
