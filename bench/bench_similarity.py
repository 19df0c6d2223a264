"""Benchmark of ``zkd similarity`` on the shipped Fashion-MNIST teacher (part of ``make bench``).

Scores, against the teacher's BatchNorm statistics:

* real data: Fashion-MNIST train and test;
* shifted real data: test images flipped left-right (inside the teacher's training augmentation), rotated by
  90 degrees, and inverted (negative);
* Gaussian noise in normalized space;
* synthetic shards of every synthesis method (``zeroshot_kd.synthesis``), made here with a small budget;

then, when calibration is available (``zeroshot_kd.quant.pipeline``), calibrates a W4A4 student on each
calibration set that ``zkd calibrate`` can read (real train, noise, every synthetic set) and reports the
Spearman rank correlation between the similarity score and the student's test accuracy.

Writes ``bench/results/similarity.md`` (the table for the README), ``similarity.json`` and ``similarity.png``.

Usage::

    python bench/bench_similarity.py                   # defaults below; ~15 min on 2 busy CPU cores
    python bench/bench_similarity.py --quick           # smaller samples and budgets, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.charts import markdown_table, save_png  # noqa: E402
from zeroshot_kd.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from zeroshot_kd.runtime import resolve_device  # noqa: E402
from zeroshot_kd.similarity import (HEADLINE, compute_signature, make_similarity_dataset, report_chart,  # noqa: E402
                                    report_markdown, similarity_report, spearman)


def shared_sets(log: list[str]) -> dict[str, str]:
    """The synthetic sets every benchmark shares (``bench/common.py``; made by bench_synthesis.py under make bench)."""
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        import common  # type: ignore[import-not-found]
    except ImportError:
        return {}
    out: dict[str, str] = {}
    for method, settings in common.SHARD_SETTINGS.items():
        out[method] = str(common.shards(method))
        log.append(f"{method}: shared bench set {out[method]} ({common.NUM_IMAGES} images, {settings or 'defaults'})")
    return out


def synthetic_sets(teacher: Any, work: Path, num_images: int, iterations: int, device: str,
                   log: list[str], skip: Sequence[str] = ()) -> dict[str, str]:
    """Make (or reuse) one small shard folder per synthesis method not in ``skip``; returns method -> folder."""
    try:
        from zeroshot_kd.synthesis import METHODS, synthesize
    except ImportError:
        log.append("synthesis is not available: no synthetic rows")
        return {}
    out: dict[str, str] = {}
    for method in [m for m in METHODS if m not in skip]:
        folder = work / f"synth-{method}"
        manifest = folder / "manifest.json"
        reuse = False
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            reuse = (m.get("teacher", {}).get("weights_sha256") == teacher.weights_sha256
                     and m.get("num_images") == num_images
                     and (method == "gaussian" or (m.get("hyperparameters") or {}).get("iterations") == iterations))
        t = time.perf_counter()
        if not reuse:
            kwargs: dict[str, Any] = {}
            if method != "gaussian":
                kwargs["iterations"] = iterations
            if method == "adi":
                kwargs["student"] = "zeroshot_kd.models:cifar_resnet"
            try:
                synthesize(folder, teacher=teacher, method=method, num_images=num_images,
                           batch_size=min(64, num_images), device=device, overwrite=True, progress=False, **kwargs)
            except Exception as e:  # one failing method must not sink the whole benchmark
                log.append(f"synthesis {method} failed: {type(e).__name__}: {e}")
                continue
            log.append(f"synthesized {num_images} {method} images in {time.perf_counter() - t:.0f}s")
        out[method] = str(folder)
    return out


def calibration_accuracy(teacher: Any, source: str, num_images: int, eval_images: int,
                         device: torch.device) -> tuple[float, float]:
    """Test top-1 (percent) of a W4A4 student calibrated (ranges only, no reconstruction) on ``source``, and of the
    teacher on the same test images."""
    from zeroshot_kd.quant.modules import QuantConfig
    from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student

    opts = CalibrationOptions(data=source, num_images=num_images, holdout=0, eval_data="fashion-mnist:test",
                              eval_images=eval_images, recon=False, progress=False)
    result = calibrate_student(teacher, QuantConfig(w_bits=4, a_bits=4), opts, device)
    return float(result.summary["student_top1"]), float(result.summary["teacher_top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-images", type=int, default=1000, help="images per real/shifted/noise set")
    ap.add_argument("--synth-images", type=int, default=64, help="images per synthesis method")
    ap.add_argument("--synth-iterations", type=int, default=100, help="optimization steps per synthetic batch")
    ap.add_argument("--calib-images", type=int, default=64, help="calibration images per W4A4 student")
    ap.add_argument("--eval-images", type=int, default=1000, help="Fashion-MNIST test images for W4A4 accuracy")
    ap.add_argument("--no-calibration", action="store_true", help="skip the W4A4 rank correlation")
    ap.add_argument("--own-shards", action="store_true",
                    help="synthesize small private sets (--synth-images/--synth-iterations) for every method instead "
                         "of using the shared bench sets of bench/common.py (which also lack adi)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "cache" / "similarity"),
                    help="folder for the private synthetic shards")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where similarity.md/json/png go")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="small samples and budgets (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.num_images, args.synth_images, args.synth_iterations = 256, 64, 60
        args.calib_images, args.eval_images = 64, 500
        args.own_shards = True

    device = resolve_device(args.device)
    teacher = load_teacher(device=device)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    n = args.num_images

    sets: list[tuple[str, str, str, list[str]]] = [  # name, kind, source, transforms
        ("fmnist-train", "real", "fashion-mnist:train", []),
        ("fmnist-test", "real", "fashion-mnist:test", []),
        ("test-hflip", "shifted (flip, in training augmentation)", "fashion-mnist:test", ["hflip"]),
        ("test-rot90", "shifted (rotated 90 deg)", "fashion-mnist:test", ["rot90"]),
        ("test-inverted", "shifted (negative)", "fashion-mnist:test", ["invert"]),
        ("gaussian-noise", "noise", f"gaussian:{n}", []),
    ]
    synthetic = {} if args.own_shards else shared_sets(log)
    synthetic.update(synthetic_sets(teacher, work, args.synth_images, args.synth_iterations, str(device), log,
                                    skip=list(synthetic)))
    for method, folder in synthetic.items():
        sets.append((f"synth-{method}", f"synthetic ({method})", folder, []))

    signatures, kinds, speed = [], {}, {}
    for name, kind, source, tf in sets:
        ds = make_similarity_dataset(source, teacher.spec, num_images=n, transforms=tf)
        t = time.perf_counter()
        sig = compute_signature(teacher, ds, name, source=source + (f" ({','.join(tf)})" if tf else ""),
                                batch_size=256, device=device)
        speed[name] = sig.count / (time.perf_counter() - t)
        signatures.append(sig)
        kinds[name] = kind
    report = similarity_report(teacher, signatures)

    accuracy: dict[str, float] = {}
    teacher_top1 = None
    rho = None
    if not args.no_calibration:
        try:
            import zeroshot_kd.quant.pipeline  # noqa: F401
        except ImportError:
            log.append("calibration is not available: no W4A4 rank correlation")
        else:
            for name, kind, source, tf in sets:
                if tf or name == "fmnist-test":  # shifted sets are not readable by calibrate; test is the eval set
                    continue
                t = time.perf_counter()
                try:
                    accuracy[name], teacher_top1 = calibration_accuracy(teacher, source, args.calib_images,
                                                                        args.eval_images, device)
                except Exception as e:
                    log.append(f"calibration on {name} failed: {type(e).__name__}: {e}")
                    continue
                log.append(f"W4A4 calibrated on {name}: top-1 {accuracy[name]:.2f}% "
                           f"({time.perf_counter() - t:.0f}s)")
            names = [e["name"] for e in report["datasets"] if e["name"] in accuracy]
            if len(names) >= 3:
                score = {e["name"]: e["scores"][HEADLINE] for e in report["datasets"]}
                rho = spearman([score[k] for k in names], [accuracy[k] for k in names])

    floor = max(e["scores"][HEADLINE] for e in report["datasets"] if kinds[e["name"]] == "real")
    rows = [[e["rank"], e["name"], kinds[e["name"]], e["images"], e["scores"]["bns"], e["scores"]["reverse"],
             e["scores"]["symmetric"], e["scores"]["l2"],
             accuracy.get(e["name"]), round(speed[e["name"]])]
            for e in report["datasets"]]
    t_src = teacher.source
    lines = [
        "# `zkd similarity` benchmark",
        "",
        f"Teacher: shipped `{t_src.get('spec')}` (Fashion-MNIST test accuracy {t_src.get('test_accuracy')}), weights "
        f"sha256 `{teacher.weights_sha256[:16]}...`; device {device}, torch {torch.__version__}. Exact whole-set "
        f"statistics at the input of {len(report['layers'])} BatchNorm layers; up to {n} images per real/shifted/noise "
        f"set; synthetic sets: " + ("see the notes" if not args.own_shards else
                                     f"{args.synth_images} images per method, {args.synth_iterations} iterations "
                                     "per batch") + ".",
        "",
        f"Headline score **bns** = mean over layers of the mean over channels of KL(N(mu_teacher, var_teacher) || "
        f"N(mu_data, var_data)); lower is closer. W4A4 top-1: student calibrated on the set ({args.calib_images} "
        f"images, ranges only, first/last layer 8-bit), tested on the first {args.eval_images} Fashion-MNIST test "
        f"images" + (f" (the float teacher scores {teacher_top1:.1f}% on them)." if teacher_top1 is not None else "."),
        "",
        f"Reading the scores: real data sits at the finite-sample floor (about {floor:.0e} with {n} images; smaller "
        "sets have a higher floor), so differences at that level are sampling noise, not signal.",
        "",
        markdown_table(["rank", "dataset", "kind", "images", "bns (headline)", "reverse", "symmetric", "l2",
                        "W4A4 top-1 %", "img/s"], rows, align="rllrrrrrrr"),
        "",
    ]
    if rho is not None:
        p = sum(accuracy.values()) / len(accuracy) / 100
        se = 100 * (p * (1 - p) / args.eval_images) ** 0.5
        lines += [f"Spearman rank correlation between the bns score and W4A4 top-1 over {len(accuracy)} calibration "
                  f"sets: **{rho:+.3f}** (negative = a lower score gives a more accurate student). The standard error "
                  f"of one top-1 figure on {args.eval_images} images is about {se:.1f} points, so only differences "
                  "larger than that carry a ranking.", ""]
    lines += ["![per-layer profile](similarity.png)", ""]
    if log:
        lines += ["Notes:", ""] + [f"- {m}" for m in log] + [""]
    lines += ["## Full report", ""] + report_markdown(report).split("\n", 2)[2:]
    atomic_write_bytes(out / "similarity.md", "\n".join(lines).encode())
    atomic_write_json(out / "similarity.json", {**report, "kinds": kinds, "w4a4_top1": accuracy,
                                                "teacher_top1_on_eval_images": teacher_top1,
                                                "spearman_bns_vs_w4a4": rho, "images_per_second": speed,
                                                "settings": vars(args)})
    save_png(report_chart(report), out / "similarity.png")
    print("\n".join(lines[:14 if rho is None else 16]))


if __name__ == "__main__":
    main()
