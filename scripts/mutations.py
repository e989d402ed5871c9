"""Mutation tests: plant known training and evaluation bugs in a copy of the project and check that
the tests named for each one fail (``docs/MUTATIONS.md``).

Each mutation of :data:`MUTATIONS` edits one file of ``src/`` with a regular expression that must
match exactly ``count`` times (an edit that no longer matches stops the run: the list must follow
the code). For each, ``src/``, ``tests/`` and ``pyproject.toml`` are copied to a temporary
folder, the edit is applied there and pytest runs the named tests with ``PYTHONPATH=<copy>/src``
(checked to import the copy, not the editable install). A mutation is *killed* when pytest
reports failing tests, *survived* when they pass. The unmutated copy runs every named test
first: they must pass, or no kill means anything.

    .venv/bin/python scripts/mutations.py            # all; exit 1 if any survives
    .venv/bin/python scripts/mutations.py --list     # the list
    .venv/bin/python scripts/mutations.py --only M3  # one (or several: --only M3 M7)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "pyproject.toml")
TRAIN = "tests/test_training_loop.py"
EQUIV = "tests/test_restore_equivalence.py"
EVAL = "tests/test_evaluate_path.py"


@dataclass(frozen=True)
class Edit:
    """``pattern`` (a regular expression, multi-line) -> ``replacement`` in ``path``, ``count`` times."""

    path: str
    pattern: str
    replacement: str
    count: int = 1


@dataclass(frozen=True)
class Mutation:
    key: str
    description: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids or files expected to fail


LOOP, STATE = "src/pseudohealthy/training/loop.py", "src/pseudohealthy/training/state.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "M1",
        "training conditioned on the clean slice instead of the corrupted one",
        (Edit(LOOP, r'batch\["cond"\](?=\.to\(device)', 'batch["x0"]'),),
        (f"{TRAIN}::test_network_is_conditioned_on_the_corrupted_slice",),
    ),
    Mutation(
        "M2",
        "Min-SNR weight dropped by the loop (gamma 0 passed to training_loss)",
        (Edit(LOOP, r"min_snr_gamma=config\.min_snr_gamma,", "min_snr_gamma=0,"),),
        (f"{TRAIN}::test_optimised_loss_carries_the_configured_min_snr_weight",),
    ),
    Mutation(
        "M3",
        "resume restarts from step 0 (the saved step is not restored)",
        (Edit(STATE, r'run\.step, run\.elapsed = int\(info\["step"\]\),', "run.step, run.elapsed = 0,"),),
        (f"{TRAIN}::test_resume_continues_at_the_saved_step",),
    ),
    Mutation(
        "M4",
        "the online weights saved as the member instead of their EMA",
        (Edit(LOOP, r"weights: nn\.Module = run\.ema\.module", "weights: nn.Module = run.model"),),
        (f"{TRAIN}::test_member_is_the_ema_of_the_online_weights",),
    ),
    Mutation(
        "M5",
        "validation corrupted with the training tasks instead of the fold's validation tasks",
        (
            Edit(
                LOOP, r"_validation_builder\(s, data, val_tasks,", "_validation_builder(s, data, train_tasks,"
            ),
        ),
        (f"{TRAIN}::test_validation_uses_the_fold_validation_tasks_and_the_ema",),
    ),
    Mutation(
        "M6",
        "no DDP gradient sync (the model is never wrapped in DistributedDataParallel)",
        (
            Edit(
                LOOP,
                r"if not s\.dist_info\.enabled:\n(\s+)return s\.run\.model",
                r"if True:\n\1return s.run.model",
            ),
        ),
        (f"{TRAIN}::test_ddp_ranks_keep_identical_weights_on_different_data",),
    ),
    Mutation(
        "M7",
        "evaluate --ensemble restores without --sampler / --steps / --seed",
        (
            Edit(
                "src/pseudohealthy/cli/evaluate.py", r"\n\s+sampler=args\.sampler,\n\s+steps=args\.steps,", ""
            ),
            Edit("src/pseudohealthy/cli/evaluate.py", r"\n\s+seed=args\.seed,", ""),
        ),
        (f"{EVAL}::test_ensemble_run_restores_with_the_requested_settings",),
    ),
    Mutation(
        "M8",
        "evaluate scores a zero map instead of the one it restored (and saved)",
        (
            Edit(
                "src/pseudohealthy/evaluation/cases.py",
                r'(\n\s+info\["anomaly_saved"\] = str\(_save_map\(anomaly, volume, path, '
                r"job\.overwrite\)\)\n)(\s+else:)",
                r"\1        anomaly = np.zeros_like(anomaly)\n\2",
            ),
        ),
        (f"{EVAL}::test_metrics_are_those_of_the_restored_maps",),
    ),
    Mutation(
        "M9",
        "the engine ignores the SSIM-constants setting (faithful_ssim not passed on from RestoreSettings)",
        (
            Edit(
                "src/pseudohealthy/engine/restore.py", r"\n\s+faithful_ssim=run\.settings\.faithful_ssim,", ""
            ),
        ),
        (f"{EQUIV}::test_faithful_ssim_setting_reaches_the_maps",),
    ),
)


def apply(root: Path, edit: Edit) -> None:
    """Apply ``edit`` under ``root``; raise if the pattern does not match exactly ``count`` times."""
    path = root / edit.path
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(edit.pattern, edit.replacement, text)
    if n != edit.count:
        raise SystemExit(
            f"mutation out of sync with the code: {edit.path}: /{edit.pattern}/ matched {n} time(s), "
            f"expected {edit.count}"
        )
    from pseudohealthy.data.files import write_text

    write_text(path, new)


def check_patterns(root: Path, mutations: list[Mutation]) -> None:
    """Every pattern still matches the code as often as it should (without editing anything)."""
    for m in mutations:
        for edit in m.edits:
            n = len(re.findall(edit.pattern, (root / edit.path).read_text(encoding="utf-8")))
            if n != edit.count:
                raise SystemExit(
                    f"{m.key} out of sync with the code: {edit.path}: /{edit.pattern}/ matched {n} "
                    f"time(s), expected {edit.count}"
                )


def copy_project(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def check_import(root: Path) -> None:
    """Refuse to go on if the copy's package is not the one Python imports."""
    out = subprocess.run(
        [sys.executable, "-c", "import pseudohealthy; print(pseudohealthy.__file__)"],
        env=_env(root),
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to((root / "src").resolve()):
        raise SystemExit(f"the copy is not imported (got {out}); the mutations would not be tested")


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """pytest's exit status, the seconds it took and the tail of its output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timed out"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return proc.returncode, time.perf_counter() - start, tail[0]


def verdict(rc: int) -> str:
    """pytest 1: tests failed (killed); 0: they passed (survived); else the run itself failed."""
    return {0: "survived", 1: "killed"}.get(rc, f"error (pytest exit {rc})")


def run_one(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix=f"mutation_{mutation.key}_") as tmp:
        root = Path(tmp)
        copy_project(root)
        for edit in mutation.edits:
            apply(root, edit)
        check_import(root)
        rc, seconds, tail = run_tests(root, mutation.tests, timeout)
    return verdict(rc), seconds, tail


def baseline(mutations: list[Mutation], timeout: float) -> None:
    """The named tests pass on the unmutated copy (else a 'kill' proves nothing)."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="mutation_base_") as tmp:
        root = Path(tmp)
        copy_project(root)
        check_patterns(root, mutations)
        check_import(root)
        rc, seconds, tail = run_tests(root, tests, timeout * len(mutations))
    print(f"baseline (no mutation): pytest exit {rc} in {seconds:.0f} s: {tail}", flush=True)
    if rc != 0:
        raise SystemExit("the named tests fail without any mutation: fix them first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", nargs="+", metavar="KEY", help="run only these mutations (e.g. M3)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.key in args.only]
    unknown = sorted(set(args.only or ()) - {m.key for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}")
    if args.list:
        check_patterns(ROOT, chosen)
        for m in chosen:
            files = ", ".join(sorted({e.path for e in m.edits}))
            print(f"{m.key}  {m.description}\n    in {files}\n    caught by {', '.join(m.tests)}")
        return 0
    if not args.no_baseline:
        baseline(chosen, args.timeout)
    survived = 0
    print(f"{'key':4} {'result':10} {'seconds':>7}  description")
    for m in chosen:
        result, seconds, tail = run_one(m, args.timeout)
        survived += result != "killed"
        print(f"{m.key:4} {result:10} {seconds:7.0f}  {m.description}  [{tail}]", flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
