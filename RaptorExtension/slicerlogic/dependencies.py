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
    """What the module panel shows: the torch version and the device Raptor will use."""
    if not torch_installed():
        return "PyTorch is not installed yet (it is installed the first time you embed)"
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        memory = torch.cuda.get_device_properties(index).total_memory / 1024**3
        return f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}: {name} ({memory:.0f} GB)"
    return f"PyTorch {torch.__version__}, CPU only (no CUDA GPU visible; embedding is slow on the CPU)"


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
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT
    )
    if torch is None:
        return False
    log.info("Raptor: installed PyTorch %s", torch.__version__)
    return True


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
        except Exception as exc:  # declined, or pip failed: say which packages are missing
            if type(exc).__name__ != "InstallationAbortedError":
                raise RaptorError(f"installing Raptor's Python packages failed ({exc})") from None
    else:
        missing = missing_requirements(lines)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "Raptor needs these Python packages, which will be downloaded and installed now:\n\n"
            + "\n".join(missing),
            windowTitle="Install Python packages",
        ):
            return False
        slicer.util.pip_install(missing)
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
    "dependencies_ready",
]
