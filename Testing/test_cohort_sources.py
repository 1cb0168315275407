"""Series discovery for batches: folder trees, manifests, filters, ids and shards (no model needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from batch_fixtures import small_ct, write_cohort
from derived_dicom import write_axial
from helpers import write_nrrd

from RaptorExtension.cohort.sources import (
    SeriesFilter,
    SeriesItem,
    assign_ids,
    discover_folder,
    fill_headers,
    load_item,
    parse_shard,
    read_manifest,
    shard_of,
)
from RaptorExtension.errors import InputError, RaptorError


@pytest.mark.needs_shared_data
def test_folder_tree_groups_dicom_by_series_and_finds_volume_files(tmp_path):
    written = write_cohort(tmp_path / "cohort", 3)
    # One series split over two folders (regrouped by UID), and a second series in the same folder as another.
    split = write_axial(small_ct(5), tmp_path / "cohort" / "split_a", patient_id="RAPTOR-SPLIT", description="split")
    (tmp_path / "cohort" / "split_b").mkdir()
    for f in split.files[8:]:
        shutil.move(str(f), tmp_path / "cohort" / "split_b" / f.name)
    shared = write_axial(small_ct(6), tmp_path / "cohort" / "RAPTOR-TEST-0000" / "series0", patient_id="RAPTOR-TEST-0000",
                         description="second series in one folder")
    for f in shared.files:
        f.rename(f.with_name("other_" + f.name))
    nrrd = write_nrrd(tmp_path / "cohort" / "volumes" / "ct_a.nrrd", np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    (tmp_path / "cohort" / "volumes" / "notes.txt").write_text("not a volume")
    (tmp_path / "cohort" / "volumes" / "junk.dcm").write_bytes(b"not dicom at all")
    (tmp_path / "cohort" / ".hidden").mkdir()
    write_axial(small_ct(7), tmp_path / "cohort" / ".hidden" / "s", patient_id="HIDDEN")

    found = discover_folder(tmp_path / "cohort")
    by_uid = {i.series_uid: i for i in found.items if i.kind == "dicom"}
    assert set(by_uid) == {w.series_uid for w in written} | {split.series_uid, shared.series_uid}
    assert by_uid[split.series_uid].n_slices == 17
    assert len({Path(p).parent.name for p in by_uid[split.series_uid].paths}) == 2
    assert by_uid[split.series_uid].source.count("|") == 1
    assert by_uid[shared.series_uid].description == "second series in one folder"
    assert by_uid[written[1].series_uid].patient_id == "RAPTOR-TEST-0000"
    assert all(i.modality == "CT" and i.sorted_files for i in by_uid.values())
    files = [i for i in found.items if i.kind == "path"]
    assert [Path(i.paths[0]).name for i in files] == ["ct_a.nrrd"] and files[0].n_slices == 6
    assert any("junk.dcm" in path for path, _ in found.skipped_files)
    assert not any("HIDDEN" in i.patient_id for i in found.items)

    # The split series loads as one volume in slice order.
    volume = load_item(by_uid[split.series_uid], "split")
    assert volume.array.shape == (17, 32, 32) and volume.id == "split"
    np.testing.assert_array_equal(load_item(files[0], "x").array, np.arange(6 * 7 * 8).reshape(6, 7, 8))


def test_filters_by_modality_slices_and_description():
    ct = SeriesItem(key="a", kind="dicom", paths=["a/1"], modality="CT", description="Abdomen ARTERIAL", n_slices=120)
    mr = SeriesItem(key="b", kind="dicom", paths=["b/1"], modality="MR", description="T1 axial", n_slices=30)
    sr = SeriesItem(key="c", kind="dicom", paths=["c/1"], modality="SR", description="dose report", n_slices=1)
    nifti = SeriesItem(key="d", kind="path", paths=["d.nii.gz"], n_slices=None)
    assert [SeriesFilter().exclusion(i) is None for i in (ct, mr, sr, nifti)] == [True, True, False, True]
    assert "holds no image" in SeriesFilter().exclusion(sr)
    only_ct = SeriesFilter(modalities=("ct",))
    assert only_ct.exclusion(ct) is None
    assert "modality MR not one of CT" in only_ct.exclusion(mr)
    assert "modality unknown" in only_ct.exclusion(nifti)
    assert SeriesFilter(modalities=("SR",)).exclusion(sr) is None  # asked for by name
    assert "30 slices, fewer than 40" in SeriesFilter(min_slices=40).exclusion(mr)
    assert SeriesFilter(min_slices=40).exclusion(nifti) is None  # unknown count: kept, the reader decides
    arterial = SeriesFilter(description="arterial|venous")
    assert arterial.exclusion(ct) is None and "does not match" in arterial.exclusion(mr)
    with pytest.raises(RaptorError, match="not a valid regular expression"):
        SeriesFilter(description="(unclosed")


@pytest.mark.needs_shared_data
def test_manifest_paths_ids_and_header_filling(tmp_path):
    written = write_cohort(tmp_path / "data", 2)
    nrrd = write_nrrd(tmp_path / "data" / "vol.nrrd", np.ones((5, 6, 7), dtype=np.int16))
    manifest = tmp_path / "lists" / "m.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,id,label\n"
        f"../data/{written[0].folder.relative_to(tmp_path / 'data')},case-1,1\n"
        f"{written[1].folder},,0\n"
        f"{nrrd},vol-1,1\n"
        "\n"
        "../data/missing.nii.gz,case-404,0\n"
    )
    found = read_manifest(manifest)
    assert [i.user_id for i in found.items] == ["case-1", "", "vol-1", "case-404"]
    assert found.items[0].paths == [str(written[0].folder.resolve())]
    assert found.items[3].paths[0].endswith("data/missing.nii.gz")
    ids = assign_ids(found.items)
    assert ids == ["case-1", written[1].series_uid, "vol-1", "case-404"]  # a DICOM folder: its UID, as raptor embed names it
    fill_headers(found.items[0])  # a DICOM folder: headers read only when a filter needs them
    assert found.items[0].kind == "dicom" and found.items[0].modality == "CT" and found.items[0].n_slices == 17
    fill_headers(found.items[2])
    assert found.items[2].n_slices == 5
    fill_headers(found.items[3])  # missing: left for the loader to report
    assert found.items[3].kind == "path"
    with pytest.raises(InputError, match="no such file or folder"):
        load_item(found.items[3], "case-404")


@pytest.mark.parametrize(
    "text, message",
    [
        ("filename,id\na.nrrd,1\n", "no 'path' column"),
        ("path,id\na.nrrd,x\nb.nrrd,x\n", "id 'x' on line 3 is already used on line 2"),
        ("path,id\n,x\n", "line 2 has an empty path"),
        ("path,id\na.nrrd,x,extra\n", "line 2 has 3 columns"),
        ("", "manifest is empty"),
    ],
)
def test_manifest_errors_name_the_file_and_line(tmp_path, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value) and "\n" not in str(info.value)


def test_ids_are_unique_and_stable():
    items = [
        SeriesItem(key="/a/x/ct.nrrd", kind="path", paths=["/a/x/ct.nrrd"]),
        SeriesItem(key="/a/y/ct.nrrd", kind="path", paths=["/a/y/ct.nrrd"]),
        SeriesItem(key="/a/z.nrrd", kind="path", paths=["/a/z.nrrd"]),
        SeriesItem(key="1.2.3", kind="dicom", paths=["/b/1.dcm"], series_uid="1.2.3"),
    ]
    assert assign_ids(items, roots=["/a"]) == ["x__ct", "y__ct", "z", "1.2.3"]
    assert assign_ids(items, roots=["/a"]) == assign_ids(list(items), roots=["/a"])
    clash = [SeriesItem(key="k1", kind="path", paths=["/a/ct.nrrd"], user_id="1.2.3"), items[3]]
    with pytest.raises(InputError, match="same id '1.2.3'"):
        assign_ids(clash)


def test_an_id_never_depends_on_the_rest_of_the_cohort():
    """Adding files (a second ct.nrrd in another folder, a DICOM series, a deeper file) renames nothing."""
    items = [
        SeriesItem(key="/a/p1/ct.nrrd", kind="path", paths=["/a/p1/ct.nrrd"]),
        SeriesItem(key="/a/p2/ct.nrrd", kind="path", paths=["/a/p2/ct.nrrd"]),
        SeriesItem(key="/a/ct.nii.gz", kind="path", paths=["/a/ct.nii.gz"]),
        SeriesItem(key="/a/p3/deep/ct.mha", kind="path", paths=["/a/p3/deep/ct.mha"]),
        SeriesItem(key="1.2.3", kind="dicom", paths=["/a/p1/dicom/1.dcm"], series_uid="1.2.3"),
        SeriesItem(key="/a/p4/x", kind="dicom", paths=["/a/p4/x/1.dcm"]),  # a DICOM series without a UID
        SeriesItem(key="/m/scans/ct.nrrd", kind="path", paths=["/m/scans/ct.nrrd"]),  # listed in /m/list.csv
        SeriesItem(key="k", kind="path", paths=["/elsewhere/ct.nrrd"], user_id="case-7"),
    ]
    roots = ["/a", "/m"]
    full = assign_ids(items, roots=roots)
    assert full == ["p1__ct", "p2__ct", "ct", "p3__deep__ct", "1.2.3", "p4__x", "scans__ct", "case-7"]
    rng = np.random.default_rng(0)
    subsets = [[n] for n in range(len(items))] + [list(range(n)) for n in range(1, len(items))]
    subsets += [sorted(rng.choice(len(items), size=rng.integers(1, len(items)), replace=False)) for _ in range(30)]
    for subset in subsets:  # every id is the same whatever else the cohort holds
        assert assign_ids([items[n] for n in subset], roots=roots) == [full[n] for n in subset]
    # Nested source folders: the innermost one that holds the file names it, whatever the order given.
    assert assign_ids(items[:2], roots=["/a/p1", "/a"]) == assign_ids(items[:2], roots=["/a", "/a/p1"]) == ["ct", "p2__ct"]


def test_shards_partition_ids_deterministically():
    ids = [f"1.2.840.{i}" for i in range(400)]
    shards = [[i for i in ids if shard_of(i, 4) == s] for s in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert all(60 < len(s) < 140 for s in shards)  # a hash spreads them
    # Adding series never moves the old ones.
    assert [shard_of(i, 4) for i in ids] == [shard_of(i, 4) for i in ids + ["new"]][:400]
    assert parse_shard("0/8") == (0, 8) and parse_shard(" 7 / 8 ") == (7, 8)
    for bad in ("8/8", "1-8", "a/b", "0/0"):
        with pytest.raises(RaptorError):
            parse_shard(bad)


def test_missing_or_wrong_folder_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        discover_folder(tmp_path / "nope")
    (tmp_path / "f.nrrd").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        discover_folder(tmp_path / "f.nrrd")
