"""The bad-input corpus: hostile and broken inputs for every ``raptor`` command, built at test time.

Issue 15 attacked the command line with corrupt and lying volume files, odd
arrays, crafted ``.npz`` and probe files, crafted metadata, bad labels,
output paths that name inputs, failing writes and concurrent runs.  This
module rebuilds such inputs (every class of the issue, plus neighbours that
must still work) in a folder, in a few seconds, with no download:

- :data:`VOLUMES`: volume files for ``raptor embed`` (bad ones, each with the
  words its one-line error must hold, and good neighbours that must embed);
- :data:`CASES`: whole command lines (``probe``, ``info``, ``merge``,
  ``batch``, ``explain``, options, output collisions, write failures), each
  with the words of its error and the files it may write.

``Testing/test_cli_bad_input_corpus.py`` runs them; ``python
Testing/bad_input_corpus.py DIR`` builds the corpus in DIR and lists it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_tiny_model_dir  # noqa: E402
from helpers import write_raw_nrrd  # noqa: E402

K, PLANES, P = 4, ["axial", "coronal", "sagittal"], 2
N_FEATURES = 3 * K * P * P
TINY_ARGS = ("--k", "4", "--grid", "8", "--device", "cpu", "-q")


@dataclass
class VolumeCase:
    name: str
    spec: str
    words: tuple[str, ...] = ()
    """Substrings of the reason (the spec's path is always required too); empty for a good neighbour."""
    good_ids: tuple[str, ...] = ()
    """For a good neighbour: the ids it must be embedded under."""

    @property
    def good(self) -> bool:
        return bool(self.good_ids)


@dataclass
class Case:
    name: str
    argv: list[str]
    words: tuple[str, ...]
    """Substrings the one ``raptor: error:`` line must hold."""
    may_write: tuple[str, ...] = ()
    """Paths the command may create or change (everything else in the corpus must stay as it was)."""
    env: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None
    """The exit status when it must be a particular one (2 for option errors); else any non-zero."""
    hold_lock: str | None = None
    """A table whose lock this process holds while the command runs (a second writer)."""


class Corpus:
    """The corpus folder: shared good inputs, then one bad input per case."""

    def __init__(self, root: Path, model_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.model = Path(model_dir) if model_dir else make_tiny_model_dir(self.root / "model")
        self.vol = self._dir("vol")
        self.volumes: list[VolumeCase] = []
        self.cases: list[Case] = []
        self._good_inputs()
        for build in _VOLUME_BUILDERS:
            build(self)
        for build in _CASE_BUILDERS:
            build(self)
        names = [c.name for c in self.volumes] + [c.name for c in self.cases]
        assert len(names) == len(set(names)), "case names must be unique"
        ids = [_stem(Path(v.spec)) for v in self.volumes if "#" not in v.spec]
        assert len(ids) == len(set(ids)), "volume files must have distinct ids (one embed run takes them all)"

    # -- helpers ----------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def p(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def model_args(self) -> list[str]:
        return ["--model", str(self.model), *TINY_ARGS]

    def volume(self, name: str, path: Path | str, *words: str) -> None:
        self.volumes.append(VolumeCase(name, str(path), tuple(words)))

    def good_volume(self, name: str, path: Path | str, *ids: str) -> None:
        self.volumes.append(VolumeCase(name, str(path), (), tuple(ids) or (_stem(Path(str(path).split("#")[0])),)))

    def case(self, name: str, argv: list[str], *words: str, may_write: tuple[str, ...] = (), **kwargs) -> None:
        self.cases.append(Case(name, [str(a) for a in argv], tuple(words), tuple(str(p) for p in may_write), **kwargs))

    # -- shared good inputs -------------------------------------------------------
    def _good_inputs(self) -> None:
        good = self._dir("good")
        self.good_npy = good / "scan.npy"
        np.save(self.good_npy, smooth_volume((8, 9, 10)))
        self.good_nrrd = write_raw_nrrd(good / "scan.nrrd", (smooth_volume((6, 7, 8)) * 10).astype("<i2"))
        # Synthetic embeddings with consistent metadata, as a table and as .npz files.
        from RaptorExtension.embeddings.embedding import Embedding, build_metadata
        from RaptorExtension.embeddings.table import write_table

        rng = np.random.default_rng(0)
        self.embeddings = []
        for i in range(24):
            meta = embedding_metadata(id=f"v{i}")
            vector = rng.normal(size=N_FEATURES).astype(np.float32) + (i % 2)
            self.embeddings.append(Embedding(vector=vector, metadata=meta))
        emb = self._dir("emb")
        self.table = write_table(emb / "emb.csv", self.embeddings)
        self.npz_dir = self._dir("emb/npz")
        for e in self.embeddings[:4]:
            e.save(self.npz_dir / f"{e.id}.npz")
        self.good_embedding = self.npz_dir / "v0.npz"
        del build_metadata
        # Labels and a fitted probe.
        labels = self._dir("labels")
        splits = ["train"] * 12 + ["val"] * 6 + ["test"] * 6
        self.labels = write_labels(labels / "binary.csv", [f"v{i}" for i in range(24)], splits,
                                   {"y": [str(i % 2) for i in range(24)]})
        from RaptorExtension.probes.probe import fit_probe, load_embeddings, read_labels

        result = fit_probe(load_embeddings([self.table]), read_labels(self.labels))
        self.probe = result.probe.save(self._dir("probe") / "good.raptorprobe")
        # A linear probe for the tiny model itself (random weights), so `raptor explain` runs to its writes.
        from helpers import random_probe

        from RaptorExtension.encoding.pipeline import Embedder, EmbedSettings

        embedder = Embedder(EmbedSettings(model=str(self.model), k=4, grid=8, device="cpu"))
        self.tiny_probe = random_probe(embedder, task="binary", classes=("0", "1")).save(
            self.root / "probe" / "tiny.raptorprobe")
        # A small cohort for batch and two shard parts for merge.
        cohort = self._dir("cohort")
        for i in range(2):
            write_raw_nrrd(cohort / f"c{i}.nrrd", (smooth_volume((6, 7, 8), seed=i) * 10).astype("<i2"))
        self.cohort = cohort
        self.manifest = self.root / "manifest.csv"
        self.manifest.write_text("path\n" + "".join(f"cohort/c{i}.nrrd\n" for i in range(2)))
        parts = self._dir("parts")
        from RaptorExtension.cli import main

        for shard in range(2):
            code = _quiet(main, ["batch", "--folder", str(cohort), "--csv", str(parts / f"part{shard}.csv"),
                                 "--shard", f"{shard}/2", "--loader", "threads", "--readers", "0", *self.model_args()])
            assert code == 0, f"could not build shard {shard}"
        self.parts = [parts / "part0.csv", parts / "part1.csv"]


def _quiet(function, *args):
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def _stem(path: Path) -> str:
    from RaptorExtension.volumes.volume import volume_id_from_path

    return volume_id_from_path(path)


# ---------------------------------------------------------------------------
# Writers (no Slicer needed: the formats are simple enough to write by hand)


def smooth_volume(shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    volume = 100 * np.exp(-((k - 0.2) ** 2 + j**2 + (i + 0.1) ** 2) * 3) + 20 * np.sin(3 * j + 2 * i)
    return (volume + rng.normal(0, 2, size=shape)).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, *, pixdim=(1.0, 1.0, 1.0, 2.0), dims=None, vox_offset: float = 352,
                sform=None, qform=None, endian: str = "<", cut: int | None = None, datatype: int | None = None) -> Path:
    codes = {"i2": (4, 16), "f4": (16, 32), "u1": (2, 8)}
    code, bitpix = codes[array.dtype.str[1:]] if datatype is None else (datatype, 16)
    shape = dims or tuple(reversed(array.shape))
    header = bytearray(352)
    struct.pack_into(endian + "i", header, 0, 348)
    struct.pack_into(endian + "8h", header, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    struct.pack_into(endian + "2h", header, 70, code, bitpix)
    struct.pack_into(endian + "8f", header, 76, *(list(pixdim) + [1.0] * (8 - len(pixdim))))
    struct.pack_into(endian + "f", header, 108, vox_offset)
    struct.pack_into(endian + "2f", header, 112, 1.0, 0.0)
    if qform is not None:
        struct.pack_into(endian + "h", header, 252, 1)
        struct.pack_into(endian + "6f", header, 256, *qform)
    if sform is not None:
        struct.pack_into(endian + "h", header, 254, 1)
        struct.pack_into(endian + "12f", header, 280, *sform)
    header[344:348] = b"n+1\0"
    data = bytes(header) + array.astype(array.dtype.newbyteorder(endian)).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data[:cut] if cut is not None else data)
    return path


def write_metaimage(path: Path, array: np.ndarray, *, spacing: str = "1 1 2", extra: str = "", compressed: bool = False,
                    cut: int | None = None, detached: bool = False, dims: str | None = None) -> Path:
    types = {"i2": "MET_SHORT", "f4": "MET_FLOAT"}
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    payload = zlib.compress(raw) if compressed else raw
    payload = payload[:cut] if cut is not None else payload
    dims = dims or " ".join(str(s) for s in reversed(array.shape))
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = {'True' if compressed else 'False'}\n{extra}ElementSpacing = {spacing}\n"
              f"DimSize = {dims}\nElementType = {types[array.dtype.str[1:]]}\n")
    if detached:
        raw_name = path.with_suffix(".raw").name
        path.write_text(header + f"ElementDataFile = {raw_name}\n")
        (path.parent / raw_name).write_bytes(payload)
    else:
        path.write_bytes((header + "ElementDataFile = LOCAL\n").encode() + payload)
    return path


def write_dicom_series(folder: Path, *, positions=None, sizes=None, series_uids=None, cut_pixels_of: int | None = None,
                       rows: int = 16, columns: int = 16) -> Path:
    """A small axial CT series written with pydicom (one 16 x 16 slice per file)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    positions = positions if positions is not None else [0.0, 2.0, 4.0, 6.0, 8.0]
    series_uid = generate_uid(entropy_srcs=[str(folder)])
    study_uid = generate_uid(entropy_srcs=[str(folder), "study"])
    for n, z in enumerate(positions):
        r, c = sizes[n] if sizes else (rows, columns)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(n)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids[n] if series_uids else series_uid
        ds.PatientID = "RAPTOR-CORPUS"
        ds.Modality = "CT"
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = r, c
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        image = (smooth_volume((1, r, c), seed=n)[0] * 10).astype("<i2")
        ds.PixelData = image.tobytes()
        path = folder / f"slice{n:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        if cut_pixels_of == n:
            path.write_bytes(path.read_bytes()[:-100])
    return folder


def npy_bytes(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def lying_npy(array: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """``.npy`` bytes whose header declares ``shape`` while holding ``array``'s data."""
    data = npy_bytes(array)
    old = repr(tuple(array.shape)).encode()
    new = repr(tuple(shape)).encode()
    header_len = struct.unpack("<H", data[8:10])[0]
    header = data[10 : 10 + header_len].replace(old, new)
    header = header.rstrip(b" \n")
    header = header + b" " * (header_len - len(header) - 1) + b"\n"
    assert len(header) == header_len, "the new shape must fit the header's padding"
    return data[:10] + header + data[10 + header_len :]


def write_zip(path: Path, members: list[tuple[str, bytes]], *, method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


def flip_byte(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x5A
    return bytes(out)


def member_data_offset(path: Path, name: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def rezip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a ZIP member by member through ``edit`` (None drops a member); CRCs are recomputed."""
    with zipfile.ZipFile(src) as archive:
        members = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    return write_zip(dst, [(n, d) for n, d in ((n, edit(n, d)) for n, d in members) if d is not None])


def embedding_metadata(**overrides) -> dict:
    from RaptorExtension.embeddings.embedding import build_metadata

    meta = build_metadata(encoder="tiny", weight_sha256="a" * 64, k=K, seed=0, projection_sha256="b" * 64,
                          planes=list(PLANES), grid=8, image_size=28, preset="minmax", keep_cls=False,
                          shape=[3, K, P, P], n_features=N_FEATURES, hidden_size=32, patch_size=14, patch_grid=P)
    meta.update(overrides)
    return meta


def raw_embedding(path: Path, vector: np.ndarray, metadata_text: str) -> Path:
    """An ``.npz`` embedding with any metadata text (valid or not)."""
    np.savez(path, embedding=vector, metadata=np.array(metadata_text))
    return path


def write_labels(path: Path, ids, splits, columns: dict[str, list[str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "split", *columns])
    for n, (identifier, split) in enumerate(zip(ids, splits)):
        writer.writerow([identifier, split, *(values[n] for values in columns.values())])
    path.write_text(buffer.getvalue())
    return path


def forge_probe(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A probe whose ``probe.json`` was edited by ``edit`` and whose checksum was recomputed (a forger's file)."""
    from RaptorExtension.probes.probe_file import content_digest

    def member(name: str, data: bytes) -> bytes:
        if name != "probe.json":
            return data
        meta = json.loads(data)
        edit(meta)
        meta["content_sha256"] = content_digest(meta)
        return json.dumps(meta).encode()

    return rezip(src, dst, member)


# ---------------------------------------------------------------------------
# Volume cases (raptor embed)

_VOLUME_BUILDERS: list[Callable[[Corpus], None]] = []
_CASE_BUILDERS: list[Callable[[Corpus], None]] = []


def volumes(fn):
    _VOLUME_BUILDERS.append(fn)
    return fn


def cases(fn):
    _CASE_BUILDERS.append(fn)
    return fn


@volumes
def npy_volumes(c: Corpus) -> None:
    d = c._dir("vol/npy")
    v = smooth_volume((8, 9, 10))

    def save(name: str, array: np.ndarray) -> Path:
        np.save(d / name, array, allow_pickle=True)
        return d / name

    c.volume("npy_2d", save("flat.npy", v[0]), "2D image")
    c.volume("npy_4d", save("series4d.npy", np.stack([v, v])), "4D series")
    c.volume("npy_0d", save("scalar.npy", np.array(5.0)), "0 dimensions")
    c.volume("npy_empty", save("empty.npy", np.zeros((0, 4, 4), np.float32)), "empty")
    c.volume("npy_one_voxel_thick", save("thin.npy", v[:1]), "1 voxel thick")
    c.volume("npy_constant", save("constant.npy", np.full((6, 6, 6), 7, np.int16)), "constant")
    c.volume("npy_all_nan", save("allnan.npy", np.full((6, 6, 6), np.nan, np.float32)), "every voxel is NaN")
    nan = v.copy()
    nan[1, 2, 3] = np.nan
    c.volume("npy_some_nan", save("somenan.npy", nan), "1 NaN")
    inf = v.copy()
    inf[0, 0, 0] = -np.inf
    c.volume("npy_infinite", save("someinf.npy", inf), "1 infinite")
    c.volume("npy_beyond_float32", save("beyond32.npy", v.astype(np.float64) * 1e300), "beyond float32")
    c.volume("npy_object", save("objects.npy", np.array([{"a": 1}], dtype=object)), "never unpickles")
    c.volume("npy_structured", save("records.npy", np.zeros((4, 4, 4), dtype=[("a", "<f4"), ("b", "<i2")])), "structured")
    c.volume("npy_complex", save("complex.npy", v.astype(np.complex64)), "complex64")
    c.volume("npy_bool", save("mask.npy", v > 0), "bool")
    data = npy_bytes(v)
    (d / "npy-cut.npy").write_bytes(data[: len(data) // 2])
    c.volume("npy_truncated", d / "npy-cut.npy", "truncated")
    (d / "npy-trailing.npy").write_bytes(data + b"\0" * 64)
    c.volume("npy_trailing_bytes", d / "npy-trailing.npy", "damaged")
    small = np.zeros((4, 4, 4), np.float32)
    (d / "npy-liehuge.npy").write_bytes(lying_npy(small, (400000, 400000, 4)))
    c.volume("npy_declares_enormous_shape", d / "npy-liehuge.npy", "640,000,000,000 voxels", "RAPTOR_MAX_VOXELS")
    (d / "npy-liesmall.npy").write_bytes(lying_npy(small, (64, 64, 64)))
    c.volume("npy_declares_more_than_it_holds", d / "npy-liesmall.npy", "header lies")
    (d / "npy-garbage.npy").write_bytes(b"this is not an array at all" * 4)
    c.volume("npy_not_npy", d / "npy-garbage.npy", "not a NumPy .npy")
    (d / "npy-badheader.npy").write_bytes(data[:10] + b"{'descr': oops}".ljust(len(data[10:data.index(b"\n") + 1]) - 1) + b"\n"
                                      + data[data.index(b"\n") + 1 :])
    c.volume("npy_corrupt_header", d / "npy-badheader.npy", "header is corrupt")
    (d / "npy-version9.npy").write_bytes(data[:6] + b"\x09\x00" + data[8:])
    c.volume("npy_unknown_version", d / "npy-version9.npy", "format version 9.0")
    (d / "npy-negative.npy").write_bytes(lying_npy(small, (-4, 4, 4)))
    c.volume("npy_negative_shape", d / "npy-negative.npy", "impossible shape")
    c.volume("npy_beyond_limit_of_many_dims", save("fivedims.npy", np.zeros((2, 2, 2, 2, 2), np.float32)), "5 dimensions")
    # Good neighbours: unusual but valid arrays embed.
    c.good_volume("npy_good", save("plain.npy", v))
    c.good_volume("npy_big_endian_float64", save("bigendian.npy", v.astype(">f8")))
    c.good_volume("npy_longdouble", save("longdouble.npy", v.astype(np.longdouble)))
    c.good_volume("npy_big_endian_uint16", save("beuint16.npy", (v * 10 + 1000).astype(">u2")))
    c.good_volume("npy_uint64", save("uint64.npy", (v * 10 + 1000).astype(np.uint64)))
    c.good_volume("npy_float16", save("half.npy", v.astype(np.float16)))
    c.good_volume("npy_fortran_order", save("fortran.npy", np.asfortranarray(v)))
    extreme = v.copy()
    extreme[0, 0, 0], extreme[1, 1, 1] = -3e38, 3e38
    c.good_volume("npy_extreme_float32_range", save("extreme.npy", extreme))


@volumes
def npz_volumes(c: Corpus) -> None:
    d = c._dir("vol/npz")
    v = smooth_volume((8, 9, 10))
    np.savez(d / "npz-single.npz", volume=v)
    data = (d / "npz-single.npz").read_bytes()
    offset = member_data_offset(d / "npz-single.npz", "volume.npy") + 200
    (d / "npz-badcrc.npz").write_bytes(flip_byte(data, offset))
    c.volume("npz_bad_crc", d / "npz-badcrc.npz", "corrupt", "CRC")
    (d / "npz-cutzip.npz").write_bytes(data[: len(data) // 2])
    c.volume("npz_truncated", d / "npz-cutzip.npz", "truncated")
    small = np.zeros((4, 4, 4), np.float32)
    write_zip(d / "npz-lieshape.npz", [("volume.npy", lying_npy(small, (64, 64, 64)))])
    c.volume("npz_declares_more_than_it_holds", d / "npz-lieshape.npz", "header lies")
    write_zip(d / "npz-liehuge.npz", [("volume.npy", lying_npy(small, (4000, 4000, 4000)))])
    c.volume("npz_declares_enormous_shape", d / "npz-liehuge.npz", "RAPTOR_MAX_VOXELS")
    np.savez(d / "npz-zerod.npz", volume=np.array(3.0))
    c.volume("npz_zero_d_array", d / "npz-zerod.npz", "0 dimensions")
    write_zip(d / "npz-objects.npz", [("volume.npy", npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True))])
    c.volume("npz_object_array", d / "npz-objects.npz", "never unpickles")
    encrypted = bytearray(data)
    with zipfile.ZipFile(d / "npz-single.npz") as archive:
        info = archive.getinfo("volume.npy")
    encrypted[info.header_offset + 6] |= 1
    central = bytes(encrypted).rfind(b"PK\x01\x02")
    encrypted[central + 8] |= 1
    (d / "npz-encrypted.npz").write_bytes(bytes(encrypted))
    c.volume("npz_encrypted_member", d / "npz-encrypted.npz", "encrypted")
    write_zip(d / "npz-lzma.npz", [("volume.npy", npy_bytes(v))], method=zipfile.ZIP_LZMA)
    c.volume("npz_lzma_member", d / "npz-lzma.npz", "compression method 14")
    write_zip(d / "npz-bzip2.npz", [("volume.npy", npy_bytes(v))], method=zipfile.ZIP_BZIP2)
    c.volume("npz_bzip2_member", d / "npz-bzip2.npz", "compression method 12")
    write_zip(d / "npz-deflated.npz", [("volume.npy", npy_bytes(v))], method=zipfile.ZIP_DEFLATED)
    deflated = (d / "npz-deflated.npz").read_bytes()
    start = member_data_offset(d / "npz-deflated.npz", "volume.npy")
    (d / "npz-baddeflate.npz").write_bytes(deflated[: start + 20] + b"\xff" * 40 + deflated[start + 60 :])
    c.volume("npz_corrupt_deflate_stream", d / "npz-baddeflate.npz", "corrupt")
    with zipfile.ZipFile(d / "npz-duplicate.npz", "w") as archive:
        archive.writestr("volume.npy", npy_bytes(v))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            archive.writestr("volume.npy", npy_bytes(v * 2))
    c.volume("npz_duplicate_member", d / "npz-duplicate.npz", "appears twice")
    write_zip(d / "npz-notnpy.npz", [("readme.txt", b"hello")])
    c.volume("npz_member_not_npy", d / "npz-notnpy.npz", "not a NumPy .npz archive")
    np.savez(d / "npz-medmnist3d.npz", test_images=v, test_labels=np.zeros(8))
    c.volume("npz_medmnist_images_not_4d", d / "npz-medmnist3d.npz", "(n, depth, height, width)")
    np.savez(d / "npz-twoarrays.npz", a=v, b=v)
    c.volume("npz_no_images_arrays", d / "npz-twoarrays.npz", "no {train,val,test}_images")
    np.savez(d / "npz-medmnist.npz", test_images=np.stack([v, v * 0.5]).astype(np.float32), test_labels=np.zeros(2))
    c.volume("npz_selector_out_of_range", f"{d / 'npz-medmnist.npz'}#test_9", "no index 9")
    c.volume("npz_is_an_embedding", c.good_embedding, "is a Raptor embedding")
    # Good neighbours.
    c.good_volume("npz_good_single", d / "npz-single.npz")
    np.savez_compressed(d / "npz-compressed.npz", volume=v)
    c.good_volume("npz_good_compressed", d / "npz-compressed.npz")
    c.good_volume("npz_good_medmnist", f"{d / 'npz-medmnist.npz'}#test", "test_0", "test_1")


@volumes
def nrrd_volumes(c: Corpus) -> None:
    d = c._dir("vol/nrrd")
    v = (smooth_volume((6, 7, 8)) * 10).astype("<i2")
    f = smooth_volume((6, 7, 8))
    c.volume("nrrd_2d", write_raw_nrrd(d / "nrrd-slice2d.nrrd", v[0]), "2D image")
    c.volume("nrrd_4d", write_raw_nrrd(d / "nrrd-series4d.nrrd", np.stack([v, v]), extra="kinds: domain domain domain list\n"),
             "4D series")
    whole = write_raw_nrrd(d / "nrrd-whole.nrrd", v).read_bytes()
    (d / "nrrd-cutraw.nrrd").write_bytes(whole[:-100])
    c.volume("nrrd_truncated_raw", d / "nrrd-cutraw.nrrd", "truncated")
    gz = write_raw_nrrd(d / "nrrd-wholegz.nrrd", v, encoding="gzip").read_bytes()
    (d / "nrrd-cutgzip.nrrd").write_bytes(gz[:-30])
    c.volume("nrrd_truncated_gzip", d / "nrrd-cutgzip.nrrd", "truncated")
    (d / "nrrd-corruptgzip.nrrd").write_bytes(gz[: len(gz) - 60] + b"\x00" * 52 + gz[-8:])
    c.volume("nrrd_corrupt_gzip", d / "nrrd-corruptgzip.nrrd", "corrupt")
    c.volume("nrrd_gzip_declares_more", write_raw_nrrd(d / "nrrd-liegzip.nrrd", v, encoding="gzip", sizes="400 400 400"),
             "decompresses to")
    c.volume("nrrd_declares_2000_cubed", write_raw_nrrd(d / "nrrd-huge.nrrd", v, sizes="2000 2000 2000"), "8,000,000,000 voxels")
    c.volume("nrrd_declares_more_raw", write_raw_nrrd(d / "nrrd-lieraw.nrrd", v, sizes="800 800 800"), "truncated")
    c.volume("nrrd_zero_spacing", write_raw_nrrd(d / "nrrd-spacing0.nrrd", v, extra="spacings: 1 0 1\n"), "'spacings'", "axis 1")
    c.volume("nrrd_nan_spacing", write_raw_nrrd(d / "nrrd-spacingnan.nrrd", v, extra="spacings: nan 1 1\n"), "'spacings'", "nan")
    space = "space: left-posterior-superior\n"
    c.volume("nrrd_nan_direction", write_raw_nrrd(d / "nrrd-dirnan.nrrd", v, extra=space + "space directions: (1,0,0) (0,nan,0) (0,0,1)\n"),
             "'space directions'", "axis 1")
    c.volume("nrrd_zero_direction", write_raw_nrrd(d / "nrrd-dirzero.nrrd", v, extra=space + "space directions: (1,0,0) (0,0,0) (0,0,1)\n"),
             "'space directions'", "(0,0,0)")
    c.volume("nrrd_degenerate_directions",
             write_raw_nrrd(d / "nrrd-dirsame.nrrd", v, extra=space + "space directions: (1,0,0) (1,0,0) (0,0,1)\n"), "degenerate")
    c.volume("nrrd_infinite_origin", write_raw_nrrd(d / "nrrd-origininf.nrrd", v, extra=space + "space origin: (0,inf,0)\n"),
             "'space origin'")
    nan = f.copy()
    nan[2, 2, 2] = np.nan
    c.volume("nrrd_nan_voxel", write_raw_nrrd(d / "nrrd-nanvoxel.nrrd", nan), "1 NaN")
    c.volume("nrrd_all_nan", write_raw_nrrd(d / "nrrd-allnan.nrrd", np.full((6, 7, 8), np.nan, np.float32)), "every voxel is NaN")
    detached = write_raw_nrrd(d / "nrrd-nodata.nhdr", v, detached=True)
    (d / "nrrd-nodata.raw").unlink()
    c.volume("nhdr_data_file_missing", detached, "nrrd-nodata.raw is missing")
    short = write_raw_nrrd(d / "nrrd-shortdata.nhdr", v, detached=True)
    (d / "nrrd-shortdata.raw").write_bytes((d / "nrrd-shortdata.raw").read_bytes()[:50])
    c.volume("nhdr_data_file_short", short, "truncated")
    c.good_volume("nrrd_good_raw", d / "nrrd-whole.nrrd")
    c.good_volume("nrrd_good_gzip", d / "nrrd-wholegz.nrrd")
    c.good_volume("nhdr_good_detached", write_raw_nrrd(d / "nrrd-detached.nhdr", v, detached=True))


@volumes
def nifti_volumes(c: Corpus) -> None:
    d = c._dir("vol/nifti")
    v = (smooth_volume((6, 7, 8)) * 10).astype("<i2")
    f = smooth_volume((6, 7, 8))
    whole = write_nifti(d / "nii-whole.nii", v).read_bytes()
    wholegz = write_nifti(d / "nii-wholegz.nii.gz", v).read_bytes()
    (d / "nii-halfgz.nii.gz").write_bytes(wholegz[: len(wholegz) // 2])
    c.volume("nifti_gz_cut_in_half", d / "nii-halfgz.nii.gz", "truncated")
    (d / "nii-minus20.nii.gz").write_bytes(wholegz[:-20])
    c.volume("nifti_gz_missing_last_20_bytes", d / "nii-minus20.nii.gz", "truncated")
    (d / "nii-badcrc.nii.gz").write_bytes(wholegz[:-8] + flip_byte(wholegz[-8:], 0))
    c.volume("nifti_gz_bad_crc", d / "nii-badcrc.nii.gz", "corrupt")
    (d / "nii-half.nii").write_bytes(whole[: len(whole) // 2])
    c.volume("nifti_cut_in_half", d / "nii-half.nii", "truncated")
    (d / "nii-minus1.nii").write_bytes(whole[:-1])
    c.volume("nifti_missing_last_byte", d / "nii-minus1.nii", "truncated")
    (d / "nii-headeronly.nii").write_bytes(whole[:352])
    c.volume("nifti_header_only", d / "nii-headeronly.nii", "truncated")
    c.volume("nifti_zero_pixdim", write_nifti(d / "nii-pixdim0.nii", v, pixdim=(1, 1, 0, 2)), "'pixdim[2]'")
    c.volume("nifti_nan_pixdim", write_nifti(d / "nii-pixdimnan.nii.gz", v, pixdim=(1, float("nan"), 1, 2)), "'pixdim[1]'")
    c.volume("nifti_negative_pixdim", write_nifti(d / "nii-pixdimneg.nii", v, pixdim=(1, 1, 1, -2)), "'pixdim[3]'")
    nan_row = [1, 0, 0, 0, 0, float("nan"), 0, 0, 0, 0, 2, 0]
    c.volume("nifti_nan_sform", write_nifti(d / "nii-sformnan.nii", v, sform=nan_row), "'srow_x/y/z'")
    c.volume("nifti_degenerate_sform", write_nifti(d / "nii-sformflat.nii", v, sform=[1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
             "degenerate")
    c.volume("nifti_nan_qform", write_nifti(d / "nii-qformnan.nii", v, qform=[0, 0, float("inf"), 0, 0, 0]), "qform")
    c.volume("nifti_bad_vox_offset", write_nifti(d / "nii-voxoffset.nii", v, vox_offset=12), "'vox_offset'")
    nan = f.copy()
    nan[1, 1, 1] = np.nan
    nan[2, 2, 2] = np.inf
    c.volume("nifti_nan_and_inf_voxels", write_nifti(d / "nii-nanvoxels.nii.gz", nan), "1 NaN and 1 infinite")
    c.volume("nifti_all_nan", write_nifti(d / "nii-allnan.nii", np.full((6, 7, 8), np.nan, np.float32)), "every voxel is NaN")
    c.volume("nifti_declares_2000_cubed", write_nifti(d / "nii-huge.nii", v, dims=(2000, 2000, 2000)), "8,000,000,000 voxels")
    c.volume("nifti_2d", write_nifti(d / "nii-flat.nii", v[0]), "2D image")
    c.volume("nifti_4d", write_nifti(d / "nii-series4d.nii", np.stack([v, v])), "4D series")
    c.good_volume("nifti_good", d / "nii-whole.nii")
    c.good_volume("nifti_good_gz", d / "nii-wholegz.nii.gz")
    c.good_volume("nifti_good_big_endian", write_nifti(d / "nii-bigendian.nii", v, endian=">"))
    c.good_volume("nifti_good_float", write_nifti(d / "nii-float.nii.gz", f))


@volumes
def metaimage_volumes(c: Corpus) -> None:
    d = c._dir("vol/mha")
    v = (smooth_volume((6, 7, 8)) * 10).astype("<i2")
    f = smooth_volume((6, 7, 8))
    c.volume("mha_truncated", write_metaimage(d / "mha-cut.mha", v, cut=200), "truncated")
    c.volume("mha_zlib_truncated", write_metaimage(d / "mha-cutz.mha", v, compressed=True, cut=100), "truncated")
    c.volume("mha_zero_spacing", write_metaimage(d / "mha-spacing0.mha", v, spacing="1 0 1"), "'elementspacing'")
    c.volume("mha_nan_offset", write_metaimage(d / "mha-offsetnan.mha", v, extra="Offset = 0 nan 0\n"), "'offset'")
    c.volume("mha_nan_matrix", write_metaimage(d / "mha-matrixnan.mha", v, extra="TransformMatrix = 1 0 0 0 nan 0 0 0 1\n"),
             "'transformmatrix'")
    c.volume("mha_declares_2000_cubed", write_metaimage(d / "mha-huge.mha", v, dims="2000 2000 2000"), "8,000,000,000 voxels")
    missing = write_metaimage(d / "mha-noraw.mhd", v, detached=True)
    (d / "mha-noraw.raw").unlink()
    c.volume("mhd_data_file_missing", missing, "mha-noraw.raw is missing")
    nan = f.copy()
    nan[0, 1, 2] = np.nan
    c.volume("mha_nan_voxel", write_metaimage(d / "mha-nanvoxel.mha", nan), "1 NaN")
    c.good_volume("mha_good", write_metaimage(d / "mha-good.mha", v))
    c.good_volume("mha_good_zlib", write_metaimage(d / "mha-goodz.mha", v, compressed=True, extra="CompressedDataSize = "
                                                   f"{len(zlib.compress(v.tobytes()))}\n"))
    c.good_volume("mhd_good_detached", write_metaimage(d / "mha-detached.mhd", v, detached=True))


@volumes
def dicom_volumes(c: Corpus) -> None:
    import pydicom

    d = c._dir("vol/dicom")
    c.volume("dicom_duplicate_positions", write_dicom_series(d / "dcm-duplicates", positions=[0, 2, 2, 4, 6]),
             "duplicate slice positions", "2.000 mm")
    c.volume("dicom_uneven_spacing", write_dicom_series(d / "dcm-missingslice", positions=[0, 2, 4, 8, 10]),
             "uneven slice spacing", "4.000 mm between")
    c.volume("dicom_single_slice", write_dicom_series(d / "dcm-oneslice", positions=[0]), "single slice")
    c.volume("dicom_two_series", write_dicom_series(d / "dcm-twoseries", series_uids=["1.2.3.1", "1.2.3.1", "1.2.3.2",
                                                                                  "1.2.3.2", "1.2.3.2"]),
             "holds 2 DICOM series")
    c.volume("dicom_truncated_pixels", write_dicom_series(d / "dcm-cutpixels", cut_pixels_of=2), "is truncated")
    c.volume("dicom_mixed_sizes", write_dicom_series(d / "dcm-mixedsizes", sizes=[(16, 16)] * 4 + [(16, 12)]),
             "slices of different sizes")
    garbage = c._dir("vol/dicom/dcm-garbage")
    (garbage / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    c.volume("dicom_unreadable", garbage, "no readable DICOM image series")
    report = c._dir("vol/dicom/dcm-report")
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pydicom.dcmwrite(str(report / "sr.dcm"), ds, enforce_file_format=True)
    c.volume("dicom_report_only", report, "holds no image")
    c.volume("folder_empty", c._dir("vol/dicom/dcm-emptyfolder"), "folder is empty")
    notes = c._dir("vol/dicom/dcm-notes")
    (notes / "readme.txt").write_text("no images here")
    c.volume("folder_without_dicom", notes, "holds no DICOM files")
    from pydicom.uid import generate_uid

    good_series = write_dicom_series(d / "dcm-goodseries")
    # A DICOM series' id is its SeriesInstanceUID, whatever the folder is called (one rule for embed and batch).
    c.good_volume("dicom_good_series", good_series, generate_uid(entropy_srcs=[str(d / "dcm-goodseries")]))


@volumes
def other_volumes(c: Corpus) -> None:
    d = c._dir("vol/other")
    c.volume("missing_file", d / "other-nothere.nrrd", "no such file")
    (d / "other-notes.txt").write_text("hello")
    c.volume("unsupported_type", d / "other-notes.txt", "unsupported file type")
    (d / "other-garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    c.volume("garbage_nifti_gz", d / "other-garbage.nii.gz", "could not read")


# ---------------------------------------------------------------------------
# Command cases


@cases
def output_collisions(c: Corpus) -> None:
    """Outputs that name each other or an input are refused before any work (issue item 1)."""
    m = c.model_args()
    vol, t = c.good_npy, c.p("out", "collide.csv")
    c.case("embed_csv_is_errors", ["embed", vol, "--csv", t, "--errors", t, *m], "collide.csv", "--csv and --errors")
    c.case("embed_csv_is_input", ["embed", vol, "--csv", vol, *m], "scan.npy", "is also an input")
    c.case("embed_errors_is_input", ["embed", vol, "-o", c.p("out", "e1"), "--errors", vol, *m], "is also an input")
    c.case("embed_csv_is_npz_output", ["embed", vol, "-o", c.p("out", "e2"), "--csv", c.p("out", "e2", "scan.npz"), *m],
           "name the same file")
    single = c.root / "vol" / "npz" / "npz-single.npz"
    c.case("embed_npz_output_is_the_input", ["embed", single, "-o", single.parent, *m], "single.npz", "is also an input")
    link = c.root / "out" / "link-to-scan.csv"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(vol)
    c.case("embed_csv_symlink_to_input", ["embed", vol, "--csv", link, *m], "link-to-scan.csv", "is also an input")
    hard = c.root / "out" / "hardlink.csv"
    if not hard.exists():
        os.link(c.table, hard)
    c.case("probe_apply_output_hardlinked_to_input", ["probe", "apply", c.probe, c.table, "-o", hard],
           "hardlink.csv", "is also an input")
    dotted = c.root / "good" / "nowhere" / ".." / "scan.npy"
    c.case("embed_csv_dotdot_to_input", ["embed", vol, "--csv", dotted, *m], "is also an input")
    c.case("embed_out_dir_is_a_file", ["embed", vol, "-o", vol, *m], "must be a folder")
    c.case("embed_csv_is_a_folder", ["embed", vol, "--csv", c.root / "good", *m], "must name a file")
    cohort, csv_out = c.cohort, c.p("out", "b.csv")
    c.case("batch_errors_is_csv", ["batch", "--folder", cohort, "--csv", csv_out, "--errors", csv_out, *m],
           "--csv and --errors")
    c.case("batch_parquet_is_csv", ["batch", "--folder", cohort, "--csv", csv_out, "--parquet", csv_out, *m],
           "--csv and --parquet")
    c.case("batch_csv_is_manifest", ["batch", "--manifest", c.manifest, "--csv", c.manifest, *m], "is also an input")
    c.case("batch_errors_is_record", ["batch", "--folder", cohort, "--csv", csv_out, "--errors", c.p("out", "b.batch.json"), *m],
           "name the same file")
    c.case("batch_csv_is_a_cohort_volume", ["batch", "--folder", cohort, "--csv", cohort / "c0.nrrd", *m],
           "c0.nrrd", "is also an input")
    p0, p1 = c.parts
    c.case("merge_output_is_a_part", ["merge", p0, p1, "-o", p0], "part0.csv", "is also an input")
    c.case("merge_output_errors_is_a_part", ["merge", p0, p1, "-o", p0.with_name("part1")], "is also an input")
    c.case("fit_output_is_labels", ["probe", "fit", c.table, c.labels, "-o", c.labels], "is also an input")
    c.case("fit_report_is_embeddings", ["probe", "fit", c.table, c.labels, "-o", c.p("out", "p.raptorprobe"),
                                        "--report", c.table], "emb.csv", "is also an input")
    c.case("fit_plot_is_probe", ["probe", "fit", c.table, c.labels, "-o", c.p("out", "p.raptorprobe"),
                                 "--plot", c.p("out", "p.raptorprobe")], "name the same file")
    c.case("apply_output_is_probe", ["probe", "apply", c.probe, c.table, "-o", c.probe], "is also an input")
    c.case("apply_output_is_embedding_in_folder", ["probe", "apply", c.probe, c.npz_dir, "-o", c.npz_dir / "v1.npz"],
           "is also an input")
    c.case("explain_output_is_probe", ["explain", c.probe, vol, "-o", c.probe], "is also an input")
    c.case("explain_heatmap_is_volume", ["explain", c.probe, c.good_nrrd, "--heatmap", c.good_nrrd], "is also an input")
    c.case("explain_curves_is_output", ["explain", c.probe, vol, "-o", c.p("out", "x.png"), "--curves",
                                        c.p("out", "x.png")], "name the same file")


@cases
def table_writers(c: Corpus) -> None:
    """One writer per table, no duplicate ids (item 2)."""
    m = c.model_args()
    held = c.p("out", "held.csv")
    c.case("embed_while_another_run_writes_the_table", ["embed", c.good_npy, "--csv", held, *m],
           "another raptor run is writing", f"pid {os.getpid()}", hold_lock=held)
    c.case("batch_while_another_run_writes_the_table", ["batch", "--folder", c.cohort, "--csv", held, *m],
           "another raptor run is writing", f"pid {os.getpid()}", hold_lock=held)
    dup = c.root / "out" / "has_scan.csv"
    if not dup.exists():
        from RaptorExtension.embeddings.embedding import Embedding
        from RaptorExtension.embeddings.table import write_table

        e = Embedding(vector=c.embeddings[0].vector, metadata=embedding_metadata(id="scan"))
        write_table(dup, [e])
    c.case("embed_csv_rerun_would_duplicate_ids", ["embed", c.good_npy, "--csv", dup, *m], "has_scan.csv",
           "already holds rows", "'scan'", "--skip-existing")


@cases
def probe_files(c: Corpus) -> None:
    """Crafted probe files: ZIP tricks, lying arrays, probe.json fields of the wrong type (item 11)."""
    d = c._dir("probes")
    good = c.probe
    data = good.read_bytes()

    def info(name: str, path: Path, *words: str) -> None:
        c.case(name, ["probe", "info", path], path.name, *words)

    (d / "cut.raptorprobe").write_bytes(data[: len(data) // 2])
    info("probe_truncated", d / "cut.raptorprobe", "truncated")
    offset = member_data_offset(good, "arrays/weight.npy") + 150
    (d / "flip.raptorprobe").write_bytes(flip_byte(data, offset))
    info("probe_flipped_weight_byte", d / "flip.raptorprobe", "corrupt")
    for method, name in ((zipfile.ZIP_LZMA, "lzma"), (zipfile.ZIP_BZIP2, "bzip2")):
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(d / f"{name}.raptorprobe", "w", compression=method) as dst:
            for item in src.infolist():
                dst.writestr(item.filename, src.read(item.filename))
        info(f"probe_{name}_members", d / f"{name}.raptorprobe", "compression method")
    lzma_bytes = (d / "lzma.raptorprobe").read_bytes()
    start = member_data_offset(d / "lzma.raptorprobe", "probe.json")
    (d / "badlzma.raptorprobe").write_bytes(lzma_bytes[: start + 30] + b"\x00" * 40 + lzma_bytes[start + 70 :])
    info("probe_corrupt_lzma_stream", d / "badlzma.raptorprobe", "compression method")
    encrypted = bytearray(data)
    with zipfile.ZipFile(good) as archive:
        first = archive.infolist()[0]
    encrypted[first.header_offset + 6] |= 1
    encrypted[bytes(encrypted).find(b"PK\x01\x02") + 8] |= 1
    (d / "encrypted.raptorprobe").write_bytes(bytes(encrypted))
    info("probe_encrypted_member", d / "encrypted.raptorprobe", "encrypted")

    def huge_weight(name: str, blob: bytes) -> bytes:
        if name != "arrays/weight.npy":
            return blob
        array = np.lib.format.read_array(io.BytesIO(blob))
        return lying_npy(array, (1, 10**12))

    rezip(good, d / "hugearray.raptorprobe", huge_weight)
    info("probe_array_declares_7_tib", d / "hugearray.raptorprobe", "array 'weight'")
    forge_probe(good, d / "hugeshape.raptorprobe", lambda m: m["arrays"]["weight"].update(shape=[1, 10**12]))
    info("probe_json_declares_huge_array", d / "hugeshape.raptorprobe", "array 'weight'")
    big = rezip(good, d / "bigjson.raptorprobe", lambda n, b: b + b" " * (17 << 20) if n == "probe.json" else b)
    info("probe_json_over_16_mib", big, "more than the 16.0 MiB allowed")
    rezip(good, d / "notjson.raptorprobe", lambda n, b: b"{not json" if n == "probe.json" else b)
    info("probe_json_not_json", d / "notjson.raptorprobe", "not valid JSON")
    rezip(good, d / "nojson.raptorprobe", lambda n, b: None if n == "probe.json" else b)
    info("probe_without_json", d / "nojson.raptorprobe", "no probe.json")
    rezip(good, d / "noweight.raptorprobe", lambda n, b: None if n == "arrays/weight.npy" else b)
    info("probe_array_missing", d / "noweight.raptorprobe", "array 'weight' is missing")
    rezip(good, d / "pickled.raptorprobe", lambda n, b: npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True)
          if n == "arrays/bias.npy" else b)
    info("probe_pickled_array", d / "pickled.raptorprobe", "never unpickles")
    rezip(good, d / "extra.raptorprobe", lambda n, b: b)
    with zipfile.ZipFile(d / "extra.raptorprobe", "a") as archive:
        archive.writestr("../../evil.npy", b"x")
    info("probe_traversal_member", d / "extra.raptorprobe", "unexpected member")
    (d / "text.raptorprobe").write_text("hello")
    info("probe_not_a_zip", d / "text.raptorprobe", "not a ZIP archive")
    swaps = {
        "dtype_foo": lambda m: m["arrays"]["weight"].update(dtype="foo"),
        "shape_text": lambda m: m["arrays"]["weight"].update(shape="1x48"),
        "shape_negative": lambda m: m["arrays"]["weight"].update(shape=[-1, 48]),
        "sha_number": lambda m: m["arrays"]["weight"].update(sha256=5),
        "arrays_list": lambda m: m.update(arrays=[1, 2]),
        "n_features_text": lambda m: m["embedding"].update(n_features="48"),
        "training_string": lambda m: m.update(training="yesterday"),
        "planes_number": lambda m: m["embedding"].update(planes=3),
        "k_text": lambda m: m["embedding"].update(k="4"),
        "keep_cls_text": lambda m: m["embedding"].update(keep_cls="no"),
        "task_unknown": lambda m: m.update(task="segmentation"),
        "classes_number": lambda m: m.update(classes=2),
        "classes_of_numbers": lambda m: m.update(classes=[0, 1]),
        "metrics_list": lambda m: m.update(metrics=[0.9]),
        "metric_text": lambda m: m["metrics"]["test"].update(auc="high"),
        "selection_string": lambda m: m["training"].update(selection="cv"),
        "mlp_layers_text": lambda m: m.update(mlp_layers="2"),
        "format_version_text": lambda m: m.update(format_version="1"),
        "embedding_missing_seed": lambda m: m["embedding"].pop("seed"),
        "metadata_is_list": None,
    }
    for name, edit in swaps.items():
        path = d / f"swap_{name}.raptorprobe"
        if edit is None:
            rezip(good, path, lambda n, b: b"[1, 2, 3]" if n == "probe.json" else b)
        else:
            forge_probe(good, path, edit)
        info(f"probe_json_{name}", path, "probe.json" if name != "metadata_is_list" else "not a Raptor probe")
    c.case("probe_apply_with_forged_probe", ["probe", "apply", d / "swap_planes_number.raptorprobe", c.table],
           "swap_planes_number.raptorprobe", "'planes'")
    c.case("explain_with_corrupt_probe", ["explain", d / "flip.raptorprobe", c.good_npy, "-o", c.p("out", "ex.png")],
           "flip.raptorprobe", "corrupt")


@cases
def embedding_files(c: Corpus) -> None:
    """Embedding metadata and table columns of the wrong type, NaN features (items 7, 12)."""
    d = c._dir("embeddings")
    vector = c.embeddings[0].vector
    good_meta = embedding_metadata(id="x")
    texts = {
        "metadata_list": "[1, 2]",
        "metadata_null": "null",
        "metadata_number": "42",
        "metadata_text": json.dumps("raptor"),
        "metadata_not_json": "{oops",
        "k_text": json.dumps({**good_meta, "k": "4"}),
        "grid_text": json.dumps({**good_meta, "grid": "big"}),
        "format_version_text": json.dumps({**good_meta, "format_version": "1"}),
        "planes_number": json.dumps({**good_meta, "planes": 3}),
        "n_features_text": json.dumps({**good_meta, "n_features": "48"}),
        "shape_mismatch": json.dumps({**good_meta, "shape": [3, 5, 2, 2]}),
        "newer_format": json.dumps({**good_meta, "format_version": 99}),
        "deeply_nested": "[" * 100000 + "]" * 100000,
    }
    for name, text in texts.items():
        path = raw_embedding(d / f"{name}.npz", vector, text)
        c.case(f"info_embedding_{name}", ["info", path], path.name)
    raw_embedding(d / "nan_vector.npz", np.full(N_FEATURES, np.nan, np.float32), json.dumps(good_meta))
    c.case("info_embedding_nan_vector", ["info", d / "nan_vector.npz"], "nan_vector.npz", "NaN")
    raw_embedding(d / "float64_vector.npz", vector.astype(np.float64), json.dumps(good_meta))
    c.case("info_embedding_float64_vector", ["info", d / "float64_vector.npz"], "float64_vector.npz", "not float32")
    raw_embedding(d / "short_vector.npz", vector[:10], json.dumps(good_meta))
    c.case("info_embedding_short_vector", ["info", d / "short_vector.npz"], "short_vector.npz", "10 values")
    c.case("apply_embedding_k_text", ["probe", "apply", c.probe, d / "k_text.npz"], "k_text.npz", "'k'")
    c.case("fit_embedding_metadata_list", ["probe", "fit", d / "metadata_list.npz", c.labels, "-o",
                                           c.p("out", "f.raptorprobe")], "metadata_list.npz")
    # Tables with columns of the wrong type, NaN features.
    header, *rows = c.table.read_text().splitlines()
    columns = header.split(",")

    def table(name: str, column: str, value: str, row: int = 0) -> Path:
        cells = rows[row].split(",")
        cells[columns.index(column)] = value
        path = d / f"{name}.csv"
        path.write_text("\n".join([header, *rows[:row], ",".join(cells), *rows[row + 1 :]]) + "\n")
        return path

    for name, column, value in (("table_k_text", "k", "abc"), ("table_grid_text", "grid", "huge"),
                                ("table_format_version_text", "format_version", "one"),
                                ("table_keep_cls_maybe", "keep_cls", "maybe"), ("table_planes_bogus", "planes", "up|down")):
        path = table(name, column, value, row=3)
        c.case(f"info_{name}", ["info", path], path.name, f"column {column}")
        c.case(f"fit_{name}", ["probe", "fit", path, c.labels, "-o", c.p("out", "t.raptorprobe")], path.name, column)
    path = table("table_k_text_batch", "k", "abc", row=0)
    c.case("batch_resume_table_k_text", ["batch", "--folder", c.cohort, "--csv", path, *c.model_args()], path.name,
           "column k")
    nan_table = table("table_nan_feature", "e5", "nan", row=20)
    c.case("apply_nan_feature", ["probe", "apply", c.probe, nan_table], "table_nan_feature.csv", "'v20'", "NaN")
    c.case("fit_nan_feature", ["probe", "fit", nan_table, c.labels, "-o", c.p("out", "n.raptorprobe")],
           "table_nan_feature.csv", "NaN")
    inf_table = table("table_inf_feature", "e7", "-inf", row=2)
    c.case("apply_inf_feature", ["probe", "apply", c.probe, inf_table], "table_inf_feature.csv", "'v2'")
    text_table = table("table_text_feature", "e1", "abc", row=1)
    c.case("apply_text_feature", ["probe", "apply", c.probe, text_table], "table_text_feature.csv", "non-numeric")
    torn = d / "table_torn.csv"
    torn.write_text(c.table.read_text()[:-50])
    c.case("info_table_torn_row", ["info", torn], "table_torn.csv", "columns")
    (d / "table_binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    c.case("info_table_binary", ["info", d / "table_binary.csv"], "table_binary.csv")


@cases
def labels_files(c: Corpus) -> None:
    """Labels edge cases (items 7, 13)."""
    d = c._dir("badlabels")
    ids = [f"v{i}" for i in range(24)]
    splits = ["train"] * 12 + ["val"] * 6 + ["test"] * 6
    binary = [str(i % 2) for i in range(24)]
    out = c.p("out", "l.raptorprobe")

    def fit(name: str, path: Path, *words: str, extra: tuple[str, ...] = ()) -> None:
        c.case(f"labels_{name}", ["probe", "fit", c.table, path, "-o", out, *extra], path.name, *words)

    nan = list(binary)
    nan[3] = "nan"
    fit("nan_label", write_labels(d / "nan.csv", ids, splits, {"y": nan}), "line 5", "'nan'")
    na = list(binary)
    na[4] = "NA"
    fit("na_label", write_labels(d / "na.csv", ids, splits, {"y": na}), "line 6", "'NA'")
    text = c.labels.read_text().splitlines()
    text[3] += ",extra"
    (d / "extra_field.csv").write_text("\n".join(text) + "\n")
    fit("extra_field", d / "extra_field.csv", "line 4", "4 fields")
    huge = [str(float(i)) for i in range(24)]
    huge[5] = "1e308"
    fit("huge_regression_target", write_labels(d / "huge.csv", ids, splits, {"y": huge}), "1e308",
        extra=("--task", "regression"))
    words = [str(i) for i in range(24)]
    words[2] = "abc"
    fit("non_numeric_regression_target", write_labels(d / "words.csv", ids, splits, {"y": words}), "'abc'",
        "not a number", extra=("--task", "regression"))
    single = ["0"] * 12 + ["1"] * 12
    fit("single_class_in_train", write_labels(d / "singletrain.csv", ids, splits, {"y": single}), "class '1'",
        "no example in the train")
    constant = write_labels(d / "constant_multilabel.csv", ids, splits, {"a": binary, "b": ["0"] * 24})
    fit("constant_multilabel_column", constant, "label 'b'", "every train row")
    many = [f"class{i}" for i in range(24)]
    fit("classes_without_train_examples", write_labels(d / "manyclasses.csv", ids, splits, {"y": many}),
        "no example in the train")
    c.case("labels_mlp_max_iter_zero", ["probe", "fit", c.table, c.labels, "-o", out, "--probe-model", "mlp",
                                        "--max-iter", "0"], "--max-iter", exit_code=2)
    c.case("labels_negative_seed", ["probe", "fit", c.table, c.labels, "-o", out, "--seed", "-3"], "--seed", exit_code=2)
    (d / "nosplit.csv").write_text("id,y\n" + "".join(f"v{i},{i % 2}\n" for i in range(24)))
    fit("no_split_column", d / "nosplit.csv", "needs 'id' and 'split'")
    bad_split = list(splits)
    bad_split[0] = "training"
    fit("unknown_split", write_labels(d / "badsplit.csv", ids, bad_split, {"y": binary}), "'training'")
    fit("duplicate_id", write_labels(d / "dupid.csv", ids[:23] + ["v0"], splits, {"y": binary}), "'v0'",
        "more than once")
    fit("id_without_embedding", write_labels(d / "unknown.csv", ids[:23] + ["ghost"], splits, {"y": binary}),
        "'ghost'")
    (d / "binary.csv").write_bytes(b"\xff\xfe\xfa\x00\x01")
    fit("binary_garbage", d / "binary.csv", "not a readable CSV")
    (d / "empty.csv").write_text("")
    fit("empty_file", d / "empty.csv", "needs 'id' and 'split'")
    fit("positive_not_a_class", c.labels, "'maybe'", extra=("--positive", "maybe"))
    fit("label_column_missing", c.labels, "'z'", extra=("--label-column", "z"))
    fit("no_val_rows", write_labels(d / "noval.csv", ids, ["train"] * 18 + ["test"] * 6, {"y": binary}), "no val rows")
    c.case("labels_missing_file", ["probe", "fit", c.table, d / "nothere.csv", "-o", out], "nothere.csv",
           "no such labels file")


@cases
def options(c: Corpus) -> None:
    """Options validated with the others, as one line, exit status 2 (item 14)."""
    vol = c.good_npy
    m = ["--model", str(c.model)]
    for name, args, words in (
        ("device_foo", ["--device", "foo"], "device 'foo'"),
        ("device_cuda_text", ["--device", "cuda:x"], "device 'cuda:x'"),
        ("ct_window_infinite", ["--ct-window=-inf,inf"], "finite"),
        ("ct_window_zero_width", ["--ct-window", "40,40"], "LOW below HIGH"),
        ("ct_window_reversed", ["--ct-window", "400,-400"], "LOW below HIGH"),
        ("ct_window_nan", ["--ct-window", "nan,100"], "finite"),
        ("ct_window_text", ["--ct-window", "soft"], "LOW,HIGH"),
        ("k_zero", ["--k", "0"], "at least 1"),
        ("k_text", ["--k", "ten"], "whole number"),
        ("seed_negative", ["--seed", "-1"], "0 or more"),
        ("readers_negative", ["--readers", "-2"], "0 or more"),
        ("image_size_zero", ["--image-size", "0"], "at least 1"),
        ("batch_size_zero", ["--batch-size", "0"], "at least 1"),
        ("preset_unknown", ["--preset", "bone"], "invalid choice"),
    ):
        c.case(f"option_{name}", ["embed", vol, *m, *args], *words, exit_code=2)
    c.case("option_grid_huge", ["embed", vol, *m, "--grid", "99999", "-q"], "grid must be between")
    c.case("option_grid_text", ["embed", vol, *m, "--grid", "huge", "-q"], "grid must be a number")
    c.case("option_planes_unknown", ["embed", vol, *m, "--planes", "axial,oblique", "-q", "--k", "4"], "oblique")
    c.case("option_explain_device", ["explain", c.probe, vol, "--device", "tpu"], "device 'tpu'", exit_code=2)
    c.case("option_gpus_bogus", ["batch", "--folder", c.cohort, "--csv", c.p("out", "g.csv"), "--gpus", "0,abc", *m],
           "--gpus", "'abc'")
    c.case("option_shard_out_of_range", ["batch", "--folder", c.cohort, "--csv", c.p("out", "s.csv"), "--shard", "3/2",
                                         *m], "shard")
    c.case("option_folds_one", ["probe", "fit", c.table, c.labels, "--select", "cv", "--folds", "1", "-o",
                                c.p("out", "o.raptorprobe")], "folds must be between")
    c.case("option_c_grid_negative", ["probe", "fit", c.table, c.labels, "--c-grid=-1,1"], "positive numbers",
           exit_code=2)
    c.case("option_hidden_zero", ["probe", "fit", c.table, c.labels, "--hidden", "0"], "hidden", exit_code=2)
    c.case("option_unknown_command", ["frobnicate"], "invalid choice", exit_code=2)
    c.case("option_max_voxels_limit", ["embed", vol, *m, *TINY_ARGS, "-o", c.p("out", "mv")], "RAPTOR_MAX_VOXELS",
           "720 voxels", env={"RAPTOR_MAX_VOXELS": "100"})
    c.case("option_max_voxels_not_a_number", ["embed", vol, *m, *TINY_ARGS, "-o", c.p("out", "mv")],
           "RAPTOR_MAX_VOXELS", env={"RAPTOR_MAX_VOXELS": "lots"})


@cases
def merge_records(c: Corpus) -> None:
    """Crafted batch records beside shard parts (item 15)."""
    d = c._dir("merge")
    out = c.p("out", "merged.csv")
    record = json.loads(c.parts[0].with_name("part0.batch.json").read_text())

    def with_record(name: str, edit: Callable[[dict], object] | None, text: str | None = None) -> Path:
        folder = d / name
        folder.mkdir(exist_ok=True)
        for part in c.parts:
            shutil.copy(part, folder / part.name)
            shutil.copy(part.with_name(part.stem + ".batch.json"), folder / (part.stem + ".batch.json"))
            errors = part.with_name(part.stem + "_errors.csv")
            if errors.exists():
                shutil.copy(errors, folder / errors.name)
        if text is None:
            value = json.loads(json.dumps(record))
            result = edit(value)
            text = json.dumps(value if result is None else result)
        (folder / "part0.batch.json").write_text(text)
        return folder

    for name, edit, words in (
        ("missing_shard", lambda r: (r.pop("shard"), None)[1], "no field 'shard'"),
        ("missing_settings", lambda r: (r.pop("settings"), None)[1], "no field 'settings'"),
        ("missing_assigned", lambda r: (r.pop("assigned"), None)[1], "no field 'assigned'"),
        ("shard_text", lambda r: r.update(shard="0/2"), "'shard'"),
        ("shard_one_number", lambda r: r.update(shard=[0]), "'shard'"),
        ("shard_out_of_range", lambda r: r.update(shard=[2, 2]), "'shard'"),
        ("errors_csv_dotdot", lambda r: r.update(errors_csv="../../secret.csv"), "'errors_csv'"),
        ("errors_csv_absolute", lambda r: r.update(errors_csv="/etc/passwd"), "'errors_csv'"),
        ("errors_csv_number", lambda r: r.update(errors_csv=5), "'errors_csv'"),
        ("settings_k_text", lambda r: r["settings"].update(k="4"), "'settings'"),
        ("assigned_number", lambda r: r.update(assigned=7), "'assigned'"),
        ("record_is_a_list", lambda r: [r], "not a Raptor batch record"),
        ("format_version_text", lambda r: r.update(format_version="1"), "'format_version'"),
    ):
        folder = with_record(name, edit)
        c.case(f"merge_record_{name}", ["merge", folder / "part0.csv", folder / "part1.csv", "-o", out],
               "part0.batch.json", words)
    folder = with_record("not_json", None, text="{oops")
    c.case("merge_record_not_json", ["merge", folder / "part0.csv", folder / "part1.csv", "-o", out], "not readable JSON")
    folder = with_record("no_record", lambda r: None)
    (folder / "part0.batch.json").unlink()
    c.case("merge_record_missing", ["merge", folder / "part0.csv", folder / "part1.csv", "-o", out], "no batch record")
    c.case("merge_part_missing", ["merge", d / "nothere.csv", c.parts[1], "-o", out], "nothere.csv", "no such file")
    c.case("merge_one_shard_only", ["merge", c.parts[0], "-o", out], "missing")


@cases
def write_failures(c: Corpus) -> None:
    """Writes that fail (a file where a folder should be, a name too long): one line, no temporary file (item 9)."""
    blocker = c.root / "out" / "afile"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("I am a file, not a folder")
    under = blocker / "sub"
    m = c.model_args()
    long_name = "x" * 256 + ".raptorprobe"
    c.case("write_embed_out_dir_under_a_file", ["embed", c.good_npy, "-o", under, *m], "afile")
    c.case("write_embed_csv_under_a_file", ["embed", c.good_npy, "--csv", under / "t.csv", *m], "t.csv", "cannot write")
    c.case("write_fit_output_under_a_file", ["probe", "fit", c.table, c.labels, "-q", "-o", under / "p.raptorprobe"],
           "p.raptorprobe", "cannot write")
    c.case("write_fit_output_name_too_long", ["probe", "fit", c.table, c.labels, "-q", "-o", c.root / "out" / long_name],
           "cannot write", "File name too long")
    c.case("write_apply_output_under_a_file", ["probe", "apply", c.probe, c.table, "-o", under / "s.csv"], "s.csv",
           "cannot write")
    c.case("write_merge_output_under_a_file", ["merge", *c.parts, "-o", under / "m.csv"], "m.csv", "cannot write")
    explain = ["explain", c.tiny_probe, c.good_npy, "--device", "cpu"]
    c.case("write_explain_png_under_a_file", [*explain, "-o", under / "why.png"], "why.png", "cannot write")
    c.case("write_explain_curves_under_a_file", [*explain, "-o", c.p("out", "why.png"), "--curves", under / "why.csv"],
           "why.csv", "cannot write", may_write=(c.p("out", "why.png"),))
    c.case("write_explain_heatmap_name_too_long", [*explain, "-o", c.p("out", "why2.png"), "--heatmap",
                                                   c.root / "out" / ("h" * 260 + ".nrrd")], "cannot write",
           may_write=(c.p("out", "why2.png"),))
    c.case("explain_nan_volume", [*explain[:2], c.root / "vol" / "npy" / "somenan.npy", "-o", c.p("out", "n.png")],
           "somenan.npy", "1 NaN")
    c.case("explain_truncated_nifti", [*explain[:2], c.root / "vol" / "nifti" / "nii-halfgz.nii.gz", "-o",
                                       c.p("out", "t.png")], "nii-halfgz.nii.gz", "truncated")
    c.case("write_batch_csv_under_a_file", ["batch", "--folder", c.cohort, "--csv", under / "b.csv", *m], "b.csv",
           "cannot write")
    c.case("write_batch_parquet_under_a_file", ["batch", "--folder", c.cohort, "--csv", c.p("out", "pq.csv"),
                                                "--parquet", under / "b.parquet", *m], "b.parquet", "cannot write",
           may_write=(c.p("out", "pq.csv"), c.p("out", "pq.batch.json"), c.p("out", "pq_errors.csv")))


def build(root: Path, model_dir: Path | None = None) -> Corpus:
    """Build the whole corpus under ``root`` (a few seconds)."""
    return Corpus(root, model_dir)


if __name__ == "__main__":  # pragma: no cover - a convenience for looking at the corpus by hand
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "out/bad-input-corpus")
    corpus = build(target)
    for v in corpus.volumes:
        print(f"volume {'good' if v.good else 'bad '} {v.name}: {v.spec}")
    for case in corpus.cases:
        print(f"case {case.name}: raptor {' '.join(case.argv)}")
    print(f"{len(corpus.volumes)} volumes, {len(corpus.cases)} command cases in {target}")
