"""How the default guard should score its candidates (issue 11): every candidate's real accuracy beside its KL on
the held-out quarter and on the BN probe, and what each scoring rule would have chosen.

For each (teacher, setting, calibration source) of the low-bit grid (``bench_lowbit.py``'s cells and shards), the
guard's seven candidates are built exactly as ``zkd calibrate`` builds them (``{mse, output, minmax} x {CLE + bias
correction off, on}`` and ``naive``; ranges fitted on the first three quarters of the 256 calibration images) and
each is measured three ways: top-1 on 2000 real Fashion-MNIST test images, ``KL(teacher || student)`` on the
held-out quarter, and on the 64-image BN probe (``--probe-iterations`` steps, default the pipeline's). Rules
compared (lower score wins):

* ``held``: held-out KL only (the guard before the probe);
* ``probe``: probe KL only (the shipped default since the probe has 500 steps);
* ``pooled``: KL over the union of both image sets (the image-count weighted mean; the default with the 50-step
  probe);
* ``max``: the larger of the two KLs (a candidate must be good on both);
* ``relative``: mean of each KL divided by the smallest KL of its source over the candidates (scale-free).

Per rule: mean top-1 over the cells, cells more than 0.5 points below naive min/max, worst shortfall to naive and
to the best candidate (the oracle). Writes ``bench/results/guard.md`` / ``guard.json``; cells are cached.

Usage::

    python bench/bench_guard.py
    python bench/bench_guard.py --teachers fmnist_resnet14 --settings W3A3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_lowbit import SETTINGS, W2_TEACHERS, calibration_data  # noqa: E402
from common import CACHE, markdown_table, write_json, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_write_json  # noqa: E402
from zeroshot_kd.quant.calibrate import calibrate_activations  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig  # noqa: E402
from zeroshot_kd.quant.pipeline import GUARD_METHODS, CalibrationOptions, _batches, _build_student  # noqa: E402
from zeroshot_kd.quant.ranges import search_act_output  # noqa: E402
from zeroshot_kd.quant.validation import PROBE_ITERATIONS, bn_probe, guard_split, make_validation  # noqa: E402


def rules(cands: dict[str, dict[str, float]]) -> dict[str, str]:
    """The candidate each scoring rule picks (ties: the first in build order, as the guard)."""
    names = list(cands)
    min_h = min(c["held"] for c in cands.values()) or 1e-12
    min_p = min(c["probe"] for c in cands.values()) or 1e-12
    score = {
        "held": lambda c: c["held"],
        "probe": lambda c: c["probe"],
        "pooled": lambda c: (c["held"] * c["n_held"] + c["probe"] * c["n_probe"]) / (c["n_held"] + c["n_probe"]),
        "max": lambda c: max(c["held"], c["probe"]),
        "relative": lambda c: c["held"] / min_h + c["probe"] / min_p,
    }
    return {r: min(names, key=lambda n: (f(cands[n]), names.index(n))) for r, f in score.items()}


def cell(tname: str, source: str, setting: tuple, args: argparse.Namespace, cache: dict) -> dict[str, Any]:
    key = hashlib.sha256(json.dumps([tname, source, setting[0], args.num_images, args.eval_images,
                                     args.shard_iterations, args.probe_iterations, 2]).encode()).hexdigest()[:16]
    path = CACHE / "guard" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    dev = torch.device("cpu")
    if tname not in cache:
        t = load_teacher(tname, device=dev)
        cache[tname] = (t, make_dataset("fashion-mnist:test", t.spec, num_images=args.eval_images))
    teacher, test = cache[tname]
    label, w, a, keep = setting
    data = calibration_data(tname, source, args)
    ds = make_dataset(data, teacher.spec, num_images=args.num_images, seed=0, verify=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    n_held = guard_split(len(x))
    fit_x, held_x = x[: len(x) - n_held], x[len(x) - n_held:]
    opts = CalibrationOptions(data=data, num_images=args.num_images, progress=False)
    probe = bn_probe(teacher, opts.probe_images, opts.seed, dev, args.probe_iterations)
    held_v = make_validation(teacher, held_x, "held-out", dev)
    probe_v = make_validation(teacher, probe, "probe", dev)
    config = QuantConfig(w, a, keep_8bit=keep)
    fit_batches = _batches(fit_x, opts.batch_size)
    cands: dict[str, dict[str, float]] = {}

    def measure(name: str, student: torch.nn.Module) -> None:
        cands[name] = {"top1": evaluate_model(student, test, dev, progress=False)["top1"],
                       "held": held_v.score(student, dev), "probe": probe_v.score(student, dev),
                       "n_held": len(held_x), "n_probe": len(probe)}
        print(f"[guard] {tname} {source} {label:16s} {name:14s} top1 {cands[name]['top1']:.2f} "
              f"held {cands[name]['held']:.4f} probe {cands[name]['probe']:.4f}", file=sys.stderr, flush=True)

    for eq, bc in ((False, False), (True, True)):
        suffix = "+cle+bc" if eq else ""
        for method in GUARD_METHODS:
            built = _build_student(teacher, config, opts, fit_x, dev, eq, bc)
            if method == "output":
                search_act_output(built.student, fit_batches, dev, opts.candidates)
            else:
                calibrate_activations(built.student, fit_batches, len(fit_batches), dev, "fp32", method,
                                      opts.lp_p, opts.candidates, progress=False)
            measure(method + suffix, built.student)
    naive = _build_student(teacher, config, CalibrationOptions(data=data, w_method="minmax", progress=False), fit_x,
                           dev, False, False)
    calibrate_activations(naive.student, fit_batches, len(fit_batches), dev, "fp32", "minmax", progress=False)
    measure("naive", naive.student)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, cands)
    return cands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", default="fmnist_mobilenetv2,fmnist_resnet14")
    ap.add_argument("--sources", default="real,gaussian,inception,bns,deepinversion")
    ap.add_argument("--settings", default="", help="comma list of setting labels [default: all]")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--shard-iterations", type=int, default=50)
    ap.add_argument("--probe-iterations", type=int, default=PROBE_ITERATIONS)
    ap.add_argument("--name", default="guard")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    wanted = [s for s in args.settings.split(",") if s] or [s[0] for s in SETTINGS]
    by_label = {s[0]: s for s in SETTINGS}
    cache: dict = {}
    results, rows = [], []
    names = ["held", "probe", "pooled", "max", "relative"]
    for tname in args.teachers.split(","):
        for label in wanted:
            if label == "W2A4" and tname not in W2_TEACHERS:
                continue
            for source in args.sources.split(","):
                cands = cell(tname, source, by_label[label], args, cache)
                picks = rules(cands)
                best = max(c["top1"] for c in cands.values())
                results.append({"teacher": tname, "setting": label, "source": source, "candidates": cands,
                                "picks": picks, "oracle": best})
                rows.append([tname.replace("fmnist_", ""), label, source, f"{cands['naive']['top1']:.2f}",
                             f"{best:.2f}"] + [f"{cands[picks[r]]['top1']:.2f} ({picks[r]})" for r in names])
    summary = []
    for r in names:
        accs = [c["candidates"][c["picks"][r]]["top1"] for c in results]
        naive = [c["candidates"]["naive"]["top1"] for c in results]
        gaps = [a - n for a, n in zip(accs, naive)]
        oracle = [a - c["oracle"] for a, c in zip(accs, results)]
        summary.append([r, f"{sum(accs) / len(accs):.2f}", sum(g < -0.5 for g in gaps), f"{min(gaps):+.2f}",
                        f"{sum(oracle) / len(oracle):+.2f}", f"{min(oracle):+.2f}"])
    text = "\n".join([
        "# How the guard should score its candidates (issue 11)", "",
        f"{len(results)} cells of the low-bit grid ({args.num_images} calibration images, ranges fitted on the first "
        f"three quarters; top-1 on {args.eval_images} real Fashion-MNIST test images). Each rule picks one of the "
        "guard's seven candidates by its KL to the teacher on the held-out quarter (`held`), on the 64-image BN probe "
        f"at {args.probe_iterations} steps "
        "(`probe`), on both pooled (`pooled`), the larger of the two (`max`), or the sum of each relative to its "
        "best candidate (`relative`).", "",
        "## Summary", "",
        markdown_table(["rule", "mean top-1", "cells < naive - 0.5", "worst vs naive", "mean vs oracle",
                        "worst vs oracle"], summary),
        "## Per cell (top-1 of the pick, pick in brackets)", "",
        markdown_table(["teacher", "setting", "data", "naive", "oracle"] + names, rows),
        f"Reproduce: `python bench/bench_guard.py` (cells cached in `bench/cache/guard/`).", ""])
    write_result(args.name, text)
    write_json(args.name, {"results": results, "settings": vars(args)})


if __name__ == "__main__":
    main()
