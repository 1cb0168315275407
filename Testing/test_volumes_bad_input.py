"""Every bad input gets one clear line naming it, and leaves nothing half-written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import synthetic_volume
from helpers import write_raw_nrrd

from RaptorExtension.cli import main
from RaptorExtension.encoding.model import load_encoder
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.errors import InputError, ModelError
from RaptorExtension.volumes.readers import read_volume


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("raptor: error:") or l.startswith("raptor: failed:")]
    assert lines, err
    return lines[0]


@pytest.fixture()
def bad_inputs(tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the message must contain)."""
    d = tmp_path / "bad"
    d.mkdir()
    items = {}
    items["2d_nrrd"] = (write_raw_nrrd(d / "slice.nrrd", np.ones((5, 6), "<i2")), "2D image")
    four_d = write_raw_nrrd(d / "series.nrrd", np.ones((3, 4, 5, 6), "<i2"), extra="kinds: domain domain domain list\n")
    items["4d_nrrd"] = (four_d, "4D series")
    np.save(d / "flat.npy", np.ones((7, 8), dtype=np.float32))
    items["2d_npy"] = (d / "flat.npy", "2D image")
    np.save(d / "four.npy", np.ones((2, 3, 4, 5), dtype=np.float32))
    items["4d_npy"] = (d / "four.npy", "4D series")
    np.save(d / "empty.npy", np.zeros((0, 4, 4), dtype=np.float32))
    items["empty"] = (d / "empty.npy", "empty")
    np.save(d / "constant.npy", np.full((6, 6, 6), 7, dtype=np.int16))
    items["constant"] = (d / "constant.npy", "constant")
    nan = synthetic_volume((6, 6, 6))
    nan[2, 2, 2] = np.nan
    np.save(d / "nan.npy", nan)
    items["nan"] = (d / "nan.npy", "NaN or infinite")
    inf = synthetic_volume((6, 6, 6))
    inf[1, 1, 1] = np.inf
    np.save(d / "inf.npy", inf)
    items["inf"] = (d / "inf.npy", "NaN or infinite")
    np.save(d / "thin.npy", synthetic_volume((1, 8, 8)))
    items["one_voxel_thick"] = (d / "thin.npy", "1 voxel thick")
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    items["pickled_npy"] = (d / "objects.npy", "never unpickles")
    (d / "garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    items["corrupt_nifti"] = (d / "garbage.nii.gz", "could not read")
    items["missing"] = (d / "nothere.nrrd", "no such file")
    (d / "notes.txt").write_text("hello")
    items["unsupported"] = (d / "notes.txt", "unsupported file type")
    corrupt = d / "corrupt_dicom"
    corrupt.mkdir()
    (corrupt / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    items["corrupt_dicom"] = (corrupt, "no readable DICOM image series")
    report = d / "report_dicom"
    report.mkdir()
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pydicom.dcmwrite(str(report / "sr.dcm"), ds, enforce_file_format=True)
    items["non_image_dicom"] = (report, "holds no image")
    empty_dir = d / "empty_folder"
    empty_dir.mkdir()
    items["empty_folder"] = (empty_dir, "folder is empty")
    return items


CASES = [
    "2d_nrrd", "4d_nrrd", "2d_npy", "4d_npy", "empty", "constant", "nan", "inf", "one_voxel_thick",
    "pickled_npy", "corrupt_nifti", "missing", "unsupported", "corrupt_dicom", "non_image_dicom", "empty_folder",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_no_output(case, bad_inputs, tiny_model_dir, tmp_path, capsys):
    path, words = bad_inputs[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "embed", str(path), "--model", str(tiny_model_dir), "--k", "8", "--grid", "12", "-q",
                                "-o", str(out), "--csv", str(tmp_path / "t.csv"))
    assert code == 1
    line = error_line(err)
    assert str(path) in line and words in line, line
    assert "Traceback" not in err
    assert not list(out.glob("*.npz")) and not (tmp_path / "t.csv").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.slow
def test_continue_on_error_finishes_the_others(bad_inputs, tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.npy"
    np.save(good, synthetic_volume((8, 9, 10)))
    good2 = tmp_path / "good2.npy"
    np.save(good2, synthetic_volume((8, 9, 10), seed=1))
    bad = [bad_inputs[c][0] for c in ("nan", "missing", "corrupt_dicom")]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "embed", str(good), *map(str, bad), str(good2), "--model", str(tiny_model_dir), "--k", "8",
                                "--grid", "12", "-q", "-o", str(out), "--continue-on-error")
    assert code == 1  # non-zero because some inputs failed
    assert sorted(p.name for p in out.glob("*.npz")) == ["good.npz", "good2.npz"]
    errors = (out / "raptor_errors.csv").read_text().splitlines()
    assert errors[0] == "id,source,reason" and len(errors) == 4
    assert "embedded 2" in stdout and "failed" in stdout


def test_stop_at_first_error_without_continue(bad_inputs, tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "good.npy"
    np.save(good, synthetic_volume((8, 9, 10)))
    code, stdout, err = run_cli(capsys, "embed", str(bad_inputs["constant"][0]), str(good), "--model",
                                str(tiny_model_dir), "--k", "8", "--grid", "12", "-q", "-o", str(tmp_path / "out"))
    assert code == 1 and "constant" in error_line(err)


def test_unknown_model_id_offline_says_how_to_use_a_local_folder(capsys, tmp_path):
    np.save(tmp_path / "v.npy", synthetic_volume((6, 6, 6)))
    code, _, err = run_cli(capsys, "embed", str(tmp_path / "v.npy"), "--model", "facebook/no-such-model-xyz", "-q")
    assert code == 1
    line = error_line(err)
    assert "facebook/no-such-model-xyz" in line and "--model PATH" in line
    assert len(err.strip().splitlines()) <= 2  # the "loading" line and the error


def test_default_model_not_cached_and_hub_unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match=r"facebook/dinov2-large.*not in the local cache.*--model PATH"):
        load_encoder("facebook/dinov2-large", device="cpu", cache_dir=str(tmp_path / "empty-cache"))


def test_model_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_encoder(str(tmp_path / "weights"), device="cpu")


def test_k_larger_than_d(tiny_encoder):
    with pytest.raises(ModelError, match=r"K=64 is larger than the encoder's token width d=32"):
        Embedder(EmbedSettings(model="tiny", k=64), encoder=tiny_encoder)


def test_k_larger_than_d_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    np.save(tmp_path / "v.npy", synthetic_volume((6, 6, 6)))
    code, _, err = run_cli(capsys, "embed", str(tmp_path / "v.npy"), "--model", str(tiny_model_dir), "--k", "33", "-q")
    assert code == 1 and "K=33 is larger" in error_line(err)


def test_bad_grid_and_planes(tiny_encoder):
    from RaptorExtension.errors import RaptorError

    with pytest.raises(RaptorError, match="grid"):
        EmbedSettings(grid="huge")
    with pytest.raises(RaptorError, match="planes must be some of axial, coronal, sagittal"):
        EmbedSettings(model="tiny", k=4, planes=("axial", "oblique"))
    with pytest.raises(RaptorError, match="each once"):
        EmbedSettings(model="tiny", k=4, planes=("axial", "axial"))


def copy_slices(dicom_series: Path, folder: Path, n: int) -> list[Path]:
    """The first ``n`` slices of the shared CT series copied into ``folder``; returns the copies."""
    folder.mkdir()
    copies = []
    for f in sorted(dicom_series.glob("*.dcm"))[:n]:
        copies.append(Path(shutil.copy(f, folder / f.name)))
    return copies


def test_dicom_folder_with_two_series_is_refused(tmp_path, dicom_series):
    folder = tmp_path / "two"
    files = copy_slices(dicom_series, folder, 3)
    ds = pydicom.dcmread(str(files[0]))
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(str(folder / "other.dcm"))
    with pytest.raises(InputError, match=r"holds 2 DICOM series"):
        read_volume(str(folder))


def test_single_dicom_slice_is_a_2d_image(tmp_path, dicom_series):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(sorted(dicom_series.glob("*.dcm"))[0], folder / "a.dcm")
    with pytest.raises(InputError, match="single slice, a 2D image"):
        read_volume(str(folder))


def test_a_truncated_dicom_slice_is_refused_not_silently_filled(tmp_path, dicom_series, tiny_model_dir, capsys):
    """Slicer's reader fills a slice whose pixel data is cut short without a word; Raptor refuses it."""
    folder = tmp_path / "cut"
    files = copy_slices(dicom_series, folder, 4)
    assert read_volume(str(folder)).array.shape == (4, 512, 512)  # whole, it reads
    victim = files[2]
    victim.write_bytes(victim.read_bytes()[:-1000])
    out = tmp_path / "out"
    code = main(["embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--grid", "16", "--k", "8", "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"raptor: error: {folder}: DICOM file {victim.name} is truncated: its pixel data has 523288 of 524288 bytes\n" in err
    assert not out.exists() or not list(out.glob("*.npz"))


def test_pixel_data_shorter_than_the_image_is_refused(tmp_path, dicom_series):
    folder = tmp_path / "short"
    files = copy_slices(dicom_series, folder, 3)
    ds = pydicom.dcmread(str(files[1]))
    ds.PixelData = ds.PixelData[: 512 * 256 * 2]  # a consistent file holding half an image
    ds.save_as(str(files[1]))
    with pytest.raises(InputError, match=r"has 262144 bytes of pixel data where 512x512 at 16 bits needs 524288"):
        read_volume(str(folder))


def test_a_multi_frame_dicom_gets_its_own_message(tmp_path, dicom_series):
    """One file holding every slice (enhanced CT/MR) is not a 2D image: say what it is and what to do."""
    folder = tmp_path / "multiframe"
    folder.mkdir()
    ds = pydicom.dcmread(str(sorted(dicom_series.glob("*.dcm"))[0]))
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData * 3
    ds.save_as(str(folder / "enhanced.dcm"))
    with pytest.raises(InputError, match=r"one multi-frame file \(3 frames, e\.g\. enhanced CT/MR\).*dcm2niix"):
        read_volume(str(folder))
