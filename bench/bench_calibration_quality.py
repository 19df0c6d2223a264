"""Does the similarity score predict calibration quality? (issue 14)

For every shipped teacher, a ladder of calibration sets whose quality varies by degrees (real training images;
each synthesis method at two iteration budgets; real images with 25/50/75% of them replaced by Gaussian noise;
inverted and 90-degree-rotated real images) is

1. scored by the similarity signature of the whole 256-image set (exact statistics) and by per-batch statistics at
   the calibration batch size (the raw signatures are cached, so every score form is recomputed from them), then
2. used by the library's ``calibrate_student`` (PTQ: the default pipeline of ``CalibrationOptions`` without
   reconstruction) at W3A3 (first/last layer 8-bit, the default) and W4A4 with every layer quantized
   (``keep_8bit`` none), with several seeds (the seed picks the calibration subset of the set), and each student
   is tested on the same 2000 real Fashion-MNIST test images.

Then every score form is correlated (Spearman, Kendall tau-b, bootstrap CIs) with the mean top-1 of each set.
Partial results are written after every calibration (``--resume`` reuses them), so an interrupted run still gives
a table; ``--analyze-only`` recomputes the table from the cached raw results.

Default budget (about 25 min on one core): 256 images per set, 128 calibration images, 2 seeds, synthesis budgets
of 20 and 100 iterations. Full size: ``--seeds 3 --calib-images 256 --set-images 1024 --budgets 200,2000``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from zeroshot_kd.shards import shard_name, write_manifest, write_shard  # noqa: E402

TEACHERS = ["fmnist_resnet14", "fmnist_mobilenetv2"]
SETTINGS = {  # name -> QuantConfig kwargs
    "W3A3": {"w_bits": 3, "a_bits": 3},
    "W4A4 all layers": {"w_bits": 4, "a_bits": 4, "keep_8bit": ()},
}
SYNTH_EXTRA = {"deepinversion": {"bn_weight": 0.1}}  # as bench/common.py's shared sets


def rel(folder: Path) -> str:
    """``shards:`` source of a folder, relative to the repository when inside it (no machine paths in results)."""
    return f"shards:{os.path.relpath(folder, ROOT)}"


def resolve(source: str) -> str:
    """A source from :func:`rel` made absolute again (the benchmark may run from any folder)."""
    path = Path(source.split(":", 1)[1])
    return f"shards:{path if path.is_absolute() else ROOT / path}"


def _stack(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack([x.float() for x in xs]), torch.tensor([int(y) for y in ys])


def write_set(folder: Path, teacher: Any, x: torch.Tensor, y: torch.Tensor, description: str) -> str:
    """Write images as a one-shard zkd shard folder (so ``calibrate`` reads it as ``shards:DIR``)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = [f"{i:06d}" for i in range(x.shape[0])]
    sha = write_shard(folder / shard_name(0), keys, x, y.tolist(), teacher.spec)
    write_manifest(folder, {"method": "bench-set", "description": description, "num_images": int(x.shape[0]),
                            "teacher": teacher.to_dict(), "input_spec": teacher.spec.to_dict(),
                            "shards": [{"file": shard_name(0), "count": int(x.shape[0]), "sha256": sha}]})
    return rel(folder)


def build_sets(teacher: Any, name: str, work: Path, n: int, budgets: list[int], log: list[str]) -> dict[str, dict]:
    """The calibration sets of one teacher: name -> {"source", "kind", "fraction_noise"}; cached in ``work``."""
    from zeroshot_kd.synthesis import synthesize
    from zeroshot_kd.similarity import TransformedDataset

    sets: dict[str, dict] = {}
    done = lambda f: (f / "manifest.json").is_file()  # noqa: E731
    real_dir = work / "real"
    real = make_dataset("fashion-mnist:train", teacher.spec, num_images=n, seed=0)
    rx, ry = _stack(real)
    if not done(real_dir):
        write_set(real_dir, teacher, rx, ry, f"{n} stratified fashion-mnist:train images (seed 0)")
    sets["real"] = {"source": rel(real_dir), "kind": "real"}
    methods = [("gaussian", None)] + [(m, b) for m in ("inception", "bns", "deepinversion") for b in budgets]
    for method, iters in methods:
        label = method if iters is None else f"{method}-{iters}"
        folder = work / label
        if not done(folder):
            t = time.perf_counter()
            hp = dict(SYNTH_EXTRA.get(method, {}))
            if iters is not None:
                hp["iterations"] = iters
            synthesize(folder, teacher=teacher, method=method, num_images=n, batch_size=64, device="cpu", seed=0,
                       overwrite=True, progress=False, **hp)
            log.append(f"{name}: synthesized {n} {label} images in {time.perf_counter() - t:.0f}s")
        sets[label] = {"source": rel(folder), "kind": "synthetic" if iters else "noise"}
    gx, gy = _stack(make_dataset(resolve(rel(work / "gaussian")), teacher.spec))
    for pct in (25, 50, 75):
        folder = work / f"mix-noise{pct}"
        if not done(folder):
            g = torch.Generator().manual_seed(pct)
            swap = torch.randperm(n, generator=g)[: n * pct // 100]
            mx, my = rx.clone(), ry.clone()
            mx[swap], my[swap] = gx[swap], gy[swap]
            write_set(folder, teacher, mx, my, f"real with {pct}% of the images replaced by gaussian noise")
        sets[f"mix-noise{pct}"] = {"source": rel(folder), "kind": "mixture", "fraction_noise": pct / 100}
    for tf in ("invert", "rot90"):
        folder = work / f"real-{tf}"
        if not done(folder):
            sx, sy = _stack(TransformedDataset(real, [tf], teacher.spec))
            write_set(folder, teacher, sx, sy, f"real images, {tf}")
        sets[f"real-{tf}"] = {"source": rel(folder), "kind": "shifted"}
    return sets


def signatures(teacher: Any, sets: dict[str, dict], work: Path, batch_size: int) -> Path:
    """Exact and per-batch (calibration batch size) signatures of every set, cached as one ``.pt`` file."""
    from zeroshot_kd.similarity import compute_signature, save_signatures

    path = work / f"signatures-b{batch_size}.pt"
    if path.is_file():
        return path
    sigs = []
    for label, s in sets.items():
        ds = make_dataset(resolve(s["source"]), teacher.spec)
        sigs.append(compute_signature(teacher, ds, label, source=s["source"], batch_size=256))
        sigs.append(compute_signature(teacher, ds, f"{label}@batch", source=s["source"], batch_size=batch_size,
                                      per_batch=True))
    save_signatures(path, sigs)
    return path


def calibrate_cell(teacher: Any, source: str, setting: str, seed: int, calib_images: int, test: Any) -> dict:
    """Top-1 (percent) on ``test`` of a student calibrated (PTQ, no reconstruction) on ``source``."""
    from zeroshot_kd.evaluate import evaluate_model
    from zeroshot_kd.quant.modules import QuantConfig
    from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student

    t = time.perf_counter()
    opts = CalibrationOptions(data=source, num_images=calib_images, holdout=0, seed=seed, recon=False,
                              progress=False)
    result = calibrate_student(teacher, QuantConfig(**SETTINGS[setting]), opts, torch.device("cpu"))
    ev = evaluate_model(result.student, test, "cpu", progress=False)
    return {"top1": ev["top1"], "seconds": time.perf_counter() - t,
            "timing": {k: round(v, 1) for k, v in result.report.get("timing", {}).items()}}


OUTCOMES = list(SETTINGS) + ["mean of both"]
TARGET = 0.8  # |Spearman| the issue asks of the headline score


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else float("nan")
    return m, sd


def analyze(raw: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """Every score form (exact and per-batch statistics) vs mean top-1, per teacher and setting."""
    from zeroshot_kd.similarity import (PREDICTOR, SCORE_FORMS, VERDICT_CLOSE, VERDICT_FAR, correlation,
                                        derive_verdict_thresholds, load_signatures, noise_ceiling, predicted_ranks,
                                        score_forms, teacher_signature, verdict)

    analysis: dict[str, Any] = {}
    for tname, entry in raw["teachers"].items():
        teacher = load_teacher(tname, device="cpu")
        sigs = {s.name: s for s in load_signatures(ROOT / entry["signatures"], teacher=teacher)}
        ref = teacher_signature(teacher)
        labels = [k for k in entry["sets"] if any(c.startswith(k + "|") for c in entry["cells"])]
        scores: dict[str, dict[str, float]] = {k: {} for k in labels}
        for k in labels:
            for form, v in score_forms(ref, sigs[k]).items():
                scores[k][form] = v
            for form, v in score_forms(ref, sigs[f"{k}@batch"]).items():
                scores[k][f"{form}@batch"] = v
        top1: dict[str, dict[str, list[float]]] = {k: {} for k in labels}
        for key, c in entry["cells"].items():
            label, setting, _ = key.split("|")
            if label in top1:
                top1[label].setdefault(setting, []).append(c["top1"])
        means = {k: {st: _mean_sd(v)[0] for st, v in top1[k].items()} for k in labels}
        for k in labels:
            if all(st in means[k] for st in SETTINGS):
                means[k]["mean of both"] = sum(means[k][st] for st in SETTINGS) / len(SETTINGS)
        sds = [_mean_sd(v)[1] for k in labels for v in top1[k].values() if len(v) > 1]
        corr: dict[str, dict[str, Any]] = {}
        for form in scores[labels[0]] if labels else []:
            corr[form] = {}
            for outcome in OUTCOMES:
                have = [k for k in labels if outcome in means[k] and scores[k][form] == scores[k][form]]
                if len(have) >= 3:
                    corr[form][outcome] = correlation([scores[k][form] for k in have],
                                                      [means[k][outcome] for k in have])
        groups = {st: [top1[k].get(st, []) for k in labels] for st in SETTINGS}
        groups["mean of both"] = [[sum(v) / len(v) for v in zip(*(top1[k].get(st, []) for st in SETTINGS))]
                                  for k in labels]
        # seed j picks the calibration subset of every set the same way: a shared seed effect is not noise
        aligned = len({len(v) for g in groups.values() for v in g}) == 1
        ceiling = {o: noise_ceiling(g, aligned=aligned) for o, g in groups.items()}
        ranks = predicted_ranks({k: scores[k][PREDICTOR] for k in labels})
        analysis[tname] = {
            "fp32_top1": entry.get("fp32_top1"), "scores": scores, "top1": top1, "mean_top1": means,
            "seed_sd": sum(sds) / len(sds) if sds else None, "correlations": corr, "noise_ceiling": ceiling,
            "predicted_rank": ranks, "verdict": {k: verdict(scores[k][PREDICTOR]) for k in labels},
            "kinds": {k: entry["sets"][k]["kind"] for k in labels}}
    # the form that predicts best: highest worst-case -Spearman over the (teacher, outcome) cells that can show a
    # correlation of TARGET at all (noise ceiling >= TARGET); a cell below it ranks seed noise, not score forms
    forms = sorted({f for a in analysis.values() for f in a["correlations"]})
    measurable = [(t, o) for t, a in analysis.items() for o in OUTCOMES
                  if a["noise_ceiling"].get(o, float("nan")) >= TARGET]

    def worst(form: str) -> float:
        """Worst case over the measurable cells of -Spearman (higher = predicts better everywhere)."""
        vals = [-analysis[t]["correlations"].get(form, {}).get(o, {}).get("spearman", float("nan"))
                for t, o in measurable]
        return min(vals) if vals and all(v == v for v in vals) else float("-inf")

    ranking = sorted(forms, key=worst, reverse=True)
    thresholds = {}
    for form in dict.fromkeys([PREDICTOR] + ranking[:1]):
        table = [[(a["scores"][k][form], a["mean_top1"]["real"]["mean of both"] - a["mean_top1"][k]["mean of both"])
                  for k in a["scores"] if "mean of both" in a["mean_top1"].get(k, {})]
                 for a in analysis.values() if "mean of both" in a["mean_top1"].get("real", {})]
        thresholds[form] = dict(zip(("close_below", "far_from"), derive_verdict_thresholds(table)))
    summary = {"best_form": ranking[0] if ranking else None, "worst_case_minus_spearman": {f: worst(f) for f in forms},
               "predictor": PREDICTOR, "measurable_cells": [f"{t} {o}" for t, o in measurable],
               "derived_thresholds": thresholds, "library_thresholds": [VERDICT_CLOSE, VERDICT_FAR]}
    atomic_write_json(out / "calibration_quality.json", {"settings": raw.get("settings"), "log": raw.get("log"),
                                                          "analysis": analysis, "summary": summary,
                                                          "cells": {t: e["cells"] for t, e in raw["teachers"].items()},
                                                          "sets": {t: e["sets"] for t, e in raw["teachers"].items()}})
    text = markdown(raw, analysis, ranking, worst, SCORE_FORMS, PREDICTOR, summary)
    atomic_write_bytes(out / "calibration_quality.md", text.encode())
    print(text)


def _fmt_ci(c: dict[str, Any], name: str) -> str:
    if not c:
        return ""
    lo, hi = c[f"{name}_bootstrap"]
    return f"{c[name]:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(raw: dict[str, Any], analysis: dict[str, Any], ranking: list[str], worst: Any,
             definitions: dict[str, str], predictor: str, summary: dict[str, Any]) -> str:
    """The result page: per-teacher set table, then the correlation of every form with top-1."""
    from zeroshot_kd.charts import markdown_table

    st = raw.get("settings") or {}
    lines = ["# Does the similarity score predict calibration quality? (issue 14)", "",
             f"Budget of this run: {st.get('set_images')} images per calibration set, synthesis budgets "
             f"{st.get('budgets')} iterations per 64-image batch, {st.get('calib_images')} calibration images per "
             f"student (the seed picks them from the set), {st.get('seeds')} seeds, calibration batch size "
             f"{st.get('batch_size')}; top-1 on {st.get('eval_images')} real Fashion-MNIST test images (stratified, "
             "seed 0). PTQ = `calibrate_student` with the default `CalibrationOptions` (no reconstruction, no "
             "fine-tuning). W3A3 keeps the first and last layer 8-bit (the default); `W4A4 all layers` = "
             "`keep_8bit` none. One shared 2-core CPU. Full size: `python bench/bench_calibration_quality.py "
             "--set-images 1024 --calib-images 256 --seeds 3 --budgets 200,2000`.", ""]
    for tname, a in analysis.items():
        lines += [f"## {tname} (FP32 top-1 {a['fp32_top1']:.2f}% on these images)", "",
                  f"Mean seed-to-seed standard deviation of one top-1 figure: {a['seed_sd']:.2f} points." if
                  a["seed_sd"] is not None else "One seed per cell: seed noise not measured.", ""]
        rows = []
        for k in sorted(a["scores"], key=lambda k: a["predicted_rank"][k]):
            row: list[Any] = [a["predicted_rank"][k], k, a["kinds"][k], a["scores"][k][predictor],
                              a["scores"][k]["bns"], a["verdict"][k]]
            for s in SETTINGS:
                v = a["top1"][k].get(s, [])
                m, sd = _mean_sd(v) if v else (float("nan"), float("nan"))
                row.append(f"{m:.2f}" + (f" ± {sd:.2f}" if sd == sd else "") if v else "")
            rows.append(row)
        lines += [markdown_table(["predicted rank", "set", "kind", f"{predictor} (predictor)", "bns", "verdict"]
                                 + [f"{s} top-1 %" for s in SETTINGS], rows), ""]
    lines += ["## Which score form predicts top-1", "",
              "Spearman (Kendall tau-b) between each form and the mean top-1 over seeds, with 95% bootstrap "
              "intervals (2000 resamples of the sets; Fisher-z intervals in the JSON). Negative = a lower score "
              "gives a more accurate student. `@batch` = per-batch statistics at the calibration batch size. "
              "Sorted by the worst case over the measurable cells (the selection criterion, below). The last row, "
              "*noise ceiling*, is the largest |correlation| any noise-free score could reach with these seed "
              "means: sqrt of their reliability (the share of the variance of the set means that is not seed "
              "noise, seed effects shared by all sets removed; `zeroshot_kd.similarity.noise_ceiling`). Where it "
              f"is below {TARGET} the target cannot be shown with this many seeds, whatever the score.", ""]
    header = ["form"] + [f"{t} {o}" for t in analysis for o in OUTCOMES]
    rows = []
    for form in ranking:
        row = [f"**{form}**" if form == predictor else form]
        for a in analysis.values():
            for o in OUTCOMES:
                c = a["correlations"].get(form, {}).get(o)
                row.append(f"{_fmt_ci(c, 'spearman')} ({c['kendall']:+.2f})" if c else "")
        rows.append(row)
    ceil_row = ["*noise ceiling*"] + [f"{a.get('noise_ceiling', {}).get(o, float('nan')):.2f}"
                                      for a in analysis.values() for o in OUTCOMES]
    rows.append(ceil_row)
    if ranking:
        lines += [f"Cells that can show |Spearman| >= {TARGET} (noise ceiling >= {TARGET}): "
                  f"{', '.join(summary['measurable_cells']) or 'none'}. Best form by the worst case over them: "
                  f"**{ranking[0]}** (worst Spearman {-worst(ranking[0]):+.2f}); the library's predictor "
                  f"(`zeroshot_kd.similarity.PREDICTOR`) is **{predictor}** (worst Spearman {-worst(predictor):+.2f}). "
                  f"Target: |Spearman| >= {TARGET} on both teachers.", ""]
        th = "; ".join(f"`{f}`: close below {v['close_below']:.3g}, far from {v['far_from']:.3g}"
                       for f, v in summary["derived_thresholds"].items())
        lines += [f"Verdict thresholds derived from this run (`derive_verdict_thresholds`: close = every set below "
                  f"it lost <= 3 points of the mean top-1 against real data on each teacher; far = fewest sets "
                  f"misclassified as losing >= 5): {th}. Library: close below {summary['library_thresholds'][0]}, "
                  f"far from {summary['library_thresholds'][1]}.", ""]
    lines += [markdown_table(header, rows), "", "Forms: " + "; ".join(f"`{k}`: {v}" for k, v in
                                                                      definitions.items()) + ".", ""]
    if raw.get("log"):
        lines += ["Notes:", ""] + [f"- {m}" for m in raw["log"]] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", default=",".join(TEACHERS), help="shipped teachers (those missing are skipped)")
    ap.add_argument("--set-images", type=int, default=128, help="images per calibration set")
    ap.add_argument("--calib-images", type=int, default=64, help="calibration images per student (seeded subset)")
    ap.add_argument("--batch-size", type=int, default=32, help="calibration batch size (CalibrationOptions default)")
    ap.add_argument("--budgets", default="10,50", help="synthesis iteration budgets")
    ap.add_argument("--seeds", type=int, default=2, help="calibration seeds per cell")
    ap.add_argument("--eval-images", type=int, default=2000, help="real test images (stratified, seed 0)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "cache" / "calibration_quality"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore the partial results of an earlier run")
    ap.add_argument("--analyze-only", action="store_true", help="only recompute the table from cached results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = work / "raw.json"
    raw: dict[str, Any] = {"teachers": {}, "log": []}
    if raw_path.is_file() and not args.fresh:
        raw = json.loads(raw_path.read_text())
    if args.analyze_only:
        analyze(raw, out, args)
        return
    raw["settings"] = {k: v for k, v in vars(args).items() if k not in ("work", "out", "fresh", "analyze_only")}
    budgets = [int(b) for b in args.budgets.split(",") if b]
    t_start = time.perf_counter()
    from zeroshot_kd.evaluate import evaluate_model

    ready = []
    for tname in args.teachers.split(","):
        if not (ROOT / "assets" / f"{tname}.pt").is_file():
            raw["log"].append(f"{tname}: not shipped in assets/, skipped")
            continue
        teacher = load_teacher(tname, device="cpu")
        twork = work / tname
        log: list[str] = []
        sets = build_sets(teacher, tname, twork, args.set_images, budgets, log)
        sig_path = signatures(teacher, sets, twork, args.batch_size)
        test = make_dataset("fashion-mnist:test", teacher.spec, num_images=args.eval_images, seed=0)
        entry = raw["teachers"].setdefault(tname, {"cells": {}})
        entry.update(sets=sets, signatures=os.path.relpath(sig_path, ROOT), weights_sha256=teacher.weights_sha256,
                     fp32_top1=evaluate_model(teacher.model, test, "cpu", progress=False)["top1"])
        raw["log"].extend(log)
        atomic_write_json(raw_path, raw)
        ready.append((tname, teacher, sets, test))
    # seed-major, teachers interleaved: an interrupted run has every set of every teacher at least once
    for seed in range(args.seeds):
        for tname, teacher, sets, test in ready:
            entry = raw["teachers"][tname]
            for setting in SETTINGS:
                for label, s in sets.items():
                    key = f"{label}|{setting}|{seed}"
                    if key in entry["cells"]:
                        continue
                    try:
                        entry["cells"][key] = calibrate_cell(teacher, resolve(s["source"]), setting, seed,
                                                             args.calib_images, test)
                    except Exception as e:  # one failing cell must not sink the benchmark
                        raw["log"].append(f"{tname} {key}: {type(e).__name__}: {e}")
                        continue
                    c = entry["cells"][key]
                    print(f"[{time.perf_counter() - t_start:6.0f}s] {tname} {key}: top-1 {c['top1']:.2f} "
                          f"({c['seconds']:.0f}s)", flush=True)
                    atomic_write_json(raw_path, raw)
    raw["seconds"] = raw.get("seconds", 0) + time.perf_counter() - t_start
    atomic_write_json(raw_path, raw)
    analyze(raw, out, args)


if __name__ == "__main__":
    main()
