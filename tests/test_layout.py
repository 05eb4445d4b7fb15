"""The package tree is the architecture: imports only point down the layers of docs/design.md
(read from the source, so a new upward import fails here, not in a review)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cifar10_resnet50"

# Lower number = lower layer. A module may import its own layer or any lower one.
LAYERS = {
    "errors": 0,
    "config": 0,
    "rules": 0,
    "declare": 0,
    "options": 0,
    "meta": 0,
    "fileio": 0,
    "runtime": 0,
    "images": 0,
    "decode_pool": 0,
    "model": 1,
    "checkpoint": 1,
    "data": 2,
    "serving": 3,
    "evaluation": 4,
    "training": 5,
    "api": 6,
    "cli": 7,
    "commands": 7,
    "__main__": 8,
    "__init__": 0,
}


def _top(module: str) -> str:
    """cifar10_resnet50.training.train → training"""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    is_module = (SRC / top).is_dir() or (SRC / f"{top}.py").is_file()
    return top if is_module else "__init__"  # a name from the package root (__version__)


def _imports(path: Path) -> set[str]:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1]  # a module's package; for __init__ the package itself
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.add(mod)
            else:
                found.update(f"{mod}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "cifar10_resnet50"
        ):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cifar10_resnet50"))
    return found


def test_imports_only_point_down_the_layers():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        me = _top(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        for target in _imports(path):
            them = _top(target)
            if them == me:
                continue
            if LAYERS[them] > LAYERS[me]:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
    assert not wrong, wrong


def test_every_module_belongs_to_a_layer():
    tops = {
        _top(".".join(p.relative_to(SRC.parent).with_suffix("").parts)) for p in SRC.rglob("*.py")
    }
    assert tops <= set(LAYERS), tops - set(LAYERS)


# Inside training/: the same rule, one level down. The command (train) sits on the loop, the
# planner, the probe and lr-find; those on the run (trainer) and its core; the core on none.
TRAINING_LAYERS = {
    "__init__": 0,
    "budget": 0,
    "callbacks": 0,
    "compile_policy": 0,
    "metrics": 0,
    "ema": 0,
    "core": 1,
    "board": 1,
    "trackers": 1,
    "trainer": 2,
    "planning": 3,
    "probe": 3,
    "lr_find": 3,
    "loop": 4,
    "learner": 5,
    "train": 6,
}


def test_training_modules_import_only_down_their_layers():
    folder = SRC / "training"
    assert {p.stem for p in folder.glob("*.py")} == set(TRAINING_LAYERS)
    wrong = []
    for path in sorted(folder.glob("*.py")):
        for target in _imports(path):
            parts = target.split(".")
            if parts[:2] != ["cifar10_resnet50", "training"] or len(parts) < 3:
                continue
            if TRAINING_LAYERS[parts[2]] > TRAINING_LAYERS[path.stem]:
                wrong.append(f"training/{path.name} imports {target}")
    assert not wrong, wrong


def test_training_modules_stay_short():
    """~500 lines a module, ~60 a function: the loop reads in one sitting."""
    long_files, long_functions = [], []
    for path in sorted((SRC / "training").glob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_no_test_patches_a_private_function_of_the_package():
    """Tests inject faults and record steps through the loop's callbacks, not by replacing a
    module's private functions (which ties them to the code's current shape)."""
    import re

    patch = re.compile(r"setattr\(\s*\w+\s*,\s*[\"']_\w+|^\s*\w+\._\w+\s*=[^=]", re.M)
    found = [
        f"{p.name}: {m.group(0).strip()}"
        for p in sorted(SRC.parents[1].joinpath("tests").glob("*.py"))
        for m in patch.finditer(p.read_text())
    ]
    assert not found, found
