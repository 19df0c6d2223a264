"""--num-images takes a seeded, stratified random sample, recorded on the dataset (issue 14)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import torch
from PIL import Image

from zeroshot_kd.data import make_dataset, parse_source, sample_indices
from zeroshot_kd.spec import InputSpec

SPEC = InputSpec(1, 8, (0.5,), (0.5,), 5)


def _image_folder(root, per_class=(20, 30, 10, 25, 15)):
    """An ImageFolder tree whose pixel value encodes (class, item), so items can be identified after loading."""
    for c, n in enumerate(per_class):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), color=c * 40 + i).save(d / f"{i:03d}.png")
    return sum(per_class)


def test_stratified_sample_of_sorted_image_folder(tmp_path):
    per_class = (20, 30, 10, 25, 15)
    total = _image_folder(tmp_path, per_class)
    n = total // 10  # 10 %
    ds = make_dataset(f"folder:{tmp_path}", SPEC, num_images=n, seed=3)
    assert len(ds) == n
    labels = [ds[i][1] for i in range(n)]
    for c, size in enumerate(per_class):
        assert abs(labels.count(c) - n * size / total) <= 1
    again = make_dataset(f"folder:{tmp_path}", SPEC, num_images=n, seed=3)
    assert list(ds.indices) == list(again.indices)
    expected = hashlib.sha256(",".join(map(str, sorted(ds.indices))).encode()).hexdigest()
    assert ds.zkd_subset == {"n": n, "seed": 3, "source_size": total, "sha256": expected}
    other = make_dataset(f"folder:{tmp_path}", SPEC, num_images=n, seed=4)
    assert sorted(other.indices) != sorted(ds.indices)


def test_quota_rule_by_hand():
    labels = [0] * 7 + [1] * 2 + [2] * 1  # n = 5: exact shares 3.5, 1.0, 0.5 -> 3 + (1 by largest fraction, tie
    idx = sample_indices(labels, 5, seed=0)  # 0.5 vs 0.5 broken by class id) -> class 0: 4, class 1: 1, class 2: 0
    got = [labels[i] for i in idx]
    assert (got.count(0), got.count(1), got.count(2)) == (4, 1, 0)
    assert len(set(idx)) == 5


def test_larger_than_source_uses_everything_and_unlabelled_sources():
    assert sorted(sample_indices([0, 1, 1], 10, seed=1)) == [0, 1, 2]
    ds = make_dataset("gaussian:12", SPEC, num_images=50)
    assert len(ds) == 12 and ds.zkd_subset["n"] == 12
    sub = make_dataset("gaussian:12", SPEC, num_images=5, seed=2)
    full = make_dataset("gaussian:12", SPEC, seed=2)
    for k, i in enumerate(sub.indices):
        torch.testing.assert_close(sub[k][0], full[i][0], rtol=0, atol=0)


def test_sample_is_independent_of_loader_batching(tmp_path):
    _image_folder(tmp_path)
    ds = make_dataset(f"folder:{tmp_path}", SPEC, num_images=17, seed=5)
    a = torch.cat([x for x, _ in torch.utils.data.DataLoader(ds, batch_size=4)])
    b = torch.cat([x for x, _ in torch.utils.data.DataLoader(ds, batch_size=17)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fashion_mnist_sample_is_stratified():
    from zeroshot_kd.data import FASHION_MNIST_SPEC, load_fashion_mnist

    _, labels = load_fashion_mnist("test")
    ds = make_dataset("fashion-mnist:test", FASHION_MNIST_SPEC, num_images=100, seed=0)
    got = ds.tensors[1].tolist()
    assert all(got.count(c) == 10 for c in range(10))  # 1000 per class in the test split -> exactly 10 each
    idx = sample_indices(labels.tolist(), 100, 0)
    assert ds.zkd_subset["sha256"] == hashlib.sha256(",".join(map(str, sorted(idx))).encode()).hexdigest()


def test_parse_source_is_the_grammar():
    assert parse_source("synth/di") == ("shards", "synth/di")
    assert parse_source("shards:x") == ("shards", "x")
    assert parse_source("folder:/a/b") == ("folder", "/a/b")
    assert parse_source("fashion-mnist:test") == ("fashion-mnist", "test")
    assert parse_source("gaussian:4") == ("gaussian", "4")


def test_calibrate_and_similarity_reports_record_the_subset(tmp_path, teacher):
    import json

    from click.testing import CliRunner

    from cli.main import cli

    res = CliRunner().invoke(cli, ["calibrate", "--data", "fashion-mnist:test", "--num-images", "32", "--holdout", "16",
                                   "--batch-size", "16", "--candidates", "5", "--no-recon", "-q", "--seed", "2",
                                   "--out", str(tmp_path / "s.pt")])
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "report.json").read_text())["settings"]
    expected = make_dataset("fashion-mnist:test", teacher.spec, num_images=48, seed=2).zkd_subset
    assert settings["data_subset"] == expected and expected["n"] == 48 and expected["source_size"] == 10000
    res = CliRunner().invoke(cli, ["similarity", "--data", "t=fashion-mnist:test", "--num-images", "20", "--seed", "1",
                                   "-q", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["subsets"]["t"] == make_dataset("fashion-mnist:test", teacher.spec, 20, seed=1).zkd_subset


def test_sample_is_the_same_in_another_process_and_thread_count():
    labels = [i % 7 for i in range(500)]
    here = sample_indices(labels, 64, seed=11)
    code = ("import torch; torch.set_num_threads(1); from zeroshot_kd.data import sample_indices; "
            "print(sample_indices([i % 7 for i in range(500)], 64, seed=11))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert json.loads(out.stdout) == here
    counts = [sum(labels[i] == c for i in here) for c in range(7)]
    assert max(counts) - min(counts) <= 1 and len(set(here)) == 64
