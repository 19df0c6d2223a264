"""Mixed-precision weight bits under a size budget (ZeroQ's Pareto-frontier allocation, Cai et al. 2020).

Sensitivity (:func:`layer_sensitivity`): for every quantizable layer ``i`` and every bit width ``b`` of
:data:`BIT_CHOICES`, only layer ``i``'s weight is quantized (per-channel range search at ``b`` bits, the student's
weight grid), every other layer and all activations stay float, and ``S_i(b) = KL(p_fp || p_q)`` (batchmean,
float32) of the logits on the calibration images. As in ZeroQ the total is predicted additively,
``S(b_1..b_L) = sum_i S_i(b_i)``.

Allocation (:func:`allocate`): minimize ``sum_i S_i(b_i)`` subject to ``sum_i n_i b_i <= budget`` (``n_i`` weights
of layer ``i``; bits), a multiple-choice knapsack solved by dynamic programming over sizes discretized in units of
``u`` bits: each choice costs ``ceil(n_i b / u)`` units, so every returned allocation fits the budget exactly
(rounding up can only drop feasible points, never admit infeasible ones); with ``u = 1`` (small problems) the DP
is exact. The same table gives the whole frontier -- the least predicted sensitivity for every size -- which the
report draws (size vs predicted sensitivity, chosen point marked).

Layers kept at 8 bits by ``--keep-8bit`` stay at 8 bits and count in the size. Sizes are weight sizes only (codes;
biases and scales are not counted); FP32 size is ``32 * sum_i n_i`` bits. Activation bits stay uniform.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from ..charts import line_chart, png_bytes
from .calibrate import search_weight_qparams
from .fakequant import int_range
from .modules import LayerConfig, QuantConfig, quantize_model

__all__ = ["BIT_CHOICES", "MixedPrecision", "allocate", "choose_bits", "frontier_png", "layer_sensitivity",
           "parse_size_budget"]

BIT_CHOICES = (2, 3, 4, 6, 8)


def parse_size_budget(text: str | None, fp32_bits: int, min_bits: int, default_bits: int | None = None) -> int:
    """A ``--size-budget`` string -> bits.

    Args:
        text: ``"2.5MB"``, ``"300KB"``, ``"120000B"`` (MB = 10^6 bytes, KB = 10^3) or a ratio of the FP32 weight size
            ``"0.125x"``; None means ``default_bits`` (the size of the uniform ``--bits`` student).
        fp32_bits: weight size of the float model.
        min_bits: the smallest reachable size (every choosable layer at 2 bits).

    Raises:
        ZkdError: unparsable, larger than the FP32 weights, or below the all-2-bit size.
    """
    if text is None:
        if default_bits is None:
            raise ZkdError("--mixed-precision needs --size-budget MB|RATIO, e.g. 2.5MB or 0.125x")
        return default_bits
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(mb|kb|b|x)\s*", text.lower())
    if not m:
        raise ZkdError(f"--size-budget {text!r} is not a size; write e.g. 2.5MB, 300KB or 0.125x (of FP32)")
    value, unit = float(m.group(1)), m.group(2)
    bits = int(math.floor(value * fp32_bits)) if unit == "x" else int(math.floor(
        value * {"mb": 1e6, "kb": 1e3, "b": 1.0}[unit] * 8))
    if bits > fp32_bits:
        raise ZkdError(f"--size-budget {text} is larger than the FP32 weights ({fp32_bits / 8e6:.4f} MB); "
                       "pick a smaller budget")
    if bits < min_bits:
        raise ZkdError(f"--size-budget {text} is below the all-2-bit size ({min_bits / 8e6:.4f} MB, "
                       f"{min_bits / fp32_bits:.4f}x); pick a larger budget")
    return bits


def allocate(params: Sequence[int], sensitivity: Sequence[dict[int, float]], budget_bits: int,
             resolution: int = 4000) -> tuple[list[int], float, list[tuple[int, float]]]:
    """Bits per layer minimizing total sensitivity with ``sum(params_i * bits_i) <= budget_bits``.

    Args:
        params: weights per layer.
        sensitivity: per layer, ``{bits: S_i(bits)}`` (the choices available to that layer).
        budget_bits: the size budget in bits (of these layers only).
        resolution: number of size units of the DP; the unit is ``ceil(max_size / resolution)`` bits (1 when the
            largest allocation has at most ``resolution`` bits: exact). Where rounding up makes a budget near the
            minimum infeasible, the DP is rerun with 4x finer units (down to exact).

    Returns:
        (bits per layer, predicted total sensitivity, frontier as ``[(size_bits, min_sensitivity)]`` with strictly
        decreasing sensitivity).

    Raises:
        ZkdError: no allocation fits the budget.
    """
    choices = [sorted(s) for s in sensitivity]
    max_size = sum(n * max(c) for n, c in zip(params, choices))
    while True:
        unit = max(1, math.ceil(max_size / resolution))
        try:
            return _allocate(params, choices, sensitivity, budget_bits, max_size, unit)
        except ZkdError:
            if unit == 1:
                raise
            resolution *= 4  # rounding sizes up made a budget near the minimum infeasible: refine


def _allocate(params: Sequence[int], choices: list[list[int]], sensitivity: Sequence[dict[int, float]],
              budget_bits: int, max_size: int, unit: int) -> tuple[list[int], float, list[tuple[int, float]]]:
    cap = min(budget_bits, max_size) // unit
    full = max_size // unit + len(params)  # room for round-up of every layer
    inf = math.inf
    dp = torch.full((full + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    back: list[torch.Tensor] = []
    for n, cs, sens in zip(params, choices, sensitivity):
        new = torch.full_like(dp, inf)
        arg = torch.full((full + 1,), -1, dtype=torch.long)
        for j, b in enumerate(cs):
            c = math.ceil(n * b / unit)
            if c > full:
                continue
            cand = torch.full_like(dp, inf)
            cand[c:] = dp[: full + 1 - c] + float(sens[b])
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        dp = new
        back.append(arg)
    if not torch.isfinite(dp[: cap + 1]).any():
        raise ZkdError(f"no bit allocation fits {budget_bits} bits; raise --size-budget")
    best_c = int(torch.argmin(dp[: cap + 1]).item())
    total = float(dp[best_c])
    bits: list[int] = []
    c = best_c
    for i in range(len(params) - 1, -1, -1):
        j = int(back[i][c])
        b = choices[i][j]
        bits.append(b)
        c -= math.ceil(params[i] * b / unit)
    bits.reverse()
    frontier: list[tuple[int, float]] = []
    best = inf
    for c in range(full + 1):
        v = float(dp[c])
        if v < best - 1e-15:
            best = v
            frontier.append((c * unit, v))
    return bits, total, frontier


@torch.no_grad()
def layer_sensitivity(fp_model: nn.Module, names: Sequence[str], x: torch.Tensor, device: torch.device,
                      bits: Sequence[int] = BIT_CHOICES, w_asym: bool = False, w_method: str = "lp",
                      p: float = 2.4, candidates: int = 100, batch_size: int = 128) -> list[dict[int, float]]:
    """``S_i(b)``: logit KL to the float model when only layer ``names[i]``'s weight is quantized at ``b`` bits.

    Args:
        fp_model: the float (folded) model; its weights are restored after each trial.
        names: module paths of Conv2d / Linear layers.
        x: calibration images.
        device: where to run.
        bits: bit widths tried.
        w_asym, w_method, p, candidates: the student's weight grid and range search.
        batch_size: forward batch size.
    """
    fp_model.eval()
    batches = [x[i:i + batch_size].to(device) for i in range(0, x.shape[0], batch_size)]
    ref = [F.log_softmax(fp_model(b).float(), 1) for b in batches]
    out: list[dict[int, float]] = []
    for name in names:
        layer = fp_model.get_submodule(name)
        w0 = layer.weight.detach().clone()
        row: dict[int, float] = {}
        for b in bits:
            qmin, qmax = int_range(b, signed=not w_asym)
            s, z = search_weight_qparams(w0, qmin, qmax, not w_asym, w_method, p, candidates)
            shape = [-1] + [1] * (w0.dim() - 1)
            s, z = s.view(shape), z.view(shape)
            layer.weight.copy_((torch.clamp(torch.round(w0.float() * (1.0 / s)) + z, qmin, qmax) - z) * s)
            kl = sum(F.kl_div(F.log_softmax(fp_model(bt).float(), 1), r, reduction="sum", log_target=True).item()
                     for bt, r in zip(batches, ref))
            row[b] = max(kl / x.shape[0], 0.0)
        layer.weight.copy_(w0)
        out.append(row)
    return out


@dataclass
class MixedPrecision:
    """The chosen per-layer weight bits and what they cost (recorded in the report)."""

    bits: dict[str, int]
    layer_configs: dict[str, LayerConfig]
    params: dict[str, int]
    size_bits: int
    budget_bits: int
    fp32_bits: int
    uniform_bits: int
    predicted_sensitivity: float
    uniform_sensitivity: float
    sensitivity: dict[str, dict[int, float]]
    frontier: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        mb = lambda b: b / 8e6  # noqa: E731
        return {"bits": self.bits, "params": self.params, "size_mb": mb(self.size_bits),
                "budget_mb": mb(self.budget_bits), "fp32_mb": mb(self.fp32_bits),
                "uniform_mb": mb(self.uniform_bits), "ratio_of_fp32": self.size_bits / self.fp32_bits,
                "predicted_sensitivity": self.predicted_sensitivity,
                "uniform_sensitivity": self.uniform_sensitivity,
                "sensitivity": {n: {str(b): v for b, v in r.items()} for n, r in self.sensitivity.items()},
                "frontier": [[mb(s), v] for s, v in self.frontier]}


def choose_bits(float_model: nn.Module, config: QuantConfig, x: torch.Tensor, device: torch.device,
                size_budget: str | None, w_method: str = "lp", p: float = 2.4, candidates: int = 100,
                bits: Sequence[int] = BIT_CHOICES, max_images: int = 256) -> MixedPrecision:
    """Per-layer weight bits for ``float_model`` (the folded float student, not modified) within ``size_budget``.

    Layers exempted by ``config.keep_8bit`` keep their 8 bits; the rest choose from ``bits``. ``size_budget`` None
    means the size of the uniform ``config.w_bits`` student.
    """
    probe = copy.deepcopy(float_model)
    defaults = quantize_model(probe, config)
    del probe
    params = {n: float_model.get_submodule(n).weight.numel() for n in defaults}
    free = [n for n, lc in defaults.items() if lc.w_bits == config.w_bits]
    fixed_bits = sum(params[n] * lc.w_bits for n, lc in defaults.items() if n not in free)
    fp32_bits = 32 * sum(params.values())
    uniform_bits = sum(params[n] * lc.w_bits for n, lc in defaults.items())
    min_bits = fixed_bits + min(bits) * sum(params[n] for n in free)
    budget = parse_size_budget(size_budget, fp32_bits, min_bits, uniform_bits)
    sens = layer_sensitivity(float_model, free, x[:max_images], device, bits, config.w_asym, w_method, p,
                             candidates)
    chosen, total, front = allocate([params[n] for n in free], sens, budget - fixed_bits)
    layer_bits = {n: lc.w_bits for n, lc in defaults.items()}
    layer_bits.update(dict(zip(free, chosen)))
    configs = {n: LayerConfig(n, lc.kind, layer_bits[n], lc.a_bits, lc.w_asym, lc.role)
               for n, lc in defaults.items()}
    uniform_s = sum(r.get(config.w_bits, math.nan) for r in sens)
    return MixedPrecision(layer_bits, configs, params, fixed_bits + sum(params[n] * b for n, b in zip(free, chosen)),
                          budget, fp32_bits, uniform_bits, total, uniform_s, dict(zip(free, sens)),
                          [(s + fixed_bits, v) for s, v in front])


def frontier_png(mp: MixedPrecision | dict[str, Any], points: int = 40) -> bytes:
    """A PNG of the Pareto frontier (weight size vs predicted sensitivity, log y), the chosen point marked."""
    d = mp.to_dict() if isinstance(mp, MixedPrecision) else mp
    front = [(s, v) for s, v in d["frontier"] if v > 0]
    if not front:
        front = [(d["size_mb"], max(d["predicted_sensitivity"], 1e-12))]
    lo, hi = front[0][0], front[-1][0]
    xs = [lo + (hi - lo) * k / max(points - 1, 1) for k in range(points)]

    def at(size: float) -> float:
        best = None
        for s, v in front:
            if s <= size + 1e-12:
                best = v
        return best if best is not None else front[0][1]

    cats = [f"{x:.3f}" for x in xs]
    k_chosen = min(range(points), key=lambda k: abs(xs[k] - d["size_mb"]))
    chosen = [None] * points
    chosen[k_chosen] = max(d["predicted_sensitivity"], 1e-12)
    img, _ = line_chart({"frontier (least predicted sensitivity)": [at(x) for x in xs], "chosen": chosen}, cats,
                        title="Mixed precision: weight size vs predicted sensitivity", y_label="sum of layer KL",
                        x_label="weight size (MB)", log_y=True, slot_px=18)
    return png_bytes(img)
