"""The synthetic tasks' reference details, each pinned by the reference's own formulas.

Expected values come from the formulas in REFERENCE.md ("Synthetic anomaly tasks"), sampled
or evaluated here with numpy/scipy, never from the task code; where it helps, the legacy
style is checked to fail the same test (so the test can fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.ndimage import distance_transform_edt

from pseudohealthy.data.anomalies import STYLES, Corruptor, apply_task, check_style, draw_shape
from pseudohealthy.data.anomalies import poisson as poisson_module
from pseudohealthy.data.anomalies.deform import deformation_for, sample_deformation
from pseudohealthy.data.anomalies.intensity import IntensityPlan, apply_intensity, intensity_plan
from pseudohealthy.data.anomalies.shapes import Shape
from pseudohealthy.data.io import load_scan
from pseudohealthy.data.preprocess import prepare_scan

SQRT2 = np.sqrt(2.0)


@pytest.fixture(scope="module")
def brain(shared_data):
    """Foreground masks and images of the central 80% of an MS patient's T2 slices, 128 px."""
    prep = prepare_scan(load_scan(shared_data / "lesion/mslub/patient07/T2.nii.gz"), size=128)
    k = len(prep.indices)
    keep = slice(int(0.1 * k), int(0.9 * k))
    return prep.images[keep], prep.masks[keep]


def _reference_sides(rng: np.random.Generator, n: int, extent: float, size: float = 128.0) -> np.ndarray:
    """side = int(clip((0.03 + Gamma(2, 0.1)) * size, 0.06 extent, 0.8 extent))."""
    return np.floor(np.clip((0.03 + rng.gamma(2.0, 0.1, n)) * size, 0.06 * extent, 0.8 * extent))


def _half_box(linear: np.ndarray, kind: str) -> np.ndarray:
    """Half the bounding box of {linear @ u : |u| <= 1} (max-norm square or unit disk)."""
    return np.linalg.norm(linear, axis=1) if kind == "ellipse" else np.abs(linear).sum(axis=1)


def _inside(shape: Shape, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The shape's implicit test, written here from its definition."""
    u = np.linalg.solve(
        shape.linear, np.stack([rows - shape.centre[0], cols - shape.centre[1]]).reshape(2, -1)
    )
    norm = np.hypot(u[0], u[1]) if shape.kind == "ellipse" else np.abs(u).max(axis=0)
    return (norm <= 1.0).reshape(np.shape(rows))


# ---------------------------------------------------------------- the switch


def test_style_switch():
    assert STYLES[0] == "reference" and "legacy" in STYLES
    assert Corruptor([2]).style == "reference" and Corruptor([2], style="legacy").style == "legacy"
    with pytest.raises(ValueError, match="style"):
        check_style("faithful")
    fg = np.ones((32, 32), bool)
    with pytest.raises(ValueError, match="style"):
        apply_task("sink", np.zeros((32, 32), np.float32), fg, np.random.default_rng(0), style="x")


# ---------------------------------------------------------------- shapes


def test_side_lengths_follow_the_gamma_formula():
    fg = np.ones((128, 128), bool)  # box 128: bounds 7.68 .. 102.4
    rng = np.random.default_rng(0)
    sides = np.array([draw_shape(fg, rng).sides for _ in range(600)]).ravel()
    np.testing.assert_array_equal(sides, np.floor(sides))  # int(...)
    expected = _reference_sides(np.random.default_rng(12345), 20000, 128)
    assert stats.ks_2samp(sides, expected).pvalue > 0.01
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(sides, q) - np.quantile(expected, q)) <= 2.0


def _shear_and_angle(shape: Shape) -> tuple[float, float, float] | None:
    """(s10, s01, angle) of linear = R(angle) [[1, s01], [s10, 1]] diag(sides/2), or None if rescaled."""
    m = shape.linear @ np.diag(2.0 / np.asarray(shape.sides))
    gram = m.T @ m  # = S^T S when not rescaled: [[1 + s10^2, s01 + s10], [., 1 + s01^2]]
    if min(gram[0, 0], gram[1, 1]) < 1.0 - 1e-9:
        return None
    x, y = np.sqrt(max(gram[0, 0] - 1.0, 0.0)), np.sqrt(max(gram[1, 1] - 1.0, 0.0))
    x, y = min(((sx * x, sy * y) for sx in (1, -1) for sy in (1, -1)), key=lambda p: abs(sum(p) - gram[0, 1]))
    rot = m @ np.linalg.inv(np.array([[1.0, y], [x, 1.0]]))
    return x, y, float(np.arctan2(rot[1, 0], rot[0, 0]))


@pytest.mark.parametrize("style", STYLES)
def test_shear_on_both_terms_and_rotation(style):
    fg = np.ones((128, 128), bool)
    rng = np.random.default_rng(1)
    found = [_shear_and_angle(draw_shape(fg, rng, style=style)) for _ in range(500)]
    terms = np.array([f for f in found if f is not None])
    assert len(terms) > 400
    sd = np.sqrt(np.mean(terms[:, :2] ** 2, axis=0))  # N(0, 0.2): E[s^2] = 0.04
    if style == "legacy":
        np.testing.assert_allclose(sd[0], 0.0, atol=1e-6)  # one shear term only
        return
    assert np.all((0.17 < sd) & (sd < 0.23))
    # rotation U(-pi/2, pi/2) (an angle and angle + pi give the same shape: fold into that range)
    angles = (terms[:, 2] + np.pi / 2) % np.pi - np.pi / 2
    assert stats.kstest(angles, stats.uniform(-np.pi / 2, np.pi).cdf).pvalue > 0.01


@pytest.mark.parametrize("style", STYLES)
def test_box_within_the_upper_bound(style):
    yy, xx = np.mgrid[:128, :128]
    fg = (yy - 64) ** 2 + (xx - 64) ** 2 < 38**2  # box 75 px: bound 0.8 * 75 = 60
    r = np.flatnonzero(fg.any(1))
    bound = 0.8 * (r[-1] - r[0] + 1)
    rng = np.random.default_rng(2)
    boxes = np.array(
        [2 * _half_box(s.linear, s.kind) for s in (draw_shape(fg, rng, style=style) for _ in range(300))]
    )
    if style == "reference":
        assert boxes.max() <= bound + 1e-9
        assert np.mean(boxes.max(axis=1) > bound - 1e-6) > 0.02  # some were rescaled onto the bound
    else:
        assert boxes.max() > bound + 1  # legacy: no rescale


def test_bounds_come_from_the_largest_connected_region():
    fg = np.zeros((128, 128), bool)
    fg[4:64, 4:64] = True  # the largest region: box 60, bounds 3.6 .. 48
    fg[110:120, 110:120] = True  # a small blob: the whole foreground's box would be 116
    rng = np.random.default_rng(3)
    sides = np.array([draw_shape(fg, rng).sides for _ in range(500)]).ravel()
    assert sides.max() <= 48
    expected = _reference_sides(np.random.default_rng(54321), 20000, 60)
    assert stats.ks_2samp(sides, expected).pvalue > 0.01
    legacy = np.array([draw_shape(fg, rng, style="legacy").sides for _ in range(200)]).ravel()
    assert legacy.max() > 48


@pytest.mark.parametrize("style", STYLES)
def test_overlap_at_least_a_quarter_and_never_cut_by_the_border(style):
    fg = np.zeros((128, 128), bool)
    fg[:, :64] = True  # touches three borders; every shape can lie wholly on it
    rng = np.random.default_rng(4)
    grid_r, grid_c = np.mgrid[-80:208, -80:208]  # a shape reaches at most ~72 px beyond the border
    overlaps, cut = [], 0
    for _ in range(200):
        shape = draw_shape(fg, rng, style=style)
        whole = _inside(shape, grid_r, grid_c)  # rasterised here on a grid beyond the image
        in_image = whole[80:208, 80:208]
        cut += int(whole.sum() > in_image.sum())
        np.testing.assert_array_equal(shape.mask, in_image)
        overlaps.append(np.count_nonzero(shape.mask & fg) / shape.mask.sum())
    overlaps = np.array(overlaps)
    if style == "reference":
        assert cut == 0
        assert overlaps.min() >= 0.25 - 0.02  # threshold 0.5 halved before the first try
        assert np.mean(overlaps < 0.5) > 0.05
    else:
        assert cut > 0 and overlaps.min() >= 0.5 - 0.02


# ---------------------------------------------------------------- deformation


def _edge_distance_by_bisection(shape: Shape, centre, rows, cols) -> np.ndarray:
    """D: distance from centre to the shape's edge along the ray through each pixel (bisection)."""
    c = np.asarray(centre, float)[:, None]
    v = np.stack([rows, cols]).astype(float) - c
    v /= np.linalg.norm(v, axis=0)
    lo, hi = np.zeros(v.shape[1]), np.full(v.shape[1], 4.0 * shape.max_extent + 4.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        p = c + v * mid
        ok = _inside(shape, p[0], p[1])
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return 0.5 * (lo + hi)


def _known_shape(kind: str) -> Shape:
    linear = np.array([[9.13, 3.07], [-2.21, 14.29]])  # no pixel exactly on the edge
    rows, cols = np.mgrid[:64, :64]
    probe = Shape(np.zeros((64, 64), bool), (0, 64, 0, 64), (30, 33), linear, kind)
    mask = _inside(probe, rows, cols)
    r, c = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return Shape(mask, (r[0], r[-1] + 1, c[0], c[-1] + 1), (30, 33), linear, kind, int(mask.sum()))


@pytest.mark.parametrize("shape_kind", ["rectangle", "ellipse"])
@pytest.mark.parametrize("kind", ["sink", "source"])
def test_displacement_field_follows_the_radial_formula(shape_kind, kind):
    from scipy.ndimage import binary_erosion

    shape = _known_shape(shape_kind)
    rng = np.random.default_rng(5)
    for _ in range(20):
        deform = deformation_for(shape, rng, kind)
        c = deform.centre
        assert shape.mask[int(c[0]), int(c[1])] and c == (int(c[0]), int(c[1]))  # a pixel of the shape
        rows, cols = deform.rows, deform.cols
        d = np.hypot(rows - c[0], cols - c[1])
        keep = d > 0
        big_d = _edge_distance_by_bisection(shape, c, rows[keep], cols[keep])
        f = deform.exponent
        dd = np.minimum(d[keep], big_d)
        moved = big_d - (big_d - dd) ** f / big_d ** (f - 1) if kind == "sink" else dd**f / big_d ** (f - 1)
        exp_r = c[0] + (rows[keep] - c[0]) * moved / d[keep]
        exp_c = c[1] + (cols[keep] - c[1]) * moved / d[keep]
        np.testing.assert_allclose(deform.src_rows[keep], exp_r, atol=1e-6)
        np.testing.assert_allclose(deform.src_cols[keep], exp_c, atol=1e-6)
        # A: mean distance to the edge pixels; p in its range; the curve (D = A) through the point
        edge = shape.mask & ~binary_erosion(shape.mask)
        er, ec = np.nonzero(edge)
        a = np.mean(np.hypot(er - c[0], ec - c[1]))
        assert deform.mean_edge == pytest.approx(a, rel=1e-9)
        p = deform.push
        assert max(0.5, 0.1 * a / SQRT2) - 1e-12 <= p <= min(5.0, 0.9 * a / SQRT2) + 1e-12
        x = a / 2 + p / SQRT2 if kind == "source" else a / 2 - p / SQRT2
        y = a / 2 - p / SQRT2 if kind == "source" else a / 2 + p / SQRT2
        curve = x**f / a ** (f - 1) if kind == "source" else a - (a - x) ** f / a ** (f - 1)
        assert curve == pytest.approx(y, rel=1e-9)


def test_push_is_uniform_in_its_range():
    shape = _known_shape("ellipse")
    rng = np.random.default_rng(6)
    u = []
    for _ in range(400):
        deform = deformation_for(shape, rng, "source")
        lo, hi = max(0.5, 0.1 * deform.mean_edge / SQRT2), min(5.0, 0.9 * deform.mean_edge / SQRT2)
        u.append((deform.push - lo) / (hi - lo))
    assert stats.kstest(u, "uniform").pvalue > 0.01


def test_largest_displacement_median_near_8_px(brain):
    """The reference's largest displacement has a median of about 8 px at 128 px (legacy: 2.6).

    400 draws on the central slices of a real T2 (sd of the median about 0.25 px); tolerance +-1 px.
    """
    _, masks = brain
    largest = {}
    for style in STYLES:
        rng = np.random.default_rng(7)
        largest[style] = np.median(
            [
                sample_deformation(
                    masks[i % len(masks)], rng, ("sink", "source")[i % 2], style=style
                ).displacement.max(initial=0.0)
                for i in range(400)
            ]
        )
    assert 7.0 <= largest["reference"] <= 9.0
    assert largest["legacy"] < 5.0


# ---------------------------------------------------------------- intensity


def _disk_shape(radius: float, size: int = 96) -> Shape:
    linear = np.diag([radius, radius])
    rows, cols = np.mgrid[:size, :size]
    centre = (size // 2, size // 2)
    mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    r, c = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return Shape(mask, (r[0], r[-1] + 1, c[0], c[-1] + 1), centre, linear, "ellipse", int(mask.sum()))


def test_edge_scale_is_capped_at_the_largest_edge_distance():
    small = _disk_shape(3.0)
    max_edt = distance_transform_edt(small.mask).max()
    rng = np.random.default_rng(8)
    soft = np.array([intensity_plan(small, rng, 128.0).soft for _ in range(1000)])
    assert soft.max() <= max_edt + 1e-9
    # s = 128 (0.02 + Gamma(3, 0.01)) is capped with probability P(s > max EDT)
    p = stats.gamma(3.0, scale=0.01).sf(max_edt / 128.0 - 0.02)
    capped = np.count_nonzero(np.isclose(soft, max_edt))
    assert abs(capped - 1000 * p) < 4 * np.sqrt(1000 * p * (1 - p)) + 1
    big = _disk_shape(40.0)
    soft = np.array([intensity_plan(big, rng, 128.0).soft for _ in range(400)])
    assert stats.kstest(soft / 128.0 - 0.02, stats.gamma(3.0, scale=0.01).cdf).pvalue > 0.01
    legacy = np.array([intensity_plan(small, rng, 128.0, style="legacy").soft for _ in range(200)])
    assert legacy.max() > max_edt


def test_edge_weight_is_edt_over_s():
    shape = _disk_shape(12.0)
    r0, r1, c0, c1 = shape.box
    img = np.full(shape.mask.shape, 0.5, np.float32)
    img[0, 0], img[0, 1] = 0.0, 1.0
    plan = IntensityPlan(0.2, 4.5, 1, 1.0, np.ones((r1 - r0, c1 - c0)))
    out = apply_intensity(img, shape, plan)
    edt = distance_transform_edt(shape.mask)
    expected = np.where(shape.mask, 0.5 + 0.2 * np.minimum(edt / 4.5, 1.0), img)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_perlin_layers_and_base_frequency():
    shape = _disk_shape(10.0)
    r0, r1, c0, c1 = shape.box
    mean_side = 0.5 * ((r1 - r0) + (c1 - c0))
    rng = np.random.default_rng(9)
    plans = [intensity_plan(shape, rng, 128.0) for _ in range(2000)]
    layers = np.array([p.layers for p in plans])
    observed = np.array([np.sum(layers == k) for k in (1, 2, 3)] + [np.sum(layers >= 4)])
    pmf = stats.poisson(1.0).pmf([0, 1, 2])
    expected = 2000 * np.append(pmf, 1 - pmf.sum())  # 1 + Poisson(1)
    assert stats.chisquare(observed, expected).pvalue > 0.001
    freq = np.array([p.frequency for p in plans]) - 1.0
    scale = (mean_side / 3.0 - 1.0) / 4.5
    assert stats.kstest(freq, stats.expon(scale=scale).cdf).pvalue > 0.01
    for p in plans[:50]:
        assert p.noise.shape == (r1 - r0, c1 - c0)
        assert p.noise.min() == pytest.approx(0.0) and p.noise.max() == pytest.approx(1.0)


# ---------------------------------------------------------------- Poisson editing


def test_poisson_replaces_the_whole_solved_box(brain):
    images, masks = brain
    j = len(images) // 2
    image, fg = images[j], masks[j]
    lo, hi = float(image.min()), float(image.max())
    outside_changed = 0
    for seed in range(8):
        out, mask = apply_task(0, image, fg, np.random.default_rng(seed), intra_sources=[images[j - 20]])
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = np.zeros_like(mask)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        delta = out.astype(np.float64) - image
        np.testing.assert_array_equal(delta[~box], 0.0)
        # outside the shape the solution keeps the target's Laplacian: delta is discrete-harmonic
        clipped = box & ((out <= lo) | (out >= hi))
        padded = np.pad(delta, 1)
        lap = padded[2:, 1:-1] + padded[:-2, 1:-1] + padded[1:-1, 2:] + padded[1:-1, :-2] - 4 * delta
        free = box & ~_cross_dilate(mask) & ~_cross_dilate(clipped)
        free[[0, -1], :] = free[:, [0, -1]] = False
        np.testing.assert_allclose(lap[free], 0.0, atol=2e-5)
        if (box & ~mask).any():
            ring = np.abs(delta[box & ~mask]).max()
            outside_changed += int(ring > 1e-6)
            assert ring <= np.abs(delta[mask]).max() + 1e-6  # "a little"
    assert outside_changed >= 4


def _cross_dilate(m: np.ndarray) -> np.ndarray:
    """``m`` and its 4-neighbours."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = poisson_module.map_coordinates

    def record(src, coords, **kwargs):
        calls.append((np.shape(src), np.asarray(coords), kwargs["order"]))
        return real(src, coords, **kwargs)

    monkeypatch.setattr(poisson_module, "map_coordinates", record)
    return calls


@pytest.mark.parametrize("style", STYLES)
def test_poisson_source_sampling_is_cubic_and_scale_capped(spy, style):
    fg = np.ones((128, 128), bool)
    img = np.tile(np.linspace(0.0, 1.0, 128, dtype=np.float32), (128, 1))
    small = np.random.default_rng(0).random((24, 24)).astype(np.float32) + 0.1
    rng = np.random.default_rng(10)
    over = 0
    for _ in range(60):
        apply_task(0, img, fg, rng, intra_sources=[small], style=style)
        _, coords, order = spy[-1]
        assert order == (3 if style == "reference" else 1)
        scale = np.hypot(*(coords[:, 0, 1] - coords[:, 0, 0]))  # source step per target pixel
        cap = 0.8 * 24 / max(coords.shape[1:])  # the patch spans at most 0.8 of the source
        over += int(scale > cap + 1e-9)
    assert (over == 0) if style == "reference" else (over > 0)


def test_poisson_scale_distribution_without_the_cap(spy):
    fg = np.zeros((128, 128), bool)
    fg[40:90, 40:90] = True
    img = np.where(fg, 0.5, 0.0).astype(np.float32)
    big = np.random.default_rng(1).random((256, 256)).astype(np.float32) + 0.1  # cap 0.8 * 256 / 42 > 4
    rng = np.random.default_rng(11)
    log_scales = []
    for _ in range(300):
        apply_task(0, img, fg, rng, intra_sources=[big])
        coords = spy[-1][1]
        log_scales.append(abs(np.log(np.hypot(*(coords[:, 0, 1] - coords[:, 0, 0])))))
    expected = np.log1p(np.random.default_rng(2).exponential(0.1, 20000))  # |log(1 + Exp(0.1))^+-1|
    assert stats.ks_2samp(log_scales, expected).pvalue > 0.01
