"""Benchmark metrics: hand-worked cases, scikit-learn agreement, pooling, the intensity baseline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pseudohealthy.evaluation.metrics import (
    MetricsError,
    PixelPool,
    benchmark_metrics,
    binary_curve,
    intensity_baseline_scores,
    metrics_from_pool,
    pr_curve,
    roc_curve,
)

KEYS = {"ap_image", "auroc", "ap_pixel", "best_dice", "dice_at_5fpr", "n_slices", "n_volumes"}

# hand-worked 6-pixel example: scores high to low, labels 1 0 1 0 0 1
SIX_SCORES = np.array([0.4, 0.9, 0.6, 0.8, 0.5, 0.7])
SIX_LABELS = np.array([1, 1, 0, 0, 0, 1], dtype=bool)  # sorted: 0.9+ 0.8- 0.7+ 0.6- 0.5- 0.4+


def _random(n: int, seed: int = 0, prevalence: float = 0.1, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < prevalence
    scores = np.clip(rng.normal(0.4, 0.15, n) + 0.2 * labels, 0, 1)
    if ties:
        scores = np.round(scores, 2)
    return scores, labels


def test_perfect_separation():
    pixels = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1], dtype=bool)
    m = benchmark_metrics([0.1, 0.9, 0.2], [False, True, False], pixels, labels, n_volumes=1)
    assert KEYS <= set(m)
    for key in ("ap_image", "auroc", "ap_pixel", "best_dice"):
        assert m[key] == pytest.approx(1.0)
    assert m["dice_at_5fpr"] == pytest.approx(1.0)  # threshold 0.8: no false positive
    assert (m["n_slices"], m["n_volumes"], m["n_lesion_pixels"]) == (3, 1, 2)


def test_hand_worked_six_pixels():
    curve = binary_curve(SIX_SCORES, SIX_LABELS)
    np.testing.assert_array_equal(curve.tps, [1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(curve.fps, [0, 1, 1, 2, 3, 3])
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 1/2 = 13/18
    assert curve.average_precision() == pytest.approx(13 / 18)
    # Dice = 2TP / (TP + FP + 3): 2/4, 2/5, 4/6, 4/7, 4/8, 6/9 -> best 2/3, first at threshold 0.7
    assert curve.best_dice() == pytest.approx((2 / 3, 0.7))
    # FPR = 0, 1/3, 1/3, 2/3, 1, 1: at 5% only the top pixel -> Dice 1/2; at 40% -> threshold 0.7
    assert curve.dice_at_fpr(0.05) == pytest.approx((0.5, 0.9))
    assert curve.dice_at_fpr(0.4) == pytest.approx((2 / 3, 0.7))
    m = benchmark_metrics(SIX_SCORES, SIX_LABELS, SIX_SCORES, SIX_LABELS)
    assert m["ap_pixel"] == pytest.approx(13 / 18)
    assert m["ap_image"] == pytest.approx(average_precision_score(SIX_LABELS, SIX_SCORES))
    assert m["auroc"] == pytest.approx(5 / 9)  # 5 of the 9 (positive, negative) pairs ordered right


def test_dice_at_5fpr_constructed():
    # 100 healthy pixels with distinct scores 0.00..0.99, 10 lesion pixels at 0.955:
    # FPR <= 5% allows the 5 healthy pixels 0.95..0.99 -> TP 10, FP 5 -> Dice 20 / 25
    neg = np.arange(100) / 100
    scores = np.r_[neg, np.full(10, 0.955)]
    labels = np.r_[np.zeros(100, bool), np.ones(10, bool)]
    m = benchmark_metrics([0.1, 0.9], [False, True], scores, labels)
    assert m["dice_at_5fpr"] == pytest.approx(0.8)
    assert m["threshold_at_5fpr"] == pytest.approx(0.95)
    assert m["best_dice"] == pytest.approx(2 * 10 / (10 + 4 + 10))  # threshold 0.955: FP 4


def test_nothing_below_max_fpr_gives_zero_dice():
    scores = np.r_[np.ones(10), np.zeros(5)]
    labels = np.r_[np.zeros(8, bool), np.ones(7, bool)]  # the top-scored tie holds 8 negatives
    assert binary_curve(scores, labels).dice_at_fpr(0.05)[0] == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_exact_path_matches_sklearn(ties):
    scores, labels = _random(5000, seed=1, ties=ties)
    s_scores, s_labels = _random(300, seed=2, ties=ties)
    m = benchmark_metrics(s_scores, s_labels, scores, labels)
    assert m["pixel_pooling"] == "exact"
    assert m["ap_pixel"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m["ap_image"] == pytest.approx(average_precision_score(s_labels, s_scores), abs=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(s_labels, s_scores), abs=1e-12)


def test_histogram_path_within_1e3_of_sklearn():
    scores, labels = _random(200_000, seed=3, prevalence=0.03)
    m = benchmark_metrics([0.2, 0.7], [False, True], scores, labels, exact_limit=0)
    assert m["pixel_pooling"] == "histogram"
    assert m["ap_pixel"] == pytest.approx(average_precision_score(labels, scores), abs=1e-3)
    exact = benchmark_metrics([0.2, 0.7], [False, True], scores, labels)
    assert m["best_dice"] == pytest.approx(exact["best_dice"], abs=1e-3)
    assert m["dice_at_5fpr"] == pytest.approx(exact["dice_at_5fpr"], abs=1e-3)


def test_histogram_resolves_tiny_scores():
    # scores of order 1e-3 (faithful SSIM maps): log-spaced bins keep their ranking
    scores, labels = _random(50_000, seed=4)
    scores = scores * 2e-3
    pool = PixelPool(exact_limit=0)
    pool.update(scores, labels)
    ap = metrics_from_pool([0.0, 1.0], [False, True], pool)["ap_pixel"]
    assert ap == pytest.approx(average_precision_score(labels, scores), abs=1e-3)


def test_scores_outside_unit_range_are_rescaled_without_changing_metrics():
    scores, labels = _random(20_000, seed=5)
    shifted = benchmark_metrics([0, 1], [False, True], 50 * scores - 7, labels, exact_limit=0)
    assert shifted["ap_pixel"] == pytest.approx(average_precision_score(labels, scores), abs=1e-3)


def test_pool_chunks_equal_one_shot_and_switch_to_histogram():
    scores, labels = _random(30_000, seed=6)
    pool = PixelPool(exact_limit=12_000)
    for part in np.array_split(np.arange(scores.size), 5):
        pool.update(scores[part].reshape(-1, 10), labels[part].reshape(-1, 10))
    assert not pool.exact and pool.n == scores.size
    chunked = metrics_from_pool([0, 1], [False, True], pool)
    one = benchmark_metrics([0, 1], [False, True], scores, labels, exact_limit=0)
    for key in ("ap_pixel", "best_dice", "dice_at_5fpr"):
        assert chunked[key] == pytest.approx(one[key], abs=1e-12)


def test_curves_helpers():
    scores, labels = _random(2000, seed=7)
    precision, recall = pr_curve(scores, labels)
    assert recall[-1] == pytest.approx(1.0) and np.all(np.diff(recall) >= 0)
    assert precision[-1] == pytest.approx(labels.mean())
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    pool = PixelPool()
    pool.update(scores, labels)
    np.testing.assert_allclose(roc_curve(pool)[1], tpr)


def test_degenerate_inputs_raise():
    with pytest.raises(MetricsError, match="no lesion pixel"):
        benchmark_metrics([0.1, 0.2], [False, True], [0.1, 0.2], [False, False])
    with pytest.raises(MetricsError, match="labels"):
        benchmark_metrics([0.1, 0.2], [False, True], [0.1, 0.2, 0.3], [False, True])
    with pytest.raises(MetricsError, match="labels"):
        benchmark_metrics([0.1], [False, True], [0.1, 0.2], [False, True])
    with pytest.raises(MetricsError, match="NaN"):
        benchmark_metrics([0.1, 0.2], [False, True], [np.nan, 0.2], [False, True])
    with pytest.raises(MetricsError, match="every slice"):
        benchmark_metrics([0.1, 0.2], [True, True], [0.1, 0.2], [False, True])
    m = benchmark_metrics([0.1, 0.2], [True, True], [0.1, 0.2], [False, True], allow_undefined=True)
    assert m["auroc"] is None and m["ap_image"] is None and m["ap_pixel"] == pytest.approx(1.0)


def test_intensity_baseline_scores():
    rng = np.random.default_rng(8)
    image = rng.normal(100, 20, (20, 20, 4)).astype(np.float32)
    fg = np.zeros(image.shape, bool)
    fg[2:18, 2:18] = True
    image[~fg] = -5
    s = intensity_baseline_scores(image, fg)
    lo, hi = np.percentile(image[fg], [1, 99])
    assert s.min() == 0.0 and s.max() == pytest.approx(1.0)
    assert np.all(s[~fg] == 0)
    np.testing.assert_allclose(s[fg], (np.clip(image[fg], lo, hi) - lo) / (hi - lo), atol=1e-6)
    assert np.mean(s[fg] == 1.0) == pytest.approx(0.01, abs=0.005)  # the top 1% clipped
    inv = intensity_baseline_scores(image, fg, invert=True)
    np.testing.assert_allclose(inv[fg], 1 - s[fg], atol=1e-6)
    assert np.all(inv[~fg] == 0)
