"""First-use installs inside Slicer: a failure is one sentence with pip's last lines; a refusal is not a failure.

Slicer's installers (``slicer.packaging.pip_ensure`` in 5.12+, ``slicer.util.pip_install`` in
5.10, ``PyTorchUtils``) exist only inside the application, so these tests put stand-ins with
the same behaviour where the engine looks for them: they raise exactly what the real ones
raise (``subprocess.CalledProcessError`` with pip's output, ``RuntimeError("User declined
package installation")``).
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without Qt) is not installed")

from RaptorExtension.errors import RaptorError  # noqa: E402
from RaptorExtension.slicerlogic import dependencies  # noqa: E402

PIP_OUTPUT = "Collecting transformers\nERROR: Could not find a version that satisfies the requirement transformers>=99\n" \
             "ERROR: No matching distribution found for transformers>=99\n"


@pytest.fixture
def missing_package(monkeypatch):
    monkeypatch.setattr(dependencies, "missing_requirements", lambda lines: ["transformers>=99"])


def test_a_failed_pip_install_on_slicer_5_10_is_one_sentence_with_pips_last_lines(monkeypatch, missing_package):
    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: None)

    def pip_install(requirements):
        raise subprocess.CalledProcessError(1, ["pip", "install", *requirements], output=PIP_OUTPUT)

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    with pytest.raises(RaptorError) as caught:
        dependencies.ensure_requirements(askConfirmation=False)
    message = str(caught.value)
    assert message.startswith("installing Raptor's Python packages failed: ")
    assert "No matching distribution found for transformers>=99" in message and "\n" not in message


def test_a_declined_install_on_slicer_5_12_is_a_cancel_not_an_error(monkeypatch, missing_package):
    def pip_ensure(requirements, requester=None, prompt_install=True):
        raise RuntimeError("User declined package installation")

    packaging = types.SimpleNamespace(pip_ensure=pip_ensure, load_requirements=lambda path: ["transformers>=99"])
    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: packaging)
    assert dependencies.ensure_requirements(askConfirmation=True) is False


def test_a_failed_install_on_slicer_5_12_names_pips_reason(monkeypatch, missing_package):
    def pip_ensure(requirements, requester=None, prompt_install=True):
        raise subprocess.CalledProcessError(1, ["pip"], stderr=PIP_OUTPUT.encode())

    packaging = types.SimpleNamespace(pip_ensure=pip_ensure, load_requirements=lambda path: ["transformers>=99"])
    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: packaging)
    with pytest.raises(RaptorError, match="No matching distribution found for transformers>=99"):
        dependencies.ensure_requirements(askConfirmation=False)


def test_a_failed_pytorch_install_is_one_sentence_and_a_declined_one_is_false(monkeypatch):
    monkeypatch.setattr(dependencies, "torch_installed", lambda: False)
    outcome = {}

    class Logic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None):
            if outcome["raise"] is not None:
                raise outcome["raise"]
            return None  # what PyTorchUtils returns when the user says no

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    outcome["raise"] = subprocess.CalledProcessError(1, ["pip"], output="ERROR: torch wheel not found for this platform\n")
    with pytest.raises(RaptorError, match="^installing PyTorch failed: ERROR: torch wheel not found for this platform$"):
        dependencies.ensure_torch(askConfirmation=False)
    outcome["raise"] = None
    assert dependencies.ensure_torch(askConfirmation=True) is False


def test_a_remote_server_needs_nothing_installed_here(monkeypatch):
    from RaptorExtension.slicerlogic.compute import Compute

    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda ask=True: pytest.fail("nothing to install for a remote server"))
    assert dependencies.ensure_server_dependencies(Compute("remote", "http://gpu-host:8765", "t" * 20)) is True


def test_the_panel_reads_the_pytorch_version_without_importing_it():
    code = ("import sys; from RaptorExtension.slicerlogic import dependencies; print(dependencies.torch_summary()); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "False" and "PyTorch 2." in done.stdout
