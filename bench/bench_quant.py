"""Low-bit students of a Fashion-MNIST teacher (default: the shipped ResNet-14) by calibration data, bits, method.

For each calibration source -- 1024 real training images, ``gaussian:1024``, and 1024 synthetic images of each
synthesis method (``inception``, ``bns``, ``deepinversion``; the shared shard cache of ``bench/common.py``) -- this
calibrates students with the library pipeline (the code behind ``zkd calibrate``) and measures top-1 on the real
Fashion-MNIST test set (10,000 images), plus top-1 agreement with the FP32 teacher:

* main table: W8A8, W4A8, W4A4 range calibration (PTQ), W4A4 + block reconstruction (``--recon``);
* "where data and method matter": W3A3 and W4A4 with every layer quantized (``--keep-8bit none``), PTQ and recon;
* the wall time of each whole calibration run (data loading to finished student, evaluation excluded).

Every run is cached in ``bench/cache/quant/`` (keyed by teacher and settings), so an interrupted benchmark resumes.
Writes ``bench/results/quant.md`` (tables for the README / docs) and ``bench/results/quant.json``.

Usage::

    python bench/bench_quant.py                       # everything (~1 h on 2 CPU cores, plus shard synthesis)
    python bench/bench_quant.py --sources real,gaussian --no-extras
    python bench/bench_quant.py --quick               # 128 calibration / 1000 test images, 50 recon steps
    python bench/bench_quant.py --teacher fmnist_mobilenetv2 --name quant-mobilenetv2   # the depthwise teacher
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, markdown_table, shard_dir, shards, write_json, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_write_json  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.runtime import resolve_device  # noqa: E402

SOURCES = ["real", "gaussian", "inception", "bns", "deepinversion"]
SYNTHETIC = ["inception", "bns", "deepinversion"]


def source_string(name: str, n: int, teacher: str | None = None) -> str:
    """The ``--data`` string of a source; synthetic sets come from the shard cache (``[TEACHER-]METHOD-N``, else
    made)."""
    if name == "real":
        return "fashion-mnist:train"
    if name == "gaussian":
        return f"gaussian:{n}"
    cached = shard_dir(name, teacher, n)
    return f"shards:{cached if (cached / 'manifest.json').is_file() else shards(name, teacher)}"


def parse_sources(text: str, default_n: int) -> list[tuple[str, int]]:
    """``"real@1024,bns"`` -> [("real", 1024), ("bns", default_n)]."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, n = item.partition("@")
        if name not in SOURCES:
            raise SystemExit(f"unknown source {name!r}; use {', '.join(SOURCES)}")
        out.append((name, int(n) if n else default_n))
    return out


def run_one(teacher: Any, name: str, n: int, w: int, a: int, recon: bool, keep: str, args: argparse.Namespace,
            test_ds: Any, device: torch.device) -> dict[str, Any]:
    settings = {"teacher": teacher.weights_sha256, "source": name, "n": n, "w": w, "a": a, "recon": recon,
                "keep": keep, "recon_iters": args.recon_iters if recon else 0, "eval": len(test_ds), "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = CACHE / "quant" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    src = source_string(name, n, args.teacher)
    t0 = time.perf_counter()
    res = calibrate_student(teacher, QuantConfig(w, a, keep_8bit=keep),
                            CalibrationOptions(data=src, num_images=n, holdout=0, recon=recon,
                                               recon_iters=args.recon_iters, progress=False), device)
    seconds = time.perf_counter() - t0
    ev = evaluate_model(res.student, test_ds, device, teacher=teacher.model, progress=False)
    out = {**settings, "top1": ev["top1"], "agreement": ev["agreement"], "calibrate_s": seconds,
           "convention": res.report["config"]["convention"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, out)
    print(f"[bench] {name:14s} W{w}A{a} {'recon' if recon else 'ptq  '} keep={keep:10s} top1 {ev['top1']:.2f} "
          f"agree {ev['agreement']:.2f} ({seconds:.0f}s)", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", default=",".join(SOURCES),
                    help="comma list of " + ", ".join(SOURCES) + "; NAME@N uses N calibration images")
    ap.add_argument("--num-images", type=int, default=1024, help="calibration images per student")
    ap.add_argument("--eval-images", type=int, default=10000, help="Fashion-MNIST test images")
    ap.add_argument("--recon-iters", type=int, default=500, help="reconstruction steps per block")
    ap.add_argument("--no-extras", action="store_true", help="skip the W3A3 / all-layers table")
    ap.add_argument("--extras-only", action="store_true", help="run only the W3A3 / all-layers table (no files)")
    ap.add_argument("--extras-ptq-only", action="store_true", help="W3A3 / all-layers table without recon columns")
    ap.add_argument("--quick", action="store_true", help="small smoke run (numbers not meaningful)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", default=None, help="a built-in teacher (default: the shipped fmnist_resnet14)")
    ap.add_argument("--name", default="quant", help="result files bench/results/NAME.md and NAME.json")
    args = ap.parse_args()
    if args.quick:
        args.num_images, args.eval_images, args.recon_iters = 128, 1000, 50
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, device=device)
    test_ds = make_dataset("fashion-mnist:test", teacher.spec, num_images=args.eval_images)
    fp = evaluate_model(teacher.model, test_ds, device, progress=False)["top1"]
    sources = parse_sources(args.sources, args.num_images)
    main_cols = [("W8A8", 8, 8, False), ("W4A8", 4, 8, False), ("W4A4", 4, 4, False), ("W4A4 + recon", 4, 4, True)]
    results: dict[str, dict[str, dict]] = {}
    for s, n in ([] if args.extras_only else sources):
        for label, w, a, recon in main_cols:
            results.setdefault(f"{s}@{n}", {})[label] = run_one(teacher, s, n, w, a, recon, "first,last", args,
                                                               test_ds, device)
    extra_cols = [("W3A3", 3, 3, False, "first,last"), ("W3A3 + recon", 3, 3, True, "first,last"),
                  ("W4A4 all layers", 4, 4, False, "none"), ("W4A4 all layers + recon", 4, 4, True, "none")]
    if args.extras_ptq_only:
        extra_cols = [c for c in extra_cols if not c[3]]
    extras: dict[str, dict[str, dict]] = {}
    if not args.no_extras:
        for s, n in sources:
            for label, w, a, recon, keep in extra_cols:
                extras.setdefault(f"{s}@{n}", {})[label] = run_one(teacher, s, n, w, a, recon, keep, args, test_ds,
                                                                  device)

    if args.extras_only:
        return

    def cell(r: dict) -> str:
        return f"{r['top1']:.2f}"

    lines = [f"# Quantized students of {teacher.source.get('spec', 'the shipped teacher')} (Fashion-MNIST, "
             f"{len(test_ds)} real test images)", "",
             f"FP32 teacher top-1: **{fp:.2f}%**. Calibration data `NAME@N`: N images of that source; ranges = per-channel Lp "
             f"(p=2.4) weight search + per-tensor MSE activation search; recon = block reconstruction "
             f"(AdaRound + QDrop, {args.recon_iters} steps/block, batch 32). Convention: "
             f"{next(iter(results.values()))['W4A4']['convention']}.", "",
             "## Top-1 (%) by calibration data", ""]
    keys = list(results)
    header = ["calibration data", "FP32"] + [c[0] for c in main_cols]
    rows = [[k, f"{fp:.2f}"] + [cell(results[k][c[0]]) for c in main_cols] for k in keys]
    lines.append(markdown_table(header, rows))
    lines += ["## Top-1 agreement with the FP32 teacher (%)", ""]
    rows = [[k] + [f"{results[k][c[0]]['agreement']:.2f}" for c in main_cols] for k in keys]
    lines.append(markdown_table(["calibration data"] + [c[0] for c in main_cols], rows))
    lines += ["## Wall time of the whole calibrate run (s)", ""]
    rows = [[k] + [f"{results[k][c[0]]['calibrate_s']:.0f}" for c in main_cols] for k in keys]
    lines.append(markdown_table(["calibration data"] + [c[0] for c in main_cols], rows))
    # targets
    lines += ["## Targets", ""]
    checks = []
    for k in keys:
        if k.split("@")[0] in SYNTHETIC + ["gaussian"]:
            d = fp - results[k]["W8A8"]["top1"]
            checks.append([f"W8A8 PTQ on {k} within 0.3 of FP32", f"{results[k]['W8A8']['top1']:.2f} ({-d:+.2f})",
                           "met" if d <= 0.3 else "MISSED"])
    for k in keys:
        name, n = k.split("@")
        ref_key = "real@1024" if "real@1024" in results else f"real@{n}"  # the target's reference
        gauss_key = "gaussian@1024" if "gaussian@1024" in results else f"gaussian@{n}"
        if name not in ("bns", "deepinversion") or ref_key not in results:
            continue
        for col in ("W4A4", "W4A4 + recon"):
            ref, got = results[ref_key][col]["top1"], results[k][col]["top1"]
            gauss = results.get(gauss_key, {}).get(col, {}).get("top1")
            ok = ref - got <= 1.0 and (gauss is None or got > gauss + 1.0)
            checks.append([f"{col} on {k} within 1.0 of {ref_key}, clearly above {gauss_key}",
                           f"{got:.2f} vs {ref:.2f} ({got - ref:+.2f})" + ("" if gauss is None else
                                                                          f"; gaussian {gauss:.2f}"),
                           "met" if ok else "MISSED"])
    lines.append(markdown_table(["target", "measured", "status"], checks))
    if extras:
        lines += ["## Where data and method matter (top-1 %)", "",
                  "`all layers` = `--keep-8bit none`: first conv, last linear and the network input quantized too.", ""]
        rows = [[k] + [cell(extras[k][c[0]]) for c in extra_cols] for k in extras]
        lines.append(markdown_table(["calibration data"] + [c[0] for c in extra_cols], rows))
    lines += ["Depthwise networks: `python bench/bench_quant.py --teacher fmnist_mobilenetv2 --name quant-mobilenetv2` "
              "(the shipped small MobileNetV2).", "",
              f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, device {device}, "
              f"torch {torch.__version__}.", ""]
    write_result(args.name, "\n".join(lines))
    write_json(args.name, {"fp32": fp, "main": results, "extras": extras,
                                                "settings": vars(args)})


if __name__ == "__main__":
    main()
