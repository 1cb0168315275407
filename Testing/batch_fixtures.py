"""Helpers shared by the batch tests: small derived DICOM cohorts and tiny-model settings.

Everything is derived from the shared TCIA CT (read once per session) and
kept small: 17 slices of 32 x 32 pixels per series, embedded on a 16^3 grid
by a random-init tiny DINOv2, so a whole cohort embeds in seconds on a CPU.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import DICOM_SERIES, require
from derived_dicom import StoredCT, read_stored_ct, subsample, write_axial

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def shared_ct() -> StoredCT:
    return read_stored_ct(require(DICOM_SERIES))


def small_ct(offset: int = 0) -> StoredCT:
    """17 x 32 x 32 voxels of the shared CT; ``offset`` shifts the first slice (a different-looking series)."""
    return subsample(shared_ct(), 8, 16, offset_k=offset % 8)


def write_cohort(folder: Path, n: int, *, patient_prefix: str = "RAPTOR-TEST") -> list:
    """``n`` small series in ``folder/patient/series`` subfolders (two series per patient)."""
    from pydicom.uid import generate_uid

    written = []
    for i in range(n):
        patient = f"{patient_prefix}-{i // 2:04d}"
        # Deterministic UIDs: ids, their order and their shards are the same in every test run.
        written.append(
            write_axial(small_ct(i), folder / patient / f"series{i}", patient_id=patient,
                        study_uid=generate_uid(entropy_srcs=[patient_prefix, patient, "study"]),
                        series_uid=generate_uid(entropy_srcs=[patient_prefix, str(i), "series"]),
                        description=f"derived axial {i}", series_number=900 + i)
        )
    return written


def tiny_settings(model_dir: Path, **overrides):
    from RaptorExtension.encoding.settings import EmbedSettings

    values = dict(model=str(model_dir), k=4, grid=16, device="cpu", batch_size=64)
    values.update(overrides)
    return EmbedSettings(**values)


def tiny_cli_args(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--k", "4", "--grid", "16", "--device", "cpu", "--batch-size", "64"]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``raptor ARGS`` in a fresh interpreter (loader processes need a real main module)."""
    proc = subprocess.run([sys.executable, "-m", "RaptorExtension", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
