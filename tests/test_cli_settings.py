"""`restore` and `evaluate` share one owner for how the engine runs: the same flags, defaults and
help (``cli.batch.add_sampler_arguments``) read back into the same RestoreSettings
(``cli.batch.restore_settings``)."""

from __future__ import annotations

import pytest

from pseudohealthy.cli import build_parser
from pseudohealthy.cli.batch import restore_settings
from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_STEPS, FAITHFUL_SSIM

SHARED = ("sampler", "steps", "spacing", "seed", "device", "batch_size", "precision", "faithful_ssim")
FLAGS = ["--sampler", "ddpm", "--steps", "7", "--spacing", "trailing", "--seed", "3", "--device", "cpu",
         "--batch-size", "4", "--precision", "fp32", "--unit-ssim"]  # fmt: skip
FACES = {
    "restore": ["restore", "scan.nii.gz", "--ensemble", "demo", "-o", "out"],
    "evaluate": [
        "evaluate",
        "--scans",
        "scan.nii.gz",
        "--masks",
        "mask.nii.gz",
        "--ensemble",
        "demo",
        "-o",
        "out",
    ],
}


@pytest.mark.parametrize("face", sorted(FACES))
def test_the_same_flags_give_the_same_settings(face):
    parse = build_parser().parse_args
    given = restore_settings(parse(FACES[face] + FLAGS))
    assert {k: getattr(given, k) for k in SHARED} == {
        "sampler": "ddpm", "steps": 7, "spacing": "trailing", "seed": 3, "device": "cpu",
        "batch_size": 4, "precision": "fp32", "faithful_ssim": False,
    }  # fmt: skip
    default = restore_settings(parse(FACES[face]))
    assert (default.sampler, default.steps, default.spacing, default.faithful_ssim) == (
        DEFAULT_SAMPLER, DEFAULT_STEPS[DEFAULT_SAMPLER], DEFAULT_SPACING, FAITHFUL_SSIM,
    )  # fmt: skip
    assert restore_settings(parse(FACES[face]), seed=9).seed == 9  # a face's own fields on top


def test_the_help_is_the_same():
    parser = build_parser()
    faces = parser._subparsers._group_actions[0].choices
    helps = {face: {a.dest: a.help for a in faces[face]._actions if a.dest in SHARED} for face in FACES}
    assert helps["restore"] == helps["evaluate"] and set(helps["restore"]) == set(SHARED)
