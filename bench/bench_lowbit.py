"""Where quantization is hard (issue 11): W4A4, W3A3, W4A4 with every layer quantized and W2A4 (ResNet only), for
both shipped teachers, calibrated on real images, Gaussian noise and small inception / bns / deepinversion shard sets.

Columns, each top-1 on real Fashion-MNIST test images after a calibration with the library pipeline (the code behind
``zkd calibrate``):

* ``naive min/max``: an independent reference written here -- per-channel symmetric min/max weights, per-tensor
  min/max activation ranges from the same calibration images, nothing searched;
* ``old MSE PTQ``: Lp weight search + per-tensor MSE activation search, no pre-steps (the default before issue 11);
* ``default PTQ``: today's default, the loss-aware guard (``--a-method auto``: {mse, output, minmax} x {CLE + bias
  correction off, on}, lowest logit KL to the FP32 teacher on the validation images: ``--validation auto``, the
  held-out quarter of real images, the 500-step BN probe for every other source);
  ``chosen`` names the candidate it kept;
* ``default calibrate``: ``zkd calibrate``'s defaults (the guard, GENIE-M reconstruction at <= 4 bits with the
  rounding rate of ``round_lr``, the reconstruction check);
* ``+ recon (qdrop)`` / ``+ recon (genie)``: the default PTQ student followed by block reconstruction,
  ``--recon-iters`` steps/block and the pipeline's other recon defaults, in the two modes: AdaRound + LSQ
  activation steps + QDrop (``--recon-mode qdrop``) and GENIE-M (weight step sizes learned jointly with the
  rounding, ``--recon-mode genie``);
* ``+ KD fine-tune``: the ``+ recon (genie)`` student followed by ``--finetune-steps`` of KD fine-tuning (T^2 KL at T = 4,
  LSQ step sizes + weights, the calibration images; the pipeline's defaults), W3A3 and every-layer W4A4 only;
* ``PTQ, validated on di@1000``: the default PTQ with ``--validation-data``: the guard scores its candidates on 256
  images of a 1024-image deepinversion shard set at 1000 steps (``bench_recon``'s cached set) instead of the BN
  probe;
* ``mixed @ uniform size``: the default PTQ with per-layer weight bits from {2,3,4,6,8} (ZeroQ sensitivity, DP
  allocation) at the weight size of the uniform student.

Small settings for a shared CPU (defaults: 256 calibration images, 2000 test images, 100 recon steps/block, 100
fine-tune steps, shards of 256 images at 50 synthesis iterations). Runs go in three phases (PTQ columns everywhere,
then recon / fine-tune, then mixed precision), each cached in ``bench/cache/lowbit/`` (outside git), and the
tables are rewritten after every phase from whatever is cached (``--table-only`` rewrites them without running).
Writes ``bench/results/lowbit.md`` and ``lowbit.json``. Full size: ``--num-images 1024 --recon-iters 1000
--shard-iterations 2000``.

Usage::

    python bench/bench_lowbit.py
    python bench/bench_lowbit.py --teachers fmnist_resnet14 --sources real,deepinversion --phases ptq
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
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import CACHE, markdown_table, write_json, write_result  # noqa: E402

from zeroshot_kd import load_teacher, synthesize  # noqa: E402
from zeroshot_kd.data import make_dataset  # noqa: E402
from zeroshot_kd.evaluate import evaluate_model  # noqa: E402
from zeroshot_kd.io import atomic_torch_save, atomic_write_json  # noqa: E402
from zeroshot_kd.quant.finetuning import finetune, finetune_objectives  # noqa: E402
from zeroshot_kd.quant.modules import QuantConfig, quant_layers  # noqa: E402
from zeroshot_kd.quant.pipeline import CalibrationOptions, calibrate_student  # noqa: E402
from zeroshot_kd.quant.recon import ReconConfig, reconstruct  # noqa: E402
from zeroshot_kd.quant.validation import clear_probe_cache  # noqa: E402

SETTINGS = [("W4A4", 4, 4, "first,last"), ("W3A3", 3, 3, "first,last"), ("W4A4 all layers", 4, 4, "none"),
            ("W2A4", 2, 4, "first,last")]
W2_TEACHERS = ("fmnist_resnet14",)
FT_SETTINGS = ("W3A3", "W4A4 all layers")
NO_PRE = {"a_method": "mse", "equalize": False, "bias_correction": False}
PTQ_COLUMNS = ["naive min/max", "old MSE PTQ", "default PTQ"]
RECON_COLUMNS = {"+ recon (qdrop)": "qdrop", "+ recon (genie)": "genie"}
DEFAULT_COLUMN = "default calibrate"
VALIDATED_COLUMN = "PTQ, validated on di@1000"
COLUMNS = (PTQ_COLUMNS + [VALIDATED_COLUMN, DEFAULT_COLUMN] + list(RECON_COLUMNS)
           + ["+ KD fine-tune", "mixed @ uniform size"])
BEFORE_COLUMNS = ("default PTQ", "default calibrate")  # read from --before, a results json of an earlier run
SHARD_METHODS = {"inception": {}, "bns": {}, "deepinversion": {"bn_weight": 0.1}}


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


def calibration_data(tname: str, source: str, args: argparse.Namespace) -> str:
    """The ``--data`` string of a row; bns / deepinversion shards are synthesized once into the bench cache."""
    if source == "real":
        return "fashion-mnist:train"
    if source == "gaussian":
        return f"gaussian:{args.num_images}"
    out = CACHE / "lowbit" / f"{tname}-{source}-{args.num_images}-it{args.shard_iterations}"
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        synthesize(out, teacher=tname, method=source, num_images=args.num_images, batch_size=64, device="cpu",
                   seed=0, resume=out.exists(), progress=False, iterations=args.shard_iterations,
                   **SHARD_METHODS[source])
        print(f"[lowbit] synthesized {source} for {tname} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
              flush=True)
    return f"shards:{out}"


class Bench:
    """Runs and caches the cells of one (teacher, setting, source) row."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = torch.device("cpu")
        self.teachers: dict[str, Any] = {}
        self.tests: dict[str, Any] = {}

    def teacher(self, tname: str) -> Any:
        if tname not in self.teachers:
            self.teachers[tname] = load_teacher(tname, device=self.dev)
            self.tests[tname] = make_dataset("fashion-mnist:test", self.teachers[tname].spec,
                                             num_images=self.args.eval_images)
        return self.teachers[tname]

    def key(self, tname: str, source: str, setting: str, col: str) -> Path:
        a = self.args
        d = {"teacher": tname, "source": source, "n": a.num_images, "setting": setting, "col": col,
             "recon_iters": a.recon_iters, "ft": a.finetune_steps, "eval": a.eval_images,
             "shard_it": a.shard_iterations, "v": 5}
        return CACHE / "lowbit" / (hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16] + ".json")

    def cached(self, tname: str, source: str, setting: str, col: str) -> dict[str, Any] | None:
        p = self.key(tname, source, setting, col)
        return json.loads(p.read_text()) if p.is_file() else None

    def record(self, tname: str, source: str, setting: str, col: str, student: torch.nn.Module, seconds: float,
               **extra: Any) -> dict[str, Any]:
        ev = evaluate_model(student, self.tests[tname], self.dev, teacher=self.teachers[tname].model, progress=False)
        out = {"top1": ev["top1"], "agreement": ev["agreement"], "calibrate_s": seconds, **extra}
        (CACHE / "lowbit").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.key(tname, source, setting, col), out)
        print(f"[lowbit] {tname} {source} {setting:16s} {col:22s} top1 {ev['top1']:.2f} ({seconds:.0f}s)",
              file=sys.stderr, flush=True)
        return out

    def calibrate(self, tname: str, source: str, setting: tuple, **kw: Any) -> tuple[Any, float]:
        label, w, a, keep = setting
        teacher = self.teacher(tname)
        data = calibration_data(tname, source, self.args)
        opts = CalibrationOptions(data=data, num_images=self.args.num_images, holdout=0, progress=False,
                                  **{"recon": False, **kw})
        clear_probe_cache()  # seconds of a standalone run: the BN probe included
        t0 = time.perf_counter()
        res = calibrate_student(teacher, QuantConfig(w, a, keep_8bit=keep), opts, self.dev)
        return res, time.perf_counter() - t0

    def ptq(self, tname: str, source: str, setting: tuple) -> None:
        label = setting[0]
        if self.cached(tname, source, label, "naive min/max") is None:
            res, sec = self.calibrate(tname, source, setting, w_method="minmax", **{**NO_PRE, "a_method": "minmax"})
            t0 = time.perf_counter()
            ds = make_dataset(calibration_data(tname, source, self.args), self.teachers[tname].spec,
                              num_images=self.args.num_images, seed=0)
            naive_minmax(res.student, torch.stack([ds[i][0] for i in range(self.args.num_images)]))
            self.record(tname, source, label, "naive min/max", res.student, sec + time.perf_counter() - t0)
        if self.cached(tname, source, label, "old MSE PTQ") is None:
            res, sec = self.calibrate(tname, source, setting, **NO_PRE)
            self.record(tname, source, label, "old MSE PTQ", res.student, sec)
        if self.cached(tname, source, label, "default PTQ") is None:
            res, sec = self.calibrate(tname, source, setting)
            (CACHE / "lowbit").mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"student": res.student, "fp_model": res.fp_model},
                              self.key(tname, source, label, "default PTQ").with_suffix(".pt"))
            self.record(tname, source, label, "default PTQ", res.student, sec, chosen=res.report["ranges"]["chosen"],
                        kl=res.report["ranges"]["kl_by_candidate"])

    def validated(self, tname: str, source: str, setting: tuple) -> None:
        """The default PTQ scored on well-synthesized validation images (``--validation-data``)."""
        from bench_recon import data_source  # the 1000-step shard sets, cached once (imported here: it imports us)

        if self.cached(tname, source, setting[0], VALIDATED_COLUMN) is None:
            res, sec = self.calibrate(tname, source, setting, validation_data=data_source("deepinversion@1000", 1024,
                                                                                           tname))
            self.record(tname, source, setting[0], VALIDATED_COLUMN, res.student, sec,
                        chosen=res.report["ranges"]["chosen"], kl=res.report["ranges"]["kl_by_candidate"])

    def default(self, tname: str, source: str, setting: tuple) -> None:
        """What ``zkd calibrate`` does by default: the guard, GENIE-M reconstruction (<= 4 bits) and its check."""
        if self.cached(tname, source, setting[0], DEFAULT_COLUMN) is None:
            res, sec = self.calibrate(tname, source, setting, recon=None, recon_iters=self.args.recon_iters)
            rec = res.report["settings"].get("reconstruction") or {}
            self.record(tname, source, setting[0], DEFAULT_COLUMN, res.student, sec,
                        chosen=res.report["ranges"]["chosen"], recon_check=res.report["recon_check"],
                        lr_round=rec.get("lr_round"), data_fit=rec.get("data_fit"))

    def recon_ft(self, tname: str, source: str, setting: tuple) -> None:
        """Both reconstruction modes from the cached default-PTQ student; KD fine-tuning after GENIE-M."""
        label = setting[0]
        base = self.cached(tname, source, label, "default PTQ")
        blob = self.key(tname, source, label, "default PTQ").with_suffix(".pt")
        if base is None or not blob.is_file():
            return
        need_ft = label in FT_SETTINGS and self.args.finetune_steps > 0
        teacher = self.teacher(tname)
        ds = make_dataset(calibration_data(tname, source, self.args), teacher.spec, num_images=self.args.num_images,
                          seed=0)
        cal_x = torch.stack([ds[i][0] for i in range(len(ds))])
        cal_y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        d = CalibrationOptions(data="gaussian:1")
        for col, mode in RECON_COLUMNS.items():
            ft_here = need_ft and mode == "genie"
            if self.cached(tname, source, label, col) is not None and (
                    not ft_here or self.cached(tname, source, label, "+ KD fine-tune") is not None):
                continue
            saved = torch.load(blob, weights_only=False)
            student, fp_model = saved["student"], saved["fp_model"]
            t0 = time.perf_counter()
            rcfg = ReconConfig(iters=self.args.recon_iters, batch_size=d.batch_size, drop_prob=d.recon_drop,
                               reg=d.recon_lambda, lr_round=d.recon_lr, mode=mode)
            reconstruct(student, fp_model, [cal_x[i:i + 128] for i in range(0, len(cal_x), 128)], self.dev, rcfg,
                        seed=d.seed, progress=False)
            sec = base["calibrate_s"] + time.perf_counter() - t0
            self.record(tname, source, label, col, student, sec)
            if ft_here:
                t0 = time.perf_counter()
                finetune(student, teacher.model, TensorDataset(cal_x, cal_y), self.args.finetune_steps,
                         finetune_objectives(None, d.temperature), lr=d.lr, scale_lr=d.scale_lr,
                         batch_size=d.batch_size, seed=d.seed, device=self.dev, precision=d.precision,
                         spec=teacher.spec, progress=False)
                self.record(tname, source, label, "+ KD fine-tune", student, sec + time.perf_counter() - t0)

    def mixed(self, tname: str, source: str, setting: tuple) -> None:
        if self.cached(tname, source, setting[0], "mixed @ uniform size") is None:
            res, sec = self.calibrate(tname, source, setting, mixed_precision=True)
            mp = res.report["mixed_precision"]
            self.record(tname, source, setting[0], "mixed @ uniform size", res.student, sec,
                        chosen=res.report["ranges"]["chosen"], size_mb=mp["size_mb"], uniform_mb=mp["uniform_mb"])


def grid(args: argparse.Namespace) -> list[tuple[str, str, tuple]]:
    wanted = [s for s in args.settings.split(",") if s] or [s[0] for s in SETTINGS]
    by_label = {s[0]: s for s in SETTINGS}
    return [(t, src, by_label[lb]) for t in args.teachers.split(",") for lb in wanted
            if lb != "W2A4" or t in W2_TEACHERS for src in args.sources.split(",")]


def _delta_check(value: float | None, ref: float | None) -> str:
    """``ok`` when ``value`` is not below ``ref`` (0.5 points of evaluation noise allowed), else the shortfall."""
    if value is None or ref is None:
        return "-"
    return "ok" if value >= ref - 0.5 else f"MISS ({value - ref:+.2f})"


def tables(bench: Bench, args: argparse.Namespace) -> None:
    """Rewrite the result files from the cache (missing cells: ``-``; columns with no cell are left out)."""
    before = json.loads(Path(args.before).read_text())["results"] if args.before else {}
    lines = ["# Low-bit students where quantization is hard (issue 11)", "",
             f"Top-1 (%) on {args.eval_images} real Fashion-MNIST test images; {args.num_images} calibration images "
             f"(`real` = fashion-mnist:train, `gaussian` = gaussian:{args.num_images}, `inception` / `bns` / "
             f"`deepinversion` = {args.num_images}-image shards at {args.shard_iterations} synthesis iterations); "
             f"recon = {args.recon_iters} steps/block; KD fine-tune = {args.finetune_steps} steps after "
             "the genie recon (W3A3 and all layers only). `all layers` = `--keep-8bit none`. `default PTQ` = the "
             "guard (`--a-method auto`, `--no-recon`); `default calibrate` = `zkd calibrate`'s defaults (the guard, "
             "then GENIE-M reconstruction at <= 4 bits with the rounding rate 1e-3 * sqrt(20000 / steps), kept "
             "only if it lowers the validation KL: `recon kept`); the guard and the check score on the validation "
             "images of `--validation auto` (the held-out quarter of images close to the training data, here `real`; "
             "for the other sources the 64-image, 500-step BN probe); `PTQ, validated on di@1000` = the default PTQ scored on "
             "256 images of a 1000-step deepinversion shard set (`--validation-data`) instead. "
             "`chosen` = the candidate the guard kept (`+cle+bc` = with equalization and bias correction, `naive` = "
             "min/max weights and activations). Seconds = the whole calibration run on a shared "
             "2-core CPU, 1 thread (evaluation excluded; + recon / + KD fine-tune include the PTQ before them). "
             "`-` = not run within the budget.", ""]
    if before:
        lines += [f"`before: ...` columns: the same cells from `{Path(args.before).name}`, an earlier run of this "
                  f"script ({args.before_note or 'see the README'}).", ""]
    results: dict[str, Any] = {}
    for tname in args.teachers.split(","):
        teacher = bench.teacher(tname)
        fp = evaluate_model(teacher.model, bench.tests[tname], bench.dev, progress=False)["top1"]
        row_cells = []
        for t, source, st in grid(args):
            if t == tname:
                cells = {c: bench.cached(tname, source, st[0], c) for c in COLUMNS}
                results.setdefault(tname, {}).setdefault(st[0], {})[source] = cells
                row_cells.append((source, st, cells))
        cols = [c for c in COLUMNS if any(cells[c] for _, _, cells in row_cells)]
        old = [c for c in BEFORE_COLUMNS if any((before.get(tname, {}).get(st[0], {}).get(source) or {}).get(c)
                                                for source, st, _ in row_cells)]
        rows, trows = [], []
        for source, st, cells in row_cells:
            top = {c: cells[c]["top1"] if cells[c] else None for c in cols}
            prev = before.get(tname, {}).get(st[0], {}).get(source) or {}
            d, dc = cells["default PTQ"], cells.get(DEFAULT_COLUMN)
            kept = (dc.get("recon_check") or {}).get("kept", "-") if dc else "-"
            rows.append([st[0], source, f"{fp:.2f}"]
                        + [f"{prev[c]['top1']:.2f}" if prev.get(c) else "-" for c in old]
                        + [f"{v:.2f}" if v is not None else "-" for v in top.values()]
                        + [d["chosen"] if d else "-", kept if dc else "-",
                           _delta_check(top.get("default PTQ"), top.get("naive min/max")),
                           _delta_check(top.get(DEFAULT_COLUMN), top.get("default PTQ"))])
            trows.append([st[0], source] + [f"{cells[c]['calibrate_s']:.0f}" if cells[c] else "-" for c in cols])
        results.setdefault(tname, {})["fp32"] = fp
        lines += [f"## {tname} (FP32 {fp:.2f}% on these images)", "",
                  markdown_table(["setting", "data", "FP32"] + [f"before: {c}" for c in old] + cols
                                 + ["chosen", "recon kept", "PTQ >= naive", "default >= PTQ"], rows),
                  "Seconds per calibration run:", "", markdown_table(["setting", "data"] + cols, trows)]
    lines += [f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, cpu, torch {torch.__version__}.",
              ""]
    write_result(args.name, "\n".join(lines))
    write_json(args.name, {"results": results, "settings": vars(args)})


def add_grid_arguments(ap: argparse.ArgumentParser) -> None:
    """The grid's options (teachers, sources, sizes), shared with the benchmarks that run on its cells."""
    ap.add_argument("--teachers", default="fmnist_mobilenetv2,fmnist_resnet14")
    ap.add_argument("--sources", default="real,gaussian,inception,bns,deepinversion")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--recon-iters", type=int, default=100)
    ap.add_argument("--shard-iterations", type=int, default=50)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(ap)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--settings", default="", help="comma list of setting labels, in run order [default: all]")
    ap.add_argument("--phases", default="ptq,validated,default,recon,mixed",
                    help="comma list of ptq, validated, default, recon, mixed")
    ap.add_argument("--before", default="", help="results json of an earlier run: its default PTQ and genie "
                    "columns are shown beside this run's (e.g. bench/results/lowbit-before-validation.json)")
    ap.add_argument("--before-note", default="", help="what differed in the --before run (shown in the table text)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the tables from the cache, run nothing")
    ap.add_argument("--name", default="lowbit")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bench = Bench(args)
    if not args.table_only:
        for phase in args.phases.split(","):
            step = {"ptq": bench.ptq, "validated": bench.validated, "default": bench.default,
                    "recon": bench.recon_ft, "mixed": bench.mixed}[phase]
            for tname, source, setting in grid(args):
                step(tname, source, setting)
            tables(bench, args)
    tables(bench, args)


if __name__ == "__main__":
    main()
