"""KD objectives on the shipped teacher, all from the same synthetic shards (DeepInversion, 1024 images).

1. **W3A3 fine-tuning**: one calibrated W3A3 student (the calibration defaults without reconstruction, first/last
   layer 8-bit; at W4A4 this teacher's calibrated student is within 0.1 of FP32 and fine-tuning has nothing to
   recover) is fine-tuned for ``FT_STEPS`` steps with ``kd`` alone and with ``kd`` + each feature/relation
   objective (default weights), through ``zeroshot_kd.quant.finetuning.finetune`` (the one training loop; connectors in
   the same Adam at ``CONNECTOR_LR``). Real Fashion-MNIST
   test accuracy before and after.
2. **FP student distillation**: a CIFAR ResNet-8 of width 8 (78k parameters; the teacher is ResNet-14 width 16,
   ~175k) trained from scratch with each objective for ``EPOCHS`` epochs on the same shards; real test accuracy
   and agreement with the teacher. ``kd`` runs with three seeds to show the seed-to-seed spread; one ``kd`` row
   trains on 1024 *real* training images for reference.

Environment knobs: ZKD_BENCH_SECTIONS (quant,fp), ZKD_BENCH_THREADS (CPU threads, default 1), ZKD_BENCH_FT_STEPS, ZKD_BENCH_EPOCHS,
ZKD_BENCH_EVAL_IMAGES (default 10000 = the whole test set).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NUM_IMAGES, markdown_table, shards, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.distill import DistillConfig, build_student, distill  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.runtime import resolve_device  # noqa: E402

FT_STEPS = int(os.environ.get("ZKD_BENCH_FT_STEPS", 300))
EPOCHS = int(os.environ.get("ZKD_BENCH_EPOCHS", 10))
EVAL_IMAGES = int(os.environ.get("ZKD_BENCH_EVAL_IMAGES", 10000))
FEATURE_OBJECTIVES = ["sp", "rkd", "pkt", "ifm", "ofd", "fsp"]
FP_RUNS = [
    ("kd", ["kd"], 0), ("kd (seed 1)", ["kd"], 1), ("kd (seed 2)", ["kd"], 2),
    ("ce (teacher top-1)", ["ce"], 0), ("ce + kd", ["ce:weight=0.1", "kd:weight=0.9"], 0),
    ("ls", ["ls"], 0), ("tfkd-reg", ["tfkd-reg"], 0), ("tfkd-self (teacher=main)", ["tfkd-self:teacher=main"], 0),
    ("cskd", ["cskd"], 0), ("kdcl (2 members, minlogit)", ["kdcl"], 0), ("bss", ["bss"], 0),
    *[(f"kd + {o}", ["kd", o], 0) for o in FEATURE_OBJECTIVES],
    ("fsp two-stage, then kd", ["fsp:init_epochs=3", "kd"], 0),
]


def pct(x: float | None) -> str:
    """A percent from :func:`evaluate_model` as the table prints it."""
    return "-" if x is None else f"{x:.2f}"


def evaluate(model, teacher, data, device) -> dict:
    """The one evaluator (percent), quietly."""
    return evaluate_model(model, data, device, 512, teacher, progress=False)


def quant_section(teacher, data: str, test, device) -> tuple[str, list[list[object]]]:
    from zeroshot_kd.quant.finetuning import finetune
    from zeroshot_kd.quant.modules import QuantConfig
    from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student
    from torch.utils.data import TensorDataset

    opts = CalibrationOptions(data=data, num_images=NUM_IMAGES, holdout=0, recon=False, progress=False)
    base = calibrate_student(teacher, QuantConfig(3, 3), opts, device).student
    cal = make_dataset(data, teacher.spec, NUM_IMAGES)
    xs = torch.stack([cal[i][0] for i in range(len(cal))])
    ys = torch.tensor([int(cal[i][1]) for i in range(len(cal))])

    before = evaluate(base, teacher.model, test, device)
    rows = [["none (calibrated only)", pct(before["top1"]), pct(before["agreement"]), "-", "-"]]
    print(rows[-1], file=sys.stderr, flush=True)
    for combo in [["kd"]] + [["kd", o] for o in FEATURE_OBJECTIVES]:
        student = copy.deepcopy(base)
        t0 = time.perf_counter()
        hist = finetune(student, teacher.model, TensorDataset(xs, ys), FT_STEPS, combo, batch_size=32,
                        device=device, spec=teacher.spec, progress=False)  # finetune's defaults: lr, mixup
        secs = time.perf_counter() - t0
        ev = evaluate(student, teacher.model, test, device)
        rows.append([" + ".join(combo), pct(ev["top1"]), pct(ev["agreement"]), f"{hist[-1]['loss']:.4g}",
                     f"{secs:.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    header = ["fine-tuning objective", "test acc %", "agreement %", "final loss", "seconds"]
    return markdown_table(header, rows), rows


def fp_section(teacher, data: str, test, device) -> str:
    train = make_dataset(data, teacher.spec, NUM_IMAGES)
    real = make_dataset("fashion-mnist:train", teacher.spec, NUM_IMAGES)
    rows = []
    for label, specs, seed in FP_RUNS + [(f"kd on {NUM_IMAGES} REAL images (reference)", ["kd"], 0)]:
        ds = real if "REAL" in label else train
        student, _ = build_student("cifar-resnet:8x8", teacher, seed=seed, device=device)
        cfg = DistillConfig(epochs=EPOCHS, batch_size=64, lr=0.05, seed=seed)
        t0 = time.perf_counter()
        summary = distill(teacher, student, ds, specs, cfg, device, progress=False)
        secs = time.perf_counter() - t0
        ev = evaluate(student, teacher.model, test, device)
        rows.append([label, " ".join(specs), pct(ev["top1"]), pct(ev["agreement"]),
                     f"{summary['final']['loss']:.4g}", f"{secs:.0f}"])
        print(rows[-1], file=sys.stderr, flush=True)
    header = ["student objective", "--objective", "test acc %", "agreement %", "final epoch loss", "seconds"]
    return markdown_table(header, rows)


def main() -> None:
    # small models: intra-op threads only add contention on a shared CPU (ZKD_BENCH_THREADS to change)
    torch.set_num_threads(int(os.environ.get("ZKD_BENCH_THREADS", 1)))
    device = resolve_device("auto")
    teacher = load_teacher(device=device)
    data = str(shards("deepinversion"))
    test = make_dataset("fashion-mnist:test", teacher.spec, EVAL_IMAGES)
    t_eval = evaluate(teacher.model, None, test, device)
    sections = os.environ.get("ZKD_BENCH_SECTIONS", "quant,fp").split(",")
    no_run = "(not run: ZKD_BENCH_SECTIONS)\n"
    quant_table = quant_section(teacher, data, test, device)[0] if "quant" in sections else no_run
    fp_table = fp_section(teacher, data, test, device) if "fp" in sections else no_run
    text = (
        "# KD objectives (bench/bench_objectives.py)\n\n"
        f"Teacher: shipped fmnist_resnet14, test accuracy {pct(t_eval['top1'])} % on {len(test)} real "
        f"Fashion-MNIST test images. Data: {NUM_IMAGES} DeepInversion shards (bench/common.py). "
        f"Device: {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}. One seed per "
        "row unless marked; differences below the kd seed spread are noise.\n\n"
        f"## W3A3 student, {FT_STEPS} fine-tuning steps after calibration (the fine-tuning defaults: Adam lr "
        "3e-4 cosine, weight steps fixed, batch mixup; batch 32)\n\n"
        + quant_table +
        f"\n## FP student cifar-resnet:8x8 from scratch, {EPOCHS} epochs (SGD lr 0.05 cosine, batch 64)\n\n"
        + fp_table
    )
    write_result("objectives", text)


if __name__ == "__main__":
    main()
