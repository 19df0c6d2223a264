"""The objective protocol: one call signature for every KD loss, typed parameters, and weighted combination.

Every objective is an ``nn.Module`` subclass of :class:`Objective`, called as ``objective(batch) -> Tensor``,
where ``batch`` is a :class:`KDBatch` holding whatever the training loop has (student/teacher logits, inputs,
labels, captured features, the models themselves, training progress). The returned scalar is **unweighted**;
:class:`ObjectiveSet` multiplies each objective by its ``weight`` parameter and sums.

Parameters are declared per class in ``PARAMS`` (kind, default, help) so that the CLI spec parser, the error
messages listing valid parameters and the documentation all come from one table.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ZkdError

__all__ = ["KDBatch", "Objective", "ObjectiveSet", "Param", "as_float", "clean_copy", "kl_div", "soft_kl"]


class Param(NamedTuple):
    """One objective parameter: ``kind`` is float, int, str, choice or layers (a ``+``-separated list)."""

    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()


@dataclass
class KDBatch:
    """Everything an objective may read for one training step (fields an objective does not need may be None).

    Attributes:
        student_logits: (B, K) logits of the student being trained (carries the graph).
        teacher_logits: (B, K) logits of the teacher on the same inputs (detached by the objectives).
        inputs: (B, C, H, W) normalized inputs both models saw.
        labels: (B,) int64 class labels, -1 where unknown (synthetic data without labels).
        student_features / teacher_features: captured activations keyed by address (``layer3``, ``fc@in``).
        student / teacher: the models (for objectives that need extra forwards: BSS, KDCL, Tf-KD self).
        pair_logits: (B, K) student logits on a same-class partner of each input (CS-KD), no graph needed.
        epoch: current epoch (0-based) for epoch schedules (IFM critical period, FSP two-stage).
        step: global step (0-based) for step schedules.
        progress: fraction of training done, in [0, 1] (BSS weight schedules).
        seed: the run's base seed (objectives draw randomness from ``batch_generator(seed, step, name)``).
        spec: the teacher's :class:`~zeroshot_kd.spec.InputSpec` (valid input range for BSS).
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    pair_logits: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0
    progress: float = 0.0
    seed: int = 0
    spec: Any = None

    @property
    def targets(self) -> torch.Tensor:
        """Hard targets: the label where known, else the teacher's top-1 class (data-free training)."""
        if self.labels is not None and bool((self.labels >= 0).all()):
            return self.labels.long()
        if self.teacher_logits is None:
            if self.labels is None:
                raise ZkdError("this objective needs labels or teacher logits for its cross-entropy term")
            raise ZkdError("some labels are unknown (-1) and there are no teacher logits to fill them in")
        pseudo = self.teacher_logits.detach().argmax(1)
        if self.labels is None:
            return pseudo
        return torch.where(self.labels >= 0, self.labels.long(), pseudo)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32 (float64 stays float64, for tests); autocast outputs are upcast."""
    return x if x.dtype == torch.float64 else x.float()


def kl_div(log_q: torch.Tensor, p: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(p || q) from the student's log-probabilities ``log_q`` and the target probabilities ``p``.

    ``batchmean`` divides the sum by B (the true KL per sample); ``mean`` divides by B*K, as PyTorch's default
    ``KLDivLoss()`` used by the Tf-KD and TAKD code does; ``sum`` does not divide.
    """
    total = torch.xlogy(p, p).sum() - (p * log_q).sum()
    if reduction == "batchmean":
        return total / log_q.shape[0]
    if reduction == "mean":
        return total / log_q.numel()
    if reduction == "sum":
        return total
    raise ZkdError(f"unknown reduction {reduction!r}; use batchmean, mean or sum")


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
            reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) with the teacher detached (not multiplied by T^2)."""
    s, t = as_float(student_logits), as_float(teacher_logits.detach()).to(as_float(student_logits).dtype)
    return kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction)


def clean_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without the forward hooks/pre-hooks that were registered on the original."""
    dup = copy.deepcopy(model)
    for m in dup.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return dup


def _convert(name: str, pname: str, p: Param, value: Any) -> Any:
    try:
        if p.kind == "float":
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if p.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if p.kind == "layers":
            if isinstance(value, str):
                items = [s.strip() for s in value.split("+") if s.strip()]
            else:
                items = [str(s) for s in value]
            if not items:
                raise ValueError
            return items
        value = str(value)
        if p.kind == "choice" and value not in p.choices:
            raise ZkdError(f"objective {name}: {pname}={value!r} is not valid; use one of: {', '.join(p.choices)}")
        return value
    except (TypeError, ValueError):
        what = {"layers": "a +-separated list of module paths"}.get(p.kind, f"an {p.kind}" if p.kind == "int"
                                                                      else f"a {p.kind}")
        raise ZkdError(f"objective {name}: {pname}={value!r} is not {what}") from None


class Objective(nn.Module):
    """Base class: parameter validation, weight, feature requests; subclasses implement ``forward(batch)``.

    Class attributes:
        name: the registry name.
        PARAMS: the parameters beyond ``weight`` (kind, default, help).
        default_weight: the reference code's weight of this term in the total loss.
        needs_teacher: whether ``batch.teacher_logits`` must be present.
        needs_pairs: the training loop must provide ``batch.pair_logits`` (CS-KD).
        needs_loop: needs ``zkd distill``'s recipe (pair sampler, peer networks); calibrate fine-tuning refuses it.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    default_weight: ClassVar[float] = 1.0
    needs_teacher: ClassVar[bool] = True
    needs_pairs: ClassVar[bool] = False
    needs_loop: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        super().__init__()
        valid = {"weight": Param("float", self.default_weight, "weight of this term in the total loss"),
                 **self.PARAMS}
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ZkdError(f"objective {self.name}: unknown parameter {unknown[0]!r}; valid: {', '.join(valid)}")
        self.params: dict[str, Any] = {}
        for pname, p in valid.items():
            value = params.get(pname, p.default)
            self.params[pname] = None if value is None else _convert(self.name, pname, p, value)
        self.weight: float = self.params["weight"]
        self.check()

    def check(self) -> None:
        """Validate parameter ranges (subclasses raise ZkdError)."""

    def _positive(self, *names: str) -> None:
        for n in names:
            if not self.params[n] > 0:
                raise ZkdError(f"objective {self.name}: {n} must be > 0, got {self.params[n]}")

    def _unit(self, *names: str) -> None:
        for n in names:
            if not 0 <= self.params[n] <= 1:
                raise ZkdError(f"objective {self.name}: {n} must be in [0, 1], got {self.params[n]}")

    # ---- features -------------------------------------------------------------------------------------------
    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Resolve layer addresses against the models (feature objectives) or build helper models."""

    def feature_requests(self) -> tuple[list[str], list[str]]:
        """Addresses to capture on the (student, teacher); valid after :meth:`bind`."""
        return [], []

    def setup(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor]) -> None:
        """Build shape adapters from one dry-run's features (called once, before the optimizer is made)."""

    def exclusive(self, batch: KDBatch) -> bool:
        """True while this objective must be the only active term (FSP's first stage)."""
        return False

    def extra_terms(self) -> dict[str, float]:
        """Sub-terms of the last call for logging (e.g. RKD distance and angle), unweighted."""
        return {}

    def forward(self, batch: KDBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


class ObjectiveSet(nn.Module):
    """A weighted sum of objectives: ``loss = sum_i weight_i * objective_i(batch)``.

    Call as ``loss, terms = objectives(batch)``; ``terms`` maps each objective name (suffixed ``#2`` ... when one
    name is used twice) to its weighted value as a float, plus sub-terms (``rkd.distance``) and ``loss``.
    """

    def __init__(self, objectives: list[Objective]) -> None:
        super().__init__()
        if not objectives:
            raise ZkdError("no objective given; pass at least one, e.g. --objective kd:T=4")
        self.items = nn.ModuleList(objectives)
        self.keys: list[str] = []
        for o in objectives:
            key, n = o.name, 2
            while key in self.keys:
                key, n = f"{o.name}#{n}", n + 1
            self.keys.append(key)

    @property
    def needs_pairs(self) -> bool:
        return any(o.needs_pairs for o in self.items)

    @property
    def needs_teacher(self) -> bool:
        return any(o.needs_teacher for o in self.items)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        for o in self.items:
            o.bind(student, teacher)

    def feature_requests(self) -> tuple[list[str], list[str]]:
        s_req: list[str] = []
        t_req: list[str] = []
        for o in self.items:
            s, t = o.feature_requests()
            s_req += [a for a in s if a not in s_req]
            t_req += [a for a in t if a not in t_req]
        return s_req, t_req

    def setup(self, student_features: dict[str, torch.Tensor], teacher_features: dict[str, torch.Tensor]) -> None:
        for o in self.items:
            o.setup(student_features, teacher_features)

    def forward(self, batch: KDBatch) -> tuple[torch.Tensor, dict[str, float]]:
        active = [o for o in self.items if o.exclusive(batch)]
        total: torch.Tensor | None = None
        terms: dict[str, float] = {}
        for key, o in zip(self.keys, self.items):
            if active and o not in active:
                terms[key] = 0.0
                continue
            value = o(batch) * o.weight
            terms[key] = float(value.detach())
            for sub, v in o.extra_terms().items():
                terms[f"{key}.{sub}"] = v
            total = value if total is None else total + value
        assert total is not None
        terms["loss"] = float(total.detach())
        return total, terms
