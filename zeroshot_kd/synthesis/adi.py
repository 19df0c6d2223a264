"""Adaptive DeepInversion (Yin et al. 2020): DeepInversion plus a competition term against a student.

The extra term is ``adi_scale * (1 - JS(p_s || p_t))`` at temperature 3 (paper: adi_scale 0.2): minimizing it
drives images to where the student disagrees with the teacher.

JS form: by default the textbook Jensen-Shannon divergence, ``0.5 KL(P || M) + 0.5 KL(Q || M)`` with
``M = (P + Q) / 2``, in nats, per sample, averaged over the batch. The authors' code instead computes
``0.5 KL(M || P) + 0.5 KL(M || Q)`` on probabilities clamped to [0.01, 0.99] and clamps the result to [0, 1]; choose
it with ``adi_js="deepinversion"`` to reproduce their behaviour.

Fixed snapshot or adaptive loop: with ``rounds=1`` and ``distill_steps=0`` (the defaults) the student is a fixed
snapshot during synthesis, as in the public code (a pretrained ResNet-18). :class:`AdaptiveConfig` turns on the
paper's adaptive loop (run by :func:`zeroshot_kd.synthesis.engine.run_synthesis`): the batches are split into
``rounds`` consecutive groups; round r synthesizes its group against the *current* student, then trains that
student for ``distill_steps`` steps of KD from the teacher (:func:`zeroshot_kd.training.train_student`) on every
image synthesized so far, read back from the shards as stored (float16). The student after each round is a
checkpoint in ``.parts/``, so ``--resume`` restores it; the final student is written as ``OUT/student.pt`` with a
card beside it (what ``zkd distill`` writes), when the student came from a spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..bn import deepinversion_feature_loss
from ..config import Config, require
from ..errors import ZkdError
from ..training import TrainConfig
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


@dataclass(frozen=True)
class AdaptiveConfig(Config):
    """The adaptive synthesize-distill loop of ADI (see the module docstring).

    Attributes:
        rounds: synthesis rounds; round r synthesizes batches ``[r B / R, (r + 1) B / R)`` of the ``B`` batches.
        distill_steps: student optimizer steps after each round (0: the student is never trained).
        objectives: the distillation objectives (``zkd distill --objective`` specs).
        lr: peak learning rate of each round's training (a fresh optimizer and cosine schedule per round).
        batch_size: images per distillation step.
        optimizer: ``sgd`` or ``adam`` (:class:`~zeroshot_kd.training.TrainConfig`).
        weight_decay: weight decay of the student.
        schedule: ``cosine`` or ``constant`` over each round's steps.

    Recorded in the run's config (``to_dict``), so ``--resume`` refuses other settings.
    """

    config_name: ClassVar[str] = "adaptive adi"

    rounds: int = 1
    distill_steps: int = 0
    objectives: tuple[str, ...] = ("kd",)
    lr: float = 0.05
    batch_size: int = 64
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}"),
            (self.distill_steps >= 0, f"--distill-steps must be >= 0, got {self.distill_steps}"),
            (self.rounds == 1 or self.distill_steps >= 1,
             f"--rounds {self.rounds} needs --distill-steps S >= 1 (without training every round competes against "
             "the same student); add --distill-steps or use --rounds 1"),
            (self.batch_size >= 2, f"--distill-batch-size must be >= 2, got {self.batch_size}"),
            (self.lr > 0, f"--distill-lr must be > 0, got {self.lr}"),
            (len(self.objectives) >= 1, "the adaptive loop needs at least one distillation objective"),
        ]
        require(checks)

    @classmethod
    def from_options(cls, rounds: int = 1, distill_steps: int = 0, distill_lr: float = 0.05,
                     distill_batch_size: int = 64, distill_objectives: tuple[str, ...] | list[str] = ("kd",)
                     ) -> "AdaptiveConfig":
        """From :func:`zeroshot_kd.synthesize`'s (and the CLI's) option names; validates the objective specs too
        when the loop is on, so bad options fail before anything is loaded or written."""
        cfg = cls(rounds=rounds, distill_steps=distill_steps, objectives=tuple(distill_objectives), lr=distill_lr,
                  batch_size=distill_batch_size)
        if cfg.active:
            from ..objectives import build

            build(list(cfg.objectives))
        return cfg

    @property
    def active(self) -> bool:
        """True when the student is trained (otherwise this is today's fixed-snapshot adi)."""
        return self.distill_steps > 0

    def round_batches(self, num_batches: int) -> list[range]:
        """The batch indices of every round (consecutive, sizes differ by at most one).

        Raises:
            ZkdError: fewer batches than rounds.
        """
        if num_batches < self.rounds:
            raise ZkdError(f"--rounds {self.rounds} needs at least {self.rounds} batches, got {num_batches} "
                           "(--num-images / --batch-size); synthesize more images or use fewer rounds")
        edges = [r * num_batches // self.rounds for r in range(self.rounds + 1)]
        return [range(edges[r], edges[r + 1]) for r in range(self.rounds)]

    def train_config(self, seed: int, precision: str = "fp32") -> TrainConfig:
        """The :class:`~zeroshot_kd.training.TrainConfig` of every round; round r trains with ``tag=round_tag(r)``."""
        return TrainConfig(steps=self.distill_steps, batch_size=self.batch_size, lr=self.lr,
                           optimizer=self.optimizer, weight_decay=self.weight_decay, schedule=self.schedule,
                           seed=seed, precision=precision)


def round_tag(r: int) -> str:
    """The :func:`~zeroshot_kd.training.train_student` ``tag`` of round r: salts its batch order and RNG seed."""
    return f"adi-round{r}"
