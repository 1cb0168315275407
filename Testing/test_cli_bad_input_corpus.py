"""The bad-input corpus (``Testing/bad_input_corpus.py``) through the ``raptor`` command line.

Every case must give one ``raptor: error:`` line that names the input and the
reason, a non-zero exit, no traceback or stray output on standard error, and
no new or changed file besides what the command documents.  Volumes run
twice: all together in one ``raptor embed --continue-on-error`` subprocess
(loader processes, as a cohort would), and each alone in-process; command
cases run in-process (a subprocess adds nothing there).  True subprocesses
cover what needs one: a full disk, two writers on one table, kills.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bad_input_corpus import Corpus, build

from RaptorExtension.cli import main
from RaptorExtension.embeddings.embedding import Embedding
from RaptorExtension.outputs import TableLock

pytestmark = pytest.mark.slow  # every test here takes seconds: real subprocesses, servers or many fits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir) -> Corpus:
    return build(tmp_path_factory.mktemp("corpus"), tiny_model_dir)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            found[str(path)] = (st.st_size, st.st_mtime_ns) if not path.is_dir() or path.is_symlink() else (-1, 0)
    return found


def changes(before: dict, after: dict, allowed=()) -> list[str]:
    allowed = tuple(str(a) for a in allowed)

    def ok(path: str) -> bool:
        return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed)

    out = [f"new {p}" for p in after if p not in before and not ok(p)]
    out += [f"changed {p}" for p in after if p in before and after[p] != before[p] and before[p][0] != -1 and not ok(p)]
    out += [f"removed {p}" for p in before if p not in after and not ok(p)]
    return out


def error_problems(code, err: str, words, *, exit_code=None) -> list[str]:
    """What is wrong with a failed command's exit status and standard error (empty: all good)."""
    problems = []
    if code == 0 or code is None:
        problems.append(f"exit status {code}")
    if exit_code is not None and code != exit_code:
        problems.append(f"exit status {code}, expected {exit_code}")
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("raptor: error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'raptor: error:' lines")
    stray = [line for line in lines if not line.startswith("raptor: ")]
    if stray:
        problems.append(f"stray output on stderr: {stray[:3]}")
    if "Traceback" in err:
        problems.append("a traceback")
    if errors:
        missing = [w for w in words if w not in errors[0]]
        if missing:
            problems.append(f"the error line lacks {missing}: {errors[0]}")
    return problems


def run_main(argv: list[str], capfd, env: dict | None = None, hold_lock: str | None = None) -> tuple[int, str, str]:
    """``raptor ARGV`` in this process; an exception escaping ``main`` is a failure of the case, not of the test."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    lock = TableLock(hold_lock).acquire() if hold_lock else None
    try:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - reported as the case's failure
            import traceback

            out, err = capfd.readouterr()
            return -999, out, err + "Traceback (escaped main): " + "".join(traceback.format_exception(exc))[-800:]
    finally:
        if lock is not None:
            lock.release()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out, err = capfd.readouterr()
    return code, out, err


def leftover_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".lock"))]


# ---------------------------------------------------------------------------


def test_the_corpus_covers_every_class_of_the_issue(corpus):
    names = {c.name for c in corpus.cases} | {v.name for v in corpus.volumes}
    for prefix, at_least in {
        "embed_csv_is": 2, "batch_": 5, "merge_record_": 12, "probe_json_": 15, "probe_": 25, "info_embedding_": 12,
        "info_table_": 5, "labels_": 15, "option_": 20, "write_": 7, "npy_": 20, "npz_": 15, "nrrd_": 15, "nifti_": 15,
        "mha_": 6, "dicom_": 8,
    }.items():
        count = sum(1 for n in names if n.startswith(prefix))
        assert count >= at_least, f"only {count} cases named {prefix}*"
    goods = [v for v in corpus.volumes if v.good]
    assert len(goods) >= 20 and len(corpus.volumes) - len(goods) >= 80
    assert len(corpus.volumes) + len(corpus.cases) >= 250


def test_every_volume_in_one_embed_run_with_loader_processes(corpus, tmp_path):
    """One ``raptor embed --continue-on-error`` over every bad file and every good neighbour, in a subprocess."""
    out, errors = corpus.root / "out" / "all-volumes", corpus.root / "out" / "all-volumes-errors.csv"
    before = snapshot(corpus.root)
    proc = subprocess.run(
        [sys.executable, "-m", "RaptorExtension", "embed", *[v.spec for v in corpus.volumes], "--continue-on-error",
         "-o", str(out), "--errors", str(errors), *corpus.model_args(), "--loader", "processes", "--readers", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    stray = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("raptor: ")]
    assert not stray, f"stray stderr output: {stray[:5]}"
    with open(errors, newline="") as handle:
        rows = list(csv.DictReader(handle))
    problems = []
    for case in corpus.volumes:
        path = case.spec.split("#")[0]
        mine = [r for r in rows if r["source"].startswith(path) or r["id"] == case.spec]
        if case.good:
            for volume_id in case.good_ids:
                npz = out / f"{volume_id}.npz"
                if not npz.exists():
                    problems.append(f"{case.name}: good neighbour not embedded ({[r['reason'] for r in mine]})")
                elif not np.isfinite(Embedding.load(npz).vector).all():
                    problems.append(f"{case.name}: non-finite embedding")
            continue
        if len(mine) != 1:
            problems.append(f"{case.name}: {len(mine)} error rows")
            continue
        missing = [w for w in case.words if w not in mine[0]["reason"]]
        if missing or path not in mine[0]["reason"]:
            problems.append(f"{case.name}: reason lacks {missing or path}: {mine[0]['reason']}")
        line = [x for x in proc.stderr.splitlines() if x.startswith(("raptor: failed:", "raptor: skipped:")) and path in x]
        if len(line) != 1:
            problems.append(f"{case.name}: {len(line)} 'failed' lines on stderr")
    assert not problems, "\n".join(problems)
    bad_ids = {r["id"] for r in rows}
    assert not any((out / f"{i}.npz").exists() for i in bad_ids), "an embedding was written for a failed volume"
    assert not changes(before, snapshot(corpus.root), allowed=[out, errors])
    assert not leftover_temporaries(corpus.root)


def test_each_bad_volume_alone_gives_one_error_line(corpus, capfd):
    problems = []
    for case in (v for v in corpus.volumes if not v.good):
        out = corpus.root / "out" / f"alone-{case.name}"
        before = snapshot(corpus.root)
        code, _, err = run_main(["embed", case.spec, "-o", str(out), *corpus.model_args()], capfd)
        found = error_problems(code, err, (case.spec.split("#")[0], *case.words))
        found += changes(before, snapshot(corpus.root))
        problems += [f"{case.name}: {p}" for p in found]
    assert not problems, "\n".join(problems)


def test_every_command_case_gives_one_error_line_and_writes_nothing(corpus, capfd):
    problems = []
    for case in corpus.cases:
        before = snapshot(corpus.root)
        code, _, err = run_main(case.argv, capfd, env=case.env, hold_lock=case.hold_lock)
        found = error_problems(code, err, case.words, exit_code=case.exit_code)
        found += changes(before, snapshot(corpus.root), allowed=case.may_write)
        problems += [f"{case.name}: {p}" for p in found]
    assert not leftover_temporaries(corpus.root)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# Faults that need a process of their own

LIMITED_RUNNER = """
import contextlib, io, json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
from RaptorExtension.cli import main
import torch  # loaded before the limit: importing writes nothing, but keep the limit for the outputs only
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as exc:
            import traceback
            code = -999
            err.write("Traceback " + repr(exc))
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_a_full_disk_gives_one_line_per_command_and_no_temporary_file(corpus, tmp_path):
    """Outputs larger than the file size limit fail like on a full disk (EFBIG): every command says so in one line."""
    out = tmp_path / "full"
    out.mkdir()
    (out / "big.csv").write_bytes(b"")
    commands = {
        "embed -o": (["embed", str(corpus.good_npy), "-o", str(out / "emb"), *corpus.model_args()], "scan.npz"),
        "embed --csv": (["embed", str(corpus.good_npy), "--csv", str(out / "t.csv"), *corpus.model_args()], "t.csv"),
        "probe fit": (["probe", "fit", str(corpus.table), str(corpus.labels), "-q", "-o", str(out / "p.raptorprobe")],
                      "p.raptorprobe"),
        "probe apply": (["probe", "apply", str(corpus.probe), str(corpus.table), "-o", str(out / "s.csv")], "s.csv"),
        "merge": (["merge", *map(str, corpus.parts), "-o", str(out / "m.csv")], "m.csv"),
        "batch": (["batch", "--folder", str(corpus.cohort), "--csv", str(out / "b.csv"), "--loader", "threads",
                   *corpus.model_args()], "b.csv"),
    }
    proc = subprocess.run([sys.executable, "-c", LIMITED_RUNNER, "600", json.dumps([c for c, _ in commands.values()])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    for (name, (_, words)), (code, err) in zip(commands.items(), results):
        found = error_problems(code, err, (words, "cannot write", "File too large"))
        problems += [f"{name}: {p}" for p in found]
    assert not problems, "\n".join(problems)
    assert not leftover_temporaries(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the other write failures cover the path")
def test_a_read_only_folder_gives_one_line(corpus, tmp_path, capfd):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_main(["probe", "fit", str(corpus.table), str(corpus.labels), "-o", str(folder / "p.raptorprobe")],
                                capfd)
        assert not error_problems(code, err, ("p.raptorprobe", "Permission denied"))
        assert not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


HOLDER = """
import sys, time
from RaptorExtension.outputs import TableLock
with TableLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder(corpus, tmp_path, capfd):
    """Another process holds the table: refused in one line naming it.  (Batch is refused the same way: the corpus.)"""
    table = tmp_path / "shared.csv"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(table)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "RaptorExtension", "embed", str(corpus.good_npy), "--csv",
                               str(table), *corpus.model_args()], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert not error_problems(proc.returncode, proc.stderr, ("shared.csv", f"pid {holder.pid}")), proc.stderr
        assert not table.exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock went with it, and the next run takes the table.
    code, _, err = run_main(["embed", str(corpus.good_npy), "--csv", str(table), *corpus.model_args()], capfd)
    assert code == 0, err
    assert not list(tmp_path.glob(".*.lock"))


def test_two_batches_started_together_never_duplicate_a_row(corpus, tmp_path):
    table = tmp_path / "together.csv"
    argv = [sys.executable, "-m", "RaptorExtension", "batch", "--folder", str(corpus.cohort), "--csv", str(table),
            "--loader", "threads", *corpus.model_args()]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    for code, err in results:  # each finished, or was refused in one line naming the other's process
        assert code == 0 or not error_problems(code, err, ("together.csv", "another raptor run is writing")), err
    assert any(code == 0 for code, _ in results)
    from RaptorExtension.embeddings.table import read_table

    assert sorted(read_table(table).ids) == ["c0", "c1"]  # every id once: the table reads


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"), reason="Linux /proc and /dev/shm")
@pytest.mark.parametrize("command", ["embed", "batch"])
def test_kill_9_leaves_no_loader_process_and_nothing_in_dev_shm(corpus, tmp_path, command):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        np.save(folder / f"m{i}.npy", np.random.default_rng(i).normal(size=(24, 24, 24)).astype(np.float32))
    volumes = sorted(folder.glob("*.npy"))
    if command == "embed":
        what = ["embed", *map(str, volumes), "-o", str(tmp_path / "out")]
    else:
        (tmp_path / "manifest.csv").write_text("path\n" + "".join(f"{v}\n" for v in volumes))
        what = ["batch", "--manifest", str(tmp_path / "manifest.csv"), "--csv", str(tmp_path / "out.csv")]
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen([sys.executable, "-m", "RaptorExtension", *what, "--model", str(corpus.model), "--k", "4",
                             "--grid", "32", "--device", "cpu", "-q", "--loader", "processes", "--readers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    children = []
    while time.monotonic() < deadline:
        children = _children(proc.pid)
        handoff = [n for n in os.listdir("/dev/shm") if n.startswith(f"raptor-load-{proc.pid}-")]
        if len(children) >= 3 and handoff:  # two loaders and multiprocessing's resource tracker
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    assert len(children) >= 3
    ours = set(os.listdir("/dev/shm")) - shm_before  # the hand-off folder and multiprocessing's semaphores
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (any(_running(c) for c in children) or ours & set(os.listdir("/dev/shm"))):
        time.sleep(0.1)
    assert not [c for c in children if _running(c)], "a loader (or the resource tracker) outlived its parent"
    assert not ours & set(os.listdir("/dev/shm")), "the kill left segments in /dev/shm"
