"""Synthesis speed and memory: ms per optimization iteration against the teacher's bare forward+backward.

The floor is the same teacher, same batch, same device: ``logits = teacher(x); logits.sum().backward()`` with
``x.requires_grad``. Each method's iteration (augmentation, BN hooks, losses, Adam step, best-per-sample tracking)
is timed inside ``optimize_batch``. Peak memory is measured in a fresh process for 256 and 4096 images: images
stream to disk batch by batch, so it must not grow with the image count.
"""

from __future__ import annotations

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
from zeroshot_kd.runtime import resolve_device  # noqa: E402
from zeroshot_kd.synthesis import SynthesisConfig, get_method, optimize_batch  # noqa: E402

BATCH = 64
ITERS = 40
ROUNDS = 3
WARM = 5


def floor_ms(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    times = []
    for i in range(ITERS):
        x = torch.randn(BATCH, *shape, device=device, requires_grad=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARM:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def method_ms(teacher, method: str, device: torch.device, student=None) -> float:
    m = get_method(method)
    cfg = SynthesisConfig(method, BATCH, BATCH, 0, "balanced", m.hyperparameters({"iterations": ITERS}))
    stamps: list[float] = []

    def tick(it: int, terms: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    optimize_batch(teacher.model, teacher.spec, m, cfg, 0, device, student, on_iteration=tick)
    deltas = [b - a for a, b in zip(stamps[WARM:], stamps[WARM + 1 :])]
    return 1000 * statistics.median(deltas)


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


def main() -> None:
    device = resolve_device("auto")
    teacher = load_teacher(device=device)
    torch.manual_seed(0)
    student = cifar_resnet(8, 8).to(device).eval()
    # Three alternating rounds; per method the fastest floor and the fastest method time (the least disturbed
    # measurements on a shared machine), each floor taken right next to the method it normalizes.
    methods = ["inception", "bns", "deepinversion", "adi"]
    best_floor = {m: float("inf") for m in methods}
    best_ms = {m: float("inf") for m in methods}
    for _ in range(ROUNDS):
        for method in methods:
            best_floor[method] = min(best_floor[method], floor_ms(teacher.model, teacher.spec.shape, device))
            best_ms[method] = min(best_ms[method], method_ms(teacher, method, device, student if method == "adi" else None))
    rows = [[m, f"{best_floor[m]:.1f}", f"{best_ms[m]:.1f}", f"{best_ms[m] / best_floor[m]:.2f}"] for m in methods]
    floor = min(best_floor.values())
    mem = {n: peak_memory(n, str(device)) for n in (256, 4096)}
    text = (
        f"### Synthesis speed (batch {BATCH}, shipped teacher, {device}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)\n\n"
        f"Floor: teacher forward+backward on the same batch, {floor:.1f} ms (best of {ROUNDS} rounds).\n\n"
        + markdown_table(["method", "floor ms (same run)", "ms / iteration", "ratio to floor"], rows)
        + "\nadi also runs the student (a random CIFAR ResNet-8, width 8) forward and backward every iteration.\n"
        + "\n### Peak memory vs image count (deepinversion, 2 iterations per batch)\n\n"
        + markdown_table(["images", "peak RSS (MB)", "peak GPU (MB)"],
                         [[n, f"{m['rss_mb']:.0f}", f"{m['gpu_mb']:.0f}"] for n, m in mem.items()])
    )
    write_result("synthesis", text)


if __name__ == "__main__":
    main()
