"""How to name, build, record and re-build a model: one record type, one reader/writer pair, one allow-list.

A :class:`ModelRecord` says how to build the untrained architecture of a model (a builder and its keyword
arguments), and records where its weights came from, what input it expects and its first/last layers where known.
Teachers (:func:`zeroshot_kd.load_teacher`), student files (``zkd calibrate --out``) and the cards that ``zkd distill``
writes beside its checkpoints all store it with :meth:`ModelRecord.to_dict` and read it with
:meth:`ModelRecord.from_dict`, which also reads every older layout::

    {"builder": "zeroshot_kd.models:cifar_resnet", "kwargs": {"depth": 14, ...}, ...}   # this version
    {"builder": "zeroshot_kd.models:cifar_resnet", "depth": 14, ...}                   # cards (assets/, distill)
    {"builder": "torchvision.models:get_model", "name": "resnet18", "num_classes": 10}  # distill cards
    {"torchvision": "resnet18", "kwargs": {"num_classes": 10}}                         # student files, version 1
    {"builder": "resnet18"}                                                            # an older distill bug

Builders are named by strings, resolved by :func:`resolve_builder`:

* a name given to :func:`register_builder` (a plain name or a ``module:function`` string);
* a torchvision model name (``resnet18``; ``torchvision.models:resnet18``; ``torchvision.models:get_model`` with
  ``name=``), always built without weights;
* a function of zkd's zoo, ``zeroshot_kd.models:NAME`` (the names in ``zeroshot_kd.models.__all__``), or a built-in
  teacher's name (``fmnist_resnet14``: its card's architecture);
* any other ``module:function``: imported and called **only** when the user typed it (a ``--teacher``/``--arch``/
  ``--student`` option, a spec string passed in Python: ``user_spec=True``). A file (a card beside a checkpoint, a
  student file, a distill card) naming one is refused before anything is imported, unless the user opts in with
  ``trust_builders=True`` (CLI ``--trust-builders``), which warns with the callable's name. Files are what users
  download from others; importing a module or calling a function they name would run the file author's code.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from .errors import ZkdError
from . import models
from .spec import InputSpec

__all__ = [
    "ModelRecord",
    "UntrustedBuilderWarning",
    "assets_dir",
    "build_model",
    "builtin_teachers",
    "call_builder",
    "is_module_function",
    "layer_names",
    "read_card",
    "register_builder",
    "registered_builders",
    "resolve_builder",
    "spec_record",
    "torchvision_names",
]

TORCHVISION_GET_MODEL = "torchvision.models:get_model"
_ZOO_MODULE = "zeroshot_kd.models"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UntrustedBuilderWarning(UserWarning):
    """A builder named in a file is imported and called because the user passed ``trust_builders``."""


@dataclass(frozen=True)
class ModelRecord:
    """How to build a model's untrained architecture, and what is known about the built model.

    Attributes:
        builder: the builder's name (see the module docstring): a registered name, a torchvision model name,
            ``zeroshot_kd.models:NAME``, a built-in teacher's name, or a ``module:function``.
        kwargs: keyword arguments of the builder (JSON values).
        weights: where the weights came from, as the user named them: a torchvision enum
            (``ResNet50_Weights.IMAGENET1K_V2``), a state-dict file, a built-in teacher's name; None when unknown or
            untrained. Provenance only: :func:`build_model` always builds the untrained architecture.
        input_spec: the input the model expects, where known.
        first_layer, last_layer: names of the first and last weight layers (Conv2d/Linear, in module order).
    """

    builder: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    input_spec: InputSpec | None = None
    first_layer: str | None = None
    last_layer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.builder, str) or not self.builder:
            raise ZkdError(f"a model record needs a builder name (a string), got {self.builder!r}")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ZkdError(f"the kwargs of builder {self.builder!r} must be a dict with string keys, "
                           f"got {self.kwargs!r}")
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form stored in cards and student files (``input_spec``/``weights``/layers only when known)."""
        d: dict[str, Any] = {"builder": self.builder, "kwargs": dict(self.kwargs)}
        if self.weights is not None:
            d["weights"] = self.weights
        if self.input_spec is not None:
            d["input_spec"] = self.input_spec.to_dict()
        if self.first_layer is not None:
            d["first_layer"] = self.first_layer
        if self.last_layer is not None:
            d["last_layer"] = self.last_layer
        return d

    def card_entry(self) -> dict[str, Any]:
        """:meth:`to_dict` without ``weights`` and ``input_spec``: a card's ``architecture`` entry (the card holds
        the input spec beside it, the checkpoint beside it the weights)."""
        return replace(self, weights=None, input_spec=None).to_dict()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model record") -> "ModelRecord":
        """Read a record written by :meth:`to_dict`, any older layout (module docstring), or a whole card.

        A card (``{"architecture": {...}, "input_spec": {...}, ...}``, as in ``assets/`` or beside a ``zkd distill``
        checkpoint) gives its architecture entry and its input spec.

        Args:
            d: the dict read from the file.
            where: names the file in error messages.

        Raises:
            ZkdError: not a dict, no builder, kwargs of the wrong type, a malformed input spec.
        """
        if not isinstance(d, Mapping):
            raise ZkdError(f"{where}: the architecture record must be a JSON object, got {type(d).__name__}")
        spec_d = d.get("input_spec")
        arch = d
        if "architecture" in d:
            arch = d["architecture"]
            if not isinstance(arch, Mapping):
                raise ZkdError(f"{where}: 'architecture' must be a JSON object, got {type(arch).__name__}")
            spec_d = arch.get("input_spec", spec_d)
        extra: dict[str, Any] = {}
        if "torchvision" in arch:  # student files, format version 1
            builder, kwargs = TORCHVISION_GET_MODEL, {"name": arch["torchvision"], **_kwargs(arch, where)}
        elif "builder" in arch:
            builder = arch["builder"]
            if "kwargs" in arch:  # this version, and student files of version 1
                kwargs = _kwargs(arch, where)
                extra = {k: arch.get(k) for k in ("weights", "first_layer", "last_layer")}
                for k, v in extra.items():
                    if v is not None and not isinstance(v, str):
                        raise ZkdError(f"{where}: '{k}' must be a string, got {type(v).__name__}")
            else:  # cards: the builder's arguments beside it
                kwargs = {k: v for k, v in arch.items() if k not in ("builder", "input_spec")}
        else:
            raise ZkdError(f"{where}: the architecture record names no builder (expected a 'builder' entry)")
        if not isinstance(builder, str) or not builder:
            raise ZkdError(f"{where}: the builder must be a non-empty string, got {builder!r}")
        spec = None
        if spec_d is not None:
            try:
                spec = InputSpec.from_dict(spec_d)
            except (KeyError, TypeError, ValueError) as e:
                raise ZkdError(f"{where}: malformed input_spec ({type(e).__name__}: {e})") from None
        return cls(builder, kwargs, input_spec=spec, **extra)

    def with_layers(self, model: nn.Module) -> "ModelRecord":
        """This record with ``first_layer``/``last_layer`` taken from a built instance."""
        first, last = layer_names(model)
        return replace(self, first_layer=first, last_layer=last)


def _kwargs(arch: Mapping[str, Any], where: str) -> dict[str, Any]:
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ZkdError(f"{where}: the builder's 'kwargs' must be a JSON object, got {type(kwargs).__name__}")
    return dict(kwargs)


def layer_names(model: nn.Module) -> tuple[str | None, str | None]:
    """Names of the first and last Conv2d/Linear layers in module order (None, None if there are none)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return (names[0], names[-1]) if names else (None, None)


# ---------------------------------------------------------------------------------------------- names and files


def assets_dir() -> Path:
    """The folder holding the built-in teachers (``assets/`` of the source tree, or the installed copy)."""
    env = os.environ.get("ZKD_ASSETS")
    here = Path(__file__).resolve().parent
    candidates = ([Path(env)] if env else []) + [here.parent / "assets", here / "assets"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.json")):
            return c
    return candidates[-1]


def builtin_teachers() -> list[str]:
    """Names of the teachers shipped in ``assets/`` (a ``NAME.json`` card next to ``NAME.pt``)."""
    return sorted(p.stem for p in assets_dir().glob("*.json") if p.with_suffix(".pt").is_file())


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def torchvision_names() -> set[str]:
    """Every model name ``torchvision.models.get_model`` builds."""
    return set(_torchvision_names())


def is_module_function(spec: str) -> bool:
    """True for ``package.module:function`` (dotted identifiers on both sides of one colon)."""
    mod, sep, fn = spec.partition(":")
    return bool(sep) and bool(mod) and bool(fn) and all(p.isidentifier() for p in mod.split(".") + fn.split("."))


def read_card(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON card at ``path`` (a dict), or None if there is no such file.

    Raises:
        ZkdError: the file is not valid JSON or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZkdError(f"card {path} is not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]}); "
                       "fix or remove it") from None
    if not isinstance(card, dict):
        raise ZkdError(f"card {path} must hold a JSON object, got {type(card).__name__}; fix or remove it")
    return card


def spec_record(spec: str, num_classes: int | None = None) -> ModelRecord | None:
    """The record of a model spec the user typed, without loading weights; None if the spec is not recognized.

    Built-in teacher names give their card's record, ``module:function`` and torchvision names a record calling
    them with ``num_classes`` (when given), a checkpoint file its card's record (None without a card).
    """
    if spec in builtin_teachers():
        path = assets_dir() / f"{spec}.json"
        return ModelRecord.from_dict(read_card(path) or {}, where=str(path))
    n = {"num_classes": int(num_classes)} if num_classes else {}
    if is_module_function(spec):
        return ModelRecord(spec, n)
    if spec in _torchvision_names():
        return ModelRecord(TORCHVISION_GET_MODEL, {"name": spec, **n})
    card = read_card(Path(spec).with_suffix(".json")) if Path(spec).is_file() else None
    return ModelRecord.from_dict(card, where=str(Path(spec).with_suffix(".json"))) if card is not None else None


# ---------------------------------------------------------------------------------------------- builders


def register_builder(name: str, fn: Callable[..., nn.Module]) -> None:
    """Allow files to name ``fn`` as their builder ``name`` (a plain name or a ``module:function`` string).

    Registering a name again replaces the earlier function. A registered name is resolved before any other
    meaning of the string, and without importing anything.

    Raises:
        ZkdError: an empty name or a non-callable ``fn``.
    """
    if not isinstance(name, str) or not name or not callable(fn):
        raise ZkdError(f"register_builder needs a non-empty name and a callable, got {name!r}, {fn!r}")
    _REGISTRY[name] = fn


def registered_builders() -> dict[str, Callable[..., nn.Module]]:
    """A copy of the names registered with :func:`register_builder`."""
    return dict(_REGISTRY)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    if name not in _torchvision_names():
        raise ZkdError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")

    def build(**kwargs: Any) -> nn.Module:
        import torchvision

        if kwargs.pop("weights", None) is not None:
            raise ZkdError(f"a record for torchvision model {name!r} may not name weights in its kwargs; it builds "
                           "the untrained architecture")
        return torchvision.models.get_model(name, weights=None, **kwargs)

    build.__name__ = name
    return build


def _get_model(name: str = "", **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model`` restricted to torchvision's model names, without weights."""
    if not isinstance(name, str):
        raise ZkdError(f"torchvision.models:get_model needs name= a model name, got {name!r}")
    return _torchvision_builder(name)(**kwargs)


def _builtin_builder(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        base = spec_record(name)
        assert base is not None
        return build_model(replace(base, kwargs={**base.kwargs, **kwargs}))

    build.__name__ = name
    return build


def _import_function(name: str) -> Callable[..., Any]:
    mod_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ZkdError(f"cannot import module {mod_name!r} for {name!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ZkdError(f"module {mod_name!r} has no attribute {attr!r} (from {name!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ZkdError(f"{name} is not callable")
    return obj


def resolve_builder(name: str, *, user_spec: bool = False, trust_builders: bool = False,
                    where: str = "a file") -> Callable[..., nn.Module]:
    """The callable a builder name stands for (see the module docstring for the allow-list).

    Args:
        name: the builder's name.
        user_spec: the user typed this name (CLI option, a spec passed in Python): any ``module:function`` is allowed.
        trust_builders: the user opted in to calling any ``module:function`` named in a file (warns).
        where: the file the name was read from, for messages.

    Raises:
        ZkdError: an unknown name, or a ``module:function`` named in a file without the opt-in; nothing is imported
            then.
    """
    if not isinstance(name, str) or not name:
        raise ZkdError(f"{where}: the builder must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    mod, sep, attr = name.partition(":")
    if not sep:
        if name in builtin_teachers():
            return _builtin_builder(name)
        if name in _torchvision_names():
            return _torchvision_builder(name)
        raise ZkdError(f"{where}: unknown builder {name!r}; name a torchvision model, zeroshot_kd.models:NAME, a "
                       "built-in teacher, a registered builder, or a module:function")
    if mod == _ZOO_MODULE:
        if attr not in models.__all__:
            raise ZkdError(f"{where}: zeroshot_kd.models has no model {attr!r}; use one of: "
                           f"{', '.join(models.__all__)}")
        return getattr(models, attr)
    if mod == "torchvision.models" and attr == "get_model":
        return _get_model
    if mod == "torchvision.models" and attr in _torchvision_names():
        return _torchvision_builder(attr)
    if not is_module_function(name):
        raise ZkdError(f"{where}: builder {name!r} is not of the form module:function")
    if user_spec:
        return _import_function(name)
    if trust_builders:
        warnings.warn(f"{where}: calling builder {name!r} named in the file, because trust_builders / "
                      "--trust-builders is set", UntrustedBuilderWarning, stacklevel=2)
        return _import_function(name)
    raise ZkdError(f"{where} names builder {name!r}, which is not on zkd's allow-list (torchvision models, "
                   "zeroshot_kd.models, built-in teachers, register_builder); refused without running it; pass "
                   "--trust-builders (Python: trust_builders=True) only if you trust the file's author")


def call_builder(fn: Callable[..., Any], name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Call a builder with ``kwargs`` and check that it returned an ``nn.Module``.

    Keyword arguments the builder's signature does not accept (no such parameter, no ``**kwargs``) are left out,
    with a warning naming them; errors raised inside the builder (TypeError included) propagate unchanged.

    Raises:
        ZkdError: the arguments do not fit the signature (e.g. a required one is missing), or the result is not
            an ``nn.Module``.
    """
    kwargs = dict(kwargs)
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        sig = None
    if sig is not None:
        params = sig.parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            accepted = {p.name for p in params
                        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
            dropped = [k for k in kwargs if k not in accepted]
            if dropped:
                warnings.warn(f"builder {name} takes no {', '.join(dropped)}; calling it without "
                              f"{'them' if len(dropped) > 1 else 'it'}", stacklevel=2)
                kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            raise ZkdError(f"builder {name} cannot be called with {sorted(kwargs)}: {e}") from None
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ZkdError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(record: ModelRecord, *, user_spec: bool = False, trust_builders: bool = False,
                where: str = "a file") -> nn.Module:
    """Build the untrained architecture a record describes (random initialization; weights are not loaded).

    Args:
        record: what to build.
        user_spec: the record's builder was typed by the user (see :func:`resolve_builder`), not read from a file.
        trust_builders: the user opted in to builders named in files that are not on the allow-list.
        where: the file the record was read from, for messages.
    """
    fn = resolve_builder(record.builder, user_spec=user_spec, trust_builders=trust_builders, where=where)
    return call_builder(fn, record.builder, record.kwargs)
