"""`pseudohealthy view`: open napari with a scan and the restoration widgets docked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pseudohealthy.errors import PseudohealthyError, ScanError

if TYPE_CHECKING:
    import napari


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``view`` subcommand."""
    parser = subparsers.add_parser(
        "view",
        help="open a scan in napari with the restoration and threshold widgets",
        description=(
            "Open SCAN (default: the bundled BraTS FLAIR sample with its tumour mask) in napari, "
            "sliced axially, with the pseudo-healthy restoration and threshold widgets docked and "
            "the ensemble chosen, ready to press Restore. Needs the napari extra "
            "(pip install 'pseudohealthy[napari]') and a display."
        ),
    )
    parser.add_argument("scan", nargs="?", type=Path, help="NIfTI scan (.nii / .nii.gz)")
    parser.add_argument(
        "--ensemble",
        type=Path,
        help="ensemble folder, or a bundled ensemble's name: demo (default: the last one used, else demo)",
    )
    parser.add_argument("--mask", type=Path, help="a lesion mask to show over the scan (optional)")
    parser.set_defaults(func=run)
    return parser


def open_viewer(
    scan: Path | None = None,
    ensemble: Path | None = None,
    mask: Path | None = None,
    viewer: napari.Viewer | None = None,
) -> tuple[napari.Viewer, Any, Any]:
    """Open the scan (and mask) in ``viewer`` (a new one by default) and dock both widgets."""
    import napari
    from napari.layers import Layer

    from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
    from pseudohealthy.napari import RestoreWidget, ThresholdWidget, read_one, show_axial

    if scan is None:
        scan = sample_scan_path()
        mask = mask or sample_mask_path()
    for path in (scan, mask):
        if path is not None and not Path(path).is_file():
            raise ScanError(path, "file not found")
    if ensemble is not None:  # a folder, or a bundled ensemble's name (demo)
        from pseudohealthy.data.sample import resolve_ensemble

        ensemble = resolve_ensemble(ensemble)
    layers = [read_one(scan)]
    if mask is not None:  # the ground truth: an outline over everything, visible
        from pseudohealthy.napari import ground_truth_name

        data, kwargs, _ = read_one(mask)
        name = ground_truth_name(layers[0][1]["name"])
        layers.append((data, {**kwargs, "name": name, "opacity": 0.9}, "labels"))

    viewer = viewer or napari.Viewer(title=f"pseudohealthy — {Path(scan).name}")
    for data, kwargs, kind in layers:
        added = viewer.add_layer(Layer.create(data, kwargs, kind))
        if kind == "labels":
            added.contour = 1  # an outline: the tissue under it stays visible
    viewer.layers.selection.active = viewer.layers[layers[0][1]["name"]]
    show_axial(viewer)
    restore = RestoreWidget(viewer)
    threshold = ThresholdWidget(viewer)
    if ensemble is not None:
        restore.set_ensemble(ensemble)
    restore.layer_combo.setCurrentText(layers[0][1]["name"])
    viewer.window.add_dock_widget(restore, name="Pseudo-healthy restoration", area="right")
    viewer.window.add_dock_widget(threshold, name="Anomaly threshold", area="right")
    return viewer, restore, threshold


QT_MISSING = (
    "no Qt binding found (napari needs one): pip install 'pseudohealthy[napari]' brings PyQt6, "
    "or pip install PyQt6"
)


def check_gui() -> None:
    """Raise a one-line :class:`PseudohealthyError` naming what to install when napari or a Qt
    binding is missing (instead of qtpy's traceback)."""
    try:
        import napari  # noqa: F401
    except ImportError as exc:
        raise PseudohealthyError(
            "napari is not installed: pip install 'pseudohealthy[napari]' (brings napari and PyQt6)"
        ) from exc
    try:
        import qtpy  # noqa: F401  (raises QtBindingsNotFoundError without PyQt/PySide)
    except Exception as exc:
        raise PseudohealthyError(QT_MISSING) from exc


def run(args: argparse.Namespace) -> int:
    from pseudohealthy.napari import quiet_opengl

    quiet_opengl()
    check_gui()
    import napari

    open_viewer(args.scan, args.ensemble, args.mask)
    napari.run()
    return 0
