"""A CT saved as NRRD or NIfTI names no modality: `--preset auto` keeps `minmax` and says, in one line, to pass `--preset ct`.

Decision (README, Intensity presets): the preset is never switched from the values, because embeddings with
different presets cannot share a table and a cohort of files would get `ct` or `minmax` file by file.
"""

from __future__ import annotations

import numpy as np
from helpers import write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.volumes.intensity import ct_hint


def ct_like(rng) -> np.ndarray:
    array = rng.normal(40, 20, (10, 12, 14))  # soft tissue in HU
    array[:, :2] = -1024  # air around the body
    array[4:6, 5:7, 5:7] = 1800  # bone
    return array.astype(np.int16)


def test_ct_looking_file_gets_one_hint_and_keeps_minmax(tmp_path, tiny_model_dir, capsys):
    rng = np.random.default_rng(0)
    ct = [write_nrrd(tmp_path / f"ct{i}.nrrd", ct_like(rng)) for i in range(2)]
    args = ["--model", str(tiny_model_dir), "--k", "2", "--grid", "12", "--device", "cpu", "--readers", "0"]
    assert main(["embed", *map(str, ct), "-o", str(tmp_path / "auto"), *args]) == 0
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if "hint" in line]
    assert hints == [f"raptor: hint: {ct[0]}: its values (-1024 to 1800) look like CT in Hounsfield units, but the file "
                     "names no modality, so --preset auto used minmax; pass --preset ct for the CT window (presets do not "
                     "mix in one table)"]  # once per run, not once per file
    assert Embedding.load(tmp_path / "auto" / "ct0.npz").metadata["preset"] == "minmax"
    assert main(["embed", str(ct[0]), "-o", str(tmp_path / "ct"), "--preset", "ct", *args]) == 0
    assert "hint" not in capsys.readouterr().err
    assert Embedding.load(tmp_path / "ct" / "ct0.npz").metadata["preset"] == "ct[-1000,1000]"


def test_other_files_get_no_hint(tmp_path, tiny_model_dir, capsys):
    mr_like = write_nrrd(tmp_path / "mr.nrrd", np.random.default_rng(1).uniform(0, 1500, (10, 12, 14)).astype(np.float32))
    assert main(["embed", str(mr_like), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir), "--k", "2", "--grid", "12",
                 "--device", "cpu"]) == 0
    assert "hint" not in capsys.readouterr().err
    assert ct_hint("auto", "CT", -1024, 3000, "x") is None  # a DICOM CT gets the ct preset from its modality
    assert ct_hint("auto", None, -1024, 900, "x") is None  # no bone or contrast: not sure enough
    assert ct_hint("auto", None, -32768, 3000, "x") is None  # not near -1024
    assert ct_hint("auto", None, -2048, 3071, "x") is not None  # outside-the-field-of-view padding
    assert ct_hint("minmax", None, -1024, 3000, "x") is None  # asked for explicitly


def test_batch_hint_names_no_path_when_anonymized(tmp_path, tiny_model_dir, capsys):
    write_nrrd(tmp_path / "patient-smith" / "ct.nrrd", ct_like(np.random.default_rng(2)))
    assert main(["batch", "--folder", str(tmp_path / "patient-smith"), "--csv", str(tmp_path / "c.csv"), "--anonymize",
                 "--salt", "a-salt-of-sixteen-chars", "--model", str(tiny_model_dir), "--k", "2", "--grid", "12",
                 "--device", "cpu", "--readers", "0"]) == 0
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if "hint:" in line]
    assert len(hints) == 1 and "smith" not in hints[0] and "look like CT" in hints[0]
