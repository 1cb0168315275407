"""The test suite's own promises: CI cannot pass without the shared data, the markers select what they say,
test modules stay independent of each other, and every test the README names exists.

The first two run pytest itself in subprocesses on a few real tests of this
suite, with ``RAPTOR_SHARED_DATA`` pointing at a folder that does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BY_FIXTURE = "Testing/test_cli_embed.py::test_medmnist_npz_selectors"  # asks for the adrenal28 fixture
BY_MARKER = "Testing/test_cohort_sources.py::test_manifest_paths_ids_and_header_filling"  # marked; reads the CT itself
NO_DATA = "Testing/test_cohort_sources.py::test_ids_are_unique_and_stable"


def pytest_run(*args: str, ci: str | None, data: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["RAPTOR_SHARED_DATA"] = str(data)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two pytest runs in subprocesses
def test_missing_shared_data_is_a_skip_with_a_message_but_a_failure_under_ci(tmp_path):
    absent = tmp_path / "no-shared-data"
    user = pytest_run(BY_FIXTURE, BY_MARKER, NO_DATA, ci=None, data=absent)
    assert user.returncode == 0, user.stdout[-2000:]
    assert "1 passed, 2 skipped" in user.stdout
    skips = [line for line in user.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skips) == 1 and skips[0].startswith("SKIPPED [2]")  # -rs: both skips, for one reason
    assert f"shared data not found at {absent}" in skips[0] and "RAPTOR_SHARED_DATA" in skips[0]
    ci = pytest_run(BY_FIXTURE, BY_MARKER, NO_DATA, ci="true", data=absent)
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "1 passed" in ci.stdout and "skipped" not in ci.stdout
    assert ci.stdout.count("CI is set, so missing shared data is a failure, not a skip") >= 2


@pytest.mark.slow  # a pytest run in a subprocess
def test_markers_select_shared_data_and_slow_tests():
    run = pytest_run(BY_FIXTURE, BY_MARKER, NO_DATA, "Testing/test_cohort_shards.py", "--collect-only", "-m",
                     "needs_shared_data and not slow", ci=None, data=ROOT)
    assert run.returncode == 0, run.stdout[-2000:]
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert collected == [BY_FIXTURE, BY_MARKER]  # the shards module is slow as a whole; NO_DATA needs no data


def test_no_test_module_imports_another():
    """Shared code lives in helpers, fixtures and builders (conftest, helpers, batch_fixtures, ...), never in a test module."""
    import ast

    offenders = []
    for path in sorted((ROOT / "Testing").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert offenders == []


def test_every_test_the_readme_names_exists():
    """The README's "Correctness (tests)" backs each claim with ``file.py::test`` (``::test`` for the same file).

    A renamed or deleted test must take its README line with it, or a claim loses its backing silently.
    """
    import re

    readme = (ROOT / "README.md").read_text()
    start = readme.index("**Correctness (tests):**")
    section = readme[start:readme.index("\n**", start + 1)]
    named, missing, current = [], [], None
    for match in re.finditer(r"`(test_\w+\.py)?(?:::(test_\w+))?`", section):
        current = match.group(1) or current
        assert current is not None, f"{match.group(0)} names no file"
        path = ROOT / "Testing" / current
        if not path.is_file():
            missing.append(current)
        elif match.group(2):
            named.append(f"{current}::{match.group(2)}")
            if not re.search(rf"^(async )?def {match.group(2)}\(", path.read_text(), re.M):
                missing.append(named[-1])
    assert len(named) >= 40, named  # the section still names its tests
    assert missing == []
