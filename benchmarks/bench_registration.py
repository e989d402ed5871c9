"""Which library registers scans to the MNI152 template best: SimpleITK, ANTsPy or DIPY?

Run: ``.venv/bin/python benchmarks/bench_registration.py [--quick] [--libraries sitk,ants,dipy]``
(needs the shared data in ``../shared/data`` and whichever libraries are installed:
``pip install simpleitk antspyx dipy``; one CPU thread, set before any library loads).

Every library gets the same job through :func:`pseudohealthy.data.registration.register_to_template`
(same ~2 mm images, template mask, start, two-pass skull-stripping pipeline); only the
optimiser differs: Mattes mutual information (32 bins, 20% random samples; DIPY: all samples,
it ignores masks when sampling sparsely), 3 levels (shrink 4, 2, 1; smoothing 2, 1, 0 voxels),
similarity then affine. Results and the choice: ``docs/REGISTRATION.md``.

Cases (fixed image: the bundled 2 mm MNI152 template):
- MSLUB T1, patients 07 and 19 (skull-stripped, rigidly in MNI space), as given and after
  ``--moves`` known random affines (rotations up to 12 deg, shifts up to 12 mm, scales 0.9-1.1,
  shears up to 0.03); registered as brain-only scans.
- IXI T1 (whole head, PSR orientation, not registered), as given and after one known random
  affine each; the two-pass whole-head pipeline.

Columns: ``recovery mm`` = mean distance, over the template's brain voxels, between where the
moved scan's registration puts them and where the known affine says they must go given the
unmoved scan's registration (does the library recover a known motion?); ``fail`` = cases with
recovery error > 5 mm; ``Dice`` (MSLUB) = template brain mask mapped onto the scan vs the
scan's own brain (non-zero voxels; an absolute check, its ceiling is < 1 because the template
mask includes the CSF around the brain); ``NCC`` = correlation of the registered scan with the
template inside the template's brain (higher is better aligned); ``s/scan`` = seconds per
registration (both passes for IXI).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MSLUB = ("lesion/mslub/patient07/T1.nii.gz", "lesion/mslub/patient19/T1.nii.gz")
IXI = (
    "healthy/ixi_t1/IXI132-HH-1415_T1.nii.gz",
    "healthy/ixi_t1/IXI334-HH-1907_T1.nii.gz",
    "healthy/ixi_t1/IXI606-HH-2601_T1.nii.gz",
    "healthy/ixi_t1/IXI508-HH-2268_T1.nii.gz",
)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------- optimisers


def optimise_ants(images, settings, initial, refine_only):
    """ANTsPy (antsRegistration): similarity then affine, same levels and metric as SimpleITK."""
    import ants
    import ants.config

    ants.config.set_ants_deterministic(True, settings.seed + 1)

    def to_ants(data, affine):
        lps = _LPS @ affine
        spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
        return ants.from_numpy(
            np.ascontiguousarray(data, dtype=np.float32),
            origin=[float(v) for v in lps[:3, 3]],
            spacing=[float(s) for s in spacing],
            direction=lps[:3, :3] / spacing,
        )

    fixed = to_ants(images.fixed, images.fixed_affine)
    moving = to_ants(images.moving, images.moving_affine)
    mask = to_ants(images.fixed_mask.astype(np.float32), images.fixed_affine)
    n = len(settings.shrink)
    if refine_only and initial is not None:
        stages = [("Affine" if settings.dof == "affine" else settings.dof.capitalize(), settings.shrink)]
    elif settings.dof == "affine" and n > 1:
        stages = [("Similarity", settings.shrink[: n - 1]), ("Affine", settings.shrink[1:])]
    else:
        stages = [(settings.dof.capitalize(), settings.shrink)]
    with tempfile.TemporaryDirectory() as tmp:
        start: list[str] | None = None
        if initial is not None:
            m = _LPS @ np.asarray(initial, dtype=float) @ _LPS
            if not refine_only:  # translation only, as the SimpleITK path does
                m[:3, :3] = np.eye(3)
            tx = ants.create_ants_transform(
                "AffineTransform", dimension=3, matrix=m[:3, :3], translation=m[:3, 3], center=[0, 0, 0]
            )
            path = str(Path(tmp) / "init.mat")
            ants.write_transform(tx, path)
            start = [path]
        for i, (kind, shrink) in enumerate(stages):
            first = settings.shrink.index(shrink[0])
            out = ants.registration(
                fixed,
                moving,
                type_of_transform=kind,
                initial_transform=start,
                outprefix=str(Path(tmp) / f"s{i}_"),
                mask=mask,
                aff_metric="mattes",
                aff_sampling=settings.bins,
                aff_random_sampling_rate=settings.sampling,
                aff_iterations=tuple([settings.iterations] * len(shrink)),
                aff_shrink_factors=tuple(shrink),
                aff_smoothing_sigmas=tuple(settings.smooth_vox[first : first + len(shrink)]),
            )
            start = [out["fwdtransforms"][0]]
        tx = ants.read_transform(start[0])
    params = np.asarray(tx.parameters, dtype=float)
    centre = np.asarray(tx.fixed_parameters, dtype=float)
    lin, trans = params[:9].reshape(3, 3), params[9:12]
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = trans + centre - lin @ centre
    return _LPS @ m @ _LPS, None


optimise_ants.library = lambda: f"ANTsPy {__import__('ants').__version__}"


def optimise_dipy(images, settings, initial, refine_only):
    """DIPY (AffineRegistration, L-BFGS-B): centres of mass, similarity, then affine."""
    from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
    from dipy.align.transforms import AffineTransform3D, RigidIsoScalingTransform3D, RigidTransform3D

    kinds = {"rigid": RigidTransform3D, "similarity": RigidIsoScalingTransform3D, "affine": AffineTransform3D}
    static, moving = images.fixed, images.moving
    sa, ma = images.fixed_affine, images.moving_affine
    n = len(settings.shrink)
    if refine_only and initial is not None:
        start = np.asarray(initial, dtype=float)
        stages = [(kinds[settings.dof], settings.shrink)]
    else:
        if initial is not None:
            start = np.eye(4)
            start[:3, 3] = np.asarray(initial)[:3, 3]
        else:
            start = transform_centers_of_mass(static, sa, moving, ma).affine
        if settings.dof == "affine" and n > 1:
            stages = [
                (RigidIsoScalingTransform3D, settings.shrink[: n - 1]),
                (AffineTransform3D, settings.shrink[1:]),
            ]
        else:
            stages = [(kinds[settings.dof], settings.shrink)]
    for kind, shrink in stages:
        first = settings.shrink.index(shrink[0])
        reg = AffineRegistration(
            # dense sampling: DIPY ignores the masks when it samples sparsely
            metric=MutualInformationMetric(nbins=settings.bins, sampling_proportion=None),
            level_iters=[settings.iterations] * len(shrink),
            sigmas=list(settings.smooth_vox[first : first + len(shrink)]),
            factors=list(shrink),
            verbosity=0,
        )
        result = reg.optimize(
            static,
            moving,
            kind(),
            None,
            static_grid2world=sa,
            moving_grid2world=ma,
            starting_affine=start,
            static_mask=images.fixed_mask.astype(np.int32),
        )
        start = result.affine
    return np.asarray(start, dtype=float), None


optimise_dipy.library = lambda: f"DIPY {__import__('dipy').__version__}"


def optimisers() -> dict:
    from pseudohealthy.data.registration import optimise_sitk

    return {"sitk": optimise_sitk, "ants": optimise_ants, "dipy": optimise_dipy}


def available(name: str) -> bool:
    module = {"sitk": "SimpleITK", "ants": "ants", "dipy": "dipy"}[name]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- cases


def random_affine(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """A random world affine about ``centre``: rotations <= 12 deg, shifts <= 12 mm, scales 0.9-1.1."""
    ax, ay, az = np.radians(rng.uniform(-12, 12, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    shear = np.eye(3) + np.triu(rng.uniform(-0.03, 0.03, (3, 3)), 1)
    lin = rz @ ry @ rx @ np.diag(rng.uniform(0.9, 1.1, 3)) @ shear
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = centre - lin @ centre + rng.uniform(-12, 12, 3)
    return m


def moved_volume(volume, motion: np.ndarray):
    """``moved(x) = volume(motion @ x)`` on the volume's own grid (world coordinates)."""
    from pseudohealthy.data.io import Volume
    from pseudohealthy.data.registration import resample

    lo = float(volume.data.min())
    data = resample(volume.data, volume.affine, volume.shape, volume.affine, motion, cval=lo, antialias=False)
    return Volume(
        data, volume.affine, volume.header, volume.source_affine, volume.source_shape, None, "moved"
    )


def moved_volume_mask(volume, mask: np.ndarray, motion: np.ndarray) -> np.ndarray:
    from pseudohealthy.data.registration import resample

    moved = resample(
        mask.astype(np.float32), volume.affine, volume.shape, volume.affine, motion, antialias=False
    )
    return moved > 0.5


def brain_points(template) -> np.ndarray:
    idx = np.argwhere(template.mask)[::7]
    return (template.image.affine @ np.c_[idx, np.ones(len(idx))].T)[:3]


def displacement(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    pts = np.vstack([points, np.ones(points.shape[1])])
    return float(np.linalg.norm((a @ pts - b @ pts)[:3], axis=0).mean())


def ncc(volume, transform, template) -> float:
    from pseudohealthy.data.registration import resample

    out = resample(volume.data, volume.affine, template.shape, template.image.affine, transform.matrix)
    a, b = out[template.mask], template.image.data[template.mask]
    return float(np.corrcoef(a, b)[0, 1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def run_library(name: str, optimiser, template, cases, points, moves: int, seed: int) -> dict:
    from pseudohealthy.data.registration import map_template_mask, register_to_template

    rows = {"recovery": [], "dice": [], "ncc": [], "seconds": [], "fail": 0, "n": 0}
    rng = np.random.default_rng(seed)
    for volume, stripped in cases:
        centre = volume.affine @ np.append((np.asarray(volume.shape) - 1) / 2.0, 1.0)
        base = None
        for k in range(moves + 1):
            motion = np.eye(4) if k == 0 else random_affine(rng, centre[:3])
            scan = volume if k == 0 else moved_volume(volume, motion)
            t0 = time.perf_counter()
            try:
                tr = register_to_template(scan, template, skull_stripped=stripped, optimiser=optimiser)
            except Exception as exc:  # a library failing is a result, not a crash
                print(f"  {name}: {volume.name} move {k}: failed ({type(exc).__name__}: {exc})", flush=True)
                rows["fail"] += 1
                rows["n"] += 1
                continue
            rows["seconds"].append(time.perf_counter() - t0)
            rows["ncc"].append(ncc(scan, tr, template))
            if stripped:
                brain = volume.data != 0
                if k:
                    brain = moved_volume_mask(volume, brain, motion)
                rows["dice"].append(dice(map_template_mask(template, tr, scan), brain))
            if k == 0:
                base = tr.matrix
            elif base is not None:
                err = displacement(tr.matrix, np.linalg.inv(motion) @ base, points)
                rows["recovery"].append(err)
                rows["n"] += 1
                rows["fail"] += int(err > 5.0)
            print(
                f"  {name}: {volume.name} move {k}: {rows['seconds'][-1]:.1f} s, NCC {rows['ncc'][-1]:.3f}"
                + (f", recovery {rows['recovery'][-1]:.2f} mm" if k and base is not None else ""),
                flush=True,
            )
    return rows


def summarise(rows: dict) -> dict:
    def mean(v):
        return float(np.mean(v)) if v else float("nan")

    return {
        "recovery_mm": mean(rows["recovery"]),
        "recovery_max_mm": float(np.max(rows["recovery"])) if rows["recovery"] else float("nan"),
        "fail": f"{rows['fail']}/{rows['n']}",
        "dice": mean(rows["dice"]),
        "ncc": mean(rows["ncc"]),
        "seconds": mean(rows["seconds"]),
    }


def install_size(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "-"
    folder = Path(mod.__file__).parent
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 1e6:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", default="sitk,ants,dipy", help="comma-separated: sitk, ants, dipy")
    parser.add_argument("--moves", type=int, default=2, help="random affines per MSLUB scan (default 2)")
    parser.add_argument("--ixi", type=int, default=3, help="IXI scans (default 3, at most 4)")
    parser.add_argument("--quick", action="store_true", help="1 move, 1 IXI scan, patient 07 only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}", file=sys.stderr)
        return 2
    from pseudohealthy.data.io import load_scan
    from pseudohealthy.data.registration import load_template

    template = load_template()
    points = brain_points(template)
    mslub = MSLUB[:1] if args.quick else MSLUB
    ixi = IXI[: 1 if args.quick else args.ixi]
    moves = 1 if args.quick else args.moves
    groups = {
        "MSLUB (brain only)": [(load_scan(SHARED / p), True) for p in mslub],
        "IXI (whole head)": [(load_scan(SHARED / p), False) for p in ixi],
    }
    for (vol, _), p in zip(groups["MSLUB (brain only)"], mslub, strict=True):
        vol.name = p.split("/")[-2]
    results = []
    for name in args.libraries.split(","):
        name = name.strip()
        if not available(name):
            print(f"{name}: not installed, skipped", flush=True)
            continue
        opt = optimisers()[name]
        for group, cases in groups.items():
            n_moves = moves if group.startswith("MSLUB") else 1
            rows = run_library(name, opt, template, cases, points, n_moves, args.seed)
            results.append((opt.library(), group, summarise(rows)))
    sizes = {
        "SimpleITK": install_size("SimpleITK"),
        "ANTsPy": install_size("ants"),
        "DIPY": install_size("dipy"),
    }
    print("\n| library | cases | recovery mm (mean / max) | fail | Dice | NCC | s/scan | installed |")
    print("|---|---|---|---|---|---|---|---|")
    for lib, group, s in results:
        size = sizes.get(lib.split()[0], "-")
        dice_txt = f"{s['dice']:.3f}" if not np.isnan(s["dice"]) else "-"
        print(
            f"| {lib} | {group} | {s['recovery_mm']:.2f} / {s['recovery_max_mm']:.2f} | {s['fail']} | "
            f"{dice_txt} | {s['ncc']:.3f} | {s['seconds']:.1f} | {size} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
