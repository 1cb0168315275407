"""Progress on the command line: a rate that is not absurd at the first tick, slices for batches, plain lines in logs."""

from __future__ import annotations

import io
import re

import numpy as np
from helpers import write_nrrd

from RaptorExtension.cli import main
from RaptorExtension.cli.batch import ConsoleProgress
from RaptorExtension.cli.progress import Progress, RateMeter
from RaptorExtension.cohort.job import BatchProgress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rate_starts_from_the_first_report_and_waits_for_two_seconds():
    clock = Clock()
    meter = RateMeter(clock=clock)
    clock.now += 0.0001
    meter.update(40)  # 40 constant slices served from the cache in no time
    clock.now += 0.5
    meter.update(45)
    assert meter.rate is None and meter.describe("slices", 55) == "measuring the rate"
    clock.now += 1.5
    meter.update(60)
    assert meter.rate == 10.0 and meter.describe("slices", 40) == "10.0 slices/s, ETA 4s"
    for _ in range(100):  # a window, not the average since the start: the rate follows a change of pace
        clock.now += 1.0
        meter.update(meter.samples[-1][1] + 2)
    assert abs(meter.rate - 2.0) < 1e-9


def test_embed_slice_bar_never_shows_a_first_tick_rate():
    clock, out = Clock(), Terminal()
    progress = Progress(total_volumes=2, stream=out, clock=clock)
    clock.now += 0.0001
    progress.slices("ct_1", 40, 100)
    clock.now += 2.0
    progress.slices("ct_1", 60, 100)
    progress.close()
    text = out.getvalue()
    assert "measuring the rate" in text and "10.0 slices/s, ETA 4s" in text
    rates = [float(r) for r in re.findall(r"([\d.]+)\s*(?:slices?|it)/s", text)]
    assert rates and max(rates) < 1000, rates  # the first tick came 0.1 ms after the start: no 400000 slices/s


def test_plain_lines_when_not_a_terminal_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    progress = Progress(total_volumes=1, stream=out, clock=clock, interval=5.0)
    for done in range(0, 130, 10):
        progress.slices("ct_1", done, 120)
        clock.now += 1.0
    progress.volume_done()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at t = 0, 5 and 10 s of 13
    assert lines[0] == "raptor: volume 1/1 ct_1: 0/120 slices, measuring the rate"
    assert lines[1].startswith("raptor: volume 1/1 ct_1: 50/120 slices, 10.0 slices/s, ETA 7s")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_batch_progress_shows_slices_with_rate_and_eta():
    clock = Clock()
    log = io.StringIO()
    console = ConsoleProgress(False, interval=0.0, stream=log, clock=clock)
    console(BatchProgress("embedding", total=3))
    for done in (12, 24, 36):
        clock.now += 1.5
        console(BatchProgress("embedding", total=3, current="1.2.3.4", slices_done=done, slices_total=48, elapsed=clock.now - 100))
    text = log.getvalue()
    assert "raptor: 0/3 series (0 failed), 0.00 volumes/s; 1.2.3.4: 36/48 slices, 8.0 slices/s, ETA 1s" in text
    assert "\r" not in text and "\x1b" not in text
    terminal = Terminal()
    console = ConsoleProgress(False, stream=terminal, clock=clock)
    console(BatchProgress("embedding", total=3))
    for done in (12, 24, 36):
        clock.now += 1.5
        console(BatchProgress("embedding", total=3, current="1.2.3.4", slices_done=done, slices_total=48, elapsed=9))
    console.close()
    assert "36/48 slices, 8.0 slices/s, ETA 1s" in terminal.getvalue()


def test_quiet_embed_prints_no_model_lines_and_logs_get_plain_progress(tmp_path, tiny_model_dir, capsys, monkeypatch):
    scan = write_nrrd(tmp_path / "scan.nrrd", np.random.default_rng(0).uniform(0, 50, (8, 10, 12)).astype(np.float32))
    args = ["embed", str(scan), "--model", str(tiny_model_dir), "--k", "2", "--grid", "12", "--device", "cpu"]
    assert main([*args, "-o", str(tmp_path / "a"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("raptor: embedded 1,")
    monkeypatch.setenv("RAPTOR_PROGRESS_INTERVAL", "0")
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as a cluster job's log is not
    assert "raptor: loading model" in err and "raptor: volume 1/1 scan: " in err and "/36 slices" in err
    assert "\r" not in err and "\x1b" not in err


def test_batch_log_shows_slice_progress(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("RAPTOR_PROGRESS_INTERVAL", "0")
    for i in range(2):
        write_nrrd(tmp_path / "scans" / f"s{i}.nrrd", np.random.default_rng(i).uniform(0, 50, (8, 10, 12)).astype(np.float32))
    assert main(["batch", "--folder", str(tmp_path / "scans"), "--csv", str(tmp_path / "c.csv"), "--model",
                 str(tiny_model_dir), "--k", "2", "--grid", "12", "--device", "cpu", "--readers", "0"]) == 0
    err = capsys.readouterr().err
    assert "series (0 failed)" in err and "/36 slices, " in err
    assert "\r" not in err and "\x1b" not in err
