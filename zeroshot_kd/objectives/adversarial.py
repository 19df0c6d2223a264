"""BSS: KD with boundary supporting samples (Heo et al., AAAI 2019).

Correctly classified inputs are pushed by a targeted L2 attack on the **teacher** toward a sampled class k, and the
student additionally matches the teacher on those near-boundary samples::

    L = CE(s(x), y) + alpha(n) * KL(p_t^T(x) || p_s^T(x)) + beta(n) * KL(p_t^T(x_adv) || p_s^T(x_adv))
    alpha(n) = alpha_end + (alpha_start - alpha_end) * (1 - n/N)        # 4 -> 1 (code)
    beta(n)  = beta_start * max(1 - n / (beta_stop * N), 0)             # 2 -> 0 at 75 % of training (code)

The code uses soft cross-entropy instead of KL (same gradient, values differ by the teacher's entropy) and no T^2;
we report the KL (0 when the student matches) and likewise omit T^2.

Attack (``AttackBSS``): with ``b`` the teacher's class at the start and ``L_k = f_b - f_k``, each step
``x <- x - eta_i (L_k + 1e-4) grad(L_k) / ||grad(L_k)||_2`` where ``eta_i = step_alpha`` until sample i's
predicted class leaves b, then 0; inputs stay inside the valid pixel range. Targets k are drawn with
probability ``q_T(k) / (1 - max q_T)`` over ``k != b`` (teacher softmax at T = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from ..runtime import batch_generator
from .base import KDBatch, Objective, Param, as_float, soft_kl

__all__ = ["BSS", "bss_attack", "bss_select", "bss_targets"]


def bss_targets(teacher_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample one target class per row with probability ``q(k) / (1 - max q)`` over the non-top-1 classes."""
    q = teacher_probs.detach().double().cpu().clone()
    q.scatter_(1, q.argmax(1, keepdim=True), 0.0)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    return torch.multinomial(q, 1, generator=generator).view(-1).to(teacher_probs.device)


def bss_select(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               size: int) -> torch.Tensor:
    """Indices of attack bases: both nets right; if more than ``size``, the ``size`` largest
    ``sum_{c != y} (p_t(c) - p_s(c))^2`` (T = 1)."""
    s, t = as_float(student_logits.detach()), as_float(teacher_logits.detach())
    ok = (s.argmax(1) == targets) & (t.argmax(1) == targets)
    idx = ok.nonzero().view(-1)
    if idx.numel() <= size:
        return idx
    diff = (F.softmax(t, 1) - F.softmax(s, 1)).pow(2)
    diff.scatter_(1, targets.view(-1, 1), 0.0)
    score = diff.sum(1)[idx]
    order = torch.argsort(score, descending=True, stable=True)[:size]
    return idx[order].sort().values


def bss_attack(model: nn.Module, x: torch.Tensor, base: torch.Tensor, target: torch.Tensor, steps: int = 10,
               step_alpha: float = 0.3, lo: torch.Tensor | float | None = None,
               hi: torch.Tensor | float | None = None) -> torch.Tensor:
    """The BSS targeted L2 attack on ``model`` (kept in its current mode); returns detached adversarial inputs."""
    x = x.detach().clone()
    rows = torch.arange(x.shape[0], device=x.device)
    for _ in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            out = as_float(model(x))
            f_b, f_k = out[rows, base], out[rows, target]
            grad, = torch.autograd.grad((f_b - f_k).sum(), x)
        with torch.no_grad():
            eta = step_alpha * (out.argmax(1) == base).to(x.dtype)
            if not bool(eta.any()):
                x = x.detach()
                break
            norm = grad.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            scale = (eta * (f_b - f_k + 1e-4) / norm).view(-1, *([1] * (x.dim() - 1)))
            x = (x - scale * grad).detach()
            if lo is not None and hi is not None:
                x = torch.maximum(torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device)),
                                  torch.as_tensor(lo, dtype=x.dtype, device=x.device))
    return x.detach()


class BSS(Objective):
    name = "bss"
    summary = "boundary supporting samples: CE + alpha(n) KL + beta(n) KL on teacher-attacked samples (no T^2)"
    PARAMS = {
        "T": Param("float", 3.0, "temperature of both KL terms (code: 3)"),
        "attack_size": Param("int", 64, "at most this many attack bases per batch (code: 64)"),
        "steps": Param("int", 10, "attack steps (code: 10)"),
        "step_alpha": Param("float", 0.3, "attack step size eta (code: 0.3)"),
        "alpha_start": Param("float", 4.0, "KD weight at the start (code: 4)"),
        "alpha_end": Param("float", 1.0, "KD weight at the end (code: 1)"),
        "beta_start": Param("float", 2.0, "boundary-sample weight at the start (code: 2)"),
        "beta_stop": Param("float", 0.75, "fraction of training at which the boundary weight reaches 0 (code: 0.75)"),
    }

    def check(self) -> None:
        self._positive("T", "attack_size", "step_alpha", "beta_stop")
        if self.params["steps"] < 1:
            raise ZkdError("objective bss: steps must be >= 1")

    def schedule(self, progress: float) -> tuple[float, float]:
        """(alpha, beta) at a training progress in [0, 1]."""
        p = self.params
        alpha = p["alpha_end"] + (p["alpha_start"] - p["alpha_end"]) * max(1.0 - progress, 0.0)
        beta = p["beta_start"] * max(1.0 - progress / p["beta_stop"], 0.0)
        return alpha, beta

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        if batch.teacher_logits is None:
            raise ZkdError("objective bss needs teacher logits")
        alpha, beta = self.schedule(batch.progress)
        y = batch.targets
        loss = F.cross_entropy(as_float(batch.student_logits), y)
        loss = loss + alpha * soft_kl(batch.student_logits, batch.teacher_logits, p["T"])
        self._last = {"alpha": alpha, "beta": beta, "adv": 0.0, "n_adv": 0.0}
        if beta <= 0:
            return loss
        if batch.student is None or batch.teacher is None or batch.inputs is None:
            raise ZkdError("objective bss needs the student, the teacher and the inputs to attack")
        idx = bss_select(batch.student_logits, batch.teacher_logits, y, p["attack_size"])
        if idx.numel() == 0:
            return loss
        x0 = batch.inputs[idx].detach()
        q = F.softmax(as_float(batch.teacher_logits.detach())[idx], 1)
        k = bss_targets(q, batch_generator(batch.seed, batch.step, "bss-targets"))
        b = q.argmax(1)
        lo, hi = (batch.spec.bounds(x0) if batch.spec is not None else (None, None))
        x_adv = bss_attack(batch.teacher, x0, b, k, p["steps"], p["step_alpha"], lo, hi)
        with torch.no_grad():
            t_adv = batch.teacher(x_adv)
        s_adv = batch.student(x_adv)
        adv = soft_kl(s_adv, t_adv, p["T"])
        self._last.update(adv=float(adv.detach()), n_adv=float(idx.numel()))
        return loss + beta * adv

    def extra_terms(self) -> dict[str, float]:
        last = getattr(self, "_last", {})
        return {"adv": last["adv"]} if last else {}
