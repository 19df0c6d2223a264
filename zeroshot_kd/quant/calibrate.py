"""Post-training range search: per-channel weight clipping and per-tensor activation clipping.

Weights: for each output channel, try ``candidates`` clipping ratios ``r = k / candidates`` (k = 1..candidates) of
the channel's range and keep the one with the smallest ``sum |w - w_hat|^p`` (``p = 2.4`` for ``lp``, 2 for
``mse``; ``minmax`` keeps r = 1). This is the BRECQ/QDrop/GENIE initialization.

Activations: run calibration batches through the student with weights quantized and activation quantizers off;
record each quantized layer's input range (exact min/max over all batches) and a seeded random sample of its values
(at most ``max_samples`` per tensor). Then per tensor: ``mse``/``lp`` search the clipping ratio as for weights
(both ends scaled together for signed tensors), ``percentile`` clips at the given percentile, ``minmax`` uses the
full range. Non-negative tensors get the unsigned grid (zero point 0), others the asymmetric grid with an integer
zero point (0.0 exactly representable). The ranges are then fixed: there are no running observers.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from tqdm import tqdm

from ..capture import Capture
from ..errors import ZkdError
from ..runtime import autocast, batch_generator
from .fakequant import SCALE_EPS, FakeQuantizer
from .modules import quant_layers

__all__ = [
    "ACT_METHODS",
    "WEIGHT_METHODS",
    "calibrate_activations",
    "calibrate_weights",
    "qparams_from_range",
    "search_act_qparams",
    "search_weight_qparams",
]

WEIGHT_METHODS = ("lp", "mse", "minmax")
ACT_METHODS = ("mse", "lp", "percentile", "minmax")


def _fq(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax) - z) * s


def _exponent(method: str, p: float) -> float:
    return 2.0 if method == "mse" else p


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering ``[lo, hi]`` (which must contain 0).

    Symmetric grids (signed narrow, or unsigned for non-negative data) use ``s = max(|lo|, |hi|) / q_max`` and
    ``z = 0``; asymmetric grids use ``s = (hi - lo) / (q_max - q_min)`` and ``z = clamp(q_min - round(lo / s))``.
    """
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        s = (torch.maximum(-lo, hi) / qmax).clamp_min(SCALE_EPS)
        return s, torch.zeros_like(s)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
    return s, z


@torch.no_grad()
def search_weight_qparams(w: torch.Tensor, qmin: int, qmax: int, symmetric: bool, method: str = "lp",
                          p: float = 2.4, candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel clipping search for a weight tensor (channel axis 0).

    Args:
        w: weight (C_out, ...).
        qmin, qmax: integer grid; symmetric: zero point fixed at 0.
        method: ``lp`` (|err|^p), ``mse`` (p = 2) or ``minmax`` (no clipping).
        p: Lp exponent for ``lp``.
        candidates: number of clipping ratios tried, ``k / candidates`` for k = 1..candidates.

    Returns:
        (scale, zero_point), each of shape (C_out,).
    """
    if method not in WEIGHT_METHODS:
        raise ZkdError(f"unknown weight range method {method!r}; use one of {', '.join(WEIGHT_METHODS)}")
    wf = w.detach().float().flatten(1)
    lo, hi = wf.amin(1), wf.amax(1)
    if method == "minmax":
        return qparams_from_range(lo, hi, qmin, qmax, symmetric)
    exp = _exponent(method, p)
    best_err = torch.full_like(lo, math.inf)
    best_s, best_z = qparams_from_range(lo, hi, qmin, qmax, symmetric)
    for k in range(candidates, 0, -1):
        r = k / candidates
        s, z = qparams_from_range(lo * r, hi * r, qmin, qmax, symmetric)
        err = (wf - _fq(wf, s[:, None], z[:, None], qmin, qmax)).abs().pow(exp).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


@torch.no_grad()
def search_act_qparams(sample: torch.Tensor, lo: float, hi: float, qmin: int, qmax: int, method: str = "mse",
                       p: float = 2.4, candidates: int = 100,
                       percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-tensor clipping search for an activation.

    Args:
        sample: values of the tensor (1-D, any subset representative of the calibration data).
        lo, hi: exact minimum and maximum over the whole calibration data.
        qmin, qmax: integer grid (unsigned ``[0, 2^b-1]``).
        method: ``mse``, ``lp``, ``percentile`` or ``minmax``.
        p, candidates: as in :func:`search_weight_qparams`.
        percentile: upper percentile kept by ``percentile`` (the lower one is ``100 - percentile``).

    Returns:
        (scale (1,), zero_point (1,), signed): ``signed`` is True when the data has negative values.
    """
    if method not in ACT_METHODS:
        raise ZkdError(f"unknown activation range method {method!r}; use one of {', '.join(ACT_METHODS)}")
    signed = lo < 0
    v = sample.detach().float().flatten()
    lo_t, hi_t = torch.tensor([min(lo, 0.0)], device=v.device), torch.tensor([max(hi, 0.0)], device=v.device)
    if method == "minmax" or v.numel() == 0:
        s, z = qparams_from_range(lo_t, hi_t, qmin, qmax, not signed)
        return s, z, signed
    if method == "percentile":
        q = torch.quantile(v, torch.tensor([1 - percentile / 100, percentile / 100], device=v.device))
        lo_c = q[:1].clamp(max=0) if signed else torch.zeros_like(lo_t)
        s, z = qparams_from_range(lo_c, q[1:].clamp(min=0), qmin, qmax, not signed)
        return s, z, signed
    exp = _exponent(method, p)
    best = (math.inf, *qparams_from_range(lo_t, hi_t, qmin, qmax, not signed))
    for k in range(candidates, 0, -1):
        r = k / candidates
        s, z = qparams_from_range(lo_t * r, hi_t * r, qmin, qmax, not signed)
        err = (v - _fq(v, s, z, qmin, qmax)).abs().pow(exp).sum().item()
        if err < best[0]:
            best = (err, s, z)
    return best[1], best[2], signed


@torch.no_grad()
def calibrate_weights(model: nn.Module, method: str = "lp", p: float = 2.4, candidates: int = 100) -> None:
    """Set every quantized layer's weight scales (and zero points) by the per-channel clipping search."""
    for _, layer in quant_layers(model):
        wq: FakeQuantizer = layer.wq
        s, z = search_weight_qparams(layer.weight, wq.qmin, wq.qmax, wq.symmetric, method, p, candidates)
        wq.set_qparams(s, z)


class _ActRecorder:
    """Records each quantized layer's input range and a seeded random sample of values (a reducing Capture)."""

    def __init__(self, model: nn.Module, per_call: int, seed: int) -> None:
        self.per_call, self.seed, self.batch = per_call, seed, 0
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        names = [name for name, layer in quant_layers(model) if layer.aq is not None]
        self.capture = Capture(model, [f"{n}@in" for n in names], detach=True,
                               reduce=lambda addr, x: self._record(addr[: -len("@in")], x)).open()

    def _record(self, name: str, value: torch.Tensor) -> None:
        x = value.float().flatten()
        self.lo[name] = min(self.lo.get(name, math.inf), x.min().item())
        self.hi[name] = max(self.hi.get(name, -math.inf), x.max().item())
        if x.numel() > self.per_call:
            g = batch_generator(self.seed, self.batch, f"act-sample:{name}")
            idx = torch.randint(0, x.numel(), (self.per_call,), generator=g).to(x.device)
            x = x[idx]
        else:
            x = x.clone()  # the live tensor may be changed in place later in the forward
        self.samples.setdefault(name, []).append(x)

    def remove(self) -> None:
        self.capture.close()


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every activation quantizer of a student on or off."""
    for _, layer in quant_layers(model):
        if layer.aq is not None:
            layer.aq.enabled = enabled


def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int,
                          device: torch.device, precision: str = "fp32", method: str = "mse", p: float = 2.4,
                          candidates: int = 100, percentile: float = 99.99, max_samples: int = 1 << 18,
                          seed: int = 0, progress: bool = True) -> dict[str, dict[str, float]]:
    """Search every activation quantizer's range on calibration batches, then fix it.

    Args:
        model: the student (weights already calibrated); run in eval mode.
        batches: iterable of normalized input batches.
        num_batches: length of ``batches`` (for the per-batch sample budget and the progress bar).
        device, precision: where and how to run the forward passes.
        method, p, candidates, percentile: see :func:`search_act_qparams`.
        max_samples: values kept per tensor for the search.
        seed: seed of the value sampling.
        progress: show a tqdm bar on stderr.

    Returns:
        Per layer: observed min/max, whether it is signed, and the chosen scale/zero point.
    """
    model.eval()
    set_act_quant(model, False)
    rec = _ActRecorder(model, max(1, max_samples // max(num_batches, 1)), seed)
    try:
        for i, x in enumerate(tqdm(batches, total=num_batches, desc="calibrate activations", disable=not progress,
                                   leave=False)):
            rec.batch = i
            with autocast(device, precision):
                model(x.to(device))
    finally:
        rec.remove()
        set_act_quant(model, True)
    layers = dict(quant_layers(model))
    stats: dict[str, dict[str, float]] = {}
    for name, chunks in rec.samples.items():
        layer = layers[name]
        aq: FakeQuantizer = layer.aq
        sample = torch.cat(chunks)
        s, z, signed = search_act_qparams(sample, rec.lo[name], rec.hi[name], aq.qmin, aq.qmax, method, p,
                                          candidates, percentile)
        layer.set_act_signed(signed)
        aq.set_qparams(s, z)
        stats[name] = {"min": rec.lo[name], "max": rec.hi[name], "signed": signed, "scale": aq.scale.item(),
                       "zero_point": aq.zero_point.item()}
    return stats
