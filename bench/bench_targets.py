"""Issue 11's accuracy targets at the settings users run: ``zkd calibrate`` with its defaults (1024 calibration
images, the range guard, GENIE-M reconstruction at 100 steps/block and its check), then
with 1000 steps/block, then with KD fine-tuning after the default reconstruction.

Rows: the target cases (``--cases``); columns: calibration data (``real`` = Fashion-MNIST train, ``METHOD@ITERS`` =
1024 images synthesized from the teacher at that many steps, cached in ``bench/cache/recon``) x settings. Each
cell: top-1 on the 10000 real Fashion-MNIST test images and the calibration's CPU seconds (one thread; evaluation
excluded). Every cell is cached in ``bench/cache/recon`` (the recon bench's cell cache); the table is
rewritten after each cell.

Usage::

    python bench/bench_targets.py                      # all cases, real and deepinversion@1000
    python bench/bench_targets.py --cases m-w4a4 --sources real
    python bench/bench_targets.py --cached-only        # render from the cache
    python bench/bench_targets.py --cases m-w3a3 m-w4a4 --seeds 0 1 2   # + the seed spread of KD fine-tuning
    python bench/bench_targets.py --cases m-w4a4 m-w3a3 m-all --sources real deepinversion@1000 \
        --settings "+ KD 4000 @3e-4, --w-asym" --seeds 0 1 2 --name targets-asym   # the asymmetric weight grid
    python bench/bench_targets.py --cases m-w4a4 m-w3a3 --sources deepinversion@2000 \
        --settings "+ KD 4000 @3e-4" --seeds 0 1 2 --name targets-di2000   # shards at synthesize's default steps
    python bench/bench_targets.py --cases m-w4a4 m-w3a3 m-all r-w3a3 --sources real deepinversion@1000 \
        --settings "+ KD 4000 @3e-4, QDrop 0.5" --seeds 0 1 2 --name targets-qdrop   # QDrop in fine-tuning
    python bench/bench_targets.py --cases m-w4a4 m-w3a3 m-all --sources real deepinversion@1000 \
        --settings "+ KD 4000 @3e-4, --w-asym, shift 2, flip" "+ KD 4000 @3e-4, --w-asym, shift 2" \
        "+ KD 4000 @3e-4, --w-asym, flip" "+ KD 4000 @3e-4, QDrop 0.5, shift 2, flip" --seeds 0 1 2 \
        --name targets-aug   # shift / flip in fine-tuning
    python bench/bench_targets.py --cases m-w4a4 --sources deepinversion@1000 --images 2048 \
        --settings "+ KD 4000 @3e-4, --w-asym, shift 2, flip" --name targets-2048   # twice the synthetic images
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench_recon  # noqa: E402  (its cell cache, bench/cache/recon)
from bench_recon import data_source  # noqa: E402  (shards cached once, shared with the recon bench)
from common import markdown_table, write_json, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.quant.validation import clear_probe_cache  # noqa: E402

#: case -> (teacher, label, w bits, a bits, --keep-8bit, target top-1 from issue 11)
CASES = {
    "m-w4a4": ("fmnist_mobilenetv2", "MobileNetV2 W4A4", 4, 4, "first,last", 90.50),
    "m-w3a3": ("fmnist_mobilenetv2", "MobileNetV2 W3A3", 3, 3, "first,last", 87.50),
    "m-all": ("fmnist_mobilenetv2", "MobileNetV2 W4A4 every layer", 4, 4, "none", 87.50),
    "r-w3a3": ("fmnist_resnet14", "ResNet14 W3A3", 3, 3, "first,last", 92.26),
}
#: column -> CalibrationOptions overrides (on top of the library defaults)
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "recon 1000": {"recon_iters": 1000},
    "+ KD 2000, no mixup": {"finetune_steps": 2000, "lr": 1e-4, "finetune_mixup": False},
    "+ KD 4000 @3e-4, no mixup": {"finetune_steps": 4000, "lr": 3e-4, "finetune_mixup": False},
    "+ KD 4000 @3e-4": {"finetune_steps": 4000, "lr": 3e-4},
    "+ KD 4000 @3e-4, --w-asym": {"finetune_steps": 4000, "lr": 3e-4, "w_asym": True},
    "+ KD 4000 @3e-4, QDrop 0.5": {"finetune_steps": 4000, "lr": 3e-4, "finetune_drop": 0.5},
    "+ KD 4000 @3e-4, --w-asym, QDrop 0.5": {"finetune_steps": 4000, "lr": 3e-4, "w_asym": True,
                                              "finetune_drop": 0.5},
    "+ KD 4000 @3e-4, --w-asym, shift 2, flip": {"finetune_steps": 4000, "lr": 3e-4, "w_asym": True,
                                                 "finetune_shift": 2, "finetune_flip": True},
    "+ KD 4000 @3e-4, --w-asym, shift 2": {"finetune_steps": 4000, "lr": 3e-4, "w_asym": True, "finetune_shift": 2},
    "+ KD 4000 @3e-4, --w-asym, flip": {"finetune_steps": 4000, "lr": 3e-4, "w_asym": True, "finetune_flip": True},
    "+ KD 4000 @3e-4, QDrop 0.5, shift 2, flip": {"finetune_steps": 4000, "lr": 3e-4, "finetune_drop": 0.5,
                                                  "finetune_shift": 2, "finetune_flip": True},
}
#: run unless ``--settings`` names others (the --w-asym, QDrop and shift/flip columns are their own runs in run_all)
DEFAULT_SETTINGS = [s for s in SETTINGS if "--w-asym" not in s and "QDrop" not in s and "shift" not in s]
IMAGES = 1024  # default --images
EVAL_IMAGES = 10000
CPU = torch.device("cpu")
VERSION = 3  # bump to invalidate cached cells (2: --validation auto; 3: the checks' tolerance of 2 SE)


#: the settings repeated over ``--seeds`` (the calibration seed: image sample, probe, reconstruction, fine-tuning)
SEED_SETTINGS = ("+ KD 4000 @3e-4", "+ KD 4000 @3e-4, --w-asym", "+ KD 4000 @3e-4, QDrop 0.5",
                 "+ KD 4000 @3e-4, --w-asym, QDrop 0.5", "+ KD 4000 @3e-4, --w-asym, shift 2, flip",
                 "+ KD 4000 @3e-4, --w-asym, shift 2", "+ KD 4000 @3e-4, --w-asym, flip",
                 "+ KD 4000 @3e-4, QDrop 0.5, shift 2, flip")


def run_cell(case: str, source: str, setting: str, cached_only: bool, seed: int = 0, images: int = IMAGES
             ) -> dict | None:
    tname, _, w, a, keep, _ = CASES[case]
    overrides = {**SETTINGS[setting], **({"seed": seed} if seed else {})}
    w_asym = overrides.pop("w_asym", False)  # a QuantConfig field, not a CalibrationOptions one
    key_d = {"v": VERSION, "case": case, "source": source, "setting": setting, "images": images,
             "eval": EVAL_IMAGES, "opts": overrides, **({"w_asym": True} if w_asym else {})}

    def measure() -> dict:
        teacher = load_teacher(tname, device="cpu")
        opts = CalibrationOptions(data=data_source(source, images, tname), num_images=images, progress=False,
                                  **overrides)
        clear_probe_cache()  # seconds of a standalone run: the BN probe included
        t0 = time.perf_counter()
        res = calibrate_student(teacher, QuantConfig(w, a, keep_8bit=keep, w_asym=w_asym), opts, CPU)
        seconds = time.perf_counter() - t0
        test = make_dataset("fashion-mnist:test", teacher.spec, num_images=EVAL_IMAGES, seed=0)
        ev = evaluate_model(res.student, test, CPU, teacher=teacher.model, progress=False)
        fp = evaluate_model(teacher.model, test, CPU, progress=False)
        return {"top1": ev["top1"], "fp32": fp["top1"], "seconds": seconds,
                "recon_kept": (res.report.get("recon_check") or {}).get("kept"),
                "finetune_kept": (res.report.get("finetune_check") or {}).get("kept")}

    bench_recon.CACHED_ONLY = cached_only
    return bench_recon.cell(key_d, measure)


def render(cells: dict[tuple[str, str, str], dict], seeded: dict[tuple[str, str, str, int], dict],
           args: argparse.Namespace) -> None:
    lines = ["# Issue 11 targets at the defaults users run", "",
             f"Generated by `python bench/bench_targets.py` (torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} thread(s)). `zkd calibrate` from Python with its defaults: {args.images} "
             "calibration images (`--validation auto`: the guard and the checks score on a held-out quarter when the "
             "images are close to the training data, else on the 500-step BN probe), the range guard, GENIE-M "
             "reconstruction at 100 steps/block kept unless it raises the validation KL beyond 2 paired standard "
             "errors (`--check-tolerance`). `recon 1000` = "
             "`--recon-iters 1000`; `+ KD 2000, no mixup` = the default, then `--finetune-steps 2000 --lr 1e-4 "
             "--no-finetune-mixup`; `+ KD 4000 @3e-4` = the default, then `--finetune-steps 4000 --lr 3e-4` "
             "(with the default batch mixup, or `--no-finetune-mixup`), `, --w-asym` the same with the asymmetric "
             "per-channel weight grid `[0, 2^b-1]` + zero point, `, QDrop 0.5` the same with `--finetune-drop 0.5` "
             "(each activation element quantized with probability 0.5 in fine-tuning, else full precision), "
             "`, shift 2` / `, flip` the same with `--finetune-shift 2` / `--finetune-flip` (each image moved by up "
             "to 2 px / mirrored with probability 1/2 before mixup); fine-tuning is checked the same way. "
             f"Top-1 % on {EVAL_IMAGES} real Fashion-MNIST test images (seconds of the "
             "calibration, one CPU thread, shared machine). `real` = Fashion-MNIST train; `deepinversion@N` = "
             f"{args.images} images synthesized from the teacher alone at N steps (data-free). `-` = not run.", ""]
    header = ["case", "FP32", "target", "data"] + list(SETTINGS) + ["best", "met"]
    rows = []
    for case in args.cases:
        _, label, *_, target = CASES[case]
        for source in args.sources:
            row_cells = [cells.get((case, source, s)) for s in SETTINGS]
            fp = next((c["fp32"] for c in row_cells if c), None)
            vals = [c["top1"] for c in row_cells if c]
            best = max(vals) if vals else None
            rows.append([label, "-" if fp is None else f"{fp:.2f}", f"{target:.2f}", source]
                        + ["-" if c is None else f"{c['top1']:.2f} ({c['seconds']:.0f}s)" for c in row_cells]
                        + ["-" if best is None else f"{best:.2f}",
                           "-" if best is None else ("met" if best >= target else f"missed ({best - target:+.2f})")])
    lines += [markdown_table(header, rows)]
    if len(args.seeds) > 1:
        lines += ["", "### Fine-tuning over calibration seeds", "",
                  "The seed draws the calibration sample, the BN probe, reconstruction's minibatches and QDrop masks, "
                  "and fine-tuning's order and mixup.", ""]
        srows = []
        for case in args.cases:
            _, label, *_, target = CASES[case]
            for source in args.sources:
                for setting in SEED_SETTINGS:
                    got = [seeded.get((case, source, setting, k)) for k in args.seeds]
                    vals = [c["top1"] for c in got if c]
                    if len(vals) < 2:  # a spread needs two seeds
                        continue
                    mean = sum(vals) / len(vals)
                    srows.append([label, f"{target:.2f}", source, setting]
                                 + ["-" if c is None else f"{c['top1']:.2f}" for c in got]
                                 + [f"{mean:.2f}", f"{sum(v >= target for v in vals)}/{len(vals)}"])
        lines += [markdown_table(["case", "target", "data", "setting"] + [f"seed {k}" for k in args.seeds]
                                 + ["mean", "seeds meeting"], srows)]
    write_result(args.name, "\n".join(lines))
    write_json(args.name, {"cells": list(cells.values()) + [c for (*_, k), c in seeded.items() if k]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--sources", nargs="+", default=["real", "deepinversion@1000"])
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS),
                    help="settings run; the others are shown from the cache ('-' where not cached)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=IMAGES, help="calibration images per run (synthesized sets: "
                    "that many images, cached once)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help=f"also run {' and '.join(map(repr, SEED_SETTINGS))} with these calibration seeds (a spread "
                    "table)")
    ap.add_argument("--cached-only", action="store_true")
    ap.add_argument("--name", default="targets")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cells: dict[tuple[str, str, str], dict] = {}
    seeded: dict[tuple[str, str, str, int], dict] = {}
    for case in args.cases:
        for source in args.sources:
            for setting in SETTINGS:
                cell = run_cell(case, source, setting, args.cached_only or setting not in args.settings,
                                images=args.images)
                if cell is not None:
                    cells[(case, source, setting)] = cell
                    render(cells, seeded, args)
                    print(f"[targets] {case} {source} {setting}: {cell['top1']:.2f}", file=sys.stderr, flush=True)
    for case in args.cases:
        for source in args.sources:
            for setting in SEED_SETTINGS:
                for seed in args.seeds:
                    cell = (cells.get((case, source, setting)) if seed == 0 else
                            run_cell(case, source, setting, args.cached_only or setting not in args.settings, seed,
                                     args.images))
                    if cell is not None:
                        seeded[(case, source, setting, seed)] = cell
                        render(cells, seeded, args)
    render(cells, seeded, args)


if __name__ == "__main__":
    main()
