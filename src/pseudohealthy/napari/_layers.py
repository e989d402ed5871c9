"""Layer geometry: a layer's physical affine, canonical views of its data, copying geometry.

Convention (the same in the reader, writer and widgets): a NIfTI file opens reoriented to
closest-canonical RAS+ with its full 4x4 canonical affine as the layer ``affine``, so napari's
world coordinates are the file's RAS+ millimetres (axes x, y, z) and the writer puts voxels back
in the file's stored order. The functions here work for any layer whose data->world transform
is a RAS affine (marked by ``metadata[NIFTI_KEY]``), canonical or not (flipped, permuted).
Layers from elsewhere (plain arrays) are read the napari way: world axis 0 is the slicing axis,
so their "axial" slices are the planes napari shows by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from nibabel import orientations as ornts

from pseudohealthy.data.io import Volume, volume_from_array
from pseudohealthy.errors import ScanError

if TYPE_CHECKING:
    import napari
    from napari.layers import Layer

#: world axis labels of layers opened from NIfTI (world = RAS+ mm)
RAS_LABELS = ("x (R)", "y (A)", "z (S)")
#: metadata key that marks a layer whose world coordinates are RAS+ mm (value: the layer's affine)
NIFTI_KEY = "nifti_affine"
# plain layers: world (w0, w1, w2) -> RAS (w2, w1, w0), so w0 (napari's slider axis) is axial
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def layer_affine(layer: Layer) -> np.ndarray:
    """The full (ndim+1)^2 data->world matrix of ``layer`` (affine x (rotate shear scale + translate))."""
    ndim = layer.ndim
    origin = np.asarray(layer.data_to_world(np.zeros(ndim)), dtype=float)
    out = np.eye(ndim + 1)
    for j, unit in enumerate(np.eye(ndim)):
        out[:ndim, j] = np.asarray(layer.data_to_world(unit), dtype=float) - origin
    out[:ndim, ndim] = origin
    return out


def is_nifti_layer(layer: Layer) -> bool:
    """Whether the layer's world coordinates are RAS+ mm (opened by our reader or made from one)."""
    return NIFTI_KEY in (layer.metadata or {})


def ras_affine(layer: Layer) -> np.ndarray:
    """The 4x4 voxel -> RAS+ affine of the layer's (2D or 3D) data; 2D data get a leading axis."""
    if layer.ndim not in (2, 3) or getattr(layer, "rgb", False):
        raise ScanError(
            None, f"layer '{layer.name}': need a 2D or 3D greyscale image, got {layer.ndim}D data"
        )
    return ras_from_world(layer_affine(layer), nifti=is_nifti_layer(layer))


def ras_from_world(full: np.ndarray, *, nifti: bool) -> np.ndarray:
    """Turn a 2D/3D data->world matrix into a 4x4 voxel->RAS affine (see the module docstring)."""
    full = np.asarray(full, dtype=float)
    if full.shape == (3, 3):
        full3 = np.eye(4)
        full3[1:, 1:] = full
        full = full3
    if full.shape != (4, 4):
        raise ScanError(None, f"need 2D or 3D data, got a {full.shape[0] - 1}D transform")
    return full if nifti else _REVERSE @ full


def as_3d(data: np.ndarray) -> np.ndarray:
    """A 3D view of 2D or 3D layer data (2D gets a leading length-1 axis)."""
    arr = np.asarray(data)
    return arr[None] if arr.ndim == 2 else arr


def layer_volume(layer: Layer) -> Volume:
    """The layer as a canonical :class:`Volume` (its data oriented by :func:`ras_affine`)."""
    return volume_from_array(as_3d(layer.data), ras_affine(layer), name=layer.name)


@dataclass(frozen=True)
class Frame:
    """The stored and canonical grids of a layer (what a :class:`Volume` knows, without the data)."""

    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    affine: np.ndarray
    shape: tuple[int, int, int]


def layer_frame(layer: Layer) -> Frame:
    """The layer's grids, cheaply (no copy of the data); matches :func:`layer_volume`."""
    source_affine = ras_affine(layer)
    shape = tuple(int(s) for s in np.shape(layer.data))
    shape = (1, *shape) if len(shape) == 2 else shape
    ornt = ornts.io_orientation(source_affine)
    canon_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        canon_shape[int(target)] = shape[axis]
    affine = source_affine @ ornts.inv_ornt_aff(ornt, shape)
    return Frame(source_affine, shape, affine, tuple(canon_shape))


def canonical_view(data: np.ndarray, frame: Frame | Volume) -> np.ndarray:
    """A writable canonical-RAS view (no copy) of an array in the layer's data order."""
    arr = as_3d(data)
    if arr.shape != tuple(frame.source_shape):
        raise ValueError(f"array shape {arr.shape} does not match the layer's {frame.source_shape}")
    view = ornts.apply_orientation(arr, ornts.io_orientation(frame.source_affine))
    assert np.shares_memory(view, arr)
    return view


def canonical_index(frame: Frame | Volume, data_coords: np.ndarray) -> np.ndarray:
    """Map data (stored-order) voxel coordinates of a 2D/3D layer to canonical voxel coordinates."""
    coords = np.asarray(data_coords, dtype=float)
    if coords.shape[-1] == 2:
        coords = np.concatenate([np.zeros((*coords.shape[:-1], 1)), coords], axis=-1)
    homog = np.concatenate([coords, np.ones((*coords.shape[:-1], 1))], axis=-1)
    to_canon = np.linalg.inv(frame.affine) @ frame.source_affine
    return (homog @ to_canon.T)[..., :3]


def current_axial_index(viewer: napari.Viewer, layer: Layer, frame: Frame | Volume) -> int:
    """The canonical axial slice index under the viewer's current position (clipped into range)."""
    data = np.asarray(layer.world_to_data(np.asarray(viewer.dims.point, dtype=float)), dtype=float)
    k = round(float(canonical_index(frame, data)[2]))
    return int(np.clip(k, 0, frame.shape[2] - 1))


def axial_world_point(layer: Layer, frame: Frame | Volume, index: int) -> np.ndarray:
    """World coordinates of the centre of canonical axial slice ``index`` of the layer."""
    centre = np.array([(frame.shape[0] - 1) / 2, (frame.shape[1] - 1) / 2, index, 1.0])
    data = np.linalg.inv(frame.source_affine) @ frame.affine @ centre
    data = data[:3] if layer.ndim == 3 else data[1:3]
    return np.asarray(layer.data_to_world(data), dtype=float)


def go_to_axial(viewer: napari.Viewer, layer: Layer, frame: Frame | Volume, index: int) -> None:
    """Move the viewer's slider(s) so that canonical axial slice ``index`` of ``layer`` is on screen."""
    here = axial_world_point(layer, frame, index)
    step = axial_world_point(layer, frame, index + 1) - here
    offset = viewer.dims.ndim - len(here)
    for axis in viewer.dims.not_displayed:
        j = axis - offset
        if 0 <= j < len(here) and abs(step[j]) > 1e-6 * max(np.abs(step).max(), 1e-12):
            viewer.dims.set_point(axis, float(here[j]))


def geometry_kwargs(layer: Layer) -> dict[str, Any]:
    """Keyword arguments that give a new layer the geometry of ``layer``."""
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": np.asarray(layer.affine.affine_matrix),
        "units": tuple(layer.units),
        "axis_labels": tuple(layer.axis_labels),
    }


def show_axial(viewer: napari.Viewer) -> None:
    """Slice the viewer axially: slider on z (S), anterior up, patient's right on the left (radiological)."""
    layers = [lay for lay in viewer.layers if lay.ndim == 3]
    if viewer.dims.ndim != 3 or not layers or not all(is_nifti_layer(lay) for lay in layers):
        return
    viewer.dims.order = (2, 1, 0)
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; older: viewer.camera
    camera = scene.camera if scene is not None else viewer.camera
    camera.orientation2d = ("up", "left")
