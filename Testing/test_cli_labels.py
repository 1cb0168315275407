"""MedMNIST-style .npz files without a line of Python: ranges in selectors, --limit, and `raptor labels`."""

from __future__ import annotations

import numpy as np
import pytest

from RaptorExtension.cli import main
from RaptorExtension.embeddings.table import read_table
from RaptorExtension.errors import InputError
from RaptorExtension.volumes.arrays import select_medmnist
from RaptorExtension.volumes.readers import expand_input

SIZES = {"train": 8, "val": 4, "test": 4}


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in SIZES.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(n, 8, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(tmp_path / "cohort.npz", **arrays)
    return tmp_path / "cohort.npz"


def test_selectors_take_ranges(npz):
    assert [r.id for r in expand_input(f"{npz}#train[2:5]")] == ["train_2", "train_3", "train_4"]
    assert [r.id for r in expand_input(f"{npz}#val[:2]")] == ["val_0", "val_1"]
    assert [r.id for r in expand_input(f"{npz}#test[2:]")] == ["test_2", "test_3"]
    assert [r.id for r in expand_input(f"{npz}#test[0:100]")] == [f"test_{i}" for i in range(4)]  # stops at the end
    assert [r.id for r in expand_input(f"{npz}#test_3")] == ["test_3"]
    assert len(expand_input(str(npz))) == 16
    with pytest.raises(InputError, match=r"train\[5:2\] selects no volume \(split train has 8\)"):
        expand_input(f"{npz}#train[5:2]")
    with pytest.raises(InputError, match=r"no volume 'train\[a:b\]' \(use e.g. test, test_17 or test\[0:100\]"):
        expand_input(f"{npz}#train[a:b]")
    with pytest.raises(InputError, match="split test has 4 volumes, no index 9"):
        select_medmnist(npz, "test_9", {"test": 4})


@pytest.mark.slow
def test_labels_csv_feeds_probe_fit(npz, tmp_path, tiny_model_dir, capsys):
    labels = tmp_path / "labels.csv"
    assert main(["labels", str(npz), "-o", str(labels)]) == 0
    assert capsys.readouterr().err == f"raptor: wrote 16 labels (train 8, val 4, test 4) -> {labels}\n"
    lines = labels.read_text().splitlines()
    assert lines[:3] == ["id,split,label", "train_0,train,0", "train_1,train,1"] and len(lines) == 17
    assert main(["embed", str(npz), "--csv", str(tmp_path / "emb.csv"), "--model", str(tiny_model_dir), "--k", "2",
                 "--grid", "native", "--preset", "uint8", "--device", "cpu", "-q"]) == 0
    assert main(["probe", "fit", str(tmp_path / "emb.csv"), str(labels), "-o", str(tmp_path / "p.raptorprobe"), "-q"]) == 0
    assert "binary probe (logistic)" in capsys.readouterr().out


def test_labels_of_part_of_a_file_other_names_and_several_labels(npz, tmp_path, capsys):
    assert main(["labels", f"{npz}#val[1:3]", "--column", "adrenal"]) == 0
    assert capsys.readouterr().out == "id,split,adrenal\nval_1,val,1\nval_2,val,0\n"
    multi = tmp_path / "multi.npz"
    np.savez(multi, train_images=np.zeros((2, 4, 4, 4)), train_labels=np.array([[1, 0, 1], [0, 0, 1]]))
    assert main(["labels", str(multi)]) == 0
    assert capsys.readouterr().out == "id,split,label_0,label_1,label_2\ntrain_0,train,1,0,1\ntrain_1,train,0,0,1\n"
    bare = tmp_path / "bare.npz"
    np.savez(bare, train_images=np.zeros((2, 4, 4, 4)))
    assert main(["labels", str(bare), "-o", str(tmp_path / "x.csv")]) == 1
    err = capsys.readouterr().err
    assert err == f"raptor: error: {bare}: .npz has no {{train,val,test}}_labels arrays (keys: train_images)\n"
    assert not (tmp_path / "x.csv").exists()
    assert main(["labels", str(npz), "--column", "split"]) == 1
    assert "needs a name other than id and split" in capsys.readouterr().err


def test_embed_limit_takes_the_first_volumes(npz, tmp_path, tiny_model_dir, capsys):
    common = ["--model", str(tiny_model_dir), "--k", "2", "--grid", "native", "--preset", "uint8", "--device", "cpu", "-q"]
    assert main(["embed", f"{npz}#train", "--limit", "3", "--csv", str(tmp_path / "a.csv"), *common]) == 0
    assert read_table(tmp_path / "a.csv").ids == ["train_0", "train_1", "train_2"]
    assert main(["embed", f"{npz}#train[6:]", "--csv", str(tmp_path / "b.csv"), *common]) == 0
    assert read_table(tmp_path / "b.csv").ids == ["train_6", "train_7"]
