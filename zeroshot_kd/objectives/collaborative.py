"""KDCL: online knowledge distillation via collaborative learning (Guo et al., CVPR 2020).

``members`` networks (the student plus ``members - 1`` freshly initialized copies of its architecture, owned by
the objective and trained with it) each see their own augmented view of the batch. An ensemble teacher logit
``z_t`` is built from all members' detached logits, and every member is trained with::

    L_i = CE(z_i, y) + lamda * T^2 * KL(softmax(z_t / T) || softmax(z_i / T))        (batchmean)

Ensembles: ``naive`` (per sample, the member with the lowest CE), ``linear`` (simplex weights minimizing the
ensemble's CE on the batch), ``minlogit`` (per class the minimum over members of ``z_i - z_i[y]``).
No official code exists; the defaults (T = 2, lamda = 1) are ours, marked as such in docs/objectives.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from ..runtime import batch_generator, batch_seed
from .base import KDBatch, clean_copy, Objective, Param, as_float, soft_kl

__all__ = ["KDCL", "augment_view", "ensemble_linear", "ensemble_minlogit", "ensemble_naive", "ensemble_logits"]


def ensemble_naive(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the member with the lowest cross-entropy (first one on ties)."""
    stack = torch.stack([z.detach() for z in logits])                         # (M, B, K)
    ce = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in stack])   # (M, B)
    best = ce.argmin(0)
    return stack[best, torch.arange(stack.shape[1], device=stack.device)]


def ensemble_minlogit(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """``z_t[j] = min_i (z_i[j] - z_i[y])``: the target logit is 0 and every other logit the smallest available."""
    stack = torch.stack([z.detach() for z in logits])
    shifted = stack - stack.gather(2, targets.view(1, -1, 1).expand(stack.shape[0], -1, 1))
    return shifted.min(0).values


def ensemble_linear(logits: list[torch.Tensor], targets: torch.Tensor, iters: int = 100, lr: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Simplex weights ``w`` minimizing ``CE(sum_i w_i z_i, y)`` on the batch, and the ensemble logits.

    The problem is convex in w. Exponentiated-gradient (mirror) descent from the uniform weights, with a
    backtracking line search: each step starts from twice the last accepted step size (``lr`` at first) and is
    halved until the CE decreases, so the step adapts to the logits' scale (a fixed step of 1 oscillates between
    vertices on logits of a few units); it stops after ``iters`` steps or once a step gains less than a relative
    1e-9. The best iterate is kept and compared with every single member (the
    simplex's vertices, which exponentiated steps only approach), so the ensemble's CE never exceeds the best
    member's nor the uniform average's.
    """
    stack = torch.stack([as_float(z.detach()) for z in logits])
    m = stack.shape[0]

    def ce(w: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.einsum("m,mbk->bk", w, stack), targets)

    w = torch.full((m,), 1.0 / m, dtype=stack.dtype, device=stack.device)
    with torch.no_grad():
        f = ce(w)
    step = lr
    for _ in range(iters):
        w.requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(ce(w), w)
        w = w.detach()
        with torch.no_grad():
            g = g - g.max()                       # same step on the simplex; keeps exp() from overflowing
            step *= 2.0
            for _ in range(40):
                cand = w * torch.exp(-step * g)
                cand = cand / cand.sum()
                f_cand = ce(cand)
                if f_cand < f:
                    break
                step *= 0.5
            else:
                break                             # no descent at any step size: w is optimal to precision
        converged = float(f - f_cand) <= 1e-9 * float(f)
        w, f = cand, f_cand
        if converged:
            break
    with torch.no_grad():
        candidates = [w] + [torch.eye(m, dtype=stack.dtype, device=stack.device)[i] for i in range(m)]
        losses = torch.stack([ce(c) for c in candidates])
        best = candidates[int(losses.argmin())]
    return best, torch.einsum("m,mbk->bk", best, stack)


def ensemble_logits(kind: str, logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Dispatch to one of the ensemble teachers (detached)."""
    if kind == "naive":
        return ensemble_naive(logits, targets)
    if kind == "minlogit":
        return ensemble_minlogit(logits, targets)
    if kind == "linear":
        return ensemble_linear(logits, targets)[1]
    raise ZkdError(f"unknown kdcl ensemble {kind!r}; use naive, linear or minlogit")


def augment_view(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """A random view per sample: horizontal flip with probability 1/2 and a shift of up to ``pad`` pixels
    (reflect-padded crop); randomness drawn on CPU from ``generator``."""
    b, _, h, w = x.shape
    flips = torch.rand(b, generator=generator) < 0.5
    shifts = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        v = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = v.flip(-1) if bool(flips[i]) else v
    return out


def _reinit(model: nn.Module, seed: int) -> None:
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices[:1]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()


class KDCL(Objective):
    name = "kdcl"
    summary = "online collaborative KD: every member CE + lamda T^2 KL(ensemble || member); naive/linear/minlogit"
    needs_teacher = False
    needs_loop = True
    PARAMS = {
        "members": Param("int", 2, "number of networks trained together, the student included"),
        "ensemble": Param("choice", "minlogit", "ensemble teacher", ("naive", "linear", "minlogit")),
        "T": Param("float", 2.0, "temperature (paper value unverified; ours)"),
        "lamda": Param("float", 1.0, "weight of the KD term per member (paper value unverified; ours)"),
        "augment": Param("choice", "flip-shift", "per-member views of the batch: flip-shift or none",
                         ("flip-shift", "none")),
    }

    def check(self) -> None:
        self._positive("T")
        if self.params["members"] < 2:
            raise ZkdError("objective kdcl: members must be >= 2 (the student and at least one peer)")
        self.peers = nn.ModuleList()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.peers = nn.ModuleList()
        for i in range(1, self.params["members"]):
            peer = clean_copy(student).requires_grad_(True).train(student.training)
            _reinit(peer, batch_seed(0, i, "kdcl-peer"))
            self.peers.append(peer)

    def member_losses(self, logits: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
        """``CE(z_i, y) + lamda T^2 KL(p_t^T || p_i^T)`` for each member, against the detached ensemble."""
        T, lam = self.params["T"], self.params["lamda"]
        z_t = ensemble_logits(self.params["ensemble"], [as_float(z) for z in logits], targets)
        return [F.cross_entropy(as_float(z), targets) + lam * soft_kl(z, z_t, T) * T * T for z in logits]

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if batch.inputs is None:
            raise ZkdError("objective kdcl needs the inputs to run its peer networks")
        y = batch.targets
        logits = [batch.student_logits]
        for i, peer in enumerate(self.peers):
            x = batch.inputs
            if self.params["augment"] != "none" and x.dim() == 4:
                x = augment_view(x, batch_generator(batch.seed, batch.step, f"kdcl-view-{i + 1}"))
            logits.append(peer(x))
        losses = self.member_losses(logits, y)
        self._last = {f"member{i}": float(v.detach()) for i, v in enumerate(losses)}
        return torch.stack(losses).sum()

    def extra_terms(self) -> dict[str, float]:
        return dict(getattr(self, "_last", {}))
