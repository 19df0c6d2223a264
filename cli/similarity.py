"""``zkd similarity``: how close datasets are to the teacher's unseen training data, from its BN statistics."""

from __future__ import annotations

import re
from typing import Any, Iterable

import click

from .common import (device_option, echo, emit_json, handle_errors, json_option, load_checked_teacher, seed_option,
                     teacher_kwargs, teacher_options, verify_option)

EXAMPLES = """
\b
Examples:
  # real, shifted and noise data against the shipped Fashion-MNIST teacher
  zkd similarity --data train=fashion-mnist:train --data test=fashion-mnist:test \\
      --data inv=fashion-mnist:test --transform inv=invert --data noise=gaussian:1000 --num-images 2000 --out sim
  # judge synthetic shards, keep their signature, compare it later without the images
  zkd similarity --data di=synth/di --save-stats di.json
  zkd similarity --stats di.json --data test=fashion-mnist:test --out sim2
"""


_NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def split_named(entry: str) -> tuple[str | None, str]:
    """``"NAME=VALUE"`` -> (NAME, VALUE) when NAME is a plain name (letters, digits, ``_.+-``); else (None, entry)."""
    name, sep, value = entry.partition("=")
    if sep and name and _NAME_RE.match(name) and value:
        return name, value
    return None, entry


def iter_named(entries: Iterable[str]) -> Iterable[tuple[str, str]]:
    """Named entries for ``--data``: a bare SOURCE is named after itself."""
    for e in entries:
        name, value = split_named(e)
        yield (name or value), value


def _table(report: dict[str, Any]) -> str:
    """The ranked scores as an aligned plain-text table (closest first)."""
    h = report["headline"]
    form = report["predictor"]["form"]
    head = ["rank", "dataset", "images", f"{h} (headline)", "reverse", "symmetric", "l2", "calibration rank",
            f"verdict ({form})"]
    rows = [[str(e["rank"]), e["name"], str(e["images"])] +
            [f"{e['scores'][k]:.4g}" for k in (h, "reverse", "symmetric", "l2")] +
            [str(e["predicted_rank"]), e["verdict"]] for e in report["datasets"]]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (1, len(r) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


@click.command(help="Rank datasets by how close their BatchNorm statistics inside the teacher are to the teacher's "
               "own (running) statistics, i.e. to its unseen training data (The Knowledge Within). Lower is "
               "closer. Each dataset also gets its predicted rank as a calibration set and a verdict (close to the "
               "training data / usable / far) from the bns divergence of the last third of the layers, the form "
               "that best predicted low-bit top-1 in bench/results/calibration_quality.md.\n" + EXAMPLES, context_settings={"show_default": True, "max_content_width": 110})
@teacher_options
@click.option("--data", "data", multiple=True, metavar="[NAME=]SOURCE",
              help="A dataset to score (repeatable): DIR|shards:DIR|folder:DIR|fashion-mnist:train|test|gaussian:N.")
@click.option("--stats", "stats", multiple=True, metavar="[NAME=]FILE",
              help="Saved signatures (--save-stats) to score without their data (repeatable); NAME= renames "
                   "(NAME/original for a file holding several).")
@click.option("--transform", "transforms", multiple=True, metavar="NAME=T[,T...]",
              help="Shift the --data entry NAME in pixel space before scoring: invert, rot90, rot180, rot270, hflip, "
                   "vflip (applied left to right).")
@click.option("--num-images", type=click.IntRange(min=1), default=None,
              help="Use a seeded random sample of N images of each --data source, stratified by class where "
                   "labels are known (--seed picks it).  [default: all]")
@click.option("--batch-size", type=click.IntRange(min=1), default=256,
              help="Images per forward pass (exact statistics do not depend on it; --per-batch ones do).")
@click.option("--per-batch", is_flag=True,
              help="Average per-batch statistics (what the BNS loss sees) instead of exact whole-dataset ones.")
@click.option("--save-stats", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Save every signature (.json or .pt, with the teacher's weights sha256) for later --stats.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write similarity.json, similarity.md and similarity.png here.  [default: terminal only]")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="DataLoader worker processes.")
@verify_option
@device_option
@seed_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def command(data: tuple[str, ...], stats: tuple[str, ...], transforms: tuple[str, ...], num_images: int | None,
            batch_size: int, per_batch: bool, save_stats: str | None, out: str | None, workers: int, device: str,
            seed: int, quiet: bool, as_json: bool, verify: bool = True, **kw: Any) -> None:
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.runtime import resolve_device
    from zeroshot_kd.similarity import (compute_signature, load_signatures, make_similarity_dataset,
                                        parse_transforms, save_signatures, similarity_report, write_report)
    from zeroshot_kd.validate import check_writable

    if not data and not stats:
        raise ZkdError("nothing to compare; pass at least one --data NAME=SOURCE or --stats FILE")
    entries = list(iter_named(data))
    names = [n for n, _ in entries]
    shifts: dict[str, list[str]] = {}
    for t in transforms:
        name, spec = split_named(t)
        if name is None:
            raise ZkdError(f"--transform {t!r} needs the form NAME=T[,T...], e.g. --transform inv=invert")
        if name not in names:
            raise ZkdError(f"--transform {t!r}: no --data entry is named {name!r}; name it with --data {name}=SOURCE")
        shifts[name] = shifts.get(name, []) + parse_transforms(spec)
    if save_stats and not save_stats.lower().endswith((".json", ".pt", ".pth")):
        raise ZkdError(f"--save-stats {save_stats}: use a .json or .pt file name")
    if save_stats:
        check_writable(save_stats, "--save-stats")
    if out:
        check_writable(out, "--out", folder=True)

    dev = resolve_device(device)
    teacher = load_checked_teacher(dev, **teacher_kwargs(kw))
    echo(f"teacher: {teacher.source.get('kind')} {teacher.source.get('spec')} (weights sha256 "
         f"{teacher.weights_sha256[:12]}), input {teacher.spec.shape}; device {dev}")

    signatures = []
    subsets: dict[str, Any] = {}
    for entry in stats:
        name, path = split_named(entry)
        loaded = load_signatures(path, teacher=teacher)
        for s in loaded:
            if name:
                s.name = name if len(loaded) == 1 else f"{name}/{s.name}"
            s.source = s.source or path
        signatures.extend(loaded)
    for name, source in entries:
        shift = shifts.get(name, [])
        ds = make_similarity_dataset(source, teacher.spec, num_images=num_images, transforms=shift, seed=seed,
                                     verify=verify)
        subsets[name] = getattr(ds, "zkd_subset", None)
        label = source + (f" ({','.join(shift)})" if shift else "")
        signatures.append(compute_signature(teacher, ds, name, source=label, batch_size=batch_size, device=dev,
                                            per_batch=per_batch, num_workers=workers,
                                            progress=None if not quiet else False))
    report = similarity_report(teacher, signatures)
    if subsets:
        report["subsets"] = subsets  # which items of each --data source were used (count, seed, sha256)
    if save_stats:
        save_signatures(save_stats, signatures)
        echo(f"signatures saved to {save_stats}")
    paths = write_report(report, out) if out else {}
    echo(_table(report))
    if paths:
        echo(f"report: {paths['markdown']}, {paths['json']}, chart {paths['chart']}")
    if as_json:
        emit_json({**report, "outputs": {k: str(v) for k, v in paths.items()},
                   "saved_stats": save_stats})
