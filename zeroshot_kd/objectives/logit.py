"""Logit-level objectives: Hinton KD, cross-entropy, label smoothing, Teacher-free KD, class-wise self-KD.

Reductions: every KL here defaults to ``batchmean`` (the true per-sample KL, as RepDistiller, mdistiller, CS-KD and
torchdistill compute it). The Tf-KD code uses PyTorch's default ``KLDivLoss()`` (``mean`` over B*K) with a
per-model ``multiplier``; ``reduction=mean`` and ``multiplier=`` reproduce it exactly (see docs/objectives.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError
from ..teachers import load_teacher
from .base import KDBatch, clean_copy, Objective, Param, as_float, kl_div, soft_kl

__all__ = ["CE", "CSKD", "KD", "LabelSmoothing", "TfKDReg", "TfKDSelf", "kd_loss", "label_smoothing_loss",
           "smoothed_targets", "tfkd_reg_loss", "virtual_teacher"]

_REDUCTIONS = ("batchmean", "mean", "sum")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0,
            reduction: str = "batchmean") -> torch.Tensor:
    """Hinton et al. (2015): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, teacher detached."""
    return soft_kl(student_logits, teacher_logits, T, reduction) * T * T


def smoothed_targets(targets: torch.Tensor, num_classes: int, eps: float, mode: str = "tfkd",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label-smoothing target distributions.

    ``tfkd`` (the Tf-KD code's LSR): ``1 - eps`` on the target, ``eps / (K - 1)`` elsewhere.
    ``pytorch`` (``CrossEntropyLoss(label_smoothing=eps)``): ``1 - eps + eps / K`` on the target, ``eps / K``
    elsewhere.
    """
    if mode == "tfkd":
        q = torch.full((targets.shape[0], num_classes), eps / (num_classes - 1), dtype=dtype, device=targets.device)
        q.scatter_(1, targets.view(-1, 1), 1 - eps)
    else:
        q = torch.full((targets.shape[0], num_classes), eps / num_classes, dtype=dtype, device=targets.device)
        q.scatter_(1, targets.view(-1, 1), 1 - eps + eps / num_classes)
    return q


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1,
                         mode: str = "tfkd") -> torch.Tensor:
    """Cross-entropy against smoothed targets, averaged over the batch: ``-sum(q * log_softmax(z)) / B``."""
    z = as_float(logits)
    q = smoothed_targets(targets, z.shape[1], eps, mode, z.dtype)
    return -(q * F.log_softmax(z, 1)).sum() / z.shape[0]


def virtual_teacher(targets: torch.Tensor, num_classes: int, a: float, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """Tf-KD's manually designed teacher ``p_d``: probability ``a`` on the target, ``(1 - a) / (K - 1)`` elsewhere."""
    p = torch.full((targets.shape[0], num_classes), (1 - a) / (num_classes - 1), dtype=dtype, device=targets.device)
    return p.scatter_(1, targets.view(-1, 1), a)


def tfkd_reg_loss(logits: torch.Tensor, targets: torch.Tensor, a: float = 0.99, T: float = 20.0,
                  form: str = "code", reduction: str = "batchmean") -> torch.Tensor:
    """The Tf-KD regularization term (without the CE part and multiplier).

    ``code`` (``loss_kd_regularization``): ``KL(softmax(p_d / T) || softmax(z))`` - the virtual teacher's
    *probabilities* are divided by T and re-softmaxed (an almost uniform target), the student stays at T = 1.
    ``direct``: ``KL(p_d || softmax(z / T))`` - the virtual teacher itself as the target.
    """
    z = as_float(logits)
    p_d = virtual_teacher(targets, z.shape[1], a, z.dtype)
    if form == "code":
        return kl_div(F.log_softmax(z, 1), F.softmax(p_d / T, 1), reduction)
    return kl_div(F.log_softmax(z / T, 1), p_d, reduction)


class KD(Objective):
    """Hinton KD: ``T^2 * KL(p_t^T || p_s^T)``, batchmean."""

    name = "kd"
    summary = "Hinton KD: T^2 KL(softmax(t/T) || softmax(s/T))"
    PARAMS = {
        "T": Param("float", 4.0, "temperature (RepDistiller/mdistiller --kd_T 4)"),
        "reduction": Param("choice", "batchmean", "KL reduction: batchmean (per sample), mean (/B/K), sum",
                           _REDUCTIONS),
    }

    def check(self) -> None:
        self._positive("T")

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return kd_loss(batch.student_logits, _need_teacher(batch, self.name), self.params["T"],
                       self.params["reduction"])


class CE(Objective):
    """Cross-entropy to the labels, or to the teacher's top-1 class where labels are unknown."""

    name = "ce"
    summary = "cross-entropy to labels (teacher top-1 where unknown)"
    needs_teacher = False

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return F.cross_entropy(as_float(batch.student_logits), batch.targets)


class LabelSmoothing(Objective):
    """Label smoothing regularization (the Tf-KD paper's LSR baseline)."""

    name = "ls"
    summary = "label smoothing: -sum(q' log p), q' = (1-eps) on target, eps/(K-1) elsewhere"
    needs_teacher = False
    PARAMS = {
        "eps": Param("float", 0.1, "smoothing mass (the Tf-KD code hard-codes 0.1)"),
        "mode": Param("choice", "tfkd", "tfkd: eps/(K-1) off-target; pytorch: eps/K everywhere", ("tfkd", "pytorch")),
    }

    def check(self) -> None:
        self._unit("eps")

    def forward(self, batch: KDBatch) -> torch.Tensor:
        return label_smoothing_loss(batch.student_logits, batch.targets, self.params["eps"], self.params["mode"])


class TfKDReg(Objective):
    """Teacher-free KD with the manually designed virtual teacher: ``(1-alpha) CE + alpha * multiplier * L_reg``."""

    name = "tfkd-reg"
    summary = "Tf-KD virtual teacher: (1-alpha) CE + alpha * multiplier * KL(virtual || student)"
    needs_teacher = False
    PARAMS = {
        "a": Param("float", 0.99, "virtual teacher's correct-class probability (code: 0.99)"),
        "T": Param("float", 20.0, "temperature (code: reg_temperature 20 for ResNet18)"),
        "alpha": Param("float", 0.1, "mixing weight of the regularizer (code: reg_alpha 0.1 for ResNet18)"),
        "multiplier": Param("float", 1.0, "extra factor (code: 100 with reduction=mean, i.e. 1 with batchmean "
                            "on CIFAR-100)"),
        "form": Param("choice", "code", "code: softmax(p_d/T) vs student at T=1; direct: p_d vs softmax(z/T)",
                      ("code", "direct")),
        "reduction": Param("choice", "batchmean", "KL reduction (code: mean)", _REDUCTIONS),
    }

    def check(self) -> None:
        self._positive("T")
        self._unit("a", "alpha")

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        y = batch.targets
        ce = F.cross_entropy(as_float(batch.student_logits), y)
        reg = tfkd_reg_loss(batch.student_logits, y, p["a"], p["T"], p["form"], p["reduction"])
        return (1 - p["alpha"]) * ce + p["alpha"] * p["multiplier"] * reg


class TfKDSelf(Objective):
    """Teacher-free KD by self-training: a pretrained copy of the student is the teacher.

    ``(1 - alpha) CE + alpha * multiplier * T^2 * KL(p_self^T || p_s^T)``. With the default ``teacher=copy`` the
    self-teacher is a frozen copy of the student's starting weights, made by :meth:`bind` or, unbound, at the first
    forward from ``batch.student`` (before any update); without either it raises instead of reading
    ``batch.teacher_logits``, which only ``teacher=main`` uses.
    """

    name = "tfkd-self"
    summary = "Tf-KD self-training: (1-alpha) CE + alpha T^2 KL(self-teacher || student)"
    needs_teacher = False
    PARAMS = {
        "alpha": Param("float", 0.95, "KD mixing weight (code: 0.95 for ResNet18)"),
        "T": Param("float", 6.0, "temperature (code: 6 for ResNet18, 20 for MobileNetV2)"),
        "multiplier": Param("float", 1.0, "extra factor (code: 50 for ResNet18 with reduction=mean)"),
        "reduction": Param("choice", "batchmean", "KL reduction (code: mean)", _REDUCTIONS),
        "teacher": Param("str", "copy", "self-teacher: copy (frozen copy of the student's starting weights), main "
                         "(the run's teacher logits), or a model spec/checkpoint of the student's architecture"),
    }

    def check(self) -> None:
        self._positive("T")
        self._unit("alpha")
        self._self: list[nn.Module] = []  # not a registered submodule: never trained, never in train mode

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        spec = self.params["teacher"]
        if spec == "main":
            return
        device = next(student.parameters()).device
        if spec == "copy":
            model = clean_copy(student)
        else:
            model = load_teacher(spec, device=device).model
        self._self = [model.eval().requires_grad_(False).to(device)]

    def forward(self, batch: KDBatch) -> torch.Tensor:
        p = self.params
        if p["teacher"] != "main" and not self._self:
            # Never fall back to the run's teacher logits: that is teacher=main, a different method.
            if batch.student is None:
                raise ZkdError(f"objective tfkd-self (teacher={p['teacher']}) has no self-teacher yet: call "
                               "bind(student, teacher) first (zkd distill and make_loss_fn do), pass the student in "
                               "KDBatch.student, or use teacher=main for the run's teacher logits")
            self.bind(batch.student, batch.teacher)   # first step: the student still has its starting weights
        if self._self:
            if batch.inputs is None:
                raise ZkdError("tfkd-self needs the inputs to run its self-teacher")
            with torch.no_grad():
                t = self._self[0](batch.inputs)
        else:
            t = _need_teacher(batch, self.name)
        ce = F.cross_entropy(as_float(batch.student_logits), batch.targets)
        kd = soft_kl(batch.student_logits, t, p["T"], p["reduction"]) * p["T"] ** 2
        return (1 - p["alpha"]) * ce + p["alpha"] * p["multiplier"] * kd


class CSKD(Objective):
    """Class-wise self-KD (Yun et al. 2020): ``CE(z_a, y) + lamda * T^2 * KL(p^T(x') || p^T(x))``.

    ``x'`` is another sample of the same class; the training loop draws it with a pair sampler and passes the
    student's logits on it (a separate forward, no gradient) as ``batch.pair_logits``.
    """

    name = "cskd"
    summary = "class-wise self-KD: CE + lamda T^2 KL(student(x') || student(x)), x' same class"
    needs_teacher = False
    needs_pairs = True
    needs_loop = True
    PARAMS = {
        "T": Param("float", 4.0, "temperature (code --temp 4)"),
        "lamda": Param("float", 1.0, "weight of the class-wise term (code --lamda 1; 3 for fine-grained sets)"),
    }

    def check(self) -> None:
        self._positive("T")

    def forward(self, batch: KDBatch) -> torch.Tensor:
        if batch.pair_logits is None:
            raise ZkdError("cskd needs same-class pairs (batch.pair_logits); run it through zkd distill")
        T = self.params["T"]
        ce = F.cross_entropy(as_float(batch.student_logits), batch.targets)
        return ce + self.params["lamda"] * soft_kl(batch.student_logits, batch.pair_logits, T) * T * T


def _need_teacher(batch: KDBatch, name: str) -> torch.Tensor:
    if batch.teacher_logits is None:
        raise ZkdError(f"objective {name} needs teacher logits")
    return batch.teacher_logits
