"""KD objectives as student losses: a registry of logit-, feature- and relation-level losses.

Usage::

    from zeroshot_kd import objectives
    rkd = objectives.get("rkd", weight=1.0)             # an Objective (nn.Module)
    loss = rkd(KDBatch(student_logits=..., teacher_logits=..., student_features=..., teacher_features=...))
    combo = objectives.build(["kd:T=4", "rkd:weight=1.0"])  # ObjectiveSet: (loss, terms) = combo(batch)

Training with them (hooks, the objectives' own parameters in the optimizer, epochs):
:func:`zeroshot_kd.training.train_student`, the one loop behind ``zkd distill`` and ``zkd calibrate``.

Every objective has the one call signature ``objective(batch: KDBatch) -> Tensor`` (unweighted scalar); an
:class:`ObjectiveSet` multiplies by each ``weight`` and sums. The formulas, defaults and reduction choices are in
``docs/objectives.md``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ZkdError
from .adversarial import BSS
from .base import KDBatch, Objective, ObjectiveSet, Param
from .collaborative import KDCL
from .feature import FSP, OFD
from .logit import CE, CSKD, KD, LabelSmoothing, TfKDReg, TfKDSelf
from .relation import IFM, PKT, RKD, SP
from .runner import ObjectiveRunner

__all__ = ["KDBatch", "Objective", "ObjectiveRunner", "ObjectiveSet", "Param", "REGISTRY", "build", "describe", "get",
           "names", "parse_spec"]

REGISTRY: dict[str, type[Objective]] = {
    cls.name: cls for cls in (KD, CE, LabelSmoothing, TfKDReg, TfKDSelf, CSKD, KDCL, BSS, SP, RKD, FSP, OFD, IFM, PKT)
}


def names() -> list[str]:
    """The registered objective names, in documentation order."""
    return list(REGISTRY)


def get(name: str, **params: Any) -> Objective:
    """Instantiate objective ``name`` with ``params`` (typed values or strings, as from the CLI).

    Raises:
        ZkdError: unknown name (listing the valid ones) or unknown/invalid parameter (listing the valid ones).
    """
    cls = REGISTRY.get(name)
    if cls is None:
        raise ZkdError(f"unknown objective {name!r}; valid: {', '.join(REGISTRY)}")
    return cls(**params)


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"rkd:weight=1.0,distance_weight=25"`` -> ``("rkd", {"weight": "1.0", "distance_weight": "25"})``.

    Lists inside a value are ``+``-separated (``layers=layer2+layer3``), so commas only separate parameters.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise ZkdError(f"empty objective in {spec!r}; use NAME[:key=value,...] with NAME one of: "
                       f"{', '.join(REGISTRY)}")
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ZkdError(f"bad objective parameter {item!r} in {spec!r}; use key=value (e.g. kd:T=4,weight=0.9)")
        if key.strip() in params:
            raise ZkdError(f"parameter {key.strip()!r} given twice in {spec!r}")
        params[key.strip()] = value.strip()
    return name, params


def build(specs: list[str | Objective]) -> ObjectiveSet:
    """An :class:`ObjectiveSet` from spec strings (or ready objectives), e.g. ``["kd:T=4", "rkd:weight=1"]``."""
    items = []
    for s in specs:
        if isinstance(s, Objective):
            items.append(s)
        else:
            name, params = parse_spec(s)
            items.append(get(name, **params))
    return ObjectiveSet(items)


def describe(name: str) -> dict[str, Any]:
    """Name, one-line summary, default weight and parameter table of an objective (for docs and ``--help``)."""
    cls = REGISTRY[name]
    params = {"weight": {"default": cls.default_weight, "help": "weight of this term in the total loss"}}
    params.update({k: {"default": p.default, "help": p.help, **({"choices": list(p.choices)} if p.choices else {})}
                   for k, p in cls.PARAMS.items()})
    return {"name": name, "summary": cls.summary, "params": params}


if set(REGISTRY) != {"kd", "ce", "ls", "tfkd-reg", "tfkd-self", "cskd", "kdcl", "bss", "sp", "rkd", "fsp", "ofd",
                     "ifm", "pkt"}:  # pragma: no cover - guards against a class losing its name
    raise ImportError("objective registry is inconsistent")
