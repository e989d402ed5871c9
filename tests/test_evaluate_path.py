"""`pseudohealthy evaluate --ensemble` end to end with a real (random, tiny) ensemble: it restores
with the sampler, steps and seed it was given (its saved maps are a direct engine call's with
those settings; another seed changes them), and its metrics are those of the maps it restored
(scoring the saved maps again gives the same numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.data.io import load_map, load_scan
from pseudohealthy.engine.reference import random_ensemble
from pseudohealthy.engine.restore import restore_volume
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.model.checkpoint import Ensemble

METRICS = ("ap_image", "auroc", "ap_pixel", "best_dice")
SAMPLER, STEPS, SEED = "ddpm", 3, 5  # none of them the default


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """A random tiny ensemble and two phantom scans with a bright lesion in some slices."""
    root = tmp_path_factory.mktemp("evalpath")
    ensemble = random_ensemble(root / "ens", "tiny", 2)
    scans, masks = [], []
    for seed in (0, 1):
        shape = (36, 36, 7)
        image = phantom(shape, seed=seed)
        grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        centre = (14 + 2 * seed, 18, 3)
        lesion = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, (5, 5, 1.5), strict=True)) < 1
        image[lesion] += 0.3
        scans.append(write_nifti(root / f"s{seed}" / "FLAIR.nii.gz", image))
        masks.append(write_nifti(root / f"s{seed}" / "lesion_mask.nii.gz", lesion.astype(np.uint8)))
    return ensemble, scans, masks


def _evaluate(test_set, out: Path, *extra: str) -> dict:
    _, scans, masks = test_set
    argv = ["-q", "evaluate", "--scans", *map(str, scans), "--masks", *map(str, masks)]
    argv += ["--frame", "native", "--size", "32", "--device", "cpu", "-o", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _restored(test_set, out: Path, seed: int) -> dict:
    ensemble = test_set[0]
    args = ["--ensemble", str(ensemble), "--sampler", SAMPLER, "--steps", str(STEPS), "--seed", str(seed)]
    args += ["--precision", "fp32"]  # the direct restoration below is fp32 on every CPU
    return _evaluate(test_set, out, *args)


@pytest.fixture(scope="module")
def runs(test_set, tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    out = {}
    for seed in (SEED, SEED + 1):
        folder = tmp_path_factory.mktemp(f"run{seed}")
        out[seed] = (folder, _restored(test_set, folder, seed))
    return out


def _saved(folder: Path, scan: Path) -> np.ndarray:
    name = f"{scan.parent.name}_{scan.name.split('.')[0]}"
    return load_map(folder / "anomaly_maps" / f"{name}_anomaly.nii.gz", load_scan(scan))


def test_ensemble_run_restores_with_the_requested_settings(test_set, runs) -> None:
    ensemble_dir, scans, _ = test_set
    folder, result = runs[SEED]
    engine = result["settings"]["engine"]
    assert (engine["sampler"], engine["steps"], engine["seed"]) == (SAMPLER, STEPS, SEED)
    assert engine["precision"] == "fp32"
    ensemble = Ensemble.from_dir(ensemble_dir)
    settings = RestoreSettings(sampler=SAMPLER, steps=STEPS, seed=SEED, device="cpu", precision="fp32")
    other_folder, _ = runs[SEED + 1]
    for scan in scans:
        direct = restore_volume(load_scan(scan), ensemble, settings).anomaly
        saved = _saved(folder, scan)
        assert direct.max() > 0
        np.testing.assert_allclose(saved, direct, rtol=0, atol=1e-5)
        assert np.abs(_saved(other_folder, scan) - saved).max() > 1e-3  # the seed reaches the engine


def test_metrics_are_those_of_the_restored_maps(test_set, runs, tmp_path) -> None:
    folder, first = runs[SEED]
    again = _evaluate(test_set, tmp_path / "again", "--restorations", str(folder / "anomaly_maps"))
    assert again["settings"]["restored"] == []  # the saved maps, scored as they are
    assert first["n_slices"] == again["n_slices"] > 0
    for key in METRICS:
        assert first[key] == pytest.approx(again[key], abs=1e-6), key
    other = runs[SEED + 1][1]
    assert any(abs(other[k] - first[k]) > 1e-6 for k in METRICS)  # other maps, other metrics
