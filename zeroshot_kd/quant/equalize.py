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
effects. :func:`correct_bias_analytic` is DFQ's data-free form: ``E[x]`` of a layer's input from the preceding
BN's ``beta, gamma`` (recorded before folding, :func:`bn_stats`) under a clipped normal (:func:`clipped_normal_mean`);
it covers only layers fed by one conv + BN (+ ReLU/ReLU6) and ignores padding.

**High-bias absorption** (:func:`absorb_high_bias`): DFQ's move of ``max(0, beta - 3 gamma)`` from a conv's bias
through a ReLU into the next (unpadded) conv's bias, narrowing the activation range the grid must cover.
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

__all__ = ["BIAS_CORRECTION_MODES", "EQUALIZE_CRITERIA", "RELU6_MODES", "ChannelClip", "absorb_high_bias",
           "activation_ranges", "analytic_input_means", "bn_stats", "clipped_normal_mean", "correct_bias",
           "correct_bias_analytic", "equalize", "find_equalization_pairs"]

RELU6_MODES = ("clip", "relu", "skip")
EQUALIZE_CRITERIA = ("activation", "weight")
BIAS_CORRECTION_MODES = ("empirical", "analytic")


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
             device: torch.device | None = None,
             stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, object]:
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
        stats: :func:`bn_stats` of the folded convs, kept in step (A's ``beta, |gamma|`` divided by ``s``) for
            the analytic steps after equalization.

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
            if stats is not None and a_name in stats:
                s64 = s.double().cpu()
                stats[a_name] = (stats[a_name][0] / s64, stats[a_name][1] / s64)
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


# --- Analytic pre-activation statistics (DFQ section 4.2): bias correction and high-bias absorption ---------------

def bn_stats(model: nn.Module, pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{conv: (beta, |gamma|)}`` of the BatchNorm after each conv of ``pairs`` (call *before* folding).

    After folding, conv ``c``'s output channel ``i`` is the BN output, which DFQ models as ``N(beta_i, gamma_i^2)``.
    :func:`equalize` keeps these in step with its scaling when given them (``stats=``).
    """
    out = {}
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if isinstance(bn, nn.BatchNorm2d) and bn.affine:
            out[conv_name] = (bn.bias.detach().double().cpu().clone(), bn.weight.detach().double().abs().cpu().clone())
    return out


def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, lower: float | torch.Tensor | None = 0.0,
                        upper: float | torch.Tensor | None = None) -> torch.Tensor:
    """``E[clamp(y, lower, upper)]`` for ``y ~ N(mu, sigma^2)`` per channel (closed form; ``None`` = unbounded).

    With ``a = (lower - mu) / sigma``, ``b = (upper - mu) / sigma``, standard normal pdf ``phi`` and cdf ``Phi``::

        E = lower Phi(a) + mu (Phi(b) - Phi(a)) + sigma (phi(a) - phi(b)) + upper (1 - Phi(b))

    (ReLU: ``lower = 0``, no upper; ReLU6: ``upper = 6``). ``sigma = 0`` gives ``clamp(mu)``.
    """
    mu, sigma = mu.double(), sigma.double()
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    safe = sigma.clamp_min(1e-30)
    lo = torch.as_tensor(-math.inf if lower is None else lower, dtype=torch.float64)
    hi = torch.as_tensor(math.inf if upper is None else upper, dtype=torch.float64)
    a, b = (lo - mu) / safe, (hi - mu) / safe
    pa, pb = normal.cdf(a), normal.cdf(b)
    da = torch.where(torch.isfinite(a), normal.log_prob(a.clamp(-1e6, 1e6)).exp(), torch.zeros_like(a))
    db = torch.where(torch.isfinite(b), normal.log_prob(b.clamp(-1e6, 1e6)).exp(), torch.zeros_like(b))
    lo_term = torch.where(torch.isfinite(lo), lo * pa, torch.zeros_like(pa))
    hi_term = torch.where(torch.isfinite(hi), hi * (1 - pb), torch.zeros_like(pb))
    e = lo_term + mu * (pb - pa) + sigma * (da - db) + hi_term
    return torch.where(sigma > 0, e, mu.clamp(lo.item(), hi.item()))


def _between_bounds(model: nn.Module, between: Sequence[str]) -> tuple[float | None, object] | None:
    """(lower, upper) of the one activation between A and B (Identity only: unbounded); None when there is more
    than one, or one of another kind."""
    acts = [model.get_submodule(p) for p in between if not isinstance(model.get_submodule(p), nn.Identity)]
    if not acts:
        return None, None
    if len(acts) > 1:
        return None
    m = acts[0]
    if isinstance(m, ChannelClip):
        return 0.0, m.upper.detach().double().cpu()
    if isinstance(m, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(m, nn.ReLU):
        return 0.0, None
    return None


def _unpadded(conv: nn.Module) -> bool:
    pad = conv.padding
    return pad == "valid" or (isinstance(pad, tuple) and all(p == 0 for p in pad))


def analytic_input_means(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
    """``{B: E[x]}`` per input channel of every conv B fed only by a conv A with BN statistics, through at most one
    ReLU / ReLU6 / clip (:func:`clipped_normal_mean` of A's ``N(beta, gamma^2)``)."""
    out = {}
    for a_name, b_name, between in find_equalization_pairs(model):
        bounds = _between_bounds(model, between)
        if a_name not in stats or bounds is None:
            continue
        mu, sigma = stats[a_name]
        out[b_name] = clipped_normal_mean(mu, sigma, *bounds)
    return out


def _weight_times_mean(layer: nn.Module, dw: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``sum_{in, k} dW[out, in, k] E[x_in]``: the output shift of a mean input (padding ignored, as in DFQ)."""
    mean = mean.to(dw.device, torch.float64)
    dw = dw.double()
    if dw.dim() == 2:
        return dw @ mean
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        return dw.flatten(1).sum(1) * mean  # depthwise: output channel i sees input channel i only
    return dw.sum((2, 3)) @ mean


@torch.no_grad()
def correct_bias_analytic(model: nn.Module, input_means: dict[str, torch.Tensor]) -> dict[str, float]:
    """Analytic DFQ bias correction: ``b -= (W_q - W) E[x]`` for every quantized layer in ``input_means``.

    ``E[x]`` comes from BN statistics (:func:`analytic_input_means`), so no images are needed; layers whose input
    is not a modelled BN output (the first layer, residual sums) are left alone. Exact for a linear layer whose
    input mean is ``E[x]``.

    Returns:
        Per corrected layer: the largest absolute bias change.
    """
    from .modules import quant_layers

    out = {}
    for n, l in quant_layers(model):
        if n not in input_means or l.bias is None:
            continue
        dw = l.wq(l.weight).detach() - l.weight.detach()
        delta = _weight_times_mean(l, dw, input_means[n]).to(l.bias.dtype)
        l.bias.sub_(delta)
        out[n] = float(delta.abs().max())
    return out


@torch.no_grad()
def absorb_high_bias(model: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     n_sigma: float = 3.0) -> dict[str, float]:
    """DFQ high-bias absorption on the float model, in place: for each pair ``A -> ReLU -> B`` with A's
    BN statistics and B without padding (1x1 or unpadded convs, so every output sees a full window),
    ``c_i = max(0, beta_i - n_sigma |gamma_i|)`` moves from A's bias into B's: ``b_A -= c``,
    ``b_B += sum_k W_B[:, i, k] c_i``.

    Why: a large positive bias widens the activation range that a per-tensor grid must cover. The function is
    unchanged wherever A's pre-activation is ``>= c`` (``ReLU(y - c) = ReLU(y) - c`` there), i.e. except with
    probability ``Phi(-n_sigma)`` under the BN model (DFQ: "at most 0.13%"). ``stats`` is updated (beta -= c).

    Returns:
        Per A: the largest absorbed ``c_i``.
    """
    out = {}
    for a_name, b_name, between in find_equalization_pairs(model):
        kinds = [type(model.get_submodule(p)) for p in between]
        b = model.get_submodule(b_name)
        if (a_name not in stats or any(k not in (nn.Identity, nn.ReLU) for k in kinds)
                or kinds.count(nn.ReLU) != 1 or not _unpadded(b)):
            continue
        beta, gamma = stats[a_name]
        c = (beta - n_sigma * gamma).clamp_min(0.0)
        if not bool((c != 0).any()):
            continue
        a = model.get_submodule(a_name)
        a.bias.sub_(c.to(a.bias.dtype).to(a.bias.device))
        shift = _weight_times_mean(b, b.weight.detach(), c).to(b.weight.dtype)
        if b.bias is None:
            b.bias = nn.Parameter(shift.to(b.weight.device), requires_grad=b.weight.requires_grad)
        else:
            b.bias.add_(shift.to(b.bias.device))
        stats[a_name] = (beta - c, gamma)
        out[a_name] = float(c.max())
    return out
