"""Relation-level objectives on captured features: SP, RKD, PKT and information-flow KD (IFM).

These compare B x B (or B x B x B) relations inside a batch, so student and teacher widths may differ and need
no adapter. Layers are addressed by module path (see :mod:`zeroshot_kd.objectives.capture`); ``layers`` applies
to both models, ``student_layers`` / ``teacher_layers`` override one side; the i-th student layer is matched
with the i-th teacher layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from .base import KDBatch, Objective, Param, as_float
from .capture import resolve_layers

__all__ = ["FeatureObjective", "IFM", "PKT", "RKD", "SP", "cosine_kernel_probs", "ifm_layer_loss", "pdist",
           "pkt_loss", "rkd_angle", "rkd_distance", "sp_loss", "student_t_kernel_probs"]


class FeatureObjective(Objective):
    """Base for objectives on captured features: resolves ``layers`` into addresses on both models."""

    default_layers: ClassVar[str] = "last-stage"
    needs_teacher = True

    @classmethod
    def layer_params(cls) -> dict[str, Param]:
        return {
            "layers": Param("layers", cls.default_layers, "module paths (+-separated, @in for a module's input) or "
                            "keywords: stages, last-stage, stem, penultimate, preact"),
            "student_layers": Param("layers", None, "student-side override of layers"),
            "teacher_layers": Param("layers", None, "teacher-side override of layers"),
        }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.s_keys: list[str] = []
        self.t_keys: list[str] = []

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ZkdError(f"objective {self.name} needs a teacher model to capture its features")
        s_tok = self.params["student_layers"] or self.params["layers"]
        t_tok = self.params["teacher_layers"] or self.params["layers"]
        self.s_keys = resolve_layers(student, s_tok, "student")
        self.t_keys = resolve_layers(teacher, t_tok, "teacher")
        if len(self.s_keys) != len(self.t_keys):
            raise ZkdError(f"objective {self.name}: {len(self.s_keys)} student layers ({'+'.join(self.s_keys)}) vs "
                           f"{len(self.t_keys)} teacher layers ({'+'.join(self.t_keys)}); give as many on each side")

    def feature_requests(self) -> tuple[list[str], list[str]]:
        return list(self.s_keys), list(self.t_keys)

    def pairs(self, batch: KDBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student feature, detached teacher feature) per matched layer, float32 (or float64)."""
        out = []
        for s, t in zip(self.s_keys, self.t_keys):
            if s not in batch.student_features or t not in batch.teacher_features:
                side, key = ("student", s) if s not in batch.student_features else ("teacher", t)
                raise ZkdError(f"objective {self.name}: feature {key!r} of the {side} was not captured this step")
            fs = as_float(batch.student_features[s])
            out.append((fs, as_float(batch.teacher_features[t].detach()).to(fs.dtype)))
        return out


# ---------------------------------------------------------------------------------------------------------------
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019) for one layer pair.

    ``G = f f^T`` on flattened features, each row L2-normalized (after the product), then
    ``||G_t - G_s||_F^2 / B^2``.
    """
    b = f_s.shape[0]
    g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).t(), dim=1)
    g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).t(), dim=1)
    return ((g_t - g_s) ** 2).sum() / (b * b)


class SP(FeatureObjective):
    name = "sp"
    summary = "similarity-preserving: ||norm(G_t) - norm(G_s)||_F^2 / b^2 on batch Gram matrices"
    default_weight = 3000.0
    default_layers = "last-stage"

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return sum((sp_loss(s, t) for s, t in self.pairs(batch)), torch.zeros((), device=batch.student_logits.device))


SP.PARAMS = SP.layer_params()


# ---------------------------------------------------------------------------------------------------------------
def pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances as in the RKD code: clamp(d^2, eps), sqrt, diagonal set to 0."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    d = d.clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def _normalize_by_mean(d: torch.Tensor) -> torch.Tensor:
    pos = d[d > 0]
    return d / pos.mean() if pos.numel() else d


def rkd_distance(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD distance term: each net's distances divided by its mean non-zero distance, smooth-L1, mean over B^2."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = _normalize_by_mean(pdist(t))
    s_d = _normalize_by_mean(pdist(s))
    return F.smooth_l1_loss(s_d, t_d, reduction="mean")


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)          # diff[i, j] = e_j - e_i
    n = F.normalize(diff, p=2, dim=2)
    return torch.bmm(n, n.transpose(1, 2)).reshape(-1)


def rkd_angle(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD angle term: cosines of all B^3 triplet angles (degenerate ones are 0), smooth-L1, mean."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    with torch.no_grad():
        t_a = _angles(t)
    return F.smooth_l1_loss(_angles(s), t_a, reduction="mean")


class RKD(FeatureObjective):
    name = "rkd"
    summary = "relational KD: distance_weight * distance + angle_weight * angle (smooth-L1)"
    default_layers = "penultimate"

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        dist = ang = torch.zeros((), device=batch.student_logits.device)
        for s, t in self.pairs(batch):
            if p["distance_weight"]:
                dist = dist + rkd_distance(s, t)
            if p["angle_weight"]:
                ang = ang + rkd_angle(s, t)
        self._last = {"distance": float(dist.detach()), "angle": float(ang.detach())}
        return p["distance_weight"] * dist + p["angle_weight"] * ang

    def extra_terms(self) -> dict[str, float]:
        return dict(getattr(self, "_last", {}))


RKD.PARAMS = {**RKD.layer_params(),
              "distance_weight": Param("float", 25.0, "weight of the distance term (paper/RepDistiller: 25)"),
              "angle_weight": Param("float", 50.0, "weight of the angle term (paper/RepDistiller: 50)")}


# ---------------------------------------------------------------------------------------------------------------
def _row_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(p=2, dim=1, keepdim=True) + eps)
    return torch.nan_to_num(x, nan=0.0)


def cosine_kernel_probs(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT's conditional probabilities: cosine kernel ``(cos + 1) / 2`` (diagonal included), rows summing to 1."""
    x = _row_normalize(x.reshape(x.shape[0], -1), eps)
    k = (x @ x.t() + 1) / 2
    return k / k.sum(1, keepdim=True)


def student_t_kernel_probs(x: torch.Tensor, d: float = 1.0) -> torch.Tensor:
    """Information-flow KD's Student-t kernel ``1 / (1 + ||x_i - x_j||^d)`` as row-normalized probabilities."""
    x = x.reshape(x.shape[0], -1)
    sq = x.pow(2).sum(1)
    dist = torch.sqrt((sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp(min=0) + 1e-6)
    k = 1 / (1 + dist.pow(d))
    return k / k.sum(1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic KT (Passalis & Tefas 2018): ``mean_ij P_t log((P_t + eps) / (P_s + eps))`` (mean over B^2)."""
    p_s, p_t = cosine_kernel_probs(f_s, eps), cosine_kernel_probs(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _jeffreys(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(p_s.dtype).tiny
    return ((p_t - p_s) * (torch.log(p_t.clamp_min(tiny)) - torch.log(p_s.clamp_min(tiny)))).mean()


def ifm_layer_loss(f_s: torch.Tensor, f_t: torch.Tensor, kernel: str = "combined", d: float = 1.0
                   ) -> torch.Tensor:
    """Information-flow KD for one layer pair: Jeffreys divergence between the kernels' conditional distributions.

    ``combined`` (the pkth code's default) sums the cosine and the Student-t kernel terms, each a mean over B^2.
    """
    total = torch.zeros((), dtype=f_s.dtype, device=f_s.device)
    if kernel in ("combined", "cosine"):
        total = total + _jeffreys(cosine_kernel_probs(f_t, 1e-6), cosine_kernel_probs(f_s, 1e-6))
    if kernel in ("combined", "student-t"):
        total = total + _jeffreys(student_t_kernel_probs(f_t, d), student_t_kernel_probs(f_s, d))
    return total


class PKT(FeatureObjective):
    name = "pkt"
    summary = "probabilistic KT: KL between cosine-kernel conditional distributions (mean over b^2)"
    default_weight = 30000.0
    default_layers = "penultimate"

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return sum((pkt_loss(s, t, self.params["eps"]) for s, t in self.pairs(batch)),
                   torch.zeros((), device=batch.student_logits.device))


PKT.PARAMS = {**PKT.layer_params(), "eps": Param("float", 1e-7, "stabilizer in the norms and the log ratio")}


class IFM(FeatureObjective):
    """Heterogeneous KD via information-flow modelling (Passalis et al. 2020).

    Per matched layer pair, the Jeffreys divergence of kernel conditional distributions; the last pair has weight
    1 and the others ``alpha_initial * gamma^epoch`` (the critical-period schedule).
    """

    name = "ifm"
    summary = "information-flow KD: Jeffreys divergence per layer, non-final weights alpha_initial * gamma^epoch"
    default_layers = "stages+penultimate"

    def check(self) -> None:
        self._positive("alpha_initial", "gamma", "d")

    def layer_weights(self, epoch: int) -> list[float]:
        """Weights of the matched layers at ``epoch``: ``alpha_initial * gamma^epoch`` for all but the last (1)."""
        w = self.params["alpha_initial"] * self.params["gamma"] ** epoch
        return [w] * (len(self.s_keys) - 1) + [1.0]

    def forward(self, batch: KDBatch) -> torch.Tensor:
        weights = self.layer_weights(batch.epoch)
        total = torch.zeros((), device=batch.student_logits.device)
        for w, (s, t) in zip(weights, self.pairs(batch)):
            total = total + w * ifm_layer_loss(s, t, self.params["kernel"], self.params["d"])
        return total


IFM.PARAMS = {**IFM.layer_params(),
              "alpha_initial": Param("float", 100.0, "initial weight of the non-final layers (pkth: 100)"),
              "gamma": Param("float", 0.7, "per-epoch decay of the non-final weights (pkth: 0.7)"),
              "kernel": Param("choice", "combined", "combined (cosine + Student-t), cosine or student-t",
                              ("combined", "cosine", "student-t")),
              "d": Param("float", 1.0, "Student-t kernel exponent (pkth: 1)")}
