"""Install what Raptor needs inside Slicer, at first use, never at import.

* **torch** comes from the PyTorch extension's ``PyTorchUtils`` module, which
  picks the build that matches the computer's NVIDIA driver (CUDA or CPU)
  through light-the-torch and asks the user first.  Raptor's extension
  declares ``EXTENSION_DEPENDS PyTorch`` so that module is there.
* **The rest** (``Resources/requirements.txt``: transformers, safetensors,
  tqdm, scikit-learn) is installed with ``slicer.packaging.pip_ensure``
  (Slicer 5.11+), which checks, asks and installs only what is missing; on
  older Slicer with ``slicer.util.pip_install``.  Packages Slicer ships
  (numpy, VTK, SimpleITK, pydicom) are never listed, so they are never
  replaced.

Only the functions that install import ``slicer``; checking works anywhere
(the tests run it without Slicer).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from pathlib import Path

from ..errors import RaptorError

log = logging.getLogger(__name__)

TORCH_REQUIREMENT = ">=2.1"
REQUESTER = "Raptor"
SLICER_BUNDLED = ("numpy", "vtk", "simpleitk", "pydicom", "torch", "torchvision")
"""Packages requirements.txt must not list: Slicer ships them, or PyTorchUtils installs them."""


def requirements_file() -> Path:
    """``requirements.txt``: in the ``RaptorExtension`` folder when installed in Slicer, else the source tree's ``Resources/``."""
    here = Path(__file__).resolve().parent.parent  # RaptorExtension/
    for candidate in (here / "requirements.txt", here.parent / "Resources" / "requirements.txt"):
        if candidate.is_file():
            return candidate
    raise RaptorError(f"{here}: Raptor's requirements.txt is missing; reinstall the extension")


def requirement_lines(path: Path | None = None) -> list[str]:
    """The requirement specifiers of a requirements file (comments and blank lines dropped)."""
    path = path or requirements_file()
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _distribution_name(requirement: str) -> str:
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise RaptorError(f"not a requirement specifier: {requirement!r}")
    return match.group(1)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements not satisfied by what is installed (name and version range)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip and with Slicer
        Requirement = None
    missing = []
    for text in requirements:
        name = _distribution_name(text)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if Requirement is not None:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
                missing.append(text)
    return missing


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def torch_summary() -> str:
    """What the module panel shows about PyTorch, read from the installed metadata.

    Slicer's own process never imports PyTorch (the local Raptor server does);
    the device the server uses is what Compute > Test shows.
    """
    if not torch_installed():
        return "PyTorch is not installed yet (it is installed the first time a job runs on this computer)"
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return f"PyTorch {version}, used by the local Raptor server (Compute > Test shows its GPU)"


def ensure_torch(askConfirmation: bool = True) -> bool:
    """Install torch through the PyTorch extension if needed; False if the user declined."""
    if torch_installed():
        return True
    try:
        import PyTorchUtils  # the PyTorch extension's scripted module
    except ImportError:
        raise RaptorError(
            "Raptor needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer and try again"
        ) from None
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT
        )
    except Exception as exc:  # pip failed (CalledProcessError) or the extension raised: one sentence
        if _declined(exc):
            return False
        raise RaptorError(f"installing PyTorch failed: {install_failure(exc)}") from None
    if torch is None:
        return False
    log.info("Raptor: installed PyTorch")
    return True


def _declined(exc: BaseException) -> bool:
    """The user said no to an installation (Slicer 5.12's pip_ensure raises for that)."""
    return type(exc).__name__ == "InstallationAbortedError" or "declined" in str(exc).lower()


def install_failure(exc: BaseException, lines: int = 3) -> str:
    """What pip said last, in one line: the reason an installation failed, without a traceback."""
    import subprocess

    text = ""
    if isinstance(exc, subprocess.CalledProcessError):
        for stream in (exc.stderr, exc.output):
            if stream:
                text = stream.decode("utf-8", "replace") if isinstance(stream, bytes) else str(stream)
                break
        if not text:
            text = f"pip exited with status {exc.returncode}"
    else:
        text = str(exc) or type(exc).__name__
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail) or type(exc).__name__


def ensure_requirements(askConfirmation: bool = True) -> bool:
    """Install the missing packages of ``requirements.txt``; False if some are still missing."""
    import slicer

    path = requirements_file()
    lines = requirement_lines(path)
    if not missing_requirements(lines):
        return True
    packaging = _slicer_packaging()
    if packaging is not None:
        requirements = packaging.load_requirements(str(path))
        try:
            packaging.pip_ensure(requirements, requester=REQUESTER, **_prompt_argument(packaging.pip_ensure, askConfirmation))
        except Exception as exc:  # declined (not a failure), or pip failed: pip's last words, in one line
            if _declined(exc):
                return False
            raise RaptorError(f"installing Raptor's Python packages failed: {install_failure(exc)}") from None
    else:
        missing = missing_requirements(lines)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "Raptor needs these Python packages, which will be downloaded and installed now:\n\n"
            + "\n".join(missing),
            windowTitle="Install Python packages",
        ):
            return False
        try:
            slicer.util.pip_install(missing)
        except Exception as exc:  # CalledProcessError when pip fails (Slicer 5.10)
            raise RaptorError(f"installing Raptor's Python packages failed: {install_failure(exc)}") from None
    importlib.invalidate_caches()
    return not missing_requirements(lines)


def _prompt_argument(pip_ensure, ask: bool) -> dict:
    """``prompt_install=`` in current Slicer, ``prompt=`` in the first 5.11 previews."""
    import inspect

    parameters = inspect.signature(pip_ensure).parameters
    return {"prompt": ask} if "prompt" in parameters and "prompt_install" not in parameters else {"prompt_install": ask}


def _slicer_packaging():
    """``slicer.packaging`` (Slicer 5.11+; briefly named ``slicer.pydeps``), or None on older Slicer."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
            return module
    return None


def ensure_dependencies(askConfirmation: bool = True) -> bool:
    """torch first (its CUDA build matters), then the rest; True when Raptor can run."""
    if not ensure_torch(askConfirmation):
        return False
    return ensure_requirements(askConfirmation)


def ensure_server_dependencies(compute, askConfirmation: bool = True) -> bool:
    """What a job needs installed here: everything for a local server (it runs in Slicer's Python), nothing for a remote one."""
    if not compute.is_local:
        return True
    return ensure_dependencies(askConfirmation)


def dependencies_ready() -> bool:
    """True when everything is installed (checked without Slicer and without installing)."""
    try:
        return torch_installed() and not missing_requirements(requirement_lines())
    except RaptorError:
        return False


__all__ = [
    "requirements_file",
    "requirement_lines",
    "missing_requirements",
    "torch_installed",
    "torch_summary",
    "ensure_torch",
    "ensure_requirements",
    "ensure_dependencies",
    "ensure_server_dependencies",
    "dependencies_ready",
    "install_failure",
]
