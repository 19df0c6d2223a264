"""Active Mixup (Wang et al., CVPR 2020): distill from a black-box teacher with few unlabeled images.

The teacher is reachable only through :class:`BlackBoxTeacher`, whose one public operation is ``query(x) -> probs``
(no gradients, weights, BN statistics or modules; every query counted, a budget enforced). The recipe:

1. query the teacher on the ``N`` originals and pre-train the student on them with KD (:func:`train_student`);
2. build a pool of mixup candidates ``x = lam x_i + (1 - lam) x_j`` over ``pool_size`` random pairs ``i < j`` of the
   originals (all pairs when there are fewer);
3. each round: for every pair still in the pool, take the ``lam`` of the grid that minimizes the student's max
   probability on the mixed image (the image it is least sure of), pick the ``k`` pairs whose minimum is lowest
   (:func:`select_mixup`), query the teacher on those images, add them to the training set, and train on; a
   selected pair leaves the pool. ``query_budget`` mixup queries are spread evenly over ``rounds`` (the budget
   bounds the rounds: with fewer queries than rounds, fewer rounds run).

``selection="random"`` draws pairs and ``lam`` uniformly instead: the baseline "KD with the same number of queries"
that isolates the active choice. The teacher's answers are stored; training reads them back by the image's bytes
(the KD objective on ``log p``, which equals KD on the teacher's logits: softmax is shift-invariant).

Mixing is done on normalized tensors, which is the same as mixing pixels (normalization is affine). Randomness
(pairs, random selection, per-round training order) derives from ``(seed, round)`` via
:func:`zeroshot_kd.runtime.batch_generator`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ZkdError
from .. import distill
from ..evaluate import evaluate_model
from ..io import atomic_write_bytes
from ..runtime import batch_generator, batch_seed
from ..training import TrainConfig, train_student, write_checkpoint

__all__ = ["BlackBoxAccessError", "BlackBoxTeacher", "DEFAULT_LAMBDAS", "MixupSelection", "active_mixup",
           "dataset_images", "mixup_pool", "select_mixup", "write_card"]

DEFAULT_LAMBDAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class BlackBoxAccessError(AttributeError):
    """Raised by every access to a :class:`BlackBoxTeacher` other than ``query`` / ``queries`` / ``budget``."""


_PUBLIC = frozenset({"query", "queries", "budget", "remaining"})
# looked up by copy/pickle: resolved to the methods below, which refuse with a clear message
_REFUSING = frozenset({"__reduce_ex__", "__reduce__", "__copy__", "__deepcopy__", "__getstate__"})


class BlackBoxTeacher:
    """A teacher that only answers queries: ``query(x) -> probs`` (softmax, float32, CPU, detached).

    The wrapped model is put in eval mode once (queries never update BN statistics) and run under ``no_grad``;
    ``queries`` counts the images asked about, and a query past ``budget`` raises :class:`ZkdError`. Any other
    attribute (``model``, ``parameters``, ``state_dict``, ``modules``, ``named_buffers``, ``__dict__``, ...),
    setting attributes, calling the object, copying or pickling it raises :class:`BlackBoxAccessError`.
    (Python cannot make this airtight against ``object.__getattribute__``; it guards against accidental use.)
    """

    __slots__ = ("_BlackBoxTeacher__model", "_BlackBoxTeacher__device", "_BlackBoxTeacher__count",
                 "_BlackBoxTeacher__budget", "_BlackBoxTeacher__batch")

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", budget: int | None = None,
                 batch_size: int = 512) -> None:
        set_ = object.__setattr__
        set_(self, "_BlackBoxTeacher__model", model.to(device).eval())
        set_(self, "_BlackBoxTeacher__device", torch.device(device))
        set_(self, "_BlackBoxTeacher__count", 0)
        set_(self, "_BlackBoxTeacher__budget", budget)
        set_(self, "_BlackBoxTeacher__batch", batch_size)

    def __getattribute__(self, name: str) -> Any:
        if name in _PUBLIC or name in _REFUSING or name == "__class__":
            return object.__getattribute__(self, name)
        raise BlackBoxAccessError(f"the black-box teacher answers only query(x) (and reports queries/budget); "
                                  f"{name!r} is not accessible")

    def __setattr__(self, name: str, value: Any) -> None:
        raise BlackBoxAccessError(f"the black-box teacher cannot be modified (setting {name!r})")

    def __delattr__(self, name: str) -> None:
        raise BlackBoxAccessError(f"the black-box teacher cannot be modified (deleting {name!r})")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise BlackBoxAccessError("the black-box teacher is not callable; use query(x)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise BlackBoxAccessError("the black-box teacher cannot be copied or pickled")

    __reduce__ = __copy__ = __getstate__ = lambda self: BlackBoxTeacher.__reduce_ex__(self, 0)  # noqa: E731

    def __deepcopy__(self, memo: Any) -> Any:
        raise BlackBoxAccessError("the black-box teacher cannot be copied or pickled")

    def __repr__(self) -> str:
        return "BlackBoxTeacher(...)"

    @property
    def queries(self) -> int:
        """How many images have been queried so far."""
        return object.__getattribute__(self, "_BlackBoxTeacher__count")

    @property
    def budget(self) -> int | None:
        """The most images that may be queried (None: unbounded)."""
        return object.__getattribute__(self, "_BlackBoxTeacher__budget")

    @property
    def remaining(self) -> int | None:
        """Queries left in the budget (None: unbounded)."""
        b = object.__getattribute__(self, "_BlackBoxTeacher__budget")
        return None if b is None else b - object.__getattribute__(self, "_BlackBoxTeacher__count")

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's class probabilities for a batch ``x`` (``N x C x H x W``): ``N`` queries.

        Raises:
            ZkdError: the query would exceed the budget.
        """
        get = object.__getattribute__
        model, device = get(self, "_BlackBoxTeacher__model"), get(self, "_BlackBoxTeacher__device")
        n, budget = int(x.shape[0]), get(self, "_BlackBoxTeacher__budget")
        count = get(self, "_BlackBoxTeacher__count")
        if budget is not None and count + n > budget:
            raise ZkdError(f"the teacher's query budget is {budget} images; {count} used, {n} more asked")
        out = []
        with torch.no_grad():
            model.eval()
            for i in range(0, n, get(self, "_BlackBoxTeacher__batch")):
                xb = x[i:i + get(self, "_BlackBoxTeacher__batch")].detach().to(device)
                out.append(F.softmax(model(xb).float(), dim=1).cpu())
        object.__setattr__(self, "_BlackBoxTeacher__count", count + n)
        return torch.cat(out) if out else torch.zeros(0)


class _Answers(nn.Module):
    """The teacher's stored answers as a frozen "teacher" module for :func:`train_student`: ``forward(x)`` returns
    ``log p`` of each row, looked up by the row's bytes (training sees exactly the stored tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.table: dict[bytes, torch.Tensor] = {}

    def add(self, images: torch.Tensor, probs: torch.Tensor) -> None:
        logp = probs.clamp_min(1e-12).log()
        for img, lp in zip(images, logp):
            self.table[img.detach().cpu().contiguous().numpy().tobytes()] = lp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            rows = [self.table[r.detach().cpu().float().contiguous().numpy().tobytes()] for r in x]
        except KeyError:
            raise ZkdError("an image without a stored teacher answer reached training") from None
        return torch.stack(rows).to(x.device)


@dataclass(frozen=True)
class MixupSelection:
    """Chosen mixup candidates: pool positions, pairs ``(i, j)``, their ``lam`` and the student's max prob there."""

    positions: list[int]
    pairs: list[tuple[int, int]]
    lams: list[float]
    scores: list[float]


def mixup_pool(n: int, size: int | None, generator: torch.Generator) -> list[tuple[int, int]]:
    """``size`` distinct random pairs ``(i, j)``, ``i < j < n`` (all ``n (n-1) / 2`` pairs, shuffled, if fewer)."""
    total = n * (n - 1) // 2
    if size is None or size >= total:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        return [pairs[k] for k in torch.randperm(total, generator=generator).tolist()]
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < size:
        draw = torch.randint(0, n, (2 * (size - len(out)) + 16, 2), generator=generator).tolist()
        for a, b in draw:
            p = (min(a, b), max(a, b))
            if a != b and p not in seen:
                seen.add(p)
                out.append(p)
                if len(out) == size:
                    break
    return out


def _mix(images: torch.Tensor, pairs: Sequence[tuple[int, int]], lams: Sequence[float]) -> torch.Tensor:
    i = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    j = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    lam = torch.tensor(list(lams), dtype=images.dtype).view(-1, *[1] * (images.dim() - 1))
    return lam * images[i] + (1 - lam) * images[j]


def select_mixup(student: nn.Module, images: torch.Tensor, pairs: Sequence[tuple[int, int]], k: int,
                 lams: Sequence[float] = DEFAULT_LAMBDAS, batch_size: int = 512,
                 device: str | torch.device = "cpu") -> MixupSelection:
    """The ``k`` candidates the student is least sure of: per pair the ``lam`` minimizing its max probability on
    ``lam x_i + (1 - lam) x_j``, then the ``k`` pairs with the lowest such minimum (ties: earlier pair, earlier lam).

    Args:
        student: evaluated in eval mode (restored afterwards), under no_grad.
        images: the originals ``N x C x H x W``.
        pairs: candidate pairs of indices into ``images``.
        k: how many to pick (at most ``len(pairs)``).
        lams: the ``lam`` grid.
        batch_size: candidates per student forward.
        device: where the student runs.
    """
    if not pairs or k <= 0:
        return MixupSelection([], [], [], [])
    was = student.training
    student.eval()
    grid = [float(v) for v in lams]
    best = torch.empty(len(pairs))
    arg = torch.empty(len(pairs), dtype=torch.long)
    try:
        with torch.no_grad():
            for s in range(0, len(pairs), max(1, batch_size // len(grid))):
                chunk = pairs[s:s + max(1, batch_size // len(grid))]
                flat = _mix(images, [p for p in chunk for _ in grid], grid * len(chunk)).to(device)
                conf = F.softmax(student(flat).float(), dim=1).amax(1).cpu().view(len(chunk), len(grid))
                v, a = conf.min(1)
                best[s:s + len(chunk)], arg[s:s + len(chunk)] = v, a
    finally:
        student.train(was)
    order = sorted(range(len(pairs)), key=lambda p: (float(best[p]), p))[:k]
    return MixupSelection(order, [tuple(pairs[p]) for p in order], [grid[int(arg[p])] for p in order],
                          [float(best[p]) for p in order])


def _round_sizes(budget: int, rounds: int) -> list[int]:
    base, extra = divmod(budget, rounds)
    return [s for s in (base + (1 if r < extra else 0) for r in range(rounds)) if s > 0]


def active_mixup(
    teacher: BlackBoxTeacher,
    student: nn.Module,
    images: torch.Tensor,
    query_budget: int,
    rounds: int,
    config: TrainConfig,
    pretrain: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    eval_data: Dataset | None = None,
    lams: Sequence[float] = DEFAULT_LAMBDAS,
    pool_size: int | None = None,
    selection: str = "active",
    metrics: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run Active Mixup (module docstring) and return its summary; the student is trained in place.

    Args:
        teacher: the black box; it is asked about the ``N`` originals and then at most ``query_budget`` mixups.
        student: trainable module on the teacher's inputs.
        images: the ``N`` unlabeled originals (normalized, ``N x C x H x W``).
        query_budget: mixup images the teacher may be asked about (beyond the originals).
        rounds: selection rounds; round ``r`` asks about ``query_budget / rounds`` images (remainder first).
        config: training of each round (on all images so far; its seed is salted by the round).
        pretrain: training on the originals before round 1 (default ``config``).
        device: torch device of the student.
        eval_data: evaluated after the pre-training and after every round (percent, in the JSONL and summary).
        lams: the ``lam`` grid.
        pool_size: candidate pairs (default ``20 N``, at most all pairs).
        selection: ``active`` (lowest max probability) or ``random`` (the baseline: random pairs and ``lam``).
        metrics: JSONL path, one line per round (round 0: the pre-training), rewritten atomically.
        out: student checkpoint (:func:`zeroshot_kd.training.write_checkpoint`), written after every round.
        checkpoint_meta: extra ``zkd`` entries of the checkpoint.
        on_round: called with each round's record.
        progress: tqdm bars of the training runs.

    Returns:
        ``{"queries", "query_budget", "rounds", "records", "final"}``; each record holds ``round``, ``queries``
        (total so far, originals included), ``train_images``, ``selected`` (its mean max prob for active), ``eval``.

    Raises:
        ZkdError: bad budget/rounds/selection, fewer than 2 images, a budget the teacher's own cannot cover.
    """
    if selection not in ("active", "random"):
        raise ZkdError(f"unknown mixup selection {selection!r}; use active or random")
    if query_budget < 0 or rounds < 1:
        raise ZkdError("--query-budget must be >= 0 and --rounds >= 1")
    n = int(images.shape[0])
    if n < 2:
        raise ZkdError("active mixup needs at least 2 unlabeled images")
    if teacher.remaining is not None and teacher.remaining < n + query_budget:
        raise ZkdError(f"the teacher allows {teacher.remaining} more queries but the recipe needs {n} originals + "
                       f"{query_budget} mixups")
    if not lams or any(not 0.0 < float(v) < 1.0 for v in lams):
        raise ZkdError("the lam grid must be values strictly between 0 and 1")
    device = torch.device(device)
    answers = _Answers()
    pool_x, pool_probs = images.detach().cpu().float().contiguous(), teacher.query(images)
    answers.add(pool_x, pool_probs)
    train_x = [pool_x]
    pool = mixup_pool(n, pool_size if pool_size is not None else 20 * n,
                      batch_generator(config.seed, 0, "active-mixup-pool"))
    records: list[dict[str, Any]] = []
    lines: list[str] = []

    def train(r: int, cfg: TrainConfig) -> None:
        x = torch.cat(train_x)
        ds = TensorDataset(x, torch.full((len(x),), -1, dtype=torch.long))
        train_student(student, answers, ds, ["kd"], replace(cfg, seed=batch_seed(cfg.seed, r, "active-mixup")),
                      device, initial_record=False, progress=progress, tag="active-mixup")

    def record(r: int, selected: MixupSelection | None) -> None:
        rec: dict[str, Any] = {"round": r, "queries": teacher.queries, "train_images": sum(len(t) for t in train_x)}
        if selected is not None:
            rec["selected"] = len(selected.pairs)
            if selected.scores:
                rec["selected_max_prob"] = float(f"{sum(selected.scores) / len(selected.scores):.6g}")
        if eval_data is not None:
            rec["eval"] = evaluate_model(student, eval_data, device, config.eval_batch_size, None,
                                         config.precision, progress=False)
        records.append(rec)
        lines.append(json.dumps(rec, sort_keys=True))
        if metrics is not None:
            atomic_write_bytes(metrics, ("\n".join(lines) + "\n").encode())
        if out is not None:
            write_checkpoint(out, student, {**(checkpoint_meta or {}), "recipe": "active-mixup", "round": r,
                                            "queries": teacher.queries})
        if on_round is not None:
            on_round(rec)

    train(0, pretrain or config)
    record(0, None)
    for r, k in enumerate(_round_sizes(query_budget, rounds), 1):
        if not pool:
            break
        k = min(k, len(pool))
        if selection == "active":
            sel = select_mixup(student, pool_x, pool, k, lams, config.eval_batch_size, device)
        else:
            g = batch_generator(config.seed, r, "active-mixup-random")
            pos = sorted(torch.randperm(len(pool), generator=g)[:k].tolist())
            li = torch.randint(0, len(lams), (k,), generator=g).tolist()
            sel = MixupSelection(pos, [pool[p] for p in pos], [float(lams[i]) for i in li], [])
        mixed = _mix(pool_x, sel.pairs, sel.lams).contiguous()
        answers.add(mixed, teacher.query(mixed))
        train_x.append(mixed)
        taken = set(sel.positions)
        pool = [p for q, p in enumerate(pool) if q not in taken]
        train(r, config)
        record(r, sel)
    return {"queries": teacher.queries, "query_budget": query_budget, "rounds": len(records) - 1,
            "selection": selection, "records": records, "final": records[-1]}


def dataset_images(data: Dataset, batch_size: int = 512) -> torch.Tensor:
    """Every image of a map-style ``(image, label)`` dataset as one tensor, in order (labels are not used)."""
    return torch.cat([x for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False)])


def write_card(out: str | os.PathLike, architecture: dict[str, Any], teacher_info: dict[str, Any], spec: Any,
               config: TrainConfig, summary: dict[str, Any]) -> None:
    """The JSON card beside an Active Mixup student checkpoint, so ``load_teacher(out)`` rebuilds it (``zkd
    distill``'s card, plus the query count)."""
    distill.write_card(out, architecture, spec, teacher_info, ["kd"], config, summary["final"], last_key="last_round",
                       extra={"recipe": "active-mixup", "queries": summary["queries"],
                              "query_budget": summary["query_budget"], "selection": summary["selection"]})
