"""What the commands print: no library chatter, files named in errors, plain English, splits in order, defaults stated."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import blob_volume, write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.cli.main import build_parser


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_dir):
    """A MedMNIST-style .npz embedded at K=4 and K=2, its labels, and a probe fitted on the K=4 table."""
    folder = tmp_path_factory.mktemp("messages")
    rng = np.random.default_rng(4)
    arrays, lines = {}, ["id,split,blob"]
    for split, count in (("train", 6), ("val", 4), ("test", 4)):
        images = [blob_volume(rng, with_blob=i % 2 == 1)[0][:12, :12, :12].astype(np.uint8) for i in range(count)]
        lines += [f"{split}_{i},{split},{i % 2}" for i in range(count)]
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = np.array([[i % 2] for i in range(count)])
    np.savez(folder / "cohort.npz", **arrays)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    for k in (4, 2):
        assert main(["embed", str(folder / "cohort.npz"), "--model", str(tiny_model_dir), "--k", str(k), "--grid", "native",
                     "--preset", "uint8", "--device", "cpu", "--csv", str(folder / f"k{k}.csv"), "-q"]) == 0
    assert main(["probe", "fit", str(folder / "k4.csv"), str(folder / "labels.csv"), "-o", str(folder / "p.raptorprobe"),
                 "-q"]) == 0
    return folder


@pytest.mark.slow
def test_explain_heatmap_prints_no_vtk_info_line(fitted, capfd):
    code = main(["explain", str(fitted / "p.raptorprobe"), f"{fitted / 'cohort.npz'}#test_1", "-o",
                 str(fitted / "why.png"), "--heatmap", str(fitted / "why.nrrd"), "--device", "cpu"])
    captured = capfd.readouterr()  # the C++ side writes straight to the file descriptors
    assert code == 0
    assert "Info:" not in captured.err + captured.out and "vtkMRML" not in captured.err + captured.out


@pytest.mark.slow
def test_apply_mismatch_names_the_embedding_file(fitted, capsys):
    code = main(["probe", "apply", str(fitted / "p.raptorprobe"), str(fitted / "k2.csv")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"raptor: error: {fitted / 'k2.csv'}: cannot apply probe ") and "k 4 vs 2" in err
    assert "embeddings:" not in err


@pytest.mark.slow
def test_probe_info_lists_splits_in_train_val_test_order(fitted, capsys):
    assert main(["probe", "info", str(fitted / "p.raptorprobe")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("split"))
    table = lines[first + 1: lines.index("", first)]  # the metrics table; the rates at the threshold follow
    rows = [line.split()[0].rstrip("*") for line in table]
    assert rows == ["train", "val", "test"]  # train is marked * (in-sample)


def test_merge_of_one_part_says_part(tmp_path, tiny_model_dir, capsys):
    write_nrrd(tmp_path / "scans" / "a.nrrd", np.random.default_rng(0).uniform(0, 9, (8, 9, 10)).astype(np.float32))
    assert main(["batch", "--folder", str(tmp_path / "scans"), "--csv", str(tmp_path / "part0.csv"), "--model",
                 str(tiny_model_dir), "--k", "2", "--grid", "12", "--device", "cpu", "--readers", "0", "-q"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "part0.csv"), "-o", str(tmp_path / "all.csv")]) == 0
    assert "raptor: merged 1 part: 1 series -> " in capsys.readouterr().out


def test_k_help_states_its_default():
    parser = build_parser()
    for command in ("embed", "batch"):
        sub = parser._subparsers._group_actions[0].choices[command]
        k = next(a for a in sub._actions if "--k" in a.option_strings)
        # None lets a --projection-file decide K; without one, EmbedSettings makes it 100.
        assert k.default is None and "default 100" in k.help
    from RaptorExtension.encoding.settings import EmbedSettings

    assert EmbedSettings().k == 100


def test_explain_slices_default_agrees_between_help_code_and_readme():
    import re

    from conftest import ROOT

    parser = build_parser()
    explain = parser._subparsers._group_actions[0].choices["explain"]
    slices = next(a for a in explain._actions if "--slices" in a.option_strings)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = re.findall(r"`--slices (\w+)`, the\s+default", readme)
    assert documented == [slices.default] and f"({slices.default}, the default)" in slices.help
    import inspect

    from RaptorExtension.probes.figure import SLICE_CHOICES, render_explanation

    assert inspect.signature(render_explanation).parameters["slices"].default == slices.default == SLICE_CHOICES[0]
    assert tuple(slices.choices) == SLICE_CHOICES
