"""Block reconstruction (issue 11): speed against its floor, and accuracy against iterations, QDrop vs GENIE-M.

Two tables, both on real Fashion-MNIST test images and one CPU thread:

* **speed**: for each shipped teacher, the cost of one reconstruction step of every block (``step_s``: sampling,
  QDrop masks, forward, loss with the rounding regularizer, backward, the optimizer steps) against two floors
  measured in the same run on the same minibatch: ``floor`` = one bare forward+backward of the block in its
  training state (soft AdaRound rounding, QDrop masks, MSE loss; no sampling, no regularizer, no optimizer), and
  ``float floor`` = one forward+backward of the float block with trainable weights. Ratios per block and their mean.
* **accuracy vs iterations**: fmnist_resnet14 W3A3 and fmnist_mobilenetv2 W4A4 (8-bit first/last layers), real and
  gaussian calibration images, reconstruction at ``--iters`` steps per block in ``qdrop`` and ``genie`` mode, after
  the library's PTQ ranges (``zkd calibrate`` defaults, no reconstruction), at each rounding learning rate of
  ``--lrs`` (``rule`` = :func:`~zeroshot_kd.quant.recon.round_lr`, the default, ``1e-3`` = the papers' fixed
  rate, the default before). ``--sources`` also takes synthetic shards (``bns@50`` = 256 BNS images at 50 synthesis
  steps) and ``--bits`` another setting. Each cell: top-1 and CPU seconds of the reconstruction.

Small settings for a shared CPU (defaults: 256 calibration images, 2000 test images, iterations 100/300/1000).
Full size: ``--images 1024 --eval-images 10000 --iters 100 300 1000 3000``. Every cell is cached in
``bench/cache/recon/``; results are rewritten after each cell (partial tables while it runs). Writes
``bench/results/recon.md`` and ``recon.json``.

Usage::

    python bench/bench_recon.py
    python bench/bench_recon.py --teachers fmnist_resnet14 --sources real --iters 100 300
    python bench/bench_recon.py --teachers fmnist_mobilenetv2 --bits 3 3 --sources real bns@50 deepinversion@1000 \
        --iters 100 --name recon-lr-w3
"""

from __future__ import annotations

import argparse
import copy
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
from bench_lowbit import SHARD_METHODS  # noqa: E402  (the synthesis settings of the low-bit grid's shards)
from common import CACHE, RESULTS, markdown_table, write_result  # noqa: E402

from zeroshot_kd import load_teacher, synthesize  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_write_json  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.quant.recon import RECON_MODES, ReconConfig, reconstruct, round_lr  # noqa: E402

CASES = {"fmnist_resnet14": ("W3A3", 3, 3), "fmnist_mobilenetv2": ("W4A4", 4, 4)}
KEEP_8BIT = "first,last"  # --keep-8bit
CPU = torch.device("cpu")
VERSION = 2  # bump to invalidate cached cells
SPEED_CODE = 2  # bump when the step loop changes (re-times the speed table only)


def data_source(source: str, n: int, tname: str) -> str:
    """``real``, ``gaussian`` or ``METHOD@ITERS`` (n synthesized images of this teacher, cached in bench/cache)."""
    if source == "real":
        return "fashion-mnist:train"
    if source == "gaussian":
        return f"gaussian:{n}"
    method, _, iters = source.partition("@")
    out = CACHE / "recon" / f"{tname}-{method}-{n}-it{iters}"
    if not (out / "manifest.json").is_file():
        synthesize(out, teacher=tname, method=method, num_images=n, batch_size=64, device="cpu", seed=0,
                   resume=out.exists(), progress=False, iterations=int(iters), **SHARD_METHODS[method])
    return f"shards:{out}"


def ptq(teacher: Any, tname: str, source: str, n: int) -> tuple[Any, torch.Tensor, float]:
    """The PTQ student (library defaults, no reconstruction), its calibration images and the seconds it took."""
    label, w, a = CASES[tname]
    data = data_source(source, n, tname)
    t0 = time.perf_counter()
    opts = CalibrationOptions(data=data, num_images=n, holdout=0, recon=False, progress=False)
    res = calibrate_student(teacher, QuantConfig(w, a, keep_8bit=KEEP_8BIT), opts, CPU)
    seconds = time.perf_counter() - t0
    ds = make_dataset(data, teacher.spec, num_images=n, seed=0)
    cal_x = torch.stack([ds[i][0] for i in range(n)]).float()
    return res, cal_x, seconds


CACHED_ONLY = False  # --cached-only: render the tables from cached cells, run nothing


def cell(key_d: dict, fn) -> dict | None:
    key = hashlib.sha256(json.dumps(key_d, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / "recon" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if CACHED_ONLY:
        return None
    out = {**key_d, **fn()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    return out


def lr_value(lr: str, iters: int) -> float:
    """``--lrs`` entry -> ReconConfig.lr_round: ``rule`` = round_lr(iters) (the library default), else the number."""
    return round_lr(iters) if lr == "rule" else float(lr)


def run_recon(base: Any, cal_x: torch.Tensor, mode: str, iters: int, test_ds: Any, teacher: Any,
              time_floor: int = 0, lr: str = "rule") -> dict:
    student = copy.deepcopy(base.student)
    batches = [cal_x[i:i + 128] for i in range(0, cal_x.shape[0], 128)]
    t0 = time.perf_counter()
    hist = reconstruct(student, base.fp_model, batches, CPU, ReconConfig(iters=iters, mode=mode,
                                                                         time_floor=time_floor,
                                                                         lr_round=lr_value(lr, iters)),
                       seed=0, progress=False)
    seconds = time.perf_counter() - t0
    ev = evaluate_model(student, test_ds, CPU, teacher=teacher.model, progress=False)
    return {"top1": ev["top1"], "agreement": ev["agreement"], "recon_s": seconds, "blocks": hist}


def render(rows_speed: list[dict], rows_acc: list[dict], fp: dict, ptq_rows: dict, args: argparse.Namespace) -> None:
    lines = ["# Block reconstruction: speed and accuracy vs iterations (issue 11)", "",
             f"Generated by `python bench/bench_recon.py` (torch {torch.__version__}, {platform.machine()}, "
             f"{torch.get_num_threads()} thread(s)); {args.images} calibration images, top-1 on "
             f"{args.eval_images} real Fashion-MNIST test images, batch 32, QDrop p = 0.5, lambda 0.01; rounding "
             "learning rate `rule` = 1e-3 * sqrt(20000 / iters) (the default), `1e-3` = the papers' fixed rate.", "",
             "## Speed: cost of one reconstruction step against its floor", "",
             "`step` = one full step (index sampling and QDrop masks on the device, forward, loss + rounding "
             "regularizer, backward, Adam steps, step clamping); `floor` = a bare forward+backward of the same block "
             "in its training state (soft rounding, QDrop masks, MSE loss) on the same minibatch; `float floor` = "
             "forward+backward of the float block. Milliseconds, qdrop mode, "
             f"{args.speed_iters} steps per block, floor timed over {args.floor_reps} passes.", ""]
    for r in rows_speed:
        blocks = r["blocks"]
        table = [[b["block"], b["layers"], f"{1e3 * b['step_s']:.2f}", f"{1e3 * b['floor_s']:.2f}",
                  f"{1e3 * b['float_floor_s']:.2f}", f"{b['ratio']:.2f}", f"{b['ratio_float']:.2f}"] for b in blocks]
        mean = sum(b["ratio"] for b in blocks) / len(blocks)
        mean_f = sum(b["ratio_float"] for b in blocks) / len(blocks)
        tot = sum(b["step_s"] for b in blocks) / sum(b["floor_s"] for b in blocks)
        table.append(["**mean**", "", "", "", "", f"**{mean:.2f}**", f"**{mean_f:.2f}**"])
        lines += [f"### {r['teacher']} {r['setting']} ({r['source']})", "",
                  markdown_table(["block", "layers", "step ms", "floor ms", "float floor ms", "step/floor",
                                  "step/float floor"], table),
                  f"Time-weighted step/floor over all blocks: {tot:.2f}.", ""]
    lines += ["## Accuracy vs iterations per block", "",
              "PTQ = the library's defaults without reconstruction (the starting point of every reconstruction "
              "cell). Cells: top-1 % (reconstruction CPU seconds).", ""]
    for tname in args.teachers:
        label = CASES[tname][0]
        combos = [(it, m, lr) for it in args.iters for m in args.modes for lr in args.lrs]
        header = ["data", "FP32", "PTQ"] + [f"{m} {it}" + (f" lr {lr}" if len(args.lrs) > 1 else "")
                                            for it, m, lr in combos]
        table = []
        for source in args.sources:
            row = [f"{source}@{args.images}", f"{fp[tname]:.2f}",
                   f"{ptq_rows[(tname, source)]['top1']:.2f}" if (tname, source) in ptq_rows else "-"]
            for it, m, lr in combos:
                c = next((r for r in rows_acc if r["teacher"] == tname and r["source"] == source
                          and r["mode"] == m and r["iters"] == it and r["lr"] == lr), None)
                row.append("not run" if c is None else f"{c['top1']:.2f} ({c['recon_s']:.0f}s)")
            table.append(row)
        lines += [f"### {tname} {label}", "", markdown_table(header, table)]
    text = "\n".join(lines) + "\n"
    write_result(args.name, text)
    atomic_write_json(RESULTS / f"{args.name}.json", {"speed": rows_speed, "accuracy": rows_acc,
                                               "ptq": {f"{k[0]}/{k[1]}": v for k, v in ptq_rows.items()}, "fp": fp})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teachers", nargs="+", default=list(CASES))
    ap.add_argument("--sources", nargs="+", default=["real", "gaussian"],
                    help="real, gaussian, or METHOD@ITERS shards (inception, bns, deepinversion), e.g. bns@50")
    ap.add_argument("--modes", nargs="+", default=list(RECON_MODES), choices=list(RECON_MODES))
    ap.add_argument("--iters", nargs="+", type=int, default=[100, 300, 1000])
    ap.add_argument("--lrs", nargs="+", default=["rule", "1e-3"],
                    help="rounding learning rates: rule (round_lr, the library default) and/or numbers")
    ap.add_argument("--bits", nargs=2, type=int, metavar=("W", "A"), default=None,
                    help="weight and activation bits of every case [default: W3A3 ResNet14, W4A4 MobileNetV2]")
    ap.add_argument("--keep-8bit", default="first,last", help="8-bit layers of every case (none = all layers)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--speed-iters", type=int, default=50)
    ap.add_argument("--floor-reps", type=int, default=10)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-acc", action="store_true", help="only the speed table (and PTQ rows)")
    ap.add_argument("--cached-only", action="store_true", help="render from cached cells only (partial runs)")
    ap.add_argument("--name", default="recon", help="result file name under bench/results/ (e.g. recon-speed with "
                                                    "--no-acc, so the accuracy tables stay)")
    args = ap.parse_args()
    global KEEP_8BIT
    KEEP_8BIT = args.keep_8bit
    if args.bits or args.keep_8bit != "first,last":
        for t, (label, w0, a0) in CASES.items():
            w, a = args.bits or (w0, a0)
            CASES[t] = (f"W{w}A{a}" + (f" keep {args.keep_8bit}" if args.keep_8bit != "first,last" else ""), w, a)
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    torch.set_num_threads(1)
    rows_speed: list[dict] = []
    rows_acc: list[dict] = []
    ptq_rows: dict = {}
    fp: dict = {}
    teachers: dict = {}
    bases: dict = {}
    for tname in args.teachers:
        if not (Path(__file__).resolve().parent.parent / "assets" / f"{tname}.pt").is_file():
            print(f"[recon] {tname} is not shipped; skipped", file=sys.stderr)
            continue
        teacher = load_teacher(tname, device=CPU)
        test_ds = make_dataset("fashion-mnist:test", teacher.spec, num_images=args.eval_images)
        fp[tname] = evaluate_model(teacher.model, test_ds, CPU, progress=False)["top1"]
        teachers[tname] = (teacher, test_ds)
    active = list(teachers)
    args.teachers = active

    def common(tname: str, source: str) -> dict:
        return {"teacher": tname, "setting": CASES[tname][0], "source": source, "n": args.images,
                "eval": args.eval_images, "v": VERSION}

    def get_base(tname: str, source: str):
        if (tname, source) not in bases:
            bases[(tname, source)] = ptq(teachers[tname][0], tname, source, args.images)
        return bases[(tname, source)]

    for tname in active:  # PTQ starting points, then the speed table (first source only)
        teacher, test_ds = teachers[tname]
        for source in args.sources:
            def ptq_cell():
                res, _, secs = get_base(tname, source)
                ev = evaluate_model(res.student, test_ds, CPU, teacher=teacher.model, progress=False)
                return {"top1": ev["top1"], "ptq_s": secs}

            row = cell({**common(tname, source), "what": "ptq"}, ptq_cell)
            if row is not None:
                ptq_rows[(tname, source)] = row
        if not args.no_speed:
            source = args.sources[0]
            spd = cell({**common(tname, source), "what": "speed", "code": SPEED_CODE, "iters": args.speed_iters, "reps": args.floor_reps},
                       lambda: run_recon(*get_base(tname, source)[:2], "qdrop", args.speed_iters, test_ds, teacher,
                                         time_floor=args.floor_reps))
            if spd is not None:
                rows_speed.append(spd)
            render(rows_speed, rows_acc, fp, ptq_rows, args)
    for it in [] if args.no_acc else args.iters:  # cheapest budgets first: a partial run still fills whole columns
        for tname in active:
            teacher, test_ds = teachers[tname]
            for source in args.sources:
                for m in args.modes:
                    for lr in args.lrs:
                        r = cell({**common(tname, source), "what": "acc", "mode": m, "iters": it, "lr": lr},
                                 lambda: run_recon(*get_base(tname, source)[:2], m, it, test_ds, teacher, lr=lr))
                        if r is None:
                            continue
                        r.update(mode=m, iters=it, lr=lr)
                        rows_acc.append(r)
                        print(f"[recon] {tname} {source} {m} {it} lr {lr}: top1 {r['top1']:.2f} "
                              f"({r['recon_s']:.0f}s)", file=sys.stderr, flush=True)
                        render(rows_speed, rows_acc, fp, ptq_rows, args)
    render(rows_speed, rows_acc, fp, ptq_rows, args)


if __name__ == "__main__":
    main()
