"""One id rule for a DICOM series: `raptor embed` (a series folder) and `raptor batch` (folder tree, manifest) both
name it by its SeriesInstanceUID, so their rows join."""

from __future__ import annotations

import numpy as np
import pytest
from batch_fixtures import tiny_cli_args, write_cohort

from RaptorExtension.cli import main
from RaptorExtension.embeddings.table import read_table


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_embed_and_batch_give_a_series_the_same_id(tmp_path, tiny_model_dir, capsys):
    series = write_cohort(tmp_path / "cohort", 2)
    uids = [s.series_uid for s in series]
    tiny = [*tiny_cli_args(tiny_model_dir), "--preset", "ct"]
    assert main(["embed", str(series[0].folder), str(series[1].files[0]), "--csv", str(tmp_path / "embed.csv"), "-q",
                 "--readers", "0", *tiny]) == 0
    assert main(["batch", "--folder", str(tmp_path / "cohort"), "--csv", str(tmp_path / "batch.csv"), "-q",
                 "--readers", "0", *tiny]) == 0
    # A manifest listing the series folders, with no filter that would read their headers anyway.
    (tmp_path / "scans.csv").write_text("path\n" + "".join(f"{s.folder}\n" for s in series))
    assert main(["batch", "--manifest", str(tmp_path / "scans.csv"), "--csv", str(tmp_path / "manifest.csv"), "-q",
                 "--readers", "0", *tiny]) == 0
    capsys.readouterr()
    embedded = read_table(tmp_path / "embed.csv")
    assert embedded.ids == uids  # a folder, and a file of a folder: both the series' UID
    for name in ("batch.csv", "manifest.csv"):
        batch = read_table(tmp_path / name)
        assert sorted(batch.ids) == sorted(uids), name
        assert batch.columns["SeriesInstanceUID"] == batch.ids
        for uid in uids:  # the rows join, and hold the same embedding
            np.testing.assert_array_equal(batch.features[batch.ids.index(uid)], embedded.features[embedded.ids.index(uid)])
    assert main(["embed", str(series[0].folder), "-o", str(tmp_path / "npz"), "-q", *tiny]) == 0
    assert (tmp_path / "npz" / f"{uids[0]}.npz").exists()
