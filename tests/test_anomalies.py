"""anomalies/: shapes, the five tasks, the Poisson solver, folds, Corruptor, random streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

from pseudohealthy.data.anomalies import (
    FOLDS,
    TASKS,
    Corruptor,
    apply_task,
    blend,
    draw_shape,
    fold_tasks,
    keyed_rng,
    load_inter_sources,
    mixed_gradients,
    poisson_solve,
    sample_rng,
    sample_shape,
    task_index,
    worker_rng,
)
from pseudohealthy.data.anomalies import corrupt as corrupt_module
from pseudohealthy.data.anomalies.deform import exponent_for_push, max_push_fraction, radial_map
from pseudohealthy.data.anomalies.intensity import fractal_noise
from pseudohealthy.data.anomalies.scan import intra_sources_for
from pseudohealthy.data.io import load_scan
from pseudohealthy.data.preprocess import prepare_scan
from pseudohealthy.errors import ScanError
from pseudohealthy.figures.gallery import save_gallery


@pytest.fixture(scope="module")
def brain(shared_data):
    """Real 128x128 model-frame slices of an MS patient's T2 (central slices only)."""
    prep = prepare_scan(load_scan(shared_data / "lesion/mslub/patient07/T2.nii.gz"), size=128)
    k = len(prep.indices)
    keep = slice(int(0.2 * k), int(0.8 * k))
    return prep.images[keep], prep.masks[keep], prep.indices[keep]


@pytest.fixture(scope="module")
def inter():
    return load_inter_sources(size=128)


def _may_change(task: int, mask: np.ndarray) -> np.ndarray:
    """Where a task may change the image: the mask; its whole box for the (reference) Poisson tasks."""
    if task not in (0, 1):
        return mask
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    region = np.zeros_like(mask)
    region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return region


def _disk(size: int = 48, radius: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    fg = yy**2 + xx**2 < radius**2
    rng = np.random.default_rng(7)
    img = np.where(fg, 0.3 + 0.5 * np.exp(-((yy - 0.1) ** 2 + xx**2) * 20) + 0.05 * rng.random(fg.shape), 0.0)
    return img.astype(np.float32), fg


# ---------------------------------------------------------------- the five tasks on real slices


@pytest.mark.parametrize("task", range(5))
def test_task_changes_only_inside_mask_and_keeps_range(brain, inter, task):
    images, masks, indices = brain
    changed = 0
    for i, j in enumerate(range(0, len(images), max(1, len(images) // 12))):
        image, fg = images[j], masks[j]
        rng = keyed_rng(11, task, i)
        intra = intra_sources_for(images, indices, j)
        out, mask = apply_task(task, image, fg, rng, intra_sources=intra, inter_sources=inter)
        assert out.dtype == np.float32 and out.shape == image.shape
        assert mask.dtype == bool and mask.any()
        region = _may_change(task, mask)
        np.testing.assert_array_equal(out[~region], image[~region])
        assert out.min() >= image.min() and out.max() <= image.max()
        assert np.count_nonzero(mask & fg) >= 0.25 * np.count_nonzero(mask)
        changed += not np.array_equal(out, image)
    assert changed >= 10  # the tasks really alter the image


@pytest.mark.parametrize("task", list(TASKS))
def test_task_reproducible_and_seed_dependent(brain, inter, task):
    images, masks, _ = brain
    image, fg = images[len(images) // 2], masks[len(images) // 2]
    kw = {"intra_sources": images[:5], "inter_sources": inter}
    a = apply_task(task, image, fg, sample_rng(3, 1), **kw)
    b = apply_task(task, image, fg, sample_rng(3, 1), **kw)
    c = apply_task(task, image, fg, sample_rng(3, 2), **kw)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_tasks_work_on_rectangular_images_and_keep_negative_ranges():
    img, fg = _disk(48)
    img = np.pad(img, ((0, 0), (8, 8))) * 2.0 - 1.0  # 48x64, range [-1, ...]
    fg = np.pad(fg, ((0, 0), (8, 8)))
    for task in range(5):
        rng = np.random.default_rng(task)
        out, mask = apply_task(task, img, fg, rng, intra_sources=[np.flip(img, 1)])
        assert out.shape == (48, 64)
        region = _may_change(task, mask)
        np.testing.assert_array_equal(out[~region], img[~region])
        assert out.min() >= img.min() and out.max() <= img.max()


def test_task_names_and_errors():
    assert [task_index(t) for t in TASKS] == [0, 1, 2, 3, 4]
    assert task_index("intra") == 0 and task_index("Poisson-Inter") == 1 and task_index("3") == 3
    with pytest.raises(ValueError, match="unknown task"):
        task_index("blur")
    with pytest.raises(ValueError):
        task_index(5)
    img, fg = _disk()
    with pytest.raises(ValueError, match="intra_sources"):
        apply_task("poisson_intra", img, fg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty"):
        apply_task("sink", img, np.zeros_like(fg), np.random.default_rng(0))


# ---------------------------------------------------------------- shapes


def test_legacy_shape_size_bounds_and_overlap():
    _, fg = _disk(128, 0.3)  # foreground box about 77 px square
    r0, r1 = np.flatnonzero(fg.any(1))[[0, -1]]
    extent = r1 - r0 + 1
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(300):
        shape = draw_shape(fg, rng, style="legacy")
        area = shape.mask.sum()
        assert area >= 1
        assert np.count_nonzero(shape.mask & fg) >= 0.5 * area - 0.5
        # linear = rotation @ shear @ diag(half sides): |first column| = h0, det = h0 * h1
        h0 = np.linalg.norm(shape.linear[:, 0])
        h1 = abs(np.linalg.det(shape.linear)) / h0
        for h in (h0, h1):
            assert 0.06 * extent / 2 - 1e-9 <= h <= 0.8 * extent / 2 + 1e-9
        sides += [2 * h0, 2 * h1]
    # side = (0.03 + Gamma(2, 0.1)) * 128: median about (0.03 + 0.168) * 128 = 25 px
    assert 20 < np.median(sides) < 31
    kinds = {draw_shape(fg, rng).kind for _ in range(40)}
    assert kinds == {"rectangle", "ellipse"}


def test_shape_on_tiny_foreground_still_overlaps():
    fg = np.zeros((64, 64), bool)
    fg[0, 63] = True  # a single pixel in a corner: thresholds must halve until it fits
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = sample_shape(fg, rng)
        assert mask[0, 63]


def test_shape_placement_is_uniform_over_valid_centres():
    fg = np.zeros((64, 64), bool)
    fg[10:54, 10:54] = True
    rng = np.random.default_rng(2)
    centres = np.array([draw_shape(fg, rng).centre for _ in range(300)])
    # centres spread over the foreground, not stuck at one spot
    assert centres[:, 0].std() > 6 and centres[:, 1].std() > 6
    assert np.all((centres >= 0) & (centres < 64))


# ---------------------------------------------------------------- Poisson editing


def _laplacian(u: np.ndarray) -> np.ndarray:
    return u[2:, 1:-1] + u[:-2, 1:-1] + u[1:-1, 2:] + u[1:-1, :-2] - 4 * u[1:-1, 1:-1]


def test_poisson_solver_recovers_field_from_its_laplacian():
    rng = np.random.default_rng(0)
    u = rng.random((23, 31))
    boundary = u.copy()
    boundary[1:-1, 1:-1] = rng.random((21, 29)) * 100  # interior of the boundary array is ignored
    np.testing.assert_allclose(poisson_solve(_laplacian(u), boundary), u, atol=1e-10)


def test_poisson_solver_harmonic_case():
    y, x = np.mgrid[:17, :20].astype(float)
    u = x**2 - y**2 + 3 * x * y - 2 * x  # discretely harmonic for the 5-point stencil
    boundary = np.where(np.pad(np.zeros((15, 18), bool), 1, constant_values=True), u, 0.0)
    out = poisson_solve(np.zeros((15, 18)), boundary)
    np.testing.assert_allclose(out, u, atol=1e-9)


def test_poisson_solver_matches_sparse_direct_solve():
    rng = np.random.default_rng(1)
    h, w = 12, 9
    boundary = rng.random((h, w))
    rhs = rng.standard_normal((h - 2, w - 2))
    n, m = h - 2, w - 2
    lap1 = lambda k: sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(k, k))  # noqa: E731
    a = sp.kron(lap1(n), sp.eye(m)) + sp.kron(sp.eye(n), lap1(m))
    b = rhs.copy()
    b[0] -= boundary[0, 1:-1]
    b[-1] -= boundary[-1, 1:-1]
    b[:, 0] -= boundary[1:-1, 0]
    b[:, -1] -= boundary[1:-1, -1]
    expected = spsolve(a.tocsc(), b.ravel()).reshape(n, m)
    out = poisson_solve(rhs, boundary)
    np.testing.assert_allclose(out[1:-1, 1:-1], expected, atol=1e-10)
    np.testing.assert_array_equal(out[0], boundary[0])
    np.testing.assert_array_equal(out[:, -1], boundary[:, -1])


def test_blend_reproduces_source_inside_and_target_outside():
    rng = np.random.default_rng(2)
    target = rng.random((20, 24))
    source = rng.random((20, 24))
    source[0], source[-1], source[:, 0], source[:, -1] = target[0], target[-1], target[:, 0], target[:, -1]
    region = np.zeros((20, 24), bool)
    region[1:-1, 1:-1] = True
    out = blend(target, source, region, mixed=False)
    np.testing.assert_allclose(out, source, atol=1e-10)  # source gradients + matching boundary
    small = np.zeros_like(region)
    small[5:12, 6:15] = True
    out = blend(target, source, small, mixed=True)
    np.testing.assert_array_equal(out[~small], target[~small])
    with pytest.raises(ValueError, match="border"):
        blend(target, source, region | np.eye(20, 24, dtype=bool))


def test_mixed_gradients_pick_the_larger_magnitude():
    t = np.array([1.0, -3.0, 0.5, 2.0, -1.0])
    s = np.array([-2.0, 1.0, 0.5, -2.0, 0.0])
    np.testing.assert_array_equal(mixed_gradients(t, s), [-2.0, -3.0, 0.5, 2.0, -1.0])


def test_mixed_blend_keeps_strong_target_edges():
    target = np.zeros((30, 30))
    target[:, 15:] = 1.0  # a strong vertical edge
    source = np.full((30, 30), 0.5)  # flat: weaker gradients everywhere
    region = np.zeros((30, 30), bool)
    region[5:25, 5:25] = True
    np.testing.assert_allclose(blend(target, source, region, mixed=True), target, atol=1e-9)
    assert not np.allclose(blend(target, source, region, mixed=False), target, atol=1e-3)


# ---------------------------------------------------------------- deformation and intensity


def test_push_exponent_inverts_max_displacement():
    for fraction in (0.01, 0.1, 0.3, 0.5):
        f = exponent_for_push(fraction)
        assert f > 1
        assert max_push_fraction(f) == pytest.approx(fraction, rel=1e-6)
    rho = np.linspace(0, 1, 2001)
    f = exponent_for_push(0.2)
    for kind in ("sink", "source"):
        moved = rho * radial_map(rho, f, kind)
        assert np.max(np.abs(moved - rho)) == pytest.approx(0.2, rel=1e-3)
        assert moved[-1] == pytest.approx(1.0) and moved[0] == pytest.approx(0.0)
    assert np.all(radial_map(rho[1:], f, "source") <= 1 + 1e-12)  # samples nearer the centre
    assert np.all(radial_map(rho[1:], f, "sink") >= 1 - 1e-12)  # samples farther out


def test_fractal_noise_normalised_and_smooth():
    rng = np.random.default_rng(0)
    noise = fractal_noise((37, 53), (2, 3), rng)
    assert noise.shape == (37, 53)
    assert noise.min() == pytest.approx(0.0) and noise.max() == pytest.approx(1.0)
    assert np.abs(np.diff(noise, axis=1)).max() < 0.25  # smooth, not white noise
    assert not np.array_equal(noise, fractal_noise((37, 53), (2, 3), rng))


def test_intensity_change_has_one_sign_and_soft_edges():
    from scipy.ndimage import binary_erosion, distance_transform_edt

    img, fg = _disk(96, 0.45)
    img = np.where(fg, 0.5, 0.0).astype(np.float32)
    img[0, 0] = 1.0  # range [0, 1]: changes of the flat tissue are not clipped
    edge_change, deep_change = [], []
    for seed in range(40):
        out, mask = apply_task("intensity", img, fg, np.random.default_rng(seed))
        diff = (out - img)[mask & fg]
        assert np.all(diff >= 0) or np.all(diff <= 0)
        change = np.abs(out - img)
        edge = mask & ~binary_erosion(mask) & fg
        deep = (distance_transform_edt(mask) >= 7) & fg
        if deep.sum() > 20:
            edge_change.append(change[edge].mean())
            deep_change.append(change[deep].mean())
    assert len(deep_change) >= 5
    # edge weight min(EDT / s, 1) with s about 5 px: the rim changes far less than the core
    assert np.mean(edge_change) < 0.5 * np.mean(deep_change)


# ---------------------------------------------------------------- folds, Corruptor, streams


def test_fold_table_matches_reference():
    table = {
        0: "012",
        1: "013",
        2: "014",
        3: "023",
        4: "024",
        5: "034",
        6: "123",
        7: "124",
        8: "134",
        9: "234",
    }
    for fold, names in table.items():
        train, val = fold_tasks(fold)
        assert "".join(map(str, train)) == names
        assert sorted(train + val) == [0, 1, 2, 3, 4] and len(val) == 2
    assert FOLDS == tuple(itertools.combinations(range(5), 3))
    with pytest.raises(ValueError):
        fold_tasks(10)


def test_corruptor_no_task_rate_and_anomaly_counts(monkeypatch):
    calls: list[int] = []
    real = corrupt_module.apply_task

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(corrupt_module, "apply_task", counting)
    img, fg = _disk(32)
    corruptor = Corruptor(["sink", 4], intra_sources=[img])
    n, none, counts, seen = 2000, 0, np.zeros(5, int), set()
    for i in range(n):
        before = len(calls)
        out, mask, index = corruptor(img, fg, sample_rng(5, i))
        k = len(calls) - before
        if index == -1:
            none += 1
            assert k == 0 and not mask.any()
            np.testing.assert_array_equal(out, img)
        else:
            assert 1 <= k <= 4 and index in (2, 4)
            counts[k] += 1
            seen.add(index)
            np.testing.assert_array_equal(out[~mask], img[~mask])
            assert out.min() >= img.min() and out.max() <= img.max()
    sd = np.sqrt(n * 0.2 * 0.8)
    assert abs(none - 0.2 * n) < 4 * sd
    drawn = n - none
    for k, p in zip((1, 2, 3, 4), (0.5, 0.25, 0.125, 0.125), strict=True):
        assert abs(counts[k] - p * drawn) < 4 * np.sqrt(drawn * p * (1 - p))
    assert seen == {2, 4}


def test_worker_and_sample_streams():
    a = worker_rng(0, 0).random(8)
    np.testing.assert_array_equal(a, worker_rng(0, 0).random(8))
    np.testing.assert_array_equal(a, np.random.default_rng(np.random.SeedSequence([0, 0, 0])).random(8))
    assert not np.array_equal(a, worker_rng(0, 1).random(8))
    assert not np.array_equal(a, worker_rng(0, 0, epoch=1).random(8))
    assert not np.array_equal(a, worker_rng(1, 0).random(8))
    streams = [worker_rng(42, w).random(1000) for w in range(4)]
    corr = np.corrcoef(streams)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.15
    np.testing.assert_array_equal(sample_rng(3, 17).random(4), sample_rng(3, 17).random(4))
    assert not np.array_equal(sample_rng(3, 17).random(4), worker_rng(3, 17).random(4))
    with pytest.raises(ValueError):
        worker_rng(-1, 0)


# ---------------------------------------------------------------- sources and gallery


def test_default_inter_sources(inter):
    assert len(inter) >= 10
    for src in inter:
        assert src.shape == (128, 128) and src.dtype == np.float32
        assert src.min() == 0.0 and src.max() == 1.0
    assert len({float(s.mean()) for s in inter}) == len(inter)


def test_inter_sources_from_folder(tmp_path):
    import nibabel as nib
    from skimage.io import imsave

    rng = np.random.default_rng(0)
    imsave(tmp_path / "a.png", (rng.random((40, 60)) * 255).astype(np.uint8))
    imsave(tmp_path / "b.jpg", (rng.random((50, 50, 3)) * 255).astype(np.uint8))
    nib.save(nib.Nifti1Image(rng.random((20, 20, 7)).astype(np.float32), np.eye(4)), tmp_path / "c.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    sources = load_inter_sources(tmp_path, size=32)
    assert len(sources) == 3
    assert all(s.shape == (32, 32) and 0.0 <= s.min() and s.max() <= 1.0 for s in sources)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="no images"):
        load_inter_sources(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ScanError, match=r"x\.png"):
        load_inter_sources(tmp_path / "bad")


def test_gallery_png(tmp_path):
    from matplotlib.image import imread

    img, fg = _disk(32)
    out, mask = apply_task("sink", img, fg, np.random.default_rng(0))
    path = save_gallery(
        tmp_path / "g.png", {"sink": [(img, out, mask, "z1"), (img, out, mask)], "x": [(img, out, mask)]}
    )
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 3 * pixels.shape[0] / 2 * 0.9
    with pytest.raises(ValueError):
        save_gallery(tmp_path / "e.png", {})
