"""Synthesis speed and memory: ms per optimization iteration against the teacher's bare forward+backward.

The floor is the same teacher, same batch shape, same device and autocast: ``teacher(x).sum().backward()`` with
``x.requires_grad``. Each method's iteration (augmentation, BN statistics, losses, Adam step, best-per-sample
tracking) is timed inside ``optimize_batch``, interleaved with blocks of floor passes (see :func:`paired_ms`).
Peak memory is measured in a fresh process for 256 and 4096 images: images stream to disk batch by batch, so it
must not grow with the image count.

Usage: ``python bench/bench_synthesis.py`` (CPU, shipped teacher, 1 thread); on a GPU see ``bench/gpu.sh``, e.g.
``--device cuda --teacher resnet50 --weights none --precision fp32,bf16``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import markdown_table, write_result  # noqa: E402

from zeroshot_kd import load_teacher  # noqa: E402
from zeroshot_kd.models import cifar_resnet  # noqa: E402
from zeroshot_kd.runtime import autocast, resolve_device  # noqa: E402
from zeroshot_kd.synthesis import SynthesisConfig, get_method, optimize_batch  # noqa: E402

BATCH = 64
ITERS = 60
ROUNDS = 3
WARM = 5
BLOCK = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_step(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds for one bare forward+backward of the teacher on ``x``: the floor."""
    _sync(x.device)
    t0 = time.perf_counter()
    model(x).sum().backward()
    _sync(x.device)
    return time.perf_counter() - t0


def paired_ms(teacher, method: str, device: torch.device, student=None, precision: str = "fp32",
              iterations: int = ITERS) -> tuple[float, float]:
    """(floor ms, method ms per iteration): medians over interleaved blocks.

    Every ``BLOCK`` optimization iterations, the callback times ``BLOCK`` bare forward+backward passes of the
    teacher on a batch of the same shape (under the same autocast), then restarts the method's clock. Floor and
    method are measured within a second of each other, so bursts of load from elsewhere (this runs on shared
    machines) hit both alike. The first iteration of each block, which starts with the other workload's data in
    the caches, is left out on both sides.
    """
    m = get_method(method)
    cfg = SynthesisConfig(method, BATCH, BATCH, 0, "balanced", m.hyperparameters({"iterations": iterations}),
                          precision)
    x = torch.randn(BATCH, *teacher.spec.shape, device=device, requires_grad=True)
    floor_model = copy.deepcopy(teacher.model)  # outside the BN statistics context that optimize_batch opens
    method_s: list[float] = []
    floor_s: list[float] = []
    last = [0.0]

    def tick(it: int, terms: dict) -> None:
        _sync(device)
        now = time.perf_counter()
        if it >= WARM and it % BLOCK != 0:
            method_s.append(now - last[0])
        if it % BLOCK == BLOCK - 1:
            with autocast(device, precision):
                times = [floor_step(floor_model, x) for _ in range(BLOCK)]
            x.grad = None
            if it >= WARM:
                floor_s.extend(times[1:])
        last[0] = time.perf_counter()

    optimize_batch(teacher.model, teacher.spec, m, cfg, 0, device, student, on_iteration=tick)
    return 1000 * statistics.median(floor_s), 1000 * statistics.median(method_s)


PEAK_SCRIPT = """
import json, resource, sys, torch
from zeroshot_kd import synthesize
n, out, device = int(sys.argv[1]), sys.argv[2], sys.argv[3]
synthesize(out, method="deepinversion", num_images=n, batch_size=64, iterations=2, device=device, progress=False)
peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and device != "cpu" else 0
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_mb": peak_gpu / 2**20}))
"""


def peak_memory(n: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n), f"{d}/o", device], capture_output=True,
                              text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_student(teacher, device: torch.device) -> torch.nn.Module:
    """ADI's competitor: a CIFAR ResNet-8 (width 8) for small inputs, a torchvision ResNet-18 for ImageNet-sized."""
    torch.manual_seed(0)
    spec = teacher.spec
    if spec.image_size <= 64:
        student = cifar_resnet(8, 8, in_channels=spec.channels, num_classes=spec.num_classes)
    else:
        import torchvision

        student = torchvision.models.resnet18(weights=None, num_classes=spec.num_classes)
    return student.to(device).eval().requires_grad_(False)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", default=None, help="as zkd synthesize --teacher (default: the shipped one)")
    ap.add_argument("--weights", default=None, help="as zkd synthesize --weights (e.g. none for resnet50)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--methods", default="inception,bns,deepinversion,adi")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--iterations", type=int, default=ITERS)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed on a shared host)")
    ap.add_argument("--name", default="synthesis", help="result file: bench/results/NAME.md")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    teacher = load_teacher(args.teacher, weights=args.weights, device=device)
    student = make_student(teacher, device)
    methods = args.methods.split(",")
    rows = []
    for precision in args.precision.split(","):
        # Alternating rounds; per method the median over rounds of the paired floor, method time and ratio.
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m in methods:
                runs[m].append(paired_ms(teacher, m, device, student if m == "adi" else None, precision,
                                         args.iterations))
        for m in methods:
            floor = statistics.median(f for f, _ in runs[m])
            ms = statistics.median(t for _, t in runs[m])
            ratios = [t / f for f, t in runs[m]]
            rows.append([m, precision, f"{floor:.1f}", f"{ms:.1f}", f"{statistics.median(ratios):.2f}",
                         f"{min(ratios):.2f}-{max(ratios):.2f}"])
    if device.type == "cuda":  # paired_ms's floor runs under optimize_batch's deterministic cuDNN; the default:
        x = torch.randn(BATCH, *teacher.spec.shape, device=device, requires_grad=True)
        default_floor = 1000 * statistics.median([floor_step(teacher.model, x) for _ in range(args.iterations)][WARM:])
    shape = "x".join(str(d) for d in teacher.spec.shape)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    text = (
        f"### Synthesis speed: {teacher.source.get('spec', args.teacher or 'shipped teacher')}, batch {BATCH} of "
        f"{shape}, {device} ({where}), torch {torch.__version__}\n\n"
        f"Floor: the teacher's bare forward+backward on a batch of the same shape, timed in blocks of {BLOCK} "
        f"between blocks of {BLOCK} method iterations ({args.iterations} iterations, {args.rounds} rounds; medians; "
        f"the first step of each block left out on both sides)."
        + (f" Both run under the deterministic cuDNN setting synthesis uses; with cuDNN's default algorithm choice "
           f"the fp32 floor is {default_floor:.1f} ms." if device.type == "cuda" else "")
        + "\n\n"
        + markdown_table(["method", "precision", "floor ms", "ms / iteration", "ratio to floor", "ratio range"],
                         rows)
        + f"\nadi also runs its student ({type(student).__name__}, random weights) forward and backward every "
        "iteration.\n"
    )
    if not args.no_memory:
        mem = {n: peak_memory(n, str(device)) for n in (256, 4096)}
        text += ("\n### Peak memory vs image count (deepinversion, shipped teacher, 2 iterations per batch)\n\n"
                 + markdown_table(["images", "peak RSS (MB)", "peak GPU (MB)"],
                                  [[n, f"{m['rss_mb']:.0f}", f"{m['gpu_mb']:.0f}"] for n, m in mem.items()]))
    write_result(args.name, text)


if __name__ == "__main__":
    main()
