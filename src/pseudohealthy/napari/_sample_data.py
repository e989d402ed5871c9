"""napari sample data: the bundled BraTS 2013 FLAIR scan with its tumour mask."""

from __future__ import annotations

from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
from pseudohealthy.napari._reader import LayerData, read_one


def sample_scan() -> list[LayerData]:
    """The bundled FLAIR scan (image) and its lesion mask (labels, half transparent)."""
    image = read_one(sample_scan_path())
    data, kwargs, kind = read_one(sample_mask_path())
    kwargs = {**kwargs, "opacity": 0.5, "visible": False}
    return [image, (data, kwargs, kind)]
