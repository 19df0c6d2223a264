"""Adaptive DeepInversion (Yin et al. 2020): DeepInversion plus a competition term against a student.

The extra term is ``adi_scale * (1 - JS(p_s || p_t))`` at temperature 3 (paper: adi_scale 0.2): minimizing it
drives images to where the student disagrees with the teacher.

JS form: by default the textbook Jensen-Shannon divergence, ``0.5 KL(P || M) + 0.5 KL(Q || M)`` with
``M = (P + Q) / 2``, in nats, per sample, averaged over the batch. The authors' code instead computes
``0.5 KL(M || P) + 0.5 KL(M || Q)`` on probabilities clamped to [0.01, 0.99] and clamps the result to [0, 1]; choose
it with ``adi_js="deepinversion"`` to reproduce their behaviour. The student is a fixed snapshot during synthesis
(as in the public code, which uses a pretrained ResNet-18); alternate ``zkd synthesize`` and ``zkd distill``
rounds for the paper's adaptive loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bn import deepinversion_feature_loss
from .base import Method
from .deepinversion import DEFAULTS

METHOD = Method(
    name="adi",
    summary="DeepInversion + 1 - JS(student || teacher) competition at T=3 against --student",
    defaults={**DEFAULTS, "adi_scale": 0.2},
    bn_loss=deepinversion_feature_loss,
    needs_student=True,
)


def js_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 3.0,
                  form: str = "textbook") -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between softened student and teacher predictions, in nats.

    Args:
        form: ``textbook`` (0.5 KL(P||M) + 0.5 KL(Q||M)) or ``deepinversion`` (the authors' code: 0.5 KL(M||P) +
            0.5 KL(M||Q) on probabilities clamped to [0.01, 0.99]).
    """
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    if form == "textbook":
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - torch.log(torch.tensor(2.0))
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
        return 0.5 * kl_pm + 0.5 * kl_qm
    if form == "deepinversion":
        p, q = log_p.exp(), log_q.exp()
        m = (0.5 * (p + q)).clamp(0.01, 0.99)
        p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
        return 0.5 * (m * (m.log() - p.log())).sum(1) + 0.5 * (m * (m.log() - q.log())).sum(1)
    raise ValueError(f"unknown JS form {form!r}; use textbook or deepinversion")


def competition_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - JS`` as (batch value, per-sample values); the deepinversion form clamps the batch JS to [0, 1]."""
    js = js_divergence(student_logits, teacher_logits, temperature, form)
    batch = js.mean()
    if form == "deepinversion":
        batch = batch.clamp(0, 1)
    return 1 - batch, (1 - js).detach()
