"""Build the bundled 2 mm MNI152 template (T1 + brain mask) from the ICBM 2009a 1 mm files.

Run: ``.venv/bin/python scripts/make_mni_template.py ../shared/data/healthy/mni152 sample_data/mni152``.

Input: the ICBM 2009a nonlinear symmetric T1 (already brain-masked, as shipped in nilearn) and
its grey- and white-matter probability maps, 1 mm, 197x233x189. Output, on the standard MNI
2 mm grid (91x109x91, RAS, voxel centres at x = -90..90, y = -126..90, z = -72..108 mm: the
bounding box of the FSL MNI152 grid on which the MSLUB scans are stored):

- ``mni152_t1_2mm.nii.gz``: the T1, Gaussian pre-filtered (sigma 0.85 mm) and trilinearly
  resampled, uint8 0..255;
- ``mni152_brainmask_2mm.nii.gz``: brain incl. CSF, uint8 0/1: template T1 > 0 inside
  GM+WM > 0.5 dilated by 4 mm, holes filled per axial slice and in 3D, largest component
  (:func:`pseudohealthy.data.registration.template_brain_mask`), then resampled (> 0.5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pseudohealthy.data.registration import template_brain_mask

T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
SHAPE = (91, 109, 91)
AFFINE = np.array([[2.0, 0, 0, -90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def resample(data: np.ndarray, src_affine: np.ndarray, sigma_mm: float = 0.85) -> np.ndarray:
    """Pre-filter and sample ``data`` at the centres of the 2 mm grid (trilinear)."""
    smooth = ndimage.gaussian_filter(data.astype(np.float32), sigma_mm / np.abs(np.diag(src_affine)[:3]))
    vox = np.linalg.inv(src_affine) @ AFFINE
    grid = np.indices(SHAPE, dtype=np.float32).reshape(3, -1)
    coords = vox[:3, :3] @ grid + vox[:3, 3:4]
    return ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=0.0).reshape(SHAPE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with the ICBM 2009a 1 mm files")
    parser.add_argument("output", type=Path, help="output folder")
    args = parser.parse_args()
    t1_img = nib.as_closest_canonical(nib.load(args.source / T1))
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = nib.as_closest_canonical(nib.load(args.source / GM)).get_fdata(dtype=np.float32) / 255.0
    wm = nib.as_closest_canonical(nib.load(args.source / WM)).get_fdata(dtype=np.float32) / 255.0
    mask = template_brain_mask(t1, gm, wm, dilate_vox=4)
    t1_2mm = np.clip(np.rint(resample(t1, t1_img.affine)), 0, 255).astype(np.uint8)
    mask_2mm = (resample(mask.astype(np.float32), t1_img.affine) > 0.5).astype(np.uint8)
    args.output.mkdir(parents=True, exist_ok=True)
    for name, arr in (("mni152_t1_2mm.nii.gz", t1_2mm), ("mni152_brainmask_2mm.nii.gz", mask_2mm)):
        img = nib.Nifti1Image(arr, AFFINE)
        img.header.set_data_dtype(np.uint8)
        img.header.set_xyzt_units("mm")
        img.header.set_qform(AFFINE, code=4)  # MNI152
        img.header.set_sform(AFFINE, code=4)
        nib.save(img, args.output / name)
        print(f"{args.output / name}: {arr.shape}, {int((arr > 0).sum())} voxels > 0")
    print(f"brain volume: {mask.sum() / 1000:.0f} ml (1 mm), {mask_2mm.sum() * 8 / 1000:.0f} ml (2 mm)")


if __name__ == "__main__":
    main()
