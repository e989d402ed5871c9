"""Make docs/screenshot.png: the sample scan restored in napari, widgets docked.

Opens the bundled BraTS FLAIR in napari (as ``pseudohealthy view`` does), restores a few
slices around the one with the most tumour with the demo ensemble (or ``--ensemble``), keeps the
automatic threshold, shows the anomaly map (magma; ``--overlay uncertainty``: the ensemble's
uncertainty, cyan) over the scan, both in the map's own display range, with the outlines of the
ground truth and of the predicted lesions and the canvas' R/L, A/P labels, and saves a
screenshot of the whole window. Needs a display; headless:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, SAMPLERS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ensemble", type=Path, help="ensemble folder (default: the bundled demo ensemble)")
    parser.add_argument("--around", type=int, default=2, help="restore the tumour slice ± N (default 2)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the sampler's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="1500x950", help="window size WxH (default 1500x950)")
    parser.add_argument(
        "--overlay",
        choices=("anomaly", "uncertainty"),
        default="anomaly",
        help="the map shown over the scan (default: the anomaly map)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "screenshot.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import napari
    from qtpy.QtWidgets import QApplication

    from pseudohealthy.cli.view import open_viewer
    from pseudohealthy.data.sample import demo_ensemble_path
    from pseudohealthy.engine.defaults import default_steps
    from pseudohealthy.napari import go_to_axial, layer_frame

    ensemble = args.ensemble or demo_ensemble_path()
    if ensemble is None:
        print("no ensemble: pass --ensemble DIR (the demo ensemble is not installed)", file=sys.stderr)
        return 2
    viewer, restore, threshold = open_viewer(None, ensemble, viewer=napari.Viewer(show=True))
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window._qt_window.resize(width, height)
    scan, lesion = viewer.layers[0], viewer.layers[1]

    # the slice with the most tumour, in canonical axial order (the reader's layers are canonical)
    frame = layer_frame(scan)
    k = int(np.argmax(np.asarray(lesion.data).sum(axis=(0, 1))))
    go_to_axial(viewer, scan, frame, k)

    restore.sampler_combo.setCurrentText(args.sampler)
    restore.steps_spin.setValue(default_steps(args.sampler) if args.steps is None else args.steps)
    if restore.device_combo.findText(args.device) >= 0:
        restore.device_combo.setCurrentText(args.device)
    restore.mode_combo.setCurrentIndex(restore.mode_combo.findData("around"))
    restore.around_spin.setValue(args.around)
    start = time.perf_counter()
    if restore.restore() is None:
        print(f"could not start the restoration: {restore.status.text()}", file=sys.stderr)
        return 1
    while restore.is_running():
        QApplication.processEvents()
        time.sleep(0.05)
        if time.perf_counter() - start > args.timeout:
            restore.cancel()
    print(f"restored in {time.perf_counter() - start:.1f} s: {restore.status.text()}")
    print(threshold.suggest_label.text())

    # over the scan: one map (anomaly or the members' disagreement), the ground-truth and
    # predicted outlines
    from pseudohealthy.napari import output_name

    restore.apply_window("1–99 %")
    for role in ("pseudo", "anomaly", "uncertainty"):
        viewer.layers[output_name(scan.name, role)].visible = role == args.overlay
    predicted = viewer.layers[output_name(scan.name, "mask")]
    predicted.contour, predicted.opacity = 1, 1.0  # predicted lesions: a second outline
    shown = viewer.layers[output_name(scan.name, args.overlay)]
    viewer.layers.selection.active = shown
    print(f"{args.overlay} colour limits:", tuple(round(float(v), 6) for v in shown.contrast_limits))
    print("edge labels:", restore.edge_labels.text())
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.output), canvas_only=False, flash=False)
    print(f"wrote {args.output}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
