"""napari sample data: the bundled BraTS 2013 FLAIR scan with its tumour mask."""

from __future__ import annotations

from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
from pseudohealthy.napari._outputs import ground_truth_name
from pseudohealthy.napari._reader import LayerData, read_one


def sample_scan() -> list[LayerData]:
    """The bundled FLAIR scan (image) and its tumour mask ("<scan> ground truth", labels, shown)."""
    image = read_one(sample_scan_path())
    data, kwargs, kind = read_one(sample_mask_path())
    kwargs = {**kwargs, "name": ground_truth_name(image[1]["name"]), "opacity": 0.9}
    return [image, (data, kwargs, kind)]
