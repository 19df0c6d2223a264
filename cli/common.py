"""Options and plumbing shared by every ``zkd`` subcommand (one option set, reused everywhere)."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from zeroshot_kd.errors import ZkdError
from zeroshot_kd.teachers import builtin_teachers


def parse_floats(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    """click callback: ``"0.5,0.5,0.5"`` -> (0.5, 0.5, 0.5)."""
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma list of numbers, got {value!r}") from None


def config_options(cls: type, names: list[str] | None = None,
                   **overrides: dict[str, Any]) -> Callable[[Callable], Callable]:
    """Click options generated from the :func:`zeroshot_kd.config.option` fields of config class ``cls``.

    Each option's flag, help, bounds, choices and default are written once, on the field; ``names`` picks and orders
    the fields (default: all option fields in field order); ``overrides[name]`` changes the command's default or
    bounds where a command differs from the library (``epochs={"default": 10}``). The parameters reach the command
    under the field names.
    """
    import dataclasses

    from zeroshot_kd.config import option_fields

    decorators = []
    for f in option_fields(cls, names):
        spec = dataclasses.replace(f.metadata["option"], **{k: v for k, v in overrides.get(f.name, {}).items()
                                                              if k != "default"})
        default = overrides.get(f.name, {}).get("default", f.default)
        flag = spec.flag_for(f.name)
        kind = spec.kind or ("flag" if default is False else "bool" if isinstance(default, bool) else
                             "float" if isinstance(default, float) else "int" if isinstance(default, int) else "str")
        kw: dict[str, Any] = {"default": default, "help": spec.help, "show_default": True}
        if default is dataclasses.MISSING:
            kw = {"required": True, "help": spec.help}
        if spec.metavar:
            kw["metavar"] = spec.metavar
        decls = [flag, f.name]
        if kind == "flag":
            kw["is_flag"] = True
        elif kind == "bool":
            decls = [f"{flag}/{spec.secondary or '--no-' + flag[2:]}", f.name]
        elif spec.choices is not None:
            kw["type"] = click.Choice(list(spec.choices))
        elif kind in ("int", "float"):
            rng = click.IntRange if kind == "int" else click.FloatRange
            bounds = {"min": spec.min, "max": spec.max}
            if kind == "float":
                bounds.update(min_open=spec.min_open, max_open=spec.max_open)
            kw["type"] = rng(**bounds) if spec.min is not None or spec.max is not None else \
                (int if kind == "int" else float)
        decorators.append(click.option(*decls, **kw))

    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def teacher_options(f: Callable) -> Callable:
    """``--teacher`` and the overrides for custom teachers, shared by every subcommand that loads one."""
    opts = [
        click.option("--teacher", default=None, metavar="SPEC", show_default="fmnist_resnet14 (shipped)",
                     help="Checkpoint PATH, module:function, torchvision model name, or built-in teacher name ("
                          + ", ".join(builtin_teachers()) + ")."),
        click.option("--weights", default=None, metavar="ENUM|PATH|none",
                     help="torchvision weights enum (DEFAULT, IMAGENET1K_V2, ...), a state_dict file, or none."),
        click.option("--arch", default=None, metavar="SPEC",
                     help="Architecture for a checkpoint file that holds only weights."),
        click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Override: number of classes."),
        click.option("--image-size", type=click.IntRange(min=1), default=None, help="Override: input resolution."),
        click.option("--channels", type=click.IntRange(min=1), default=None, help="Override: input channels."),
        click.option("--mean", default=None, callback=parse_floats, metavar="LIST",
                     help="Override: per-channel normalization mean, e.g. 0.485,0.456,0.406."),
        click.option("--std", default=None, callback=parse_floats, metavar="LIST",
                     help="Override: per-channel normalization std."),
        click.option("--trust-builders", is_flag=True, default=False,
                     help="Call a builder that a file (card, student file) names even if it is not a torchvision "
                          "model, zeroshot_kd.models function or built-in teacher. Runs the file author's code."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def teacher_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the teacher options out of a command's keyword arguments, named as ``load_teacher`` takes them."""
    keys = {"teacher": "spec", "weights": "weights", "arch": "arch", "num_classes": "num_classes",
            "image_size": "image_size", "channels": "channels", "mean": "mean", "std": "std",
            "trust_builders": "trust_builders"}
    return {dst: kw.pop(src) for src, dst in keys.items() if src in kw}


device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                             help="Where to run; auto picks cuda, then mps, then cpu.")
precision_option = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
                                show_default=True, help="Autocast dtype for forward passes; statistics and losses "
                                "stay float32.")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Base seed; per-batch seeds "
                           "derive from (seed, batch index).")
verify_option = click.option("--verify/--no-verify", "verify", default=True, show_default=True,
                             help="Check each shard's sha256 against its manifest before reading (opt out only for "
                                  "shards you trust).")
json_option = click.option("--json", "as_json", is_flag=True, default=False,
                           help="Print one JSON summary object on stdout (human text stays on stderr).")


def load_checked_teacher(device: Any, multires: bool = False, **kw: Any) -> Any:
    """``load_teacher`` plus the up-front checks of its input spec (first layer, output width, smallest input).

    Call it before creating any output, so a spec that does not fit the teacher leaves nothing behind.
    """
    from zeroshot_kd import load_teacher
    from zeroshot_kd.validate import check_finite, check_teacher_input

    check_finite({"--mean": kw.get("mean") or (), "--std": kw.get("std") or ()})
    teacher = load_teacher(device=device, **kw)
    check_teacher_input(teacher.model, teacher.spec, multires=multires)
    return teacher


def echo(msg: str) -> None:
    """Human-readable output goes to stderr, so stdout stays machine-readable."""
    click.echo(msg, err=True)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=True, default=str))


def handle_errors(f: Callable) -> Callable:
    """Turn expected failures (ZkdError) into a one-line message and exit code 2, without a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except ZkdError as e:
            click.echo(f"zkd: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("zkd: interrupted", err=True)
            sys.exit(130)

    return wrapper
