"""Adaptive DeepInversion (issue 12): fixed-snapshot adi vs adaptive adi vs deepinversion at the same compute.

Each variant synthesizes ``IMAGES`` images (batches of 64, ``ITERATIONS`` Adam steps each, DeepInversion terms with
``bn_weight`` 0.1 as in bench/common.py) from the shipped teacher and trains a fresh ``cifar-resnet:8x8`` student
(the same seeded initialization in every variant) for ``STEPS`` KD steps in total (kd T=4, SGD lr 0.05, cosine,
batch 64). Only where the student's training happens, and what the competition term sees, differ:

- **deepinversion**: no competition term; ``STEPS`` KD steps on the final images.
- **adi, fixed snapshot**: competition (``adi_scale`` 0.2) against the *initial* student, the only snapshot
  available at no extra compute; then ``STEPS`` KD steps on the final images (``--rounds 1 --distill-steps STEPS``).
- **adi, adaptive**: ``ROUNDS`` rounds; round r synthesizes ``IMAGES / ROUNDS`` images against the current student,
  then ``STEPS / ROUNDS`` KD steps on every image so far (``--rounds ROUNDS --distill-steps STEPS/ROUNDS``).

Same total synthesis iterations and the same total KD steps in every row. The score is the student's top-1 on
``EVAL_IMAGES`` real Fashion-MNIST test images (a seeded, class-stratified sample) and its agreement with the
teacher there, for each seed in ``SEEDS`` (the seed drives the synthesis noise and the student's initialization).

Environment knobs: ZKD_BENCH_ADI_IMAGES (256), ZKD_BENCH_ADI_ITERATIONS (40), ZKD_BENCH_ADI_STEPS (200),
ZKD_BENCH_ADI_ROUNDS (4), ZKD_BENCH_ADI_SEEDS (0,1), ZKD_BENCH_EVAL_IMAGES (2000), ZKD_BENCH_THREADS (1).
Full size (the paper's 2000 iterations per batch): ZKD_BENCH_ADI_ITERATIONS=2000 ZKD_BENCH_ADI_IMAGES=2048
ZKD_BENCH_ADI_STEPS=2000 on a GPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, markdown_table, write_result  # noqa: E402

from zeroshot_kd import load_teacher, synthesize  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.distill import build_student  # noqa: E402
from zeroshot_kd.errors import ZkdError  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_write_json  # noqa: E402
from zeroshot_kd.runtime import resolve_device  # noqa: E402
from zeroshot_kd.shards import ShardDataset  # noqa: E402
from zeroshot_kd.synthesis.adi import round_tag  # noqa: E402
from zeroshot_kd.training import TrainConfig, read_checkpoint, train_student  # noqa: E402

IMAGES = int(os.environ.get("ZKD_BENCH_ADI_IMAGES", 256))
ITERATIONS = int(os.environ.get("ZKD_BENCH_ADI_ITERATIONS", 40))
STEPS = int(os.environ.get("ZKD_BENCH_ADI_STEPS", 200))
ROUNDS = int(os.environ.get("ZKD_BENCH_ADI_ROUNDS", 4))
SEEDS = [int(s) for s in os.environ.get("ZKD_BENCH_ADI_SEEDS", "0,1").split(",")]
EVAL_IMAGES = int(os.environ.get("ZKD_BENCH_EVAL_IMAGES", 2000))
STUDENT = "cifar-resnet:8x8"
BATCH = 64
LR = 0.05
SYNTH = {"iterations": ITERATIONS, "bn_weight": 0.1, "batch_size": BATCH, "num_images": IMAGES}
VARIANTS = ["deepinversion", "adi, fixed snapshot", "adi, adaptive"]


def _synthesize(out: Path, **kw) -> dict:  # noqa: ANN003
    """Synthesize into ``out``, continuing an interrupted run of the same settings, replacing other settings."""
    try:
        return synthesize(out, resume=out.exists(), progress=False, **kw)
    except ZkdError as e:
        if "different settings" not in str(e):
            raise
        return synthesize(out, overwrite=True, progress=False, **kw)


def run_variant(variant: str, seed: int, teacher, device) -> tuple[torch.nn.Module, float]:  # noqa: ANN001
    """The trained student of one variant and seed, and the seconds it took (synthesis + training)."""
    t0 = time.time()
    out = CACHE / "adi" / f"{variant.replace(', ', '-').replace(' ', '-')}-{IMAGES}-{ITERATIONS}-seed{seed}"
    if variant == "deepinversion":
        _synthesize(out, teacher=teacher, method="deepinversion", seed=seed, device=str(device), **SYNTH)
        student, _ = build_student(STUDENT, teacher, seed=seed, device=device)
        # the fixed-snapshot loop's training exactly: one round's config and tag, on the shards in order
        train_student(student, teacher.model, ShardDataset(out), ["kd"],
                      TrainConfig(steps=STEPS, batch_size=BATCH, lr=LR, seed=seed), device, spec=teacher.spec,
                      initial_record=False, progress=False, tag=round_tag(0))
        return student.eval(), time.time() - t0
    rounds = 1 if variant == "adi, fixed snapshot" else ROUNDS
    _synthesize(out, teacher=teacher, method="adi", seed=seed, device=str(device), student=STUDENT, rounds=rounds,
                distill_steps=STEPS // rounds, distill_batch_size=BATCH, distill_lr=LR, **SYNTH)
    student, _ = build_student(STUDENT, teacher, seed=seed, device=device)
    student.load_state_dict(read_checkpoint(out / "student.pt")[0])
    return student.eval(), time.time() - t0


def main() -> None:
    torch.set_num_threads(int(os.environ.get("ZKD_BENCH_THREADS", 1)))
    device = resolve_device("auto")
    teacher = load_teacher(device=device)
    test = make_dataset("fashion-mnist:test", teacher.spec, num_images=EVAL_IMAGES, seed=0)
    t_eval = evaluate_model(teacher.model, test, device, progress=False)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for k, seed in enumerate(SEEDS):
        for variant in VARIANTS:
            student, seconds = run_variant(variant, seed, teacher, device)
            ev = evaluate_model(student, test, device, teacher=teacher.model, progress=False)
            results[variant].append({"seed": seed, "top1": ev["top1"], "agreement": ev["agreement"],
                                     "seconds": round(seconds)})
            print(f"[bench_adi] seed {seed} {variant}: top-1 {ev['top1']:.2f} %, agreement {ev['agreement']:.2f} %, "
                  f"{seconds:.0f} s", file=sys.stderr, flush=True)
        report(results, SEEDS[:k + 1], t_eval["top1"], device)  # after every seed: a partial table survives a stop


def report(results: dict[str, list[dict]], seeds: list[int], teacher_top1: float, device: torch.device) -> None:
    """Write bench/results/adi.md and adi.json for the seeds done so far."""

    def spread(vals: list[float]) -> str:
        mean = statistics.fmean(vals)
        return f"{mean:.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{mean:.2f}"

    rows = []
    for variant in VARIANTS:
        rs = results[variant]
        rows.append([variant, *[f"{r['top1']:.2f}" for r in rs], spread([r["top1"] for r in rs]),
                     spread([r["agreement"] for r in rs]), sum(r["seconds"] for r in rs)])
    header = ["variant", *[f"top-1 % seed {s}" for s in seeds], "top-1 % mean ± sd", "agreement % mean ± sd",
              "seconds (all seeds)"]
    text = (
        "# Adaptive DeepInversion (bench/bench_adi.py)\n\n"
        f"Teacher: shipped fmnist_resnet14, top-1 {teacher_top1:.2f} % on the {EVAL_IMAGES} real Fashion-MNIST "
        f"test images used here (a seeded, class-stratified sample). Student: `{STUDENT}` from scratch, the same "
        f"seeded initialization in every variant. Device: {device} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s).\n\n"
        f"Budget per variant and seed (the same in every row): {IMAGES} images in batches of {BATCH}, {ITERATIONS} "
        f"synthesis iterations per batch (DeepInversion terms, bn_weight 0.1; adi adds adi_scale 0.2), and {STEPS} KD "
        f"steps in total (kd T=4, SGD lr {LR}, cosine, batch {BATCH}). Fixed snapshot: competition against the "
        f"initial student, then {STEPS} steps on the final images. Adaptive: {ROUNDS} rounds of {IMAGES // ROUNDS} "
        f"images, each followed by {STEPS // ROUNDS} steps on all images so far. deepinversion: {STEPS} steps on "
        "its final images, no competition.\n\n"
        + markdown_table(header, rows)
        + f"\nSeeds done: {', '.join(map(str, seeds))} of {', '.join(map(str, SEEDS))}. "
        "Reproduce: `python bench/bench_adi.py` (this table: about 25 min with 1 thread on a 2-core machine shared with other jobs). Full size: "
        "`ZKD_BENCH_ADI_ITERATIONS=2000 ZKD_BENCH_ADI_IMAGES=2048 ZKD_BENCH_ADI_STEPS=2000 python bench/bench_adi.py` "
        "on a GPU. Seconds are wall time on a shared machine (synthesis + training, not evaluation).\n"
    )
    write_result("adi", text)
    atomic_write_json(RESULTS / "adi.json", {"teacher_top1": teacher_top1, "images": IMAGES, "iterations": ITERATIONS,
                                             "steps": STEPS, "rounds": ROUNDS, "eval_images": EVAL_IMAGES,
                                             "results": results})


if __name__ == "__main__":
    main()
