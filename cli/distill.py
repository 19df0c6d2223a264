"""``zkd distill``: train any student from the teacher with KD objectives on synthetic or real data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.common import (config_options, device_option, echo, emit_json, handle_errors, json_option,
                        load_checked_teacher, precision_option, seed_option, teacher_kwargs, teacher_options,
                        verify_option)
from zeroshot_kd.training import TrainConfig as DistillConfig


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
@config_options(DistillConfig, ["epochs", "steps", "batch_size", "lr", "optimizer", "weight_decay", "schedule"],
                epochs={"default": 10}, batch_size={"min": 2})
@click.option("--eval-data", default=None, metavar="SOURCE",
              help="Evaluated before training and after each epoch (accuracy, agreement with the teacher), "
                   "e.g. fashion-mnist:test.")
@click.option("--eval-images", type=click.IntRange(min=1), default=None, help="Use only the first N eval images.")
@click.option("--out", required=True, type=click.Path(),
              help="Student checkpoint to write (.pt); with --assistant, the folder of the chain's stage-K.pt files.")
@click.option("--assistant", "assistants", multiple=True, metavar="SPEC",
              help="Teacher-assistant chain (TAKD): train teacher -> each --assistant in order -> student, one stage "
                   "each with the same objectives and data (ifm only on the last stage); 'wider-of-student' is the "
                   "student's architecture at twice the width (IFM's auxiliary network). Writes OUT/stage-K.pt "
                   "(+ .json card, .jsonl metrics) and OUT/chain.json.")
@click.option("--resume", is_flag=True, default=False,
              help="With --assistant: skip the stages OUT/chain.json records as finished (their checkpoints are "
                   "loaded) and restart at the first unfinished one.")
@click.option("--recipe", type=click.Choice(["distill", "active-mixup"]), default="distill", show_default=True,
              help="active-mixup: the teacher is a black box answering probabilities only; pre-train on the "
                   "--num-images originals, then --rounds rounds of the mixup images the student is least sure of, "
                   "--query-budget mixup queries in all (docs/recipes.md).")
@click.option("--query-budget", type=click.IntRange(min=0), default=1000, show_default=True,
              help="active-mixup: teacher queries on mixup images, beyond the originals.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="active-mixup: selection rounds (each trains --epochs on all images so far).")
@click.option("--pool-size", type=click.IntRange(min=1), default=None,
              help="active-mixup: candidate pairs in the mixup pool; default 20 x --num-images.")
@click.option("--mixup-selection", type=click.Choice(["active", "random"]), default="active", show_default=True,
              help="active-mixup: least-sure pairs and lam (active) or random ones (the same-queries baseline).")
@click.option("--metrics", default=None, type=click.Path(dir_okay=False),
              help="JSONL metrics file; default: OUT with suffix .jsonl.")
@config_options(DistillConfig, ["mixup", "shift", "flip", "workers", "freeze_bn"])
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar with loss terms.")
@device_option
@precision_option
@seed_option
@json_option
@handle_errors
def command(student_spec: str, student_weights: str | None, student_arch: str | None, data: str,
            num_images: int | None, objective_specs: tuple[str, ...], eval_data: str | None,
            eval_images: int | None, out: str, assistants: tuple[str, ...], resume: bool, recipe: str,
            query_budget: int, rounds: int, pool_size: int | None, mixup_selection: str, metrics: str | None,
            progress: bool, device: str, precision: str, seed: int, as_json: bool, verify: bool = True,
            **kw: Any) -> None:
    """Options named like DistillConfig fields reach it through ``kw``; the rest are the teacher options."""
    from zeroshot_kd.validate import check_writable
    from zeroshot_kd.data import make_dataset
    from zeroshot_kd.config import option_fields
    from zeroshot_kd.distill import build_student, distill
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.objectives import build
    from zeroshot_kd.runtime import dist_env, resolve_device

    specs = list(objective_specs) or ["kd"]
    build(specs)  # validate names and parameters before loading anything heavy
    if assistants and recipe != "distill":
        raise ZkdError("--assistant builds a distillation chain; it does not combine with --recipe active-mixup")
    if assistants and (student_weights or student_arch):
        raise ZkdError("--student-weights/--student-arch do not apply to a chain (every stage starts from random "
                       "init); drop them or drop --assistant")
    if resume and not assistants:
        raise ZkdError("--resume restarts a chain at its first unfinished stage; it needs --assistant")
    if recipe == "active-mixup" and specs != ["kd"]:
        raise ZkdError("--recipe active-mixup trains with kd on the teacher's answers; drop --objective")
    if assistants:
        from zeroshot_kd.recipes.chain import chain_plan

        chain_plan(student_spec, assistants, specs, out)  # resolves wider-of-student: fails before loading
    dev = resolve_device(device)
    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise ZkdError(f"--out {out}: folder {out_path.parent} does not exist")
    if assistants:
        if out_path.exists() and not out_path.is_dir():
            raise ZkdError(f"--out {out} is a file; with --assistant it is the chain's folder")
    else:
        if out_path.is_dir():
            raise ZkdError(f"--out {out} is a folder; pass the student checkpoint's file name (.pt)")
        check_writable(out_path, "--out")
    cfg = DistillConfig(**{f.name: kw.pop(f.name) for f in option_fields(DistillConfig)}, seed=seed,
                        precision=precision)
    tk = teacher_kwargs(kw)
    teacher = load_checked_teacher(dev, **tk)
    train = make_dataset(data, teacher.spec, num_images, seed=seed, verify=verify)
    evald = make_dataset(eval_data, teacher.spec, eval_images, seed=seed, verify=verify) if eval_data else None
    student, card = build_student(student_spec, teacher, weights=student_weights, arch=student_arch, seed=seed,
                                  device=dev, trust_builders=tk["trust_builders"])
    metrics_path = metrics or str(out_path.with_suffix(".jsonl"))
    env = dist_env()
    if env.is_main:
        budget = f"{cfg.steps} step(s)" if cfg.steps else f"{cfg.epochs} epoch(s)"
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

    if assistants:
        from zeroshot_kd.recipes.chain import distill_chain

        def stage_done(stage: Any, summ: dict[str, Any], skipped: bool) -> None:
            top1 = ((summ.get("final") or {}).get("eval") or {}).get("top1")
            acc = f", top1 {top1:.2f}%" if top1 is not None else ""
            echo(f"stage {stage.index}/{len(assistants) + 1} {stage.spec} ({' + '.join(stage.objectives)})"
                 f"{': finished earlier, loaded' if skipped else ''}{acc} -> {stage.checkpoint}")

        del student
        summary = distill_chain(teacher, student_spec, assistants, train, specs, cfg, out_path, dev, evald,
                                resume=resume, progress=progress, on_record=lambda s, rec: report(rec),
                                on_stage=stage_done)
        if env.is_main:
            echo(f"wrote {out_path}/stage-1..{len(assistants) + 1}.pt (+ .json, .jsonl) and chain.json; the student "
                 f"is {summary['student']}")
    elif recipe == "active-mixup":
        from zeroshot_kd.recipes.active_mixup import BlackBoxTeacher, active_mixup, dataset_images, write_card

        images = dataset_images(train)
        box = BlackBoxTeacher(teacher.model, dev, budget=len(train) + query_budget, batch_size=cfg.eval_batch_size)
        teacher_info, teacher_spec = teacher.to_dict(), teacher.spec
        del teacher   # from here on the recipe reaches the teacher only through the black box

        def round_done(rec: dict[str, Any]) -> None:
            top1 = (rec.get("eval") or {}).get("top1")
            acc = f", top1 {top1:.2f}%" if top1 is not None else ""
            echo(f"  round {rec['round']}: {rec['queries']} queries, {rec['train_images']} training images{acc}")

        summary = active_mixup(box, student, images, query_budget, rounds, cfg, device=dev, eval_data=evald,
                               pool_size=pool_size, selection=mixup_selection, metrics=metrics_path, out=out_path,
                               checkpoint_meta={"kind": "distilled-student", "teacher": teacher_info.get("spec"),
                                                "teacher_sha256": teacher_info.get("weights_sha256")},
                               on_round=round_done, progress=progress)
        write_card(out_path, card, teacher_info, teacher_spec, cfg, summary)
        echo(f"wrote {out_path} (+ {out_path.with_suffix('.json').name}) and {metrics_path}; {summary['queries']} "
             f"teacher queries ({len(train)} originals + {summary['queries'] - len(train)} mixups)")
    else:
        summary = distill(teacher, student, train, specs, cfg, dev, out=out_path, metrics=metrics_path,
                          eval_data=evald, student_card=card, progress=progress, on_epoch=report)
        if env.is_main:
            echo(f"wrote {out_path} (+ {out_path.with_suffix('.json').name}) and {metrics_path}")
    if env.is_main and as_json:
        emit_json(summary)
