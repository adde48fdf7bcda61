"""The project's files import one way, down: a learner reading data.py never meets the inference script, and no
file stands on one above it. Read from the files' own import statements (those inside functions too)."""

import ast
import re
from pathlib import Path

from conftest import REPO

# Lowest first. A file may import only files of lower layers: data -> model -> train, with export and inference
# beside training (below serve and tune), distillation (which runs a teacher through inference) just under train.
LAYERS = [
    {"hub", "checkpoints", "metrics"},
    {"readers", "samplers", "optimizer"},
    {"data"},
    {"model"},
    {"callbacks", "export"},
    {"inference"},
    {"distill"},
    {"train"},
    {"serve", "tune"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def project_imports(path: Path) -> set[str]:
    """The project's own modules that path imports, anywhere in it."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported & set(LAYER)


def import_graph() -> dict[str, set[str]]:
    return {path.stem: project_imports(path) for path in sorted(REPO.glob("*.py"))}


def test_every_file_of_the_project_has_a_layer():
    assert set(import_graph()) == set(LAYER), "a new file: give it its place in LAYERS"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} imports {other}" for name, imports in graph.items() for other in sorted(imports) if LAYER[other] >= LAYER[name]]


def a_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of graph, as a path that ends where it starts; [] if there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return []
        for other in sorted(graph.get(name, ())):
            if cycle := visit(other, path + [name]):
                return cycle
        done.add(name)
        return []

    return next((cycle for name in sorted(graph) if (cycle := visit(name, []))), [])


def test_imports_run_only_downwards():
    assert upward_imports(import_graph()) == []


def test_the_graph_has_no_cycle():
    assert a_cycle(import_graph()) == []


def test_the_checks_find_an_upward_import_and_a_cycle(tmp_path):
    # data.py importing inference inside a function, as it did until 2026-12-07, and the circle that made.
    (tmp_path / "data.py").write_text("import os\n\ndef f():\n    from inference import Predictor\n")
    graph = {**import_graph(), "data": project_imports(tmp_path / "data.py")}
    assert upward_imports(graph) == ["data imports inference"]
    assert a_cycle(graph) == ["data", "inference", "data"]


def test_the_lesson_files_are_short_and_the_readme_says_how_long():
    """Issue 45: data.py, model.py and train.py under 400 lines each, every method of the two Lightning classes under
    60; and the README's "How it fits together" gives their lengths (to within 10 lines) as they are."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in ("data.py", "model.py", "train.py", "inference.py"):
        lines = len((REPO / name).read_text(encoding="utf-8").splitlines())
        said = int(re.search(rf"^\| `{re.escape(name)}` \| (\d+) \|", readme, re.M).group(1))
        assert abs(said - lines) <= 10, f"README says {name} has {said} lines; it has {lines}"
        assert name == "inference.py" or lines < 400
    for name, cls in (("data.py", "TextDataModule"), ("model.py", "TextClassifier")):
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
        [class_def] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls]
        long = [(f.name, f.end_lineno - f.lineno + 1) for f in class_def.body
                if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 >= 60]
        assert long == [], f"{cls}: methods of 60 lines or more"
