"""The one convention of zkd's configuration dataclasses (training, quantization, calibration, reconstruction,
synthesis).

A config is a ``@dataclass`` that inherits :class:`Config`:

- it validates itself in ``__post_init__`` and raises :class:`~zeroshot_kd.errors.ZkdError` with one line naming the
  option and the fix (:func:`require` runs a list of ``(ok, message)`` checks, :meth:`Config.check_fields` the
  range/choice checks declared on the fields);
- :meth:`Config.to_dict` gives a plain JSON-able dict, recorded in every output that the config shaped (cards,
  student files, manifests, reports); :meth:`Config.from_dict` reads it back, older records' missing keys taking
  their defaults, unknown keys refused (``strict``) or dropped with a warning;
- a field may carry its command-line option (:func:`option`): flag, help, bounds, choices. The CLI generates its
  click options from these (``cli.common.config_options``), so each option, its default and its bounds are written
  once, here, and the same bounds are checked for Python callers.

Why one place: whoever adds a hyper-parameter adds one field, and the CLI, validation and the recorded outputs follow.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Iterable, Sequence, TypeVar

from .errors import ZkdError

__all__ = ["Config", "OptionSpec", "option", "option_fields", "require"]

C = TypeVar("C", bound="Config")
_MISSING = dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """The command-line face of a config field (read by ``cli.common.config_options`` and :meth:`check_fields`).

    Attributes:
        help: the ``--help`` text.
        flag: the option name; default ``--`` + the field name with ``-`` for ``_``.
        kind: ``int``, ``float``, ``str``, ``flag`` (``--x``), ``bool`` (``--x/--no-x``); default from the default.
        min, max, min_open, max_open: numeric bounds (checked in Python as on the command line).
        choices: the allowed values of a string option.
        metavar: shown in ``--help``.
        secondary: the ``--no-x`` name of a ``bool`` option (default ``--no-`` + the flag's name).
    """

    help: str = ""
    flag: str | None = None
    kind: str | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    secondary: str | None = None

    def flag_for(self, name: str) -> str:
        """The option's flag (``--recon-iters`` for field ``recon_iters``)."""
        return self.flag or "--" + name.replace("_", "-")

    def problem(self, name: str, value: Any) -> str | None:
        """One line saying why ``value`` is not allowed for this option, or None when it is."""
        if value is None:
            return None
        flag = self.flag_for(name)
        if self.choices is not None:
            return None if value in self.choices else \
                f"unknown {flag} {value!r}; use one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        if self.min is not None and (value <= self.min if self.min_open else value < self.min):
            return f"{flag} must be {'>' if self.min_open else '>='} {_num(self.min)}, got {value}"
        if self.max is not None and (value >= self.max if self.max_open else value > self.max):
            return f"{flag} must be {'<' if self.max_open else '<='} {_num(self.max)}, got {value}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def option(default: Any = None, help: str = "", **spec: Any) -> Any:  # noqa: A002 - click's word
    """A dataclass field with its command-line option: ``lr: float = option(0.05, "Peak learning rate.", min=0,
    min_open=True)``. Keyword arguments are :class:`OptionSpec` attributes; a mutable default is copied per
    instance."""
    meta = {"option": OptionSpec(help=help, **spec)}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise :class:`ZkdError` with the message of the first failed ``(ok, message)`` check."""
    for ok, message in checks:
        if not ok:
            raise ZkdError(message)


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Config:
    """Mixin of zkd's configuration dataclasses: :meth:`to_dict`, :meth:`from_dict`, :meth:`check_fields`.

    ``config_name`` (a class attribute, not a field) names the options in messages: "unknown training option(s)".
    """

    config_name: ClassVar[str] = ""

    def check_fields(self) -> None:
        """Check every field that declares an :func:`option` against its bounds and choices (one-line ZkdError)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec = f.metadata.get("option")
            if spec is not None:
                msg = spec.problem(f.name, getattr(self, f.name))
                if msg:
                    raise ZkdError(msg)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict of every field (tuples as lists, nested configs as dicts)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], strict: bool = True, where: str | None = None) -> C:
        """Inverse of :meth:`to_dict`: fields missing from older records take their defaults; fields whose default
        is a tuple get a tuple back.

        Args:
            d: the recorded dict.
            strict: unknown keys raise ZkdError (a typo in a config file); otherwise they are dropped with a warning
                (a record written by a newer zkd).
            where: what the dict is, for the messages (default: the class name).

        Raises:
            ZkdError: ``d`` is not a dict, has unknown keys (strict) or lacks a field without default, or a value is
                invalid (the class's own validation).
        """
        what = where or cls.__name__
        if not isinstance(d, dict):
            raise ZkdError(f"{what}: expected a JSON object of options, got {type(d).__name__}")
        fs = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fs))
        if unknown and strict:
            kind = f"{cls.config_name} " if cls.config_name else ""
            raise ZkdError(f"{what}: unknown {kind}option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fs))}")
        if unknown:
            warnings.warn(f"{what}: ignoring unknown option(s) {', '.join(unknown)} (written by another zkd?)",
                          stacklevel=2)
        kw = {}
        for name, f in fs.items():
            if name not in d:
                if f.default is _MISSING and f.default_factory is _MISSING:
                    raise ZkdError(f"{what}: missing option {name!r}")
                continue
            v = d[name]
            if isinstance(f.default, tuple) and isinstance(v, list):
                v = tuple(v)
            kw[name] = v
        try:
            return cls(**kw)
        except TypeError as e:  # a value of the wrong type that the class's checks did not name
            raise ZkdError(f"{what}: {e}") from None


def option_fields(cls: type, names: Sequence[str] | None = None) -> list[dataclasses.Field]:
    """The fields of config class ``cls`` that declare an :func:`option`, in ``names`` order (default: field order).

    Raises:
        KeyError: a name in ``names`` is not an option field of ``cls``.
    """
    fs = {f.name: f for f in dataclasses.fields(cls) if "option" in f.metadata}
    return [fs[n] for n in names] if names is not None else list(fs.values())
