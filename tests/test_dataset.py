"""Training data: scan discovery, the volume-level split, on-the-fly corruption, batch order."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pseudohealthy.data.anomalies import fold_tasks
from pseudohealthy.data.dataset import (
    CorruptedSliceDataset,
    EpochBatchSampler,
    HealthySlices,
    build_validation,
    collect_training_scans,
    split_holdout,
)
from pseudohealthy.errors import ScanError

SIZE = 32


def crop_canonical(src: Path, dst: Path, z: slice) -> Path:
    """Axial slices ``z`` of a scan in canonical orientation, saved as float32."""
    img = nib.as_closest_canonical(nib.load(src)).slicer[:, :, z]
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), dst)
    return dst


@pytest.fixture(scope="module")
def ixi_dir(tmp_path_factory, shared_data) -> Path:
    """Three real IXI T1 volumes, 10 axial slices each, plus mask-like decoys."""
    out = tmp_path_factory.mktemp("ixi")
    for src in sorted((shared_data / "healthy/ixi_t1").glob("IXI2*_T1.nii.gz"))[:3]:
        crop_canonical(src, out / src.name, slice(55, 65))
    first = sorted(out.glob("*.nii.gz"))[0]
    (out / "sub").mkdir()
    nib.save(nib.load(first), out / "sub" / "lesion_seg.nii.gz")
    nib.save(nib.load(first), out / "sub" / "brain_label.nii")
    return out


@pytest.fixture(scope="module")
def slices(ixi_dir) -> HealthySlices:
    return HealthySlices.from_scans(collect_training_scans([ixi_dir]), size=SIZE, seed=0)


def test_collect_training_scans_skips_masks_and_finds_brain_masks(ixi_dir, tmp_path):
    found = collect_training_scans([ixi_dir])
    names = [p.name for p, _ in found]
    assert len(found) == 3 and all(n.startswith("IXI") for n in names)
    assert all(mask is None for _, mask in found)
    # an explicit file is taken even if it looks like a mask; include / exclude globs
    decoy = ixi_dir / "sub" / "lesion_seg.nii.gz"
    assert [p.name for p, _ in collect_training_scans([decoy])] == ["lesion_seg.nii.gz"]
    assert len(collect_training_scans([ixi_dir], exclude=[names[0]])) == 2
    assert [p.name for p, _ in collect_training_scans([ixi_dir], include=[names[1]])] == [names[1]]

    # sibling brain masks: automatic, by pattern, or switched off
    case = tmp_path / "case"
    case.mkdir()
    scan = case / "flair.nii.gz"
    nib.save(nib.load(ixi_dir / names[0]), scan)
    nib.save(nib.load(ixi_dir / names[0]), case / "brainmask.nii.gz")
    assert collect_training_scans([case]) == [(scan.resolve(), case / "brainmask.nii.gz")]
    assert collect_training_scans([case], "none") == [(scan.resolve(), None)]
    nib.save(nib.load(ixi_dir / names[0]), case / "flair_bm.nii.gz")
    assert collect_training_scans([scan], "{stem}_bm.nii.gz")[0][1] == case / "flair_bm.nii.gz"
    with pytest.raises(ScanError, match="brain mask"):
        collect_training_scans([scan], "{stem}_missing.nii.gz")


def test_collect_training_scans_errors(tmp_path):
    with pytest.raises(ScanError, match="no NIfTI scans found"):
        collect_training_scans([tmp_path])
    with pytest.raises(ScanError, match="not found"):
        collect_training_scans([tmp_path / "nope.nii.gz"])


def test_split_is_by_volume_and_seeded():
    ids = np.repeat(np.arange(10), 20)
    train, val = split_holdout(ids, 0.05, seed=3)
    assert set(ids[train]).isdisjoint(ids[val])  # no patient on both sides
    assert len(set(ids[val])) == 1 and len(train) + len(val) == ids.size
    again = split_holdout(ids, 0.05, seed=3)
    assert np.array_equal(again[1], val)
    others = {tuple(split_holdout(ids, 0.05, seed=s)[1]) for s in range(6)}
    assert len(others) > 1  # the held-out volume depends on the seed
    # 25% needs 3 of 10 volumes (60 of 200 slices >= 50)
    assert len(set(ids[split_holdout(ids, 0.25, 0)[1]])) == 3
    # one volume: 5% of its slices (at least one)
    one = np.zeros(100, dtype=int)
    train1, val1 = split_holdout(one, 0.05, 0)
    assert len(val1) == 5 and len(train1) == 95
    # two volumes: one is held out, never both
    _, val2 = split_holdout(np.repeat([0, 1], 5), 0.9, 0)
    assert len(val2) == 5


def test_healthy_slices_from_real_scans(slices):
    s = slices.summary()
    assert s["n_volumes"] == 3 and s["n_slices"] == len(slices) == slices.images.shape[0]
    assert slices.images.shape[1:] == (SIZE, SIZE) and slices.images.dtype == np.float32
    assert 0.0 <= slices.images.min() and slices.images.max() <= 1.0
    assert slices.masks.dtype == bool and slices.masks.any(axis=(1, 2)).all()
    assert s["n_val_slices"] == 10 and s["n_train_slices"] == 20  # one whole volume held out
    assert len(s["held_out_volumes"]) == 1
    held = slices.volume_ids[slices.val_index]
    assert np.unique(held).size == 1 and held[0] not in slices.volume_ids[slices.train_index]


def test_lesion_slices_are_excluded(tmp_path, shared_data):
    case = shared_data / "lesion/brats2013/brats_2013_pat0003_1"
    scan = crop_canonical(case / "Flair_subtrMeanDivStd.nii.gz", tmp_path / "flair.nii.gz", slice(40, 120, 4))
    seg = crop_canonical(case / "OTMultiClass.nii.gz", tmp_path / "seg.nii.gz", slice(40, 120, 4))
    lesion_slices = np.flatnonzero(nib.load(seg).get_fdata().any(axis=(0, 1)))
    assert 0 < lesion_slices.size < 20
    full = HealthySlices.from_scans([(scan, None)], size=SIZE, val_fraction=0.0)
    free = HealthySlices.from_scans([(scan, None)], size=SIZE, val_fraction=0.0, exclude_masks=[seg])
    assert set(free.slice_indices).isdisjoint(lesion_slices)
    assert set(free.slice_indices) == set(full.slice_indices) - set(lesion_slices)
    assert free.n_excluded == len(full) - len(free) > 0
    # a slice filter drops more
    odd = HealthySlices.from_scans(
        [(scan, None)], size=SIZE, val_fraction=0.0, slice_filter=lambda name, k, img: k % 2 == 0
    )
    assert (odd.slice_indices % 2 == 0).all() and len(odd) < len(full)


def test_corrupted_items_are_deterministic_per_epoch_and_slice(slices):
    tasks = fold_tasks(6)[0]  # poisson_inter, sink, source
    ds = CorruptedSliceDataset(slices, slices.train_index, tasks, seed=5)
    a, b = ds[(0, 3)], ds[(0, 3)]
    assert set(a) >= {"x0", "cond", "mask", "task"}
    assert a["x0"].shape == a["cond"].shape == a["mask"].shape == (1, SIZE, SIZE)
    assert torch.equal(a["cond"], b["cond"]) and torch.equal(a["mask"], b["mask"])
    assert torch.equal(a["x0"], torch.from_numpy(slices.images[slices.train_index[3]])[None])
    ds.set_epoch(0)
    assert torch.equal(ds[3]["cond"], a["cond"])  # integer keys use set_epoch
    items = [ds[(e, i)] for e in range(3) for i in range(len(ds))]
    for item in items:
        assert item["task"] in (*tasks, -1)
        outside = ~item["mask"]
        if item["task"] in (0, 1) and item["mask"].any():  # the reference's Poisson: the mask's whole box
            rows, cols = (torch.nonzero(item["mask"][0].any(d)).flatten() for d in (1, 0))
            outside[0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = False
        assert torch.equal(item["cond"][outside], item["x0"][outside])  # changes only inside the mask
        if item["task"] >= 0:
            assert item["mask"].any()
    fractions = np.mean([it["task"] == -1 for it in items])
    assert 0.05 < fractions < 0.45  # p_none = 0.2
    # a new epoch gives new corruptions of the same slice
    assert any(not torch.equal(ds[(0, i)]["cond"], ds[(1, i)]["cond"]) for i in range(5))
    # other slices get independent streams: their masks are not copies of each other
    masks = [it["mask"] for it in items[: len(ds)] if it["mask"].any()]
    assert len({m.numpy().tobytes() for m in masks}) == len(masks)


def test_batches_do_not_depend_on_the_worker_count(slices):
    ds = CorruptedSliceDataset(slices, slices.train_index, fold_tasks(0)[0], seed=1)

    def batches(workers: int) -> list[dict]:
        sampler = EpochBatchSampler(len(ds), 4, seed=1)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == 7:  # crosses an epoch (5 batches per epoch)
                break
        return out

    serial, parallel = batches(0), batches(2)
    for x, y in zip(serial, parallel, strict=True):
        assert torch.equal(x["index"], y["index"])
        assert torch.equal(x["cond"], y["cond"]) and torch.equal(x["mask"], y["mask"])


def test_epoch_batch_sampler_resumes_and_shards():
    n, bs = 23, 4
    whole = EpochBatchSampler(n, bs, seed=9)
    assert whole.steps_per_epoch == 5
    it = iter(whole)
    first = [next(it) for _ in range(12)]
    epoch0 = [i for b in first[:5] for _, i in b]
    assert len(set(epoch0)) == 20 and all(e == 0 for b in first[:5] for e, _ in b)
    assert {e for _, e in [(0, e) for b in first[5:10] for e, _ in b]} == {1}
    assert [i for _, i in first[5]] != [i for _, i in first[0]]  # a new order each epoch
    # resuming at step 7 continues exactly
    resumed = iter(EpochBatchSampler(n, bs, seed=9, start_step=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    assert whole.batch(8) == first[8]
    # two ranks split each global batch of 2 x 2 without overlap
    r0 = EpochBatchSampler(n, 2, seed=9, rank=0, world_size=2)
    r1 = EpochBatchSampler(n, 2, seed=9, rank=1, world_size=2)
    for step in range(6):
        a, b = r0.batch(step), r1.batch(step)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert sorted(a + b) == sorted(whole.batch(step))
    # fewer samples than a batch: the epoch repeats samples to fill it
    tiny = EpochBatchSampler(3, 4, seed=0)
    assert len(tiny.batch(0)) == 4 and {i for _, i in tiny.batch(0)} == {0, 1, 2}


def test_validation_set_is_fixed_and_uses_the_validation_tasks(slices):
    train_tasks, val_tasks = fold_tasks(3)  # val: poisson_inter, intensity
    v1 = build_validation(slices, slices.val_index, val_tasks, seed=2)
    v2 = build_validation(slices, slices.val_index, val_tasks, seed=2)
    assert len(v1) == slices.val_index.size
    assert np.array_equal(v1.cond, v2.cond) and np.array_equal(v1.mask, v2.mask)
    assert set(v1.task) <= {*val_tasks, -1} and set(v1.task) & set(val_tasks)
    assert not set(v1.task) & set(train_tasks)
    assert np.array_equal(v1.x0, slices.images[slices.val_index])
    changed = (v1.cond != v1.x0).any(axis=(1, 2))
    assert np.array_equal(changed, v1.mask.any(axis=(1, 2)) & changed)
    capped = build_validation(slices, slices.val_index, val_tasks, seed=2, max_slices=4)
    assert len(capped) == 4
