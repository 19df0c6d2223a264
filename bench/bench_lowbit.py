"""Where quantization is hard (issue 11): W4A4, W3A3 and W4A4 with every layer quantized, for both shipped teachers.

Columns, each a full calibration with the library pipeline (the code behind ``zkd calibrate``) and top-1 on real
Fashion-MNIST test images:

* ``naive min/max``: an independent reference written here -- per-channel symmetric min/max weights, per-tensor
  min/max activation ranges from the same calibration images, nothing searched;
* ``today PTQ``: Lp weight search + per-tensor MSE activation search (``--a-method mse``, the previous default);
* ``output ranges``: ``--a-method output`` (clipping chosen by the consuming layer's output error);
* ``+ CLE/BC``: plus cross-layer equalization (ReLU6 -> per-channel clip, exact) and empirical bias correction;
* ``+ CLE(relu)/BC``: the same with ReLU6 replaced by ReLU (DFQ's MobileNetV2 recipe; changes the float net);
* ``+ recon``: ``+ CLE/BC`` followed by block reconstruction (AdaRound + QDrop) at ``--recon-iters`` steps/block;
* ``mixed @ uniform size``: ``+ CLE/BC`` with per-layer weight bits from {2,3,4,6,8} (ZeroQ sensitivity, DP
  allocation) at the weight size of the uniform student;
* ``output + recon`` / ``output + mixed``: the same two on ``output ranges`` without CLE/BC.

Small settings for a shared CPU (defaults: 256 calibration images, 2000 test images, 100 recon steps/block).
Every run is cached in ``bench/cache/lowbit/``. Writes ``bench/results/lowbit.md`` and ``lowbit.json``.

Usage::

    python bench/bench_lowbit.py
    python bench/bench_lowbit.py --teachers fmnist_mobilenetv2 --sources real --no-recon
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
from common import CACHE, markdown_table, write_json, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_write_json  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig, quant_layers  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402

SETTINGS = [("W4A4", 4, 4, "first,last"), ("W3A3", 3, 3, "first,last"), ("W4A4 all layers", 4, 4, "none")]
CLE_BC = {"a_method": "output", "equalize": True, "bias_correction": True}
NO_PRE = {"equalize": False, "bias_correction": False}  # explicit: the library default depends on --keep-8bit
COLUMNS: list[tuple[str, dict[str, Any]]] = [
    ("naive min/max", {"naive": True, **NO_PRE}),
    ("today PTQ", {"a_method": "mse", **NO_PRE}),
    ("output ranges", {"a_method": "output", **NO_PRE}),
    ("+ CLE/BC", CLE_BC),
    ("+ CLE(relu)/BC", {**CLE_BC, "relu6": "relu"}),
    ("+ recon", {**CLE_BC, "recon": True}),
    ("mixed @ uniform size", {**CLE_BC, "mixed_precision": True}),
    ("output + recon", {"a_method": "output", "recon": True, **NO_PRE}),
    ("output + mixed", {"a_method": "output", "mixed_precision": True, **NO_PRE}),
]


@torch.no_grad()
def naive_minmax(student: torch.nn.Module, cal_x: torch.Tensor) -> None:
    """Reference: per-channel symmetric min/max weight scales and per-tensor min/max activation ranges."""
    layers = quant_layers(student)
    lo = {n: float("inf") for n, _ in layers}
    hi = {n: float("-inf") for n, _ in layers}
    for _, l in layers:
        wq = l.wq
        amax = l.weight.detach().abs().flatten(1).amax(1) if wq.symmetric else None
        if wq.symmetric:
            wq.set_qparams(amax / wq.qmax)
        else:
            w = l.weight.detach().flatten(1)
            mn, mx = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
            s = (mx - mn) / (wq.qmax - wq.qmin)
            wq.set_qparams(s, wq.qmin - torch.round(mn / s.clamp_min(1e-8)))
        if l.aq is not None:
            l.aq.enabled = False

    def hook(name):
        def fn(m, args):
            lo[name] = min(lo[name], args[0].min().item())
            hi[name] = max(hi[name], args[0].max().item())
        return fn

    hs = [l.register_forward_pre_hook(hook(n)) for n, l in layers if l.aq is not None]
    for i in range(0, cal_x.shape[0], 128):
        student(cal_x[i:i + 128])
    for h in hs:
        h.remove()
    for n, l in layers:
        if l.aq is None:
            continue
        l.aq.enabled = True
        mn, mx = min(lo[n], 0.0), max(hi[n], 0.0)
        l.set_act_signed(mn < 0)
        s = torch.tensor([(mx - mn) / (l.aq.qmax - l.aq.qmin)])
        l.aq.set_qparams(s, torch.round(-mn / s) if mn < 0 else None)


def run_one(teacher: Any, tname: str, source: str, n: int, setting: tuple, col: tuple, args: argparse.Namespace,
            test_ds: Any) -> dict[str, Any]:
    label, w, a, keep = setting
    cname, kw = col
    kw = dict(kw)
    naive = kw.pop("naive", False)
    key_d = {"teacher": tname, "source": source, "n": n, "setting": label, "col": cname, "kw": kw,
             "recon_iters": args.recon_iters, "eval": len(test_ds), "v": 1}
    key = hashlib.sha256(json.dumps(key_d, sort_keys=True).encode()).hexdigest()[:16]
    cache = CACHE / "lowbit" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    data = "fashion-mnist:train" if source == "real" else f"gaussian:{n}"
    t0 = time.perf_counter()
    opts = CalibrationOptions(data=data, num_images=n, holdout=0, recon_iters=args.recon_iters, progress=False,
                              **({"a_method": "minmax", "w_method": "minmax", **NO_PRE} if naive else kw))
    res = calibrate_student(teacher, QuantConfig(w, a, keep_8bit=keep), opts, torch.device("cpu"))
    if naive:
        ds = make_dataset(data, teacher.spec, num_images=n, seed=0)
        cal_x = torch.stack([ds[i][0] for i in range(n)])
        naive_minmax(res.student, cal_x)
    seconds = time.perf_counter() - t0
    ev = evaluate_model(res.student, test_ds, torch.device("cpu"), teacher=teacher.model, progress=False)
    mp = res.report.get("mixed_precision")
    out = {**key_d, "top1": ev["top1"], "agreement": ev["agreement"], "calibrate_s": seconds,
           "ranges_chosen": res.report.get("ranges", {}).get("chosen"),
           "mixed": None if mp is None else {"bits": mp["bits"], "size_mb": mp["size_mb"],
                                             "uniform_mb": mp["uniform_mb"]}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, out)
    print(f"[lowbit] {tname} {source}@{n} {label:16s} {cname:22s} top1 {ev['top1']:.2f} ({seconds:.0f}s)",
          file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", default="fmnist_mobilenetv2,fmnist_resnet14")
    ap.add_argument("--sources", default="real,gaussian")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--recon-iters", type=int, default=100)
    ap.add_argument("--no-recon", action="store_true")
    ap.add_argument("--name", default="lowbit")
    args = ap.parse_args()
    torch.manual_seed(0)
    cols = [c for c in COLUMNS if not (args.no_recon and c[1].get("recon"))]
    results: dict[str, Any] = {}
    lines = ["# Low-bit students where quantization is hard (issue 11)", "",
             f"Top-1 (%) on {args.eval_images} real Fashion-MNIST test images; {args.num_images} calibration images "
             f"(`real` = fashion-mnist:train, `gaussian` = gaussian:{args.num_images}); recon = "
             f"{args.recon_iters} steps/block. `all layers` = `--keep-8bit none`. Seconds = the whole calibration "
             "run on a shared 2-core CPU (evaluation excluded).", ""]
    for tname in args.teachers.split(","):
        teacher = load_teacher(tname, device=torch.device("cpu"))
        test_ds = make_dataset("fashion-mnist:test", teacher.spec, num_images=args.eval_images)
        fp = evaluate_model(teacher.model, test_ds, torch.device("cpu"), progress=False)["top1"]
        rows, trows = [], []
        for setting in SETTINGS:
            for source in args.sources.split(","):
                r = {c[0]: run_one(teacher, tname, source, args.num_images, setting, c, args, test_ds) for c in cols}
                results.setdefault(tname, {}).setdefault(setting[0], {})[source] = r
                rows.append([setting[0], source, f"{fp:.2f}"] + [f"{r[c[0]]['top1']:.2f}" for c in cols])
                trows.append([setting[0], source] + [f"{r[c[0]]['calibrate_s']:.0f}" for c in cols])
        lines += [f"## {tname} (FP32 {fp:.2f}% on these images)", "",
                  markdown_table(["setting", "data", "FP32"] + [c[0] for c in cols], rows),
                  "Seconds per calibration run:", "",
                  markdown_table(["setting", "data"] + [c[0] for c in cols], trows)]
        results[tname]["fp32"] = fp
    lines += [f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, cpu, torch {torch.__version__}.",
              ""]
    write_result(args.name, "\n".join(lines))
    write_json(args.name, {"results": results, "settings": vars(args)})


if __name__ == "__main__":
    main()
