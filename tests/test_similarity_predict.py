"""Rank correlations (hand-computed, ties included), score forms (closed form), verdicts and predicted ranks."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from zeroshot_kd.similarity import (PREDICTOR, SCORE_FORMS, VERDICT_CLOSE, VERDICT_FAR, VERDICTS, Signature,
                                    bootstrap_interval, correlation, fisher_z_interval, kendall_tau_b,
                                    noise_ceiling, predicted_ranks, ranks, reliability, score_forms, spearman,
                                    verdict)

Z95 = 1.959963984540054  # standard normal 97.5% quantile


def test_ranks_average_ties():
    assert ranks([5, 1, 5, 3, 5]) == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_spearman_and_kendall_with_ties_in_one_side():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4]: sxy = 4.5, sxx = 4.5, syy = 5 -> 3 / sqrt(10).
    # Pairs: 5 concordant, 0 discordant, one tied in x: tau-b = 5 / sqrt((6 - 1) * 6).
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    assert spearman(x, y) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert kendall_tau_b(x, y) == pytest.approx(5 / math.sqrt(30), abs=1e-12)


def test_spearman_and_kendall_with_ties_in_both_sides_and_a_discordant_pair():
    # x ranks [1, 2, 3.5, 3.5, 5], y ranks [2, 1, 4, 4, 4]: sxy = 7, sxx = 9.5, syy = 8 -> 7 / sqrt(76).
    # Pairs: 6 concordant, 1 discordant (0, 1), 1 tied in x, 3 tied in y: tau-b = 5 / sqrt(9 * 7).
    x, y = [1, 2, 3, 3, 4], [2, 1, 3, 3, 3]
    assert spearman(x, y) == pytest.approx(7 / math.sqrt(76), abs=1e-12)
    assert kendall_tau_b(x, y) == pytest.approx(5 / math.sqrt(63), abs=1e-12)
    assert kendall_tau_b(y, x) == pytest.approx(kendall_tau_b(x, y), abs=1e-15)


def test_kendall_equals_inversion_count_formula_without_ties():
    rng = random.Random(3)
    perm = list(range(12))
    rng.shuffle(perm)
    inversions = sum(1 for i, j in itertools.combinations(range(12), 2) if perm[i] > perm[j])
    assert kendall_tau_b(list(range(12)), perm) == pytest.approx(1 - 4 * inversions / (12 * 11), abs=1e-12)


def test_constant_side_is_nan():
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))


def test_fisher_interval_closed_form():
    lo, hi = fisher_z_interval(0.5, 10, "spearman")
    se = math.sqrt(1.06 / 7)
    assert lo == pytest.approx(math.tanh(math.atanh(0.5) - Z95 * se), abs=1e-9)
    assert hi == pytest.approx(math.tanh(math.atanh(0.5) + Z95 * se), abs=1e-9)
    lo, hi = fisher_z_interval(-0.3, 14, "kendall")
    se = math.sqrt(0.437 / 10)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(-0.3) - Z95 * se), math.tanh(math.atanh(-0.3) + Z95 * se)))
    assert all(math.isnan(v) for v in fisher_z_interval(0.5, 3, "spearman"))


def test_bootstrap_interval_monotone_data_is_one_and_seeded():
    x = [1.0, 2, 3, 4, 5, 6, 7, 8]
    y = [v ** 3 for v in x]
    assert bootstrap_interval(x, y, "spearman", resamples=300) == (1.0, 1.0)
    assert bootstrap_interval(x, [-v for v in y], "kendall", resamples=300) == (-1.0, -1.0)
    noisy = [3, 1, 4, 1, 5, 9, 2, 6]
    a = bootstrap_interval(x, noisy, resamples=500, seed=1)
    assert a == bootstrap_interval(x, noisy, resamples=500, seed=1)
    r = spearman(x, noisy)
    assert a[0] < r < a[1]


def test_correlation_record():
    c = correlation([1, 2, 3, 3, 4], [2, 1, 3, 3, 3], resamples=200)
    assert c["n"] == 5
    assert c["spearman"] == pytest.approx(7 / math.sqrt(76))
    assert c["kendall"] == pytest.approx(5 / math.sqrt(63))
    assert c["kendall_fisher"] == list(fisher_z_interval(c["kendall"], 5, "kendall"))
    lo, hi = c["spearman_bootstrap"]
    assert -1 <= lo <= hi <= 1


def _sig(name, means, variances, sha="t"):
    return Signature(name, [f"bn{i}" for i in range(len(means))], [torch.tensor(m, dtype=torch.float64) for m in means],
                     [torch.tensor(v, dtype=torch.float64) for v in variances], [0.0] * len(means), sha)


def kl(mp, vp, mq, vq):
    return 0.5 * math.log(vq / vp) + (vp + (mp - mq) ** 2) / (2 * vq) - 0.5


def test_score_forms_closed_form():
    # three layers, channel counts 1, 2, 1; teacher N(0, 1) everywhere.
    ref = _sig("teacher", [[0.0], [0.0, 0.0], [0.0]], [[1.0], [1.0, 1.0], [1.0]])
    data = _sig("d", [[1.0], [0.0, 2.0], [0.0]], [[1.0], [4.0, 1.0], [0.25]])
    f = [kl(0, 1, 1, 1), (kl(0, 1, 0, 4) + kl(0, 1, 2, 1)) / 2, kl(0, 1, 0, 0.25)]
    r = [kl(1, 1, 0, 1), (kl(0, 4, 0, 1) + kl(2, 1, 0, 1)) / 2, kl(0, 0.25, 0, 1)]
    s = score_forms(ref, data)
    assert set(s) == set(SCORE_FORMS)
    assert s["bns"] == pytest.approx(sum(f) / 3)
    assert s["reverse"] == pytest.approx(sum(r) / 3)
    assert s["symmetric"] == pytest.approx((sum(f) + sum(r)) / 6)
    assert s["l2"] == pytest.approx((1 + 0) / 3 + (2 + 3) / 3 + (0 + 0.75) / 3)
    assert s["bns-channels"] == pytest.approx((f[0] + 2 * f[1] + f[2]) / 4)
    assert s["bns-depth"] == pytest.approx((f[0] + 2 * f[1] + 3 * f[2]) / 6)
    assert s["bns-first"] == pytest.approx(f[0])  # ceil(3 / 3) = 1 layer
    assert s["bns-last"] == pytest.approx(f[2])
    assert s["bns-max"] == pytest.approx(max(f))
    assert s["symmetric-max"] == pytest.approx(max((a + b) / 2 for a, b in zip(f, r)))


def test_verdict_thresholds():
    assert PREDICTOR in SCORE_FORMS
    assert 0 < VERDICT_CLOSE < VERDICT_FAR
    assert verdict(0.0) == verdict(VERDICT_CLOSE * 0.999) == VERDICTS[0]
    assert verdict(VERDICT_CLOSE) == verdict(VERDICT_FAR * 0.999) == VERDICTS[1]
    assert verdict(VERDICT_FAR) == verdict(1e9) == verdict(float("inf")) == verdict(float("nan")) == VERDICTS[2]
    assert verdict(0.5, close=0.1, far=0.4) == "far" and verdict(0.05, close=0.1, far=0.4) == VERDICTS[0]


def test_predicted_ranks_lowest_score_first_ties_share():
    assert predicted_ranks({"noise": 3.0, "real": 0.01, "synth": 0.2, "synth2": 0.2, "bad": float("nan")}) == {
        "real": 1, "synth": 2, "synth2": 2, "noise": 4, "bad": 5}


def test_report_carries_predicted_rank_and_verdict():
    from test_similarity import images, small_teacher

    from zeroshot_kd.similarity import compute_signature, report_markdown, similarity_report, teacher_signature

    teacher = small_teacher()
    sigs = [compute_signature(teacher, images(24, seed=i, offset=off), name, batch_size=24)
            for i, (name, off) in enumerate([("a", 3.0), ("b", 0.0), ("c", 1.0)])]
    report = similarity_report(teacher, sigs)
    by = {e["name"]: e for e in report["datasets"]}
    values = {n: by[n]["forms"][PREDICTOR] for n in by}
    assert sorted(by, key=lambda n: by[n]["predicted_rank"]) == sorted(values, key=values.get)
    assert sorted(e["predicted_rank"] for e in by.values()) == [1, 2, 3]
    for n, e in by.items():
        assert e["verdict"] == verdict(values[n])
        assert e["forms"] == score_forms(teacher_signature(teacher), next(s for s in sigs if s.name == n))
    assert report["predictor"]["form"] == PREDICTOR and report["predictor"]["far_from"] == VERDICT_FAR
    md = report_markdown(report)
    assert "## As a calibration set" in md and all(e["verdict"] in md for e in by.values())


def test_reliability_and_noise_ceiling_hand_computed():
    # means 2, 6, 10: s_b^2 = 16; within variances 2, 2, 2; n = 2 -> R = (16 - 2 / 2) / 16
    assert reliability([[1, 3], [5, 7], [9, 11]]) == pytest.approx(15 / 16)
    assert noise_ceiling([[1, 3], [5, 7], [9, 11]]) == pytest.approx(math.sqrt(15 / 16))
    # unequal sizes: within variances 2 and 4 (the single value has none); n = 3 / (1/2 + 1 + 1/3)
    n = 3 / (1 / 2 + 1 + 1 / 3)
    assert reliability([[1, 3], [6], [8, 10, 12]]) == pytest.approx((16 - 3 / n) / 16)
    assert reliability([[0, 2], [1, 5]]) == 0.0                  # noise larger than the spread: clipped
    assert math.isnan(reliability([[1, 3], [3, 1]]))            # the means do not vary
    assert math.isnan(reliability([[1], [2], [3]]))             # no replicates


def test_reliability_matches_its_expectation_on_simulated_groups():
    rng = random.Random(0)
    sb, sw, n = 1.0, 2.0, 4
    groups = []
    for _ in range(4000):
        mu = rng.gauss(0, sb)
        groups.append([mu + rng.gauss(0, sw) for _ in range(n)])
    assert reliability(groups) == pytest.approx(sb ** 2 / (sb ** 2 + sw ** 2 / n), abs=0.03)


def _dash_rows(img, color, top):
    """Rows (y above ``top``) where ``color`` draws a dashed line across most of the image's width."""
    px = img.load()
    rows = []
    for y in range(top):
        hits = sum(1 for x in range(img.width) if px[x, y] == color)
        if hits > img.width // 8:
            rows.append(y)
    return rows


def test_chart_marks_the_verdict_thresholds_on_the_log_axis():
    from zeroshot_kd.similarity import report_chart

    def report(far):
        # scores span [0.004, 8]: the axis ends (min / 3, max * 3) do not depend on the thresholds
        names = {"real": 0.004, "synth": 0.05, "noise": 8.0}
        datasets = [{"name": n, "predicted_rank": i + 1, "verdict": verdict(v), "forms": {"f": v},
                     "scores": {"bns": v}, "per_layer": {"bns": [v, v * 2]}} for i, (n, v) in enumerate(names.items())]
        return {"headline": "bns", "layers": ["l1", "l2"], "datasets": datasets,
                "predictor": {"form": "f", "close_below": 0.01, "far_from": far}}

    a, b = report_chart(report(0.1)), report_chart(report(1.0))
    top = a.height // 2  # the bar panel is the upper image
    green_a, red_a = _dash_rows(a, (40, 150, 40), top), _dash_rows(a, (200, 40, 40), top)
    green_b, red_b = _dash_rows(b, (40, 150, 40), top), _dash_rows(b, (200, 40, 40), top)
    assert green_a and red_a and green_a == green_b
    y_close, y_far_a, y_far_b = green_a[0], red_a[0], red_b[0]
    assert y_close > y_far_a > y_far_b  # lower score = lower on the chart
    # log axis: 0.01 -> 0.1 and 0.1 -> 1.0 are the same distance
    assert abs((y_close - y_far_a) - (y_far_a - y_far_b)) <= 2


def test_verdict_thresholds_derived_from_a_benchmark_table():
    from zeroshot_kd.similarity import derive_verdict_thresholds

    # teacher A: losses stay <= 3 up to score 0.02, then 4; teacher B: up to 0.05. far = loss >= 5.
    a = [(0.001, 0.0), (0.01, 1.0), (0.02, 2.5), (0.08, 4.0), (0.4, 6.0), (2.0, 20.0)]
    b = [(0.002, 0.0), (0.05, 3.0), (0.1, 1.0), (0.3, 4.5), (1.0, 8.0)]
    close, far = derive_verdict_thresholds([a, b])
    assert close == pytest.approx(math.sqrt(0.02 * 0.08))          # A's prefix ends first
    # candidates above close: errors counted by hand; sqrt(0.3 * 0.4) separates every far set from the rest
    assert far == pytest.approx(math.sqrt(0.3 * 0.4))
    # brute force over all cut points gives the same minimum error
    every = a + b

    def err(t):
        return sum((sc >= t) != (loss >= 5.0) for sc, loss in every)

    assert err(far) == min(err(t) for t in [sc * f for sc, _ in every for f in (0.999, 1.001)] if t > close) == 0
    assert derive_verdict_thresholds([[(0.1, 9.0), (0.2, 9.0)]])[0] == 0.1   # nothing close: below every set


def test_aligned_reliability_removes_a_shared_replicate_effect():
    base = [1.0, 4.0, 6.0, 9.0]
    seed = [0.0, 3.0, -2.0]  # every set moves alike with the seed: the ranking is noise-free
    groups = [[b + e for e in seed] for b in base]
    assert reliability(groups, aligned=True) == pytest.approx(1.0)
    assert reliability(groups) < 0.95
    # s_b^2 = 2, residual variance 4 / ((2-1)(2-1)), n = 2: R = (2 - 4 / 2) / 2
    g = [[3.0, 1.0], [3.0, 5.0]]  # means 2, 4; column means 3, 3; residuals +-1
    assert reliability(g, aligned=True) == pytest.approx(max(0.0, (2 - 4 / 2) / 2))
    with pytest.raises(ValueError):
        reliability([[1, 2], [3]], aligned=True)
