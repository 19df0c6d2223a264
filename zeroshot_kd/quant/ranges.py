"""Activation ranges chosen for accuracy: a clipping search against each layer's output error, and a loss-aware
choice between range sets by the KL of the final logits.

Why: the per-tensor criterion ``min_r ||x - Q_r(x)||^2`` (``--a-method mse``) clips too hard at 3-4 bits -- on
long-tailed inputs it trades a few large errors for many small ones, but a convolution sums the clipped outliers
coherently, so the accuracy-optimal range is wider than the tensor-MSE-optimal one (measured in the issue: naive
min/max ranges beat MSE ranges at W3A3, and MSE ranges collapse with every layer at 4 bits).

``output`` (:func:`search_act_output`): for each quantized layer with an input quantizer, and each candidate
clipping ratio ``r = k / candidates`` of the observed range (both ends scaled together for signed inputs, as for
``mse``), quantize the layer's input with that range, run the layer with its quantized weight and compare with
the layer's float output (float weight, float input)::

    err(r) = sum_batches || layer_Wq(Q_r(x)) - layer_W(x) ||^2

The input ``x`` is the one the student sees with quantized weights and activation quantizers off (as for the
tensor searches), so every layer's search is independent and two passes over the calibration batches suffice
(one for the exact min/max, one accumulating ``err(r)`` for all candidates). ``r = 1`` (min/max) is a candidate,
so per layer the chosen range never has a larger output error than min/max.

``auto`` (:func:`calibrate_activations_auto`, the default): compute the ``output``, ``mse`` and ``minmax`` range
sets and keep the one whose student logits are closest to the float logits on the calibration images
(``KL(p_fp || p_q)``, batchmean). The PTQ-only path is thus never worse than naive min/max on the calibration
criterion.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import Capture
from ..runtime import autocast
from .calibrate import calibrate_activations, qparams_from_range
from .fakequant import FakeQuantizer
from .modules import QuantConv2d, quant_layers

__all__ = ["NEW_ACT_METHODS", "calibrate_act_ranges", "calibrate_activations_auto", "following_activations",
           "logit_kl", "logit_kl_per_image", "search_act_output", "set_weight_quant"]

NEW_ACT_METHODS = ("auto", "output")


def _fq(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax) - z) * s


def _layer_out(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(x, w, layer.bias)
    return F.linear(x, w, layer.bias)


def set_weight_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every weight quantizer of a student on or off (off: the student computes the float function)."""
    for _, layer in quant_layers(model):
        layer.wq.enabled = enabled


def _set_act(model: nn.Module, enabled: bool) -> None:
    for _, layer in quant_layers(model):
        if layer.aq is not None:
            layer.aq.enabled = enabled


def following_activations(model: nn.Module) -> dict[str, nn.Module]:
    """For each quantized layer whose output goes only (through Identity, i.e. a folded BN) into a ReLU / ReLU6 /
    clip module, that module: errors the activation removes (negative or clipped outputs) do not propagate, so
    the output search compares post-activation outputs. Untraceable models give ``{}``."""
    import torch.fx

    from .equalize import ChannelClip
    from .modules import QUANT_TYPES

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QUANT_TYPES + (ChannelClip,)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:
        return {}
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QUANT_TYPES):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            m = modules.get(nxt.target) if nxt.op == "call_module" else None
            if isinstance(m, nn.Identity):
                cur = nxt
                continue
            if isinstance(m, (nn.ReLU, nn.ReLU6, ChannelClip)):
                out[str(node.target)] = m
            break
    return out


@torch.no_grad()
def search_act_output(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
                      candidates: int = 100, min_ratio: float = 0.0,
                      post_activation: bool = False, stride: int = 5) -> dict[str, dict[str, float]]:
    """Set every activation quantizer's range by the output-error search (see the module docstring).

    The ratios are searched coarse to fine: every ``stride``-th ratio first (``r = 1`` always among them), then the
    ``stride - 1`` neighbours on each side of each layer's two best coarse points, so a layer runs at most
    ``candidates / stride + 4 (stride - 1)`` candidate convolutions per batch instead of ``candidates`` (36 instead
    of 100 at the defaults: the exhaustive search was 70% of the default guard's time). Two points, not one,
    because a few layers' error curves have two dips (measured on the shipped MobileNetV2: refining around the
    best coarse point alone picked another ratio than the exhaustive search on 2 of 51 layers).
    ``stride=1`` is the exhaustive search; the chosen ratio is always the lowest error among the ratios evaluated,
    ``r = 1`` included, so per layer it never has a larger output error than min/max.

    Args:
        model: the student, weights already calibrated; run in eval mode.
        batches: calibration input batches (normalized).
        device: where to run.
        candidates: clipping ratios ``k / candidates``, k = 1..candidates, are the search grid.
        min_ratio: skip ratios below this (0 tries them all).
        post_activation: compare outputs after the ReLU/ReLU6 that directly follows the layer, if any
            (:func:`following_activations`). Off by default: measured on fmnist_mobilenetv2 (256 real images,
            2000 test images) it gave W4A4 88.95 vs 88.10, W3A3 77.00 vs 78.00, but every layer at W4A4 47.35
            vs 76.60 -- the pre-activation error is the safer criterion.
        stride: coarse step of the grid, in grid points (1 = evaluate every ratio).

    Returns:
        Per layer: observed min/max, sign, chosen ratio, scale and zero point.
    """
    model.eval()
    layers = [(n, l) for n, l in quant_layers(model) if l.aq is not None]
    lo: dict[str, float] = {n: math.inf for n, _ in layers}
    hi: dict[str, float] = {n: -math.inf for n, _ in layers}
    post = following_activations(model) if post_activation else {}
    addrs = [f"{n}@in" for n, _ in layers]
    _set_act(model, False)
    modules = dict(layers)
    k_min = max(1, math.ceil(min_ratio * candidates - 1e-9))
    stride = max(1, int(stride))
    errs: dict[str, dict[int, float]] = {n: {} for n, _ in layers}  # layer -> grid point k -> output error
    try:
        def observe(addr: str, x: torch.Tensor) -> None:
            name = addr[: -len("@in")]
            lo[name] = min(lo[name], x.min().item())
            hi[name] = max(hi[name], x.max().item())

        with Capture(model, addrs, reduce=observe, detach=True):
            for x in batches:
                model(x.to(device))

        def qparams(n: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            aq = modules[n].aq
            r = k / candidates
            lo_t = torch.tensor([min(lo[n], 0.0) * r], device=device)
            hi_t = torch.tensor([max(hi[n], 0.0) * r], device=device)
            return qparams_from_range(lo_t, hi_t, aq.qmin, aq.qmax, not lo[n] < 0)

        def evaluate(ks: dict[str, list[int]]) -> None:
            """One pass over the batches accumulating each layer's output error at its grid points ``ks``."""
            grids = {n: [qparams(n, k) for k in ks[n]] for n in ks}
            acc = {n: torch.zeros(len(ks[n]), dtype=torch.float64) for n in ks}

            def accumulate(addr: str, x: torch.Tensor) -> None:
                name = addr[: -len("@in")]
                if not grids[name]:
                    return
                m = modules[name]
                x = x.float()
                act = post.get(name, nn.Identity())
                ref = act(_layer_out(m, x, m.weight))
                wq = m.wq(m.weight)
                aq: FakeQuantizer = m.aq
                e = torch.stack([(act(_layer_out(m, _fq(x, s, z, aq.qmin, aq.qmax), wq)) - ref).pow(2).sum()
                                 for s, z in grids[name]])
                acc[name] += e.double().cpu()

            with Capture(model, addrs, reduce=accumulate, detach=True):
                for x in batches:
                    model(x.to(device))
            for n in ks:
                errs[n].update(zip(ks[n], acc[n].tolist()))

        coarse = sorted(set(range(candidates, k_min - 1, -stride)) | {candidates}, reverse=True)
        evaluate({n: coarse for n, _ in layers})
        if stride > 1:
            fine: dict[str, list[int]] = {}
            for n, _ in layers:
                near: set[int] = set()
                for best in sorted(errs[n], key=lambda k: (errs[n][k], -k))[:2]:  # two best: curves can be bimodal
                    near.update(range(max(k_min, best - stride + 1), min(candidates, best + stride - 1) + 1))
                fine[n] = sorted(near - errs[n].keys(), reverse=True)
            evaluate(fine)
    finally:
        _set_act(model, True)
    stats: dict[str, dict[str, float]] = {}
    for n, l in layers:
        k = min(errs[n], key=lambda k: (errs[n][k], -k))  # ties: the wider range
        s, z = qparams(n, k)
        signed = lo[n] < 0
        l.set_act_signed(signed)
        l.aq.set_qparams(s, z)
        stats[n] = {"min": lo[n], "max": hi[n], "signed": signed, "ratio": k / candidates,
                    "scale": l.aq.scale.item(), "zero_point": l.aq.zero_point.item(),
                    "evaluated": len(errs[n])}
    return stats


@torch.no_grad()
def logit_kl_per_image(model: nn.Module, batches: Sequence[torch.Tensor], ref_logits: Sequence[torch.Tensor],
                       device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """``KL(p_ref || p_model)`` of each image of ``batches`` (float32, on the CPU, in image order)."""
    out = []
    for x, t in zip(batches, ref_logits):
        with autocast(device, precision):
            s = model(x.to(device))
        kl = F.kl_div(F.log_softmax(s.float(), 1), F.log_softmax(t.float().to(device), 1), reduction="none",
                      log_target=True).sum(1)
        out.append(kl.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def logit_kl(model: nn.Module, batches: Sequence[torch.Tensor], ref_logits: Sequence[torch.Tensor],
             device: torch.device, precision: str = "fp32") -> float:
    """``KL(p_ref || p_model)`` (batchmean over all images, float32) of ``model``'s logits on ``batches``."""
    kl = logit_kl_per_image(model, batches, ref_logits, device, precision)
    return float(kl.sum()) / max(kl.numel(), 1)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    return {n: (l.aq.scale.detach().clone(), l.aq.zero_point.clone(), l.aq.symmetric)
            for n, l in quant_layers(model) if l.aq is not None}


def _restore(model: nn.Module, snap: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
    for n, l in quant_layers(model):
        if n in snap:
            s, z, sym = snap[n]
            l.aq.symmetric = sym
            l.aq.set_qparams(s, z)


@torch.no_grad()
def calibrate_activations_auto(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
                               precision: str = "fp32", methods: Iterable[str] = ("output", "mse", "minmax"),
                               p: float = 2.4, candidates: int = 100, percentile: float = 99.99,
                               kl_images: int = 256, seed: int = 0, progress: bool = True,
                               kl_batches: Sequence[torch.Tensor] | None = None,
                               ref_logits: Sequence[torch.Tensor] | None = None,
                               ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Compute several activation range sets and keep the one with the lowest logit KL to the float model.

    Args:
        model: the student, weights already calibrated.
        batches: calibration input batches (the ranges are set on these).
        device, precision: where and how to run.
        methods: range sets to compare: ``output`` and any of :data:`zeroshot_kd.quant.calibrate.ACT_METHODS`.
        p, candidates, percentile: search parameters.
        kl_images: without ``kl_batches``, the KL is measured on the first ``kl_images`` of ``batches``.
        seed: seed of the tensor searches' value sampling.
        progress: progress bars of the tensor searches.
        kl_batches: images the KL is measured on (the pipeline's guard passes a held-out split of the
            calibration set, so the choice is not judged on the images that set the ranges).
        ref_logits: reference logits on ``kl_batches`` (the guard passes the FP32 teacher's); default: the
            student itself with every quantizer off.

    Returns:
        (per-layer stats of the chosen set, with ``"method"``; KL of every set tried).
    """
    model.eval()
    if kl_batches is None:
        kl_batches, seen = [], 0
        for x in batches:
            if seen >= kl_images:
                break
            kl_batches.append(x[: kl_images - seen])
            seen += kl_batches[-1].shape[0]
    if ref_logits is None:
        set_weight_quant(model, False)
        _set_act(model, False)
        try:
            ref = [model(x.to(device)).detach() for x in kl_batches]
        finally:
            set_weight_quant(model, True)
            _set_act(model, True)
    else:
        ref = list(ref_logits)
    kls: dict[str, float] = {}
    best: tuple[float, str, dict, dict] | None = None
    for method in methods:
        if method == "output":
            stats = search_act_output(model, batches, device, candidates)
        else:
            stats = calibrate_activations(model, batches, len(batches), device, precision, method, p, candidates,
                                          percentile, seed=seed, progress=progress)
        kls[method] = logit_kl(model, kl_batches, ref, device, precision)
        if best is None or kls[method] < best[0]:
            best = (kls[method], method, stats, _snapshot(model))
    assert best is not None
    _restore(model, best[3])
    chosen = {n: {**st, "method": best[1]} for n, st in best[2].items()}
    return chosen, kls


def calibrate_act_ranges(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device,
                         method: str = "auto", precision: str = "fp32", p: float = 2.4, candidates: int = 100,
                         percentile: float = 99.99, seed: int = 0,
                         progress: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Method dispatch of the activation range search (``--a-method``).

    Returns:
        (per-layer stats, KL of each range set compared -- empty unless ``method == "auto"``).
    """
    if method == "auto":
        return calibrate_activations_auto(model, batches, device, precision, p=p, candidates=candidates,
                                          percentile=percentile, seed=seed, progress=progress)
    if method == "output":
        return search_act_output(model, batches, device, candidates), {}
    return calibrate_activations(model, batches, len(batches), device, precision, method, p, candidates, percentile,
                                 seed=seed, progress=progress), {}
