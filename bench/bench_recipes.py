"""Recipes on the shipped Fashion-MNIST teacher (issue 12): TAKD chains, Active Mixup, no-skip students.

1. **TAKD**: a ``cifar-resnet:8x4`` student (19k parameters; the teacher is ResNet-14 width 16, 175k) distilled
   directly, through one assistant (``cifar-resnet:14x8``) and through two (``14x8`` then ``8x8``), with KD, three
   seeds, on ``TAKD_REAL`` real training images and on ``TAKD_SYN`` DeepInversion images synthesized here (cached in
   bench/cache, outside git). Every stage trains ``STEPS`` steps of batch 64.
2. **Active Mixup**: N = 500 and 2000 unlabeled real training images, the teacher as a black box (probabilities
   only). Active Mixup (``MIX_ROUNDS`` rounds, ``MIX_QUERIES`` mixup queries in all, pool of ``MIX_POOL`` pairs, lam
   grid 0.1..0.9) against the same recipe with *random* pairs and lam (the same number of queries) and against
   plain KD on the N originals alone (N queries), all with the same total training steps.
3. **No-skip students**: ``noskip:cifar-resnet:D x 8`` for D = 8, 14, 20 trained with CE on the true labels alone
   vs with KD from the teacher, ``NOSKIP_IMAGES`` real images, ``STEPS_NOSKIP`` steps.

Accuracy is top-1 (percent) on the first ``EVAL_IMAGES`` real test images. The budgets are cut to run in about
20 minutes on one CPU core; the full-size run (``ZKD_BENCH_FULL=1``) uses 10000 test images, 5000 real images,
1024 synthetic images and 10x the steps.

Environment knobs: ZKD_BENCH_SECTIONS (takd,mixup,noskip), ZKD_BENCH_THREADS (default 1), ZKD_BENCH_FULL; for a
longer TAKD check ZKD_BENCH_TAKD_STEPS, ZKD_BENCH_SEEDS (0,1,2), ZKD_BENCH_TAKD_DATA (real,synthetic),
ZKD_BENCH_TAKD_CHAINS (3: direct, 1 and 2 assistants), ZKD_BENCH_NAME (result file name).
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
from common import CACHE, markdown_table, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.distill import build_student, distill  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.recipes.active_mixup import BlackBoxTeacher, active_mixup, dataset_images  # noqa: E402
from zeroshot_kd.recipes.chain import distill_chain  # noqa: E402
from zeroshot_kd.training import TrainConfig  # noqa: E402

FULL = os.environ.get("ZKD_BENCH_FULL") == "1"
SCALE = 10 if FULL else 1
EVAL_IMAGES = 10000 if FULL else 1000
STEPS = int(os.environ.get("ZKD_BENCH_TAKD_STEPS", 60 * SCALE))
TAKD_REAL = 5000 if FULL else 512
TAKD_SYN = 1024 if FULL else 128
SYN_ITERS = 200 if FULL else 100
STUDENT = "cifar-resnet:8x4"
CHAINS = [("direct", []), ("1 assistant (14x8)", ["cifar-resnet:14x8"]),
          ("2 assistants (14x8, 8x8)", ["cifar-resnet:14x8", "cifar-resnet:8x8"])]
SEEDS = [int(v) for v in os.environ.get("ZKD_BENCH_SEEDS", "0,1,2").split(",")]
TAKD_DATA = os.environ.get("ZKD_BENCH_TAKD_DATA", "real,synthetic").split(",")
TAKD_CHAINS = int(os.environ.get("ZKD_BENCH_TAKD_CHAINS", 3))
MIX_N = [500, 2000]
MIX_QUERIES = 600 * SCALE
MIX_ROUNDS = 3
MIX_POOL = 2000 * SCALE
MIX_PRE_STEPS, MIX_ROUND_STEPS = 40 * SCALE, 20 * SCALE
NOSKIP_IMAGES = 5000 if FULL else 512
STEPS_NOSKIP = 40 * SCALE
BATCH = 64


def top1(model, test, device) -> float:
    return float(evaluate_model(model, test, device, 512, None, "fp32", progress=False)["top1"])


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def synthetic_shards() -> Path:
    from zeroshot_kd import synthesize

    out = CACHE / f"recipes-deepinversion-{TAKD_SYN}-{SYN_ITERS}"
    if not (out / "manifest.json").is_file():
        print(f"[bench] synthesizing {TAKD_SYN} deepinversion images into {out}", file=sys.stderr)
        synthesize(out, method="deepinversion", num_images=TAKD_SYN, batch_size=64, device="cpu", seed=0,
                   resume=out.exists(), progress=False, iterations=SYN_ITERS, bn_weight=0.1)
    return out


def takd(teacher, test, device, work: Path) -> str:
    rows = []
    sources = [("real", "fashion-mnist:train", TAKD_REAL), ("synthetic", "shards:", None)]
    for data_name, source, n in [s for s in sources if s[0] in TAKD_DATA]:
        if source == "shards:":
            source += str(synthetic_shards())
        data = make_dataset(source, teacher.spec, n, seed=0)
        for name, assistants in CHAINS[:TAKD_CHAINS]:
            accs, stage_accs = [], []
            for seed in SEEDS:
                t0 = time.time()
                cfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=0.05, seed=seed, log_every=STEPS)
                res = distill_chain(teacher, STUDENT, assistants, data, ["kd"], cfg,
                                    work / f"takd-{data_name}-{len(assistants)}-{seed}", device, progress=False)
                student = load_teacher(res["student"]).model
                accs.append(top1(student, test, device))
                stage_accs.append([top1(load_teacher(str(work / f"takd-{data_name}-{len(assistants)}-{seed}"
                                                         / f"stage-{k}.pt")).model, test, device)
                                   for k in range(1, len(assistants) + 1)])
                print(f"[takd] {data_name} {name} seed {seed}: {accs[-1]:.2f} ({time.time() - t0:.0f}s)",
                      file=sys.stderr)
            assist = ", ".join(mean_sd([s[k] for s in stage_accs]) for k in range(len(assistants))) or "-"
            rows.append([data_name, name, mean_sd(accs), " / ".join(f"{a:.2f}" for a in accs), assist])
    return ("## 1. TAKD: teacher-assistant chains\n\n"
            f"Student `{STUDENT}` from `fmnist_resnet14` (test top-1 93.26), KD (T=4), {STEPS} steps of batch {BATCH} "
            f"per stage (SGD, lr 0.05, cosine), {TAKD_REAL} real training images or {TAKD_SYN} DeepInversion images "
            f"({SYN_ITERS} iterations, bn_weight 0.1). Mean ± standard deviation over seeds {SEEDS}.\n\n"
            + markdown_table(["data", "chain", "student top-1", "per seed", "assistants' top-1"], rows))


def mixup(teacher, test, device) -> str:
    rows, curves = [], []
    total_steps = MIX_PRE_STEPS + MIX_ROUNDS * MIX_ROUND_STEPS
    for n in MIX_N:
        data = make_dataset("fashion-mnist:train", teacher.spec, n, seed=0)
        images = dataset_images(data)
        for selection in ("active", "random"):
            t0 = time.time()
            box = BlackBoxTeacher(teacher.model, device, budget=n + MIX_QUERIES)
            student, _ = build_student(STUDENT, teacher, seed=0, device=device)
            res = active_mixup(box, student, images, MIX_QUERIES, MIX_ROUNDS,
                               TrainConfig(steps=MIX_ROUND_STEPS, batch_size=BATCH, seed=0),
                               pretrain=TrainConfig(steps=MIX_PRE_STEPS, batch_size=BATCH, seed=0), device=device,
                               eval_data=test, pool_size=MIX_POOL, selection=selection)
            curve = [(r["queries"], r["eval"]["top1"]) for r in res["records"]]
            curves.append([n, f"{selection} mixup", " → ".join(f"{q}: {a:.2f}" for q, a in curve)])
            rows.append([n, f"{selection} mixup", res["queries"], f"{curve[-1][1]:.2f}"])
            print(f"[mixup] N={n} {selection}: {curve} ({time.time() - t0:.0f}s)", file=sys.stderr)
        # plain KD on the N originals: N queries, the same total steps (answers stored like the recipe's)
        box = BlackBoxTeacher(teacher.model, device, budget=n)
        student, _ = build_student(STUDENT, teacher, seed=0, device=device)
        res = active_mixup(box, student, images, 0, 1, TrainConfig(steps=MIX_ROUND_STEPS, batch_size=BATCH, seed=0),
                           pretrain=TrainConfig(steps=total_steps, batch_size=BATCH, seed=0), device=device,
                           eval_data=test)
        rows.append([n, "plain KD, originals only", res["queries"], f"{res['final']['eval']['top1']:.2f}"])
        print(f"[mixup] N={n} plain: {res['final']['eval']['top1']:.2f}", file=sys.stderr)
    return ("## 2. Active Mixup vs KD with the same queries\n\n"
            f"Student `{STUDENT}`, teacher behind `BlackBoxTeacher` (probabilities only). Mixup rows: pre-train "
            f"{MIX_PRE_STEPS} steps on the N originals, then {MIX_ROUNDS} rounds of {MIX_QUERIES // MIX_ROUNDS} "
            f"queries + {MIX_ROUND_STEPS} steps on everything so far (pool {MIX_POOL} random pairs, lam grid "
            f"0.1..0.9); *random* picks pairs and lam uniformly (the same-queries baseline). Plain KD trains the "
            f"same {total_steps} steps on the originals. Batch {BATCH}, SGD lr 0.05 cosine per training run.\n\n"
            + markdown_table(["N", "method", "teacher queries", "final top-1"], rows)
            + "\nAccuracy after each round (total queries: top-1):\n\n"
            + markdown_table(["N", "method", "queries: top-1"], curves))


def noskip(teacher, test, device) -> str:
    data = make_dataset("fashion-mnist:train", teacher.spec, NOSKIP_IMAGES, seed=0)
    rows = []
    for depth in (8, 14, 20):
        spec = f"noskip:cifar-resnet:{depth}x8"
        accs = {}
        for obj in ("ce", "kd"):
            student, _ = build_student(spec, teacher, seed=0, device=device)
            distill(teacher, student, data, [obj], TrainConfig(steps=STEPS_NOSKIP, batch_size=BATCH, seed=0,
                                                               log_every=STEPS_NOSKIP), device, progress=False)
            accs[obj] = top1(student, test, device)
            print(f"[noskip] {spec} {obj}: {accs[obj]:.2f}", file=sys.stderr)
        rows.append([spec, f"{accs['ce']:.2f}", f"{accs['kd']:.2f}", f"{accs['kd'] - accs['ce']:+.2f}"])
    return ("## 3. No-skip students: CE vs KD\n\n"
            f"`noskip:cifar-resnet:Dx8` (every shortcut removed), {NOSKIP_IMAGES} real training images with their "
            f"labels (CE) or the teacher's soft targets (KD, T=4), {STEPS_NOSKIP} steps of batch {BATCH}.\n\n"
            + markdown_table(["student", "CE top-1", "KD top-1", "KD - CE"], rows))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("ZKD_BENCH_THREADS", 1)))
    sections = os.environ.get("ZKD_BENCH_SECTIONS", "takd,mixup,noskip").split(",")
    device = torch.device("cpu")
    teacher = load_teacher()
    test = make_dataset("fashion-mnist:test", teacher.spec, EVAL_IMAGES, seed=0)
    work = CACHE / "recipes-runs"
    t0 = time.time()
    parts = ["# Recipes (issue 12)\n",
             f"Shipped teacher `fmnist_resnet14`; top-1 on the first {EVAL_IMAGES} (stratified sample) Fashion-MNIST "
             f"test images; {'full' if FULL else 'reduced'} budget, {torch.get_num_threads()} CPU thread(s), torch "
             f"{torch.__version__}, {platform.machine()}. Reproduce: `python bench/bench_recipes.py` "
             "(full size: `ZKD_BENCH_FULL=1`).\n"]
    if "takd" in sections:
        parts.append(takd(teacher, test, device, work))
    if "mixup" in sections:
        parts.append(mixup(teacher, test, device))
    if "noskip" in sections:
        parts.append(noskip(teacher, test, device))
    parts.append(f"\nWall time: {time.time() - t0:.0f} s.\n")
    write_result(os.environ.get("ZKD_BENCH_NAME") or ("recipes" if sections == ["takd", "mixup", "noskip"]
                                                      else "recipes-" + "-".join(sections)),
                 "\n".join(parts))


if __name__ == "__main__":
    main()
