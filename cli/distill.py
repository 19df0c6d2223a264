"""``zkd distill``: train any student from the teacher with KD objectives on synthetic or real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import (device_option, echo, emit_json, handle_errors, json_option, load_checked_teacher,
                        precision_option, seed_option, teacher_kwargs, teacher_options, verify_option)


# Kept static so that `zkd --help` does not import torch; tests check it against the registry.
OBJECTIVE_HELP = ("Objective NAME[:key=value,...], repeatable (default: kd); weighted terms are summed. Names: kd, ce, "
                  "ls, tfkd-reg, tfkd-self, cskd, kdcl, bss, sp, rkd, fsp, ofd, ifm, pkt. Lists inside a value are "
                  "+-separated (layers=layer2+layer3). See docs/objectives.md.")


@click.command(help="Train a student from the teacher with KD objectives; writes the checkpoint, a JSON card "
               "(so --teacher/--student accept it back) and JSONL metrics. Under torchrun (python -m "
               "torch.distributed.run --nproc-per-node N -m zeroshot_kd distill ...) it trains with "
               "DistributedDataParallel: each global batch of --batch-size is split across the ranks.")
@teacher_options
@click.option("--student", "student_spec", required=True, metavar="SPEC",
              help="cifar-resnet:DEPTH[xWIDTH] (e.g. cifar-resnet:8x8), a torchvision model name, module:function, "
                   "or a checkpoint file with its card.")
@click.option("--student-weights", default=None, metavar="ENUM|PATH|none",
              help="Initial student weights (torchvision enum or state_dict file); default: random init.")
@click.option("--student-arch", default=None, metavar="SPEC", help="Architecture of a --student weights-only file.")
@click.option("--data", required=True, metavar="SOURCE",
              help="Training data: DIR|shards:DIR|folder:DIR|fashion-mnist:train|test|gaussian:N.")
@click.option("--num-images", type=click.IntRange(min=2), default=None,
              help="Use a seeded random sample of N training images, stratified by class where labels are known.")
@verify_option
@click.option("--objective", "objective_specs", multiple=True, metavar="SPEC", help=OBJECTIVE_HELP)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Budget in optimizer steps instead of --epochs (passes repeat as needed).")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Peak learning rate (cosine decay).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=5e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--eval-data", default=None, metavar="SOURCE",
              help="Evaluated before training and after each epoch (accuracy, agreement with the teacher), "
                   "e.g. fashion-mnist:test.")
@click.option("--eval-images", type=click.IntRange(min=1), default=None, help="Use only the first N eval images.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Student checkpoint to write (.pt).")
@click.option("--metrics", default=None, type=click.Path(dir_okay=False),
              help="JSONL metrics file; default: OUT with suffix .jsonl.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--freeze-bn", is_flag=True, default=False,
              help="Train with the student in eval mode: BatchNorm uses and keeps its running statistics (no "
                   "dropout); under torchrun on CPU this makes the result equal to one process.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar with loss terms.")
@device_option
@precision_option
@seed_option
@json_option
@handle_errors
def command(student_spec: str, student_weights: str | None, student_arch: str | None, data: str,
            num_images: int | None, objective_specs: tuple[str, ...], epochs: int, steps: int | None,
            batch_size: int, lr: float, optimizer: str, weight_decay: float, schedule: str, eval_data: str | None,
            eval_images: int | None, out: str, metrics: str | None, workers: int, freeze_bn: bool, progress: bool,
            device: str, precision: str, seed: int, as_json: bool, verify: bool = True, **kw: Any) -> None:
    from zeroshot_kd.validate import check_writable
    from zeroshot_kd.data import make_dataset
    from zeroshot_kd.distill import DistillConfig, build_student, distill
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.objectives import build
    from zeroshot_kd.runtime import dist_env, resolve_device

    specs = list(objective_specs) or ["kd"]
    build(specs)  # validate names and parameters before loading anything heavy
    dev = resolve_device(device)
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise ZkdError(f"--out {out}: folder {out_path.parent} does not exist")
    check_writable(out_path, "--out")
    tk = teacher_kwargs(kw)
    teacher = load_checked_teacher(dev, **tk)
    train = make_dataset(data, teacher.spec, num_images, seed=seed, verify=verify)
    evald = make_dataset(eval_data, teacher.spec, eval_images, seed=seed, verify=verify) if eval_data else None
    student, card = build_student(student_spec, teacher, weights=student_weights, arch=student_arch, seed=seed,
                                  device=dev, trust_builders=tk["trust_builders"])
    cfg = DistillConfig(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, optimizer=optimizer,
                        weight_decay=weight_decay, schedule=schedule, seed=seed, precision=precision, workers=workers,
                        freeze_bn=freeze_bn)
    metrics_path = metrics or str(out_path.with_suffix(".jsonl"))
    env = dist_env()
    if env.is_main:
        budget = f"{steps} step(s)" if steps else f"{epochs} epoch(s)"
        ranks = f" x {env.world_size} processes" if env.world_size > 1 else ""
        echo(f"zkd distill: {student_spec} <- {teacher.source.get('spec')} on {data} ({len(train)} images), "
             f"objectives {' + '.join(specs)}, {budget} on {dev}{ranks}")

    def report(rec: dict[str, Any]) -> None:
        ev = rec.get("eval", {})
        parts = [f"epoch {rec['epoch']}", f"step {rec['step']}"]
        if "loss" in rec:
            parts.append(f"loss {rec['loss']:.4g}")
        parts += [f"{k} {ev[k]:.2f}%" for k in ("top1", "agreement") if ev.get(k) is not None]
        if ev.get("kl") is not None:
            parts.append(f"KL {ev['kl']:.4f}")
        echo("  " + ", ".join(parts))

    summary = distill(teacher, student, train, specs, cfg, dev, out=out_path, metrics=metrics_path, eval_data=evald,
                      student_card=card, progress=progress, on_epoch=report)
    if not env.is_main:
        return
    echo(f"wrote {out_path} (+ {out_path.with_suffix('.json').name}) and {metrics_path}")
    if as_json:
        emit_json(summary)
