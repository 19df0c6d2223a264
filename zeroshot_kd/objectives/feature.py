"""Feature-level objectives: FSP matrices (Yim et al. 2017) and overhaul feature distillation (Heo et al. 2019).

Both compare channel-wise quantities, so where student and teacher widths differ a **connector** (1x1 conv + BN,
trained with the student) maps the student's feature to the teacher's width. Connectors are built by
:meth:`Objective.setup` from one dry run, so the optimizer must include ``objective.parameters()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from .base import KDBatch, Param
from .capture import preact_bn
from .relation import FeatureObjective

__all__ = ["FSP", "OFD", "connector", "fsp_loss", "fsp_matrix", "ofd_loss", "ofd_margin"]


def connector(c_in: int, c_out: int) -> nn.Sequential:
    """OFD's student connector: ``Conv2d(c_in, c_out, 1, bias=False)`` + ``BatchNorm2d(c_out)``.

    Init as in the OFD code: conv weights ``N(0, sqrt(2 / (k * k * c_out)))``, BN weight 1, bias 0.
    """
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / c_out))
    bn = nn.BatchNorm2d(c_out)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)


# ---------------------------------------------------------------------------------------------------------------
def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Flow of solution procedure: ``G[b, j, i] = sum_hw top[b,j,h,w] * bottom[b,i,h,w] / (h*w)``.

    The larger map is average-pooled to the smaller one's size first (RepDistiller).
    """
    if bottom.dim() != 4 or top.dim() != 4:
        raise ZkdError("fsp needs 4-D feature maps (B, C, H, W) at every layer; pick convolutional layers")
    if bottom.shape[-2:] != top.shape[-2:]:
        size = (min(bottom.shape[-2], top.shape[-2]), min(bottom.shape[-1], top.shape[-1]))
        bottom = F.adaptive_avg_pool2d(bottom, size) if bottom.shape[-2:] != size else bottom
        top = F.adaptive_avg_pool2d(top, size) if top.shape[-2:] != size else top
    return torch.einsum("bihw,bjhw->bji", bottom, top) / (bottom.shape[-2] * bottom.shape[-1])


def fsp_loss(s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive pairs (i, i+1) of ``mean((G_s - G_t)^2)`` (RepDistiller's reduction, equal lambdas)."""
    total = torch.zeros((), dtype=s_feats[0].dtype, device=s_feats[0].device)
    for i in range(len(s_feats) - 1):
        g_s = fsp_matrix(s_feats[i], s_feats[i + 1])
        g_t = fsp_matrix(t_feats[i], t_feats[i + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


class FSP(FeatureObjective):
    """FSP matrices between consecutive layers; optional two-stage schedule (FSP alone first, then the rest)."""

    name = "fsp"
    summary = "FSP matrices of consecutive layer pairs, mean squared difference; two-stage schedule optional"
    default_layers = "stem+stages"

    def check(self) -> None:
        if self.params["init_epochs"] < 0 or self.params["init_steps"] < 0:
            raise ZkdError("objective fsp: init_epochs and init_steps must be >= 0")

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.adapters = nn.ModuleDict()

    @property
    def two_stage(self) -> bool:
        return self.params["init_epochs"] > 0 or self.params["init_steps"] > 0

    def in_first_stage(self, batch: KDBatch) -> bool:
        p = self.params
        return (p["init_epochs"] > 0 and batch.epoch < p["init_epochs"]) or (
            p["init_steps"] > 0 and batch.step < p["init_steps"])

    def exclusive(self, batch: KDBatch) -> bool:
        return self.in_first_stage(batch)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        if len(self.s_keys) < 2:
            raise ZkdError(f"objective fsp needs at least two layers (got {'+'.join(self.s_keys)}); e.g. "
                           "layers=stem+stages")

    def setup(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor]) -> None:
        for i, (s, t) in enumerate(zip(self.s_keys, self.t_keys)):
            cs, ct = student_features[s].shape[1], teacher_features[t].shape[1]
            if cs != ct:
                self.adapters[str(i)] = connector(cs, ct).to(student_features[s].device)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if self.two_stage and not self.in_first_stage(batch):
            return torch.zeros((), device=batch.student_logits.device)
        pairs = self.pairs(batch)
        s_feats = [self.adapters[str(i)](s) if str(i) in self.adapters else s for i, (s, _) in enumerate(pairs)]
        return fsp_loss(s_feats, [t for _, t in pairs])


FSP.PARAMS = {**FSP.layer_params(),
              "init_epochs": Param("int", 0, "two-stage: train on FSP alone for this many epochs, then drop it "
                                   "(RepDistiller: 30); 0 = FSP added to the other terms throughout"),
              "init_steps": Param("int", 0, "same as init_epochs, counted in steps (for zkd calibrate)")}


# ---------------------------------------------------------------------------------------------------------------
def ofd_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margin ``E[x | x < 0]`` for x ~ N(beta, |gamma|^2), from the BN before the ReLU.

    ``m - s * phi(m/s) / Phi(-m/s)`` where ``Phi(-m/s) > 0.001``, else the fallback ``-3 s``.
    """
    s = gamma.abs().double().clamp_min(1e-12)
    m = beta.double()
    z = m / s
    cdf_neg = 0.5 * torch.erfc(z / math.sqrt(2.0))               # Phi(-m/s)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)      # phi(m/s)
    exact = m - s * pdf / cdf_neg.clamp_min(1e-300)
    return torch.where(cdf_neg > 0.001, exact, -3 * s)


def ofd_loss(f_s: torch.Tensor, f_t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2 with the teacher's margin ReLU, summed over all elements (not divided by B).

    ``t' = max(t, margin)``; ``sum((s - t')^2 * [(s > t') or (t' > 0)])``.
    """
    t = torch.maximum(f_t, margin.view(1, -1, *([1] * (f_t.dim() - 2))).to(f_t.dtype))
    mask = ((f_s > t) | (t > 0)).to(f_s.dtype)
    return ((f_s - t).pow(2) * mask).sum()


class OFD(FeatureObjective):
    """Overhaul feature distillation: pre-ReLU features, margin ReLU on the teacher, partial L2, student connector.

    ``sum_i 2^-(N-1-i) * ofd_loss(connector_i(s_i), t_i, margin_i) / B``. Margins come from the teacher BN that
    feeds each pre-ReLU feature; where none is found (or ``margin=data``), from the running mean of the teacher's
    negative responses per channel (the data-driven margin the OFD author suggests for BN-free nets).
    """

    name = "ofd"
    summary = "overhaul FD: partial L2 to margin-ReLU'd pre-ReLU teacher features, 1x1 conv+BN connector"
    default_weight = 1e-3
    default_layers = "preact"

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.connectors = nn.ModuleList()
        self._bn_margins: list[torch.Tensor | None] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().bind(student, teacher)
        assert teacher is not None
        self._bn_margins = []
        for addr in self.t_keys:
            bn_path = preact_bn(teacher, addr) if self.params["margin"] != "data" else None
            if bn_path is None and self.params["margin"] == "bn":
                raise ZkdError(f"objective ofd: no BatchNorm feeds teacher layer {addr!r}; use margin=data or a "
                               "pre-ReLU address (PATH.relu@in) inside a conv-BN block")
            if bn_path is None:
                self._bn_margins.append(None)
            else:
                bn = teacher.get_submodule(bn_path)
                self._bn_margins.append(ofd_margin(bn.weight.detach(), bn.bias.detach()).float())

    def setup(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor]) -> None:
        self.connectors = nn.ModuleList()
        for i, (s, t) in enumerate(zip(self.s_keys, self.t_keys)):
            fs, ft = student_features[s], teacher_features[t]
            if fs.dim() != 4 or ft.dim() != 4:
                raise ZkdError(f"objective ofd needs 4-D feature maps; {s!r}/{t!r} are not")
            self.connectors.append(connector(fs.shape[1], ft.shape[1]).to(fs.device))
            if self._bn_margins[i] is None:
                self.register_buffer(f"neg_sum_{i}", torch.zeros(ft.shape[1], dtype=torch.float64, device=ft.device))
                self.register_buffer(f"neg_count_{i}", torch.zeros(ft.shape[1], dtype=torch.float64,
                                                                   device=ft.device))

    def margin(self, i: int, f_t: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s margin: the BN-derived one, or the running mean of negative teacher responses."""
        bn_margin = self._bn_margins[i]
        if bn_margin is not None:
            return bn_margin.to(f_t.device)
        neg_sum, neg_count = getattr(self, f"neg_sum_{i}"), getattr(self, f"neg_count_{i}")
        if self.training:
            with torch.no_grad():
                neg = f_t.detach().double().clamp(max=0)
                neg_sum += neg.transpose(0, 1).reshape(f_t.shape[1], -1).sum(1)
                neg_count += (f_t.detach() < 0).transpose(0, 1).reshape(f_t.shape[1], -1).sum(1).double()
        return (neg_sum / neg_count.clamp_min(1)).to(f_t.dtype)

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if not len(self.connectors):
            raise ZkdError("objective ofd was not set up (its connectors are built from a dry run); use "
                           "ObjectiveRunner.setup(example_inputs) or zeroshot_kd.training.train_student")
        pairs = self.pairs(batch)
        n = len(pairs)
        total = torch.zeros((), device=batch.student_logits.device)
        for i, (s, t) in enumerate(pairs):
            s = self.connectors[i](s)
            if t.shape[-2:] != s.shape[-2:]:
                t = F.adaptive_avg_pool2d(t, s.shape[-2:])
            total = total + ofd_loss(s, t, self.margin(i, t)) / 2 ** (n - 1 - i)
        return total / s.shape[0]


OFD.PARAMS = {**OFD.layer_params(),
              "margin": Param("choice", "auto", "auto (BN if found, else data), bn, or data (running mean of the "
                              "teacher's negative responses)", ("auto", "bn", "data"))}
