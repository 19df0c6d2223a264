"""``zkd synthesize``: images from a frozen teacher's statistics, written as shards."""

from __future__ import annotations

import click

from zeroshot_kd.synthesis import COMMON_DEFAULTS, METHODS

from .common import (device_option, echo, emit_json, handle_errors, json_option, load_checked_teacher, parse_floats,
                     precision_option, seed_option, teacher_kwargs, teacher_options)


def _defaults_help(key: str) -> str:
    """'[default: deepinversion 0.01, bns 1, others 0]'-style text built from the method registry."""
    values: dict[str, list[str]] = {}
    for name, m in METHODS.items():
        v = m.hyperparameters().get(key)
        values.setdefault("auto (scaled 30 px @224)" if v is None else str(v), []).append(name)
    if len(values) == 1:
        return f"[default: {next(iter(values))}]"
    return "[default: " + "; ".join(f"{'/'.join(ms)}: {v}" for v, ms in values.items()) + "]"


def hp_option(flag: str, key: str, type_: click.ParamType | type, help_: str):  # noqa: ANN201
    return click.option(flag, key, type=type_, default=None, help=f"{help_} {_defaults_help(key)}")


EXAMPLES = """
\b
Examples:
  # 256 DeepInversion images from the shipped Fashion-MNIST teacher
  zkd synthesize --out synth/di --num-images 256 --iterations 200
  # BNS (The Knowledge Within) from a torchvision ResNet-50 on GPU, bf16
  zkd synthesize --teacher resnet50 --weights IMAGENET1K_V2 --method bns --device cuda --precision bf16 --out rn50
  # adaptive DeepInversion: 4 rounds, each followed by 100 KD steps of the student; writes OUT/student.pt
  zkd synthesize --method adi --student cifar-resnet:8x8 --rounds 4 --distill-steps 100 --out synth/adi
  # your own checkpoint (state_dict) and architecture
  zkd synthesize --teacher ckpt.pt --arch resnet18 --num-classes 10 --image-size 32 --out mine
  # two processes (CPU or GPU): batches are strided over ranks, output identical to one process
  torchrun --standalone --nproc-per-node 2 -m zeroshot_kd synthesize --out synth/di
"""


@click.command(help="Synthesize images from a frozen teacher and write them as tar shards.\n" + EXAMPLES,
               context_settings={"show_default": True, "max_content_width": 110})
@teacher_options
@click.option("--method", type=click.Choice(list(METHODS)), default="deepinversion",
              help="Synthesis method: " + "; ".join(f"{n}: {m.summary}" for n, m in METHODS.items()))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for shards and manifest.")
@click.option("--num-images", type=click.IntRange(min=1), default=256, help="Number of images to synthesize.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images optimized together.")
@click.option("--targets", default="balanced", metavar="balanced|random|LIST",
              help="Target classes: balanced over classes, random, or a comma list of class ids (cycled).")
@hp_option("--iterations", "iterations", click.IntRange(min=0), "Optimization steps per batch.")
@hp_option("--lr", "lr", click.FloatRange(min=0, min_open=True), "Adam learning rate (peak of warm-up + cosine).")
@click.option("--betas", default=None, callback=parse_floats, metavar="B1,B2",
              help=f"Adam betas. {_defaults_help('betas')}")
@hp_option("--warmup", "warmup", click.IntRange(min=0), "Linear warm-up iterations (capped at iterations/4).")
@hp_option("--bn-weight", "bn_weight", float, "Weight of the BatchNorm term (DeepInversion's r_feature).")
@hp_option("--first-bn-multiplier", "first_bn_multiplier", float, "Extra weight of the first BN layer's term.")
@hp_option("--ce-weight", "ce_weight", float, "Weight of cross-entropy to the targets (bns: BNS+I).")
@hp_option("--tv-l1", "tv_l1", float, "Weight of the total-variation L1 prior.")
@hp_option("--tv-l2", "tv_l2", float, "Weight of the total-variation L2 prior.")
@hp_option("--l2", "l2", float, "Weight of the image L2-norm prior.")
@hp_option("--jitter", "jitter", click.IntRange(min=0), "Random roll in pixels per iteration.")
@click.option("--flip/--no-flip", default=None, help=f"Random horizontal flips. {_defaults_help('flip')}")
@click.option("--clip/--no-clip", default=None, help=f"Clip to the valid pixel range after each step. "
              f"{_defaults_help('clip')}")
@hp_option("--multires-iterations", "multires_iterations", click.IntRange(min=0),
           "Extra first stage at half resolution (DeepInversion setting 0).")
@click.option("--student", default=None, metavar="SPEC",
              help="adi: model to compete against (same forms as --teacher); with --distill-steps the student to "
                   "train, built like zkd distill --student (also cifar-resnet:DxW, noskip:ARCH).")
@hp_option("--adi-scale", "adi_scale", float, "adi: weight of the 1 - JS competition term.")
@hp_option("--adi-temperature", "adi_temperature", click.FloatRange(min=0, min_open=True), "adi: softmax temperature.")
@click.option("--adi-js", type=click.Choice(["textbook", "deepinversion"]), default=None,
              help="adi: JS form, textbook or the authors' code (reverse KLs, clamped). [default: textbook]")
@click.option("--rounds", type=int, default=None,
              help="adi: synthesis rounds of the adaptive loop; each round synthesizes its share of --num-images "
                   "against the current student. [default: 1]")
@click.option("--distill-steps", type=int, default=None,
              help="adi: KD steps of the student after each round, on all images so far (0: fixed snapshot); "
                   "> 0 writes OUT/student.pt. [default: 0]")
@click.option("--distill-lr", type=float, default=None,
              help="adi: peak SGD learning rate of each round's training (cosine). [default: 0.05]")
@click.option("--distill-batch-size", type=int, default=None, help="adi: images per training step. [default: 64]")
@click.option("--distill-objective", "distill_objectives", multiple=True, metavar="SPEC",
              help="adi: training objective, repeatable (zkd distill --objective specs). [default: kd]")
@device_option
@precision_option
@seed_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out (same settings).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def command(method: str, out: str, num_images: int, batch_size: int, targets: str, student: str | None,
            rounds: int | None, distill_steps: int | None, distill_lr: float | None, distill_batch_size: int | None,
            distill_objectives: tuple[str, ...], device: str, precision: str, seed: int, resume: bool,
            overwrite: bool, quiet: bool, as_json: bool, **kw) -> None:  # noqa: ANN003
    from zeroshot_kd import synthesize
    from zeroshot_kd.errors import ZkdError
    from zeroshot_kd.runtime import dist_env, resolve_device
    from zeroshot_kd.synthesis import get_method
    from zeroshot_kd.validate import check_finite, check_writable

    m = get_method(method)
    adi_only = {"--student": student, "--adi-scale": kw.get("adi_scale"), "--adi-temperature": kw.get("adi_temperature"),
                "--adi-js": kw.get("adi_js"), "--rounds": rounds, "--distill-steps": distill_steps,
                "--distill-lr": distill_lr, "--distill-batch-size": distill_batch_size,
                "--distill-objective": distill_objectives or None}
    given = [flag for flag, v in adi_only.items() if v is not None]
    if given and not m.needs_student:
        raise ZkdError(f"{', '.join(given)} only apply to --method adi, not {method}; drop them or use --method adi")
    loop = {"rounds": rounds, "distill_steps": distill_steps, "distill_lr": distill_lr,
            "distill_batch_size": distill_batch_size, "distill_objectives": distill_objectives or None}
    loop = {k: v for k, v in loop.items() if v is not None}
    from zeroshot_kd.synthesis import AdaptiveConfig

    AdaptiveConfig.from_options(**loop)  # bad loop options fail before the teacher is loaded
    tk = teacher_kwargs(kw)
    check_finite({**{f"--{k.replace('_', '-')}": v for k, v in kw.items()}, "--distill-lr": distill_lr})
    check_writable(out, "--out", folder=True)
    dev = resolve_device(device)
    multires = bool(m.hyperparameters({k: v for k, v in kw.items()})["multires_iterations"])
    teacher = load_checked_teacher(dev, multires=multires, **tk)
    is_main = dist_env().is_main
    if is_main:
        echo(f"teacher: {teacher.source.get('kind')} {teacher.source.get('spec')} "
             f"({teacher.source.get('weights') or 'sha256 ' + str(teacher.source.get('sha256'))[:12]}), "
             f"input {teacher.spec.shape}, {teacher.spec.num_classes} classes; device {dev}")
    manifest = synthesize(out, teacher=teacher, method=method, num_images=num_images, batch_size=batch_size,
                          seed=seed, targets=targets, device=str(dev), precision=precision, student=student,
                          resume=resume, overwrite=overwrite, progress=not quiet,
                          log=echo if is_main else None, **loop, **kw)
    if not is_main:
        return
    q = manifest["quality"]
    acc = ("labels = the teacher's argmax" if q["teacher_accuracy"] is None
           else f"teacher accuracy on the images {100 * q['teacher_accuracy']:.1f}%")
    if "adaptive" in manifest:
        echo(f"student after {len(manifest['adaptive']['rounds_log'])} round(s): {out}/student.pt")
    echo(f"{acc}, BNS-KL "
         f"{q['bns_kl'] if q['bns_kl'] is None else round(q['bns_kl'], 3)}, {manifest['wall_time_s']:.1f}s; "
         f"preview: {out}/preview.png")
    if as_json:
        emit_json({"out": out, "method": method, "num_images": manifest["num_images"],
                   "shards": len(manifest["shards"]), "quality": q, "final_loss": manifest["final_loss"],
                   "wall_time_s": manifest["wall_time_s"], "teacher": manifest["teacher"],
                   "adaptive": manifest.get("adaptive")})
