"""Divergences between signatures: the teacher-to-data scores (:data:`DIVERGENCES`) and dataset-to-dataset distance."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..bn import gaussian_kl
from .signature import Signature, check_compatible

__all__ = ["DIVERGENCES", "HEADLINE", "dataset_distance", "divergences", "similarity_matrix"]

HEADLINE = "bns"
DIVERGENCES: dict[str, str] = {
    "bns": "KL(N(mu_teacher, var_teacher) || N(mu_data, var_data)), mean over channels (The Knowledge Within)",
    "reverse": "KL(N(mu_data, var_data) || N(mu_teacher, var_teacher)), mean over channels",
    "symmetric": "(bns + reverse) / 2, mean over channels",
    "l2": "||mu_data - mu_teacher||_2 + ||var_data - var_teacher||_2 over channels (DeepInversion R_feature)",
}


def _layer_terms(ref: Signature, data: Signature, i: int) -> dict[str, float]:
    eps = ref.eps[i]
    mu_t, var_t, mu_d, var_d = ref.mean[i], ref.var[i], data.mean[i], data.var[i]
    fwd = gaussian_kl(mu_t, var_t + eps, mu_d, var_d + eps).mean().item()
    rev = gaussian_kl(mu_d, var_d + eps, mu_t, var_t + eps).mean().item()
    l2 = (torch.linalg.vector_norm(mu_d - mu_t) + torch.linalg.vector_norm(var_d - var_t)).item()
    return {"bns": fwd, "reverse": rev, "symmetric": 0.5 * (fwd + rev), "l2": l2}


def divergences(ref: Signature, data: Signature) -> dict[str, Any]:
    """Every divergence of :data:`DIVERGENCES` from ``ref`` (usually the teacher) to ``data``.

    Returns:
        ``{"scores": {kind: mean over layers}, "per_layer": {kind: [one value per layer]}}``.
    """
    check_compatible(ref, data)
    per_layer: dict[str, list[float]] = {k: [] for k in DIVERGENCES}
    for i in range(len(ref.layers)):
        for k, v in _layer_terms(ref, data, i).items():
            per_layer[k].append(v)
    scores = {k: sum(v) / len(v) for k, v in per_layer.items()}
    return {"scores": scores, "per_layer": per_layer}


def dataset_distance(a: Signature, b: Signature) -> float:
    """Symmetric KL between two signatures: mean over channels, then over layers (0 iff they are equal)."""
    check_compatible(a, b)
    total = 0.0
    for i in range(len(a.layers)):
        eps = a.eps[i]
        va, vb = a.var[i] + eps, b.var[i] + eps
        kl = gaussian_kl(a.mean[i], va, b.mean[i], vb) + gaussian_kl(b.mean[i], vb, a.mean[i], va)
        total += 0.5 * kl.mean().item()
    return total / len(a.layers)


def similarity_matrix(signatures: Sequence[Signature]) -> list[list[float]]:
    """Pairwise :func:`dataset_distance` of the signatures (symmetric, zero diagonal)."""
    n = len(signatures)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            out[i][j] = out[j][i] = dataset_distance(signatures[i], signatures[j])
    return out
