"""The Slicer extension's build files, catalog entry, icons and module UIs are consistent.

Slicer itself is not available here, so these tests check what a missing line
would otherwise only reveal in an extension build or at Slicer start-up:
a .py file of the engine not shipped, a module resource not listed, a widget
the module code uses that the .ui does not have, a parameter bound to no
widget, a catalog entry the ExtensionsIndex schema rejects.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "RaptorExtension"


def cmake_text(path: Path) -> str:
    """CMake source without comments (a ``#`` inside a quoted string, as in a URL, is kept)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        quoted = False
        for i, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                line = line[:i]
                break
        lines.append(line)
    return "\n".join(lines)


def cmake_set(text: str, name: str, substitutions: dict[str, str] | None = None) -> list[str]:
    """The values of ``set(NAME v1 v2 ...)``, with ``${VAR}`` substituted."""
    match = re.search(rf"\bset\(\s*{re.escape(name)}\b(.*?)\)", text, re.S)
    assert match, f"no set({name} ...)"
    values = match.group(1).split()
    for key, value in (substitutions or {}).items():
        values = [v.replace("${" + key + "}", value) for v in values]
    return values


def module_dirs() -> list[Path]:
    """Every scripted module folder: a folder with a CMakeLists.txt calling slicerMacroBuildScriptedModule."""
    return sorted(
        p.parent for p in ROOT.glob("*/CMakeLists.txt") if "slicerMacroBuildScriptedModule" in cmake_text(p)
    )


# ---------------------------------------------------------------------------
# top level and catalog


def test_top_level_cmakelists_is_a_slicer_extension():
    text = cmake_text(ROOT / "CMakeLists.txt")
    assert re.search(r"project\(\s*Raptor\s*\)", text)
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL"):
        assert re.search(rf'set\(EXTENSION_{var}\s+"[^"]+"\)', text), f"EXTENSION_{var} missing or empty"
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS\s+"([^"]+)"\)', text).group(1)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", c.strip()) for c in contributors.split(",")), "contributors: Name (Organization)"
    # A screenshot URL must name a file of this repository (the index fetches it); none is better than a dead one.
    screenshots = re.search(r'set\(EXTENSION_SCREENSHOTURLS\s+"([^"]*)"\)', text)
    assert screenshots is not None, "EXTENSION_SCREENSHOTURLS missing"
    for url in screenshots.group(1).split():
        assert (ROOT / url.split("/main/", 1)[-1]).is_file(), f"screenshot {url} names no file of this repository"
    icon = re.search(r'set\(EXTENSION_ICONURL\s+"([^"]+)"\)', text).group(1)
    assert (ROOT / icon.split("/main/", 1)[-1]).is_file(), f"icon {icon} names no file of this repository"
    assert re.match(r"cmake_minimum_required\(VERSION 3\.20\.6\.\.\.3\.22\.6 FATAL_ERROR\)", text), "as Slicer 5.10's template writes it"
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', text)
    find = text.index("find_package(Slicer REQUIRED)")
    use = text.index("include(${Slicer_USE_FILE})")
    subdirs = [m.group(1) for m in re.finditer(r"add_subdirectory\(\s*([\w./-]+)\s*\)", text)]
    generate = text.index("include(${Slicer_EXTENSION_GENERATE_CONFIG})")
    cpack = text.index("include(${Slicer_EXTENSION_CPACK})")
    assert find < use < text.index("add_subdirectory(") < generate < cpack
    assert "RaptorExtension" in subdirs and "RaptorEmbed" in subdirs and "RaptorProbe" in subdirs
    for module in module_dirs():
        assert module.name in subdirs, f"{module.name}/ is a module but the top-level CMakeLists.txt does not add it"
    for sub in subdirs:
        assert (ROOT / sub / "CMakeLists.txt").is_file(), f"add_subdirectory({sub}) but {sub}/CMakeLists.txt is missing"


def test_catalog_entry_follows_the_extensions_index_schema():
    """Checked against slicer-extension-catalog-entry-schema-v1.0.1 (draft-07, additionalProperties false)."""
    entry = json.loads((ROOT / "Raptor.json").read_text(encoding="utf-8"))
    schema_types = {
        "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
        "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
    }
    assert {"$schema", "category", "scm_url"} <= entry.keys()
    assert entry.keys() <= schema_types.keys(), f"not allowed by the schema: {entry.keys() - schema_types.keys()}"
    for key, value in entry.items():
        assert isinstance(value, schema_types[key]), key
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    assert all(isinstance(d, str) for d in entry["build_dependencies"])
    assert entry["build_dependencies"] == ["PyTorch"]
    category = re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]+)"\)', cmake_text(ROOT / "CMakeLists.txt")).group(1)
    assert entry["category"] == category


def test_extension_icon_and_requirements():
    from PIL import Image

    with Image.open(ROOT / "Resources" / "Icons" / "Raptor.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128) and icon.mode == "RGBA"
    requirements = (ROOT / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    names = {re.match(r"[A-Za-z0-9._-]+", line).group(0).lower() for line in requirements.splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"numpy", "vtk", "simpleitk", "pydicom", "torch", "torchvision"}, "Slicer ships these"


# ---------------------------------------------------------------------------
# the engine package


def test_every_engine_python_file_is_installed():
    text = cmake_text(ENGINE / "CMakeLists.txt")
    listed = cmake_set(text, "RAPTOR_ENGINE_PYTHON_FILES")
    present = sorted(str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)
    missing = sorted(set(present) - set(listed))
    assert not missing, f"RaptorExtension/CMakeLists.txt does not install {missing}; add them to RAPTOR_ENGINE_PYTHON_FILES"
    stale = sorted(set(listed) - set(present))
    assert not stale, f"RaptorExtension/CMakeLists.txt lists files that do not exist: {stale}"
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert "ctkMacroCompilePythonScript(" in text and "NO_INSTALL_SUBDIR" in text
    assert "RaptorExtension/${file}" in text, "scripts must keep the RaptorExtension/ package folder"
    assert "requirements.txt" in text
    for folder in ENGINE.rglob("*"):
        if folder.is_dir() and "__pycache__" not in folder.parts:
            assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ENGINE)}/ is not a package (no __init__.py)"


def test_engine_never_imports_gui_toolkits():
    for path in ENGINE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("qt", "ctk", "PythonQt", "PyQt5", "PyQt6", "PySide2", "PySide6"), f"{path.name} imports {name}"
                assert name not in ("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"), f"{path.name} imports {name}"


# ---------------------------------------------------------------------------
# every scripted module


@pytest.fixture(params=[p.name for p in module_dirs()])
def module(request) -> Path:
    return ROOT / request.param


def test_module_cmakelists_lists_every_script_and_resource(module):
    name = module.name
    text = cmake_text(module / "CMakeLists.txt")
    assert re.search(rf"set\(\s*MODULE_NAME\s+{name}\s*\)", text)
    scripts = cmake_set(text, "MODULE_PYTHON_SCRIPTS", {"MODULE_NAME": name})
    resources = cmake_set(text, "MODULE_PYTHON_RESOURCES", {"MODULE_NAME": name})
    assert f"{name}.py" in scripts
    for listed in scripts + resources:
        assert (module / listed).is_file(), f"{name}/CMakeLists.txt lists {listed}, which does not exist"
    on_disk_scripts = sorted(str(p.relative_to(module)) for p in module.rglob("*.py") if "Testing" not in p.parts)
    assert sorted(scripts) == on_disk_scripts, f"{name}: scripts on disk {on_disk_scripts}, listed {sorted(scripts)}"
    on_disk_resources = sorted(
        str(p.relative_to(module)) for p in (module / "Resources").rglob("*")
        if p.is_file() and "Translations" not in p.parts
    )
    assert sorted(resources) == on_disk_resources, f"{name}: resources on disk {on_disk_resources}, listed {sorted(resources)}"
    assert re.search(r"slicerMacroBuildScriptedModule\(.*?WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)
    assert (module / "Resources" / "Icons" / f"{name}.png").is_file()
    assert (module / "Resources" / "UI" / f"{name}.ui").is_file()


def test_module_follows_the_scripted_module_template(module):
    name = module.name
    source = module / f"{name}.py"
    py_compile.compile(str(source), doraise=True)
    tree = ast.parse(source.read_text(encoding="utf-8"))
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    bases = {n: [ast.unparse(b) for b in c.bases] for n, c in classes.items()}
    assert "ScriptedLoadableModule" in bases[name]
    assert "ScriptedLoadableModuleWidget" in bases[f"{name}Widget"] and "VTKObservationMixin" in bases[f"{name}Widget"]
    assert "ScriptedLoadableModuleLogic" in bases[f"{name}Logic"]
    assert "ScriptedLoadableModuleTest" in bases[f"{name}Test"]
    wrapped = [c for c in classes.values() if any(ast.unparse(d) == "parameterNodeWrapper" for d in c.decorator_list)]
    assert wrapped, f"{name}.py has no @parameterNodeWrapper parameter node class"
    test_methods = [f.name for f in classes[f"{name}Test"].body if isinstance(f, ast.FunctionDef)]
    assert "runTest" in test_methods and any(m.startswith("test_") for m in test_methods)
    with open(module / "Resources" / "Icons" / f"{name}.png", "rb") as icon:
        assert icon.read(8) == b"\x89PNG\r\n\x1a\n"


def ui_widgets(ui_path: Path) -> dict[str, ET.Element]:
    root = ET.parse(ui_path).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    return {w.get("name"): w for w in root.iter("widget")}


def test_module_ui_has_every_widget_the_code_uses(module):
    name = module.name
    ui_path = module / "Resources" / "UI" / f"{name}.ui"
    widgets = ui_widgets(ui_path)
    root = ET.parse(ui_path).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget" and root.find("widget").get("name") == name
    code = (module / f"{name}.py").read_text(encoding="utf-8")
    assert f'resourcePath("UI/{name}.ui")' in code.replace("'", '"')
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    created_in_code = set(re.findall(r"self\.ui\.(\w+)\s*=(?!=)", code))
    missing = sorted(used - created_in_code - set(widgets))
    assert not missing, f"{name}.py uses self.ui.{missing} but {ui_path.name} has no such widget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    standard = {w.get("class") for w in widgets.values() if w.get("class", "").startswith("Q")}
    custom = {w.get("class") for w in widgets.values()} - standard
    assert custom <= declared, f"custom widgets not declared in <customwidgets>: {custom - declared}"
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widgets and connection.findtext("receiver") in widgets


# Which widget classes the parameter node wrapper binds to which annotated types
# (Slicer's parameterNodeWrapper/guiConnectors.py): the binding fails at runtime otherwise.
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def parameter_fields(code: str) -> dict[str, tuple[str, bool]]:
    """``{field: (base type, has Choice)}`` of the @parameterNodeWrapper class."""
    tree = ast.parse(code)
    for c in tree.body:
        if isinstance(c, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in c.decorator_list):
            fields = {}
            for stmt in c.body:
                if isinstance(stmt, ast.AnnAssign):
                    annotation = ast.unparse(stmt.annotation)
                    base = re.sub(r"^Annotated\[(\w+).*", r"\1", annotation)
                    base = "node" if base.startswith("vtkMRML") else base
                    fields[stmt.target.id] = (base, "Choice(" in annotation)
            return fields
    raise AssertionError("no @parameterNodeWrapper class")


def test_module_parameters_are_bound_to_matching_widgets(module):
    name = module.name
    code = (module / f"{name}.py").read_text(encoding="utf-8")
    fields = parameter_fields(code)
    widgets = ui_widgets(module / "Resources" / "UI" / f"{name}.ui")
    bound = {}
    for widget in widgets.values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"{name}.ui binds {unknown}, which the parameter node does not have"
    for field, widget_class in bound.items():
        base, has_choice = fields[field]
        assert widget_class in CONNECTABLE.get(base, set()), f"{field}: {base} cannot bind to a {widget_class}"
        if widget_class == "QComboBox" and base != "node":
            assert has_choice, f"{field}: a QComboBox needs a Choice(...) annotation"


def test_raptor_embed_binds_every_parameter():
    code = (ROOT / "RaptorEmbed" / "RaptorEmbed.py").read_text(encoding="utf-8")
    widgets = ui_widgets(ROOT / "RaptorEmbed" / "Resources" / "UI" / "RaptorEmbed.ui")
    bound = {p.findtext("string") for w in widgets.values() for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    assert bound == set(parameter_fields(code))
