"""Scores as a DICOM SR (TID 1500) and heatmaps as a Parametric Map, re-read with pydicom and highdicom.

The series are small copies of the shared CT (17 x 32 x 32, with a frame of
reference), axial and resliced sagittally, so the frame geometry is checked
for two slice orientations.  Values are compared with the NRRD heatmap of the
same ``raptor explain`` run, read back with Slicer's reader, through the
Parametric Map's own per-frame geometry (not the code that wrote it).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from batch_fixtures import small_ct, tiny_cli_args
from derived_dicom import write_axial, write_sagittal
from helpers import dciodvfy_errors, random_probe, write_nrrd
from pydicom.uid import generate_uid

from RaptorExtension.cli import main
from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings
from RaptorExtension.errors import InputError
from RaptorExtension.probes.dicom_results import frames_for_source, read_source_folder
from RaptorExtension.probes.probe_file import read_probe_file
from RaptorExtension.volumes.readers import read_slicer_file, read_volume

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

hd = pytest.importorskip("highdicom")

PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def series(shared_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dicom-results")
    frame = generate_uid(entropy_srcs=["raptor-test", "frame"])
    axial = write_axial(small_ct(0), root / "axial", patient_id="RAPTOR-SR-0001", frame_of_reference_uid=frame)
    sagittal = write_sagittal(small_ct(0), root / "sagittal", patient_id="RAPTOR-SR-0001", study_uid=axial.study_uid,
                              frame_of_reference_uid=frame)
    return {"axial": axial, "sagittal": sagittal, "root": root}


@pytest.fixture(scope="module")
def probe_file(tiny_model_dir, tiny_encoder, tmp_path_factory) -> Path:
    settings = EmbedSettings(model=str(tiny_model_dir), k=4, grid=16, preset="minmax", device="cpu", batch_size=64)
    probe = random_probe(Embedder(settings, encoder=tiny_encoder), classes=("liver", "pancreas", "spleen"))
    probe.name = "organ"
    return probe.save(tmp_path_factory.mktemp("probe") / "organ.raptorprobe")


def explain_args(probe_file: Path, model_dir: Path, volume: str, out: Path, *extra: str) -> list[str]:
    return ["explain", str(probe_file), volume, "-o", str(out / "why.png"), "--heatmap", str(out / "heat.nrrd"),
            "--model", str(model_dir), "--device", "cpu", "--class", "pancreas", *extra]


def heatmap_values_at_frames(pm: pydicom.Dataset, nrrd: Path) -> np.ndarray:
    """The NRRD heatmap sampled at every pixel of every frame, placed by the PM's per-frame geometry."""
    heat = read_slicer_file(nrrd)
    to_ijk = np.linalg.inv(heat.ijk_to_ras)
    shared = pm.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    rows, cols = int(pm.Rows), int(pm.Columns)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    frames = []
    for item in pm.PerFrameFunctionalGroupsSequence:
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        lps = ipp[:, None, None] + iop[:3, None, None] * dc * c + iop[3:, None, None] * dr * r
        ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])])
        ijk = np.einsum("ab,bjk->ajk", to_ijk, ras)[:3]
        assert np.abs(ijk - np.rint(ijk)).max() < 1e-3, "a frame's pixels must land on the heatmap's voxel centres"
        i, j, k = np.rint(ijk).astype(int)
        frames.append(heat.array[k, j, i])
    return np.stack(frames)


def parameters(group) -> dict[str, str]:
    """The algorithm parameters (TEXT items) of a measurement group, as key=value pairs."""
    found = {}
    for item in group[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "111002" and item.ValueType == "TEXT":  # Algorithm Parameters
            for part in str(item.TextValue).split("; "):
                key, _, value = part.partition("=")
                found[key] = value
    return found


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_explain_writes_a_parametric_map_and_an_sr_that_read_back(orientation, series, probe_file, tiny_model_dir,
                                                                   tmp_path, capsys):
    written = series[orientation]
    out = tmp_path
    code = main(explain_args(probe_file, tiny_model_dir, str(written.folder), out,
                             "--dicom-pm", str(out / "heat_pm.dcm"), "--dicom-sr", str(out / "scores_sr.dcm")))
    assert code == 0, capsys.readouterr().err
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(str(f), stop_before_pixels=True) for f in written.files)}

    # -- the Parametric Map: same frame of reference, one frame per source slice, values = the NRRD heatmap
    pm = pydicom.dcmread(str(out / "heat_pm.dcm"))
    assert pm.SOPClassUID == PM_SOP_CLASS
    assert (pm.PatientID, pm.StudyInstanceUID) == (written.patient_id, written.study_uid)
    assert pm.SeriesInstanceUID != written.series_uid
    assert pm.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    assert int(pm.NumberOfFrames) == len(written.files)
    assert pm.BitsAllocated == 32 and "FloatPixelData" in pm
    frame_ipps = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                  for f in pm.PerFrameFunctionalGroupsSequence}
    source_ipps = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient) for ds in sources.values()}
    assert frame_ipps == source_ipps
    shared = pm.SharedFunctionalGroupsSequence[0]
    first = next(iter(sources.values()))
    np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                               [float(v) for v in first.ImageOrientationPatient])
    np.testing.assert_allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [float(v) for v in first.PixelSpacing])
    pixels = pm.pixel_array.astype(np.float32)
    expected = heatmap_values_at_frames(pm, out / "heat.nrrd")
    assert np.array_equal(pixels, expected), f"max difference {np.abs(pixels - expected).max()}"
    assert np.abs(pixels).max() > 0
    mapping = shared.RealWorldValueMappingSequence[0]
    assert (float(mapping.RealWorldValueSlope), float(mapping.RealWorldValueIntercept)) == (1.0, 0.0)
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "130402"  # Class activation
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    assert "logit of pancreas" in mapping.LUTExplanation
    # highdicom finds the frame of each source instance by the references the PM keeps
    reread = hd.pm.ParametricMap.from_dataset(pm)
    uids = sorted(sources)
    by_source = reread.get_pixels_by_source_instance(source_sop_instance_uids=uids)
    assert by_source.shape == (len(uids), pm.Rows, pm.Columns)
    by_position = {tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient): n
                   for n, f in enumerate(pm.PerFrameFunctionalGroupsSequence)}
    for n, uid in enumerate(uids):
        frame = by_position[tuple(round(float(v), 3) for v in sources[uid].ImagePositionPatient)]
        assert np.array_equal(by_source[n], pixels[frame])

    # -- the SR: one probability per class, the algorithm, the source series, the slice curves
    sr = hd.sr.srread(str(out / "scores_sr.dcm"))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert (sr.PatientID, sr.StudyInstanceUID) == (written.patient_id, written.study_uid)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == written.series_uid
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == set(sources)
    groups = sr.content.get_image_measurement_groups()
    by_name = {g.finding_type.meaning: g for g in groups if g.finding_type is not None}
    volume = read_volume(str(written.folder))
    from RaptorExtension.probes.explain import embed_settings_for
    from RaptorExtension.probes.probe import Probe

    probe = Probe.load(probe_file)
    embedding = Embedder(embed_settings_for(probe, model=str(tiny_model_dir), device="cpu")).embed_volume(volume)
    scores = probe.scores(embedding.vector[None])[0]
    classes = [g for g in groups if g.get_measurements()[0].name.value == "122157"]
    assert [g.finding_type.meaning for g in classes] == ["y = liver", "y = pancreas", "y = spleen"]
    for group, expected_score in zip(classes, scores):
        measurement = group.get_measurements()[0]
        assert measurement.unit.value == "1"
        assert measurement.value == pytest.approx(expected_score, rel=1e-6)
    params = parameters(classes[0])
    meta, _ = read_probe_file(probe_file)
    assert params["probe_sha256"] == meta["content_sha256"]
    assert params["weight_sha256"] == probe.embedding["weight_sha256"] and params["K"] == "4" and params["seed"] == "0"
    assert params["label_column"] == "y" and params["encoder"] == probe.embedding["encoder"]
    curves = [g for g in groups if "slice curve" in str(g.tracking_identifier)]
    decision = next(g for g in groups if str(g.tracking_identifier).endswith("decision"))
    assert [len(g.get_measurements()) for g in curves] == [16, 16, 16]
    logit, bias = (m.value for m in decision.get_measurements())
    total = sum(m.value for g in curves for m in g.get_measurements())
    assert logit == pytest.approx(bias + total, abs=1e-4)
    assert "pancreas" in by_name["y = pancreas"].finding_type.meaning
    coordinates = curves[0].get_measurements()[0].referenced_coordinates
    assert coordinates is not None

    # -- dicom3tools' validator finds no error in either object
    assert dciodvfy_errors(out / "heat_pm.dcm") == []
    assert dciodvfy_errors(out / "scores_sr.dcm") == []


def test_probe_apply_writes_one_sr_per_dicom_series_and_one_line_for_the_rest(series, probe_file, tiny_model_dir,
                                                                               tmp_path, capsys):
    embedded = tmp_path / "npz"
    for name in ("axial", "sagittal"):
        assert main(["embed", str(series[name].folder), "-o", str(embedded), "--model", str(tiny_model_dir), "--k", "4",
                     "--grid", "16", "--preset", "minmax", "--device", "cpu"]) == 0
    write_nrrd(tmp_path / "plain.nrrd", (np.arange(10 * 11 * 12) % 23).astype(np.int16).reshape(10, 11, 12))
    assert main(["embed", str(tmp_path / "plain.nrrd"), "-o", str(embedded), "--model", str(tiny_model_dir), "--k", "4",
                 "--grid", "16", "--preset", "minmax", "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "sr"
    code = main(["probe", "apply", str(probe_file), str(embedded), "-o", str(tmp_path / "scores.csv"), "--dicom-sr", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("raptor: error:")]
    assert len(lines) == 1 and "plain" in lines[0] and "not a DICOM series" in lines[0]
    assert "wrote 2 DICOM SR(s)" in err
    scores = {row["id"]: row for row in csv.DictReader(open(tmp_path / "scores.csv"))}
    for name in ("axial", "sagittal"):
        uid = series[name].series_uid  # a DICOM series' id is its SeriesInstanceUID (one rule for embed and batch)
        sr = hd.sr.srread(str(out / f"{uid}_sr.dcm"))
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == uid
        values = [g.get_measurements()[0].value for g in sr.content.get_image_measurement_groups()]
        assert values == pytest.approx([float(scores[uid][f"p_{c}"]) for c in ("liver", "pancreas", "spleen")], rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{series[n].series_uid}_sr.dcm" for n in ("axial", "sagittal"))


def test_a_batch_table_finds_its_series_by_uid_among_several_in_a_folder(series, probe_file, tiny_model_dir, tmp_path,
                                                                          capsys):
    table = tmp_path / "cohort.csv"
    assert main(["batch", "--folder", str(series["root"]), "--csv", str(table), "--readers", "0", "-q", "--preset", "minmax",
                 *tiny_cli_args(tiny_model_dir)]) == 0
    out = tmp_path / "sr"
    assert main(["probe", "apply", str(probe_file), str(table), "-o", str(tmp_path / "s.csv"), "--dicom-sr", str(out)]) == 0
    for name in ("axial", "sagittal"):
        uid = series[name].series_uid
        sr = pydicom.dcmread(str(out / f"{uid}_sr.dcm"))
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def test_dicom_results_of_a_volume_that_is_not_dicom_are_one_line_before_any_work(probe_file, tiny_model_dir, tmp_path,
                                                                                    capsys):
    nrrd = write_nrrd(tmp_path / "scan.nrrd", (np.arange(10 * 11 * 12) % 23).astype(np.int16).reshape(10, 11, 12))
    code = main(explain_args(probe_file, tiny_model_dir, str(nrrd), tmp_path, "--dicom-pm", str(tmp_path / "pm.dcm")))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "is not a DICOM series" in err and "loading model" not in err
    assert not (tmp_path / "pm.dcm").exists() and not (tmp_path / "why.png").exists()


def test_frames_refuse_a_heatmap_on_another_grid(series):
    source = read_source_folder(series["axial"].folder)
    volume = read_volume(str(series["axial"].folder))
    heat = np.arange(volume.array.size, dtype=np.float32).reshape(volume.array.shape)
    frames = frames_for_source(heat, volume.ijk_to_ras, source)
    assert frames.shape == (len(source.datasets), *volume.array.shape[1:])
    assert sorted(np.unique(frames[:, 0, 0] // (volume.array.shape[1] * volume.array.shape[2])).tolist()) == list(
        range(volume.array.shape[0]))  # every slice used once
    shifted = volume.ijk_to_ras.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 0]
    with pytest.raises(InputError, match="does not lie on the heatmap's voxel grid"):
        frames_for_source(heat, shifted, source)
    with pytest.raises(InputError, match="outside the heatmap's volume"):
        frames_for_source(heat[:-2], volume.ijk_to_ras, source)
