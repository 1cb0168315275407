"""The Slicer modules read against what Slicer ships, without Slicer: widget classes, imports, ``slicer.util``.

The modules cannot run here (no Qt application), so these checks read their
files: the ``.ui`` XML and the Python source (ast).  Each guards against a
defect that would only show inside Slicer: a widget class Slicer does not
have, PyTorch imported when the panel is built (before it is installed, and
in a process that must never run the model), a ``slicer.util`` function that
does not exist, a widget the shared Compute section needs missing from a panel.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("RaptorEmbed", "RaptorProbe")

SLICER_WIDGET_CLASSES = {
    # Qt widgets (PythonQt wraps them all)
    "QWidget", "QFrame", "QGroupBox", "QLabel", "QPushButton", "QToolButton", "QRadioButton", "QCheckBox", "QComboBox",
    "QSpinBox", "QDoubleSpinBox", "QSlider", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar", "QListWidget",
    "QTableWidget", "QTreeWidget", "QTabWidget", "QStackedWidget", "QScrollArea", "QSplitter",
    # CTK widgets Slicer ships
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkPathLineEdit", "ctkDirectoryButton", "ctkSliderWidget",
    "ctkRangeWidget", "ctkCheckBox", "ctkComboBox", "ctkMenuButton", "ctkDoubleSpinBox",
    # MRML widgets
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLTableView", "qMRMLPlotView", "qMRMLSubjectHierarchyTreeView",
    "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLCheckableNodeComboBox",
}
HEAVY = ("torch", "transformers", "sklearn", "matplotlib", "onnx")


def ui_root(name: str) -> ET.Element:
    return ET.parse(ROOT / name / "Resources" / "UI" / f"{name}.ui").getroot()


@pytest.mark.parametrize("name", MODULES)
def test_every_widget_class_is_one_slicer_ships(name):
    classes = {w.get("class") for w in ui_root(name).iter("widget")}
    unknown = sorted(classes - SLICER_WIDGET_CLASSES)
    assert not unknown, f"{name}.ui uses widget classes Slicer does not ship: {unknown}"


@pytest.mark.parametrize("name", MODULES)
def test_the_shared_compute_section_finds_its_widgets_in_every_panel(name):
    shared = (ROOT / "RaptorEmbed" / "RaptorEmbedLib" / "ComputeSection.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", shared))
    widgets = {w.get("name") for w in ui_root(name).iter("widget")}
    assert used and not (used - widgets), f"{name}.ui lacks {sorted(used - widgets)} for the Compute section"


def _module_level_imports(path: Path) -> set[str]:
    """Absolute module names imported at module level (not inside functions), resolved for relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path)
    names: set[str] = set()
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, ast.Import):
                names.update(a.name for a in inner.names)
            elif isinstance(inner, ast.ImportFrom):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                if inner.level:
                    base = package.split(".")[: len(package.split(".")) - inner.level + 1]
                    module = ".".join(base + ([inner.module] if inner.module else []))
                else:
                    module = inner.module or ""
                names.add(module)
                names.update(f"{module}.{a.name}" for a in inner.names)
    return names


def _package_of(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])


def _source_of(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] == "RaptorEmbedLib":
        parts = ["RaptorEmbed", *parts]
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("name", MODULES)
def test_building_a_panel_imports_no_heavy_package(name):
    """Everything a module imports when Slicer loads it, followed through the engine, at module level only."""
    seen: set[Path] = set()
    heavy: list[str] = []
    todo = [ROOT / name / f"{name}.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _module_level_imports(path):
            if module.split(".")[0] in HEAVY:
                heavy.append(f"{path.relative_to(ROOT)} imports {module}")
            source = _source_of(module)
            if source is not None:
                todo.append(source)
                parts = module.split(".")
                for i in range(1, len(parts)):  # a package's __init__ runs first
                    parent = _source_of(".".join(parts[:i]))
                    if parent is not None:
                        todo.append(parent)
    assert not heavy, "\n".join(heavy)
    assert any("slicerlogic" in str(p) for p in seen)  # the walk really followed the engine


def _slicer_util_functions() -> set[str]:
    spec = importlib.util.find_spec("slicer.util")
    if spec is None or not spec.origin:
        pytest.skip("slicer-core is not installed (its slicer/util.py is Slicer's own)")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("name", MODULES)
def test_every_slicer_util_function_the_modules_call_exists(name):
    available = _slicer_util_functions()
    files = [ROOT / name / f"{name}.py", *sorted((ROOT / name).rglob("*Lib/*.py"))]
    used = set()
    for path in files:
        used |= set(re.findall(r"slicer\.util\.(\w+)", path.read_text(encoding="utf-8")))
    missing = sorted(used - available)
    assert used and not missing, f"{name} calls slicer.util.{missing}, which Slicer's util.py does not define"


def test_probe_module_loads_after_the_embed_module():
    """Raptor Probe uses Raptor Embed's logic and its shared Compute section."""
    tree = ast.parse((ROOT / "RaptorProbe" / "RaptorProbe.py").read_text(encoding="utf-8"))
    dependencies = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and ast.unparse(n.targets[0]) == "self.parent.dependencies"]
    assert dependencies and ast.literal_eval(dependencies[0].value) == ["RaptorEmbed"]


@pytest.mark.parametrize("name", MODULES)
def test_every_widget_the_panel_uses_is_in_its_ui_and_every_bound_parameter_exists(name):
    """``self.ui.x`` must name a widget of the .ui (else AttributeError in Slicer), and each widget's
    ``SlicerParameterName`` a field of the module's ``@parameterNodeWrapper`` class (else connectGui fails)."""
    source = (ROOT / name / f"{name}.py").read_text(encoding="utf-8")
    widgets = {w.get("name") for w in ui_root(name).iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and not (used - widgets), f"{name}.py uses widgets its .ui lacks: {sorted(used - widgets)}"
    tree = ast.parse(source)
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef)
                   and any(ast.unparse(d) == "parameterNodeWrapper" for d in n.decorator_list))
    fields = {n.target.id: _base_type(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = {p.findtext("string"): w.get("class") for w in ui_root(name).iter("widget") for p in w.findall("property")
             if p.get("name") == "SlicerParameterName"}
    assert bound and not (set(bound) - set(fields)), f"{name}.ui binds parameters the node lacks: {sorted(set(bound) - set(fields))}"
    # The connector Slicer's parameterNodeWrapper picks for a widget class must take the parameter's type.
    wrong = {param: (widget, fields[param]) for param, widget in bound.items()
             if not any(fields[param] == t or (t == "vtkMRML" and fields[param].startswith("vtkMRML"))
                        for t in CONNECTOR_TYPES.get(widget, ()))}
    assert not wrong, f"{name}.ui binds widgets to parameters of a type their connector does not take: {wrong}"


CONNECTOR_TYPES = {
    # widget class -> parameter types its guiConnectors.py connector takes (Slicer 5.10)
    "QLineEdit": ("str",), "QComboBox": ("str", "int", "float"), "ctkComboBox": ("str", "int", "float"),
    "QSpinBox": ("int",), "QDoubleSpinBox": ("float",), "ctkDoubleSpinBox": ("float",),
    "ctkSliderWidget": ("float",), "qMRMLSliderWidget": ("float",), "QSlider": ("int",),
    "QCheckBox": ("bool",), "ctkCheckBox": ("bool",), "QRadioButton": ("bool",), "QPushButton": ("bool",),
    "ctkPathLineEdit": ("Path",), "ctkDirectoryButton": ("Path",),
    "qMRMLNodeComboBox": ("vtkMRML",), "QLabel": ("str", "int", "float"),
}


def _base_type(annotation: ast.expr) -> str:
    """``Annotated[int, WithinRange(...)]`` -> ``int``; ``vtkMRMLScalarVolumeNode`` as is."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
        inner = annotation.slice.elts[0] if isinstance(annotation.slice, ast.Tuple) else annotation.slice
        return ast.unparse(inner)
    return ast.unparse(annotation)
