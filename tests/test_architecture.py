"""The package's rooms keep their rules (docs/architecture.md): core imports only core, models
import core and models, a stage never imports another stage, and no module shadows the standard
library (running a file inside the package must not break `import tokenize` and the like)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medmax_pipeline"


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    found += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return [m.removeprefix("medmax_pipeline.") for m in found if m.startswith("medmax_pipeline.")]


def test_rooms_import_only_what_they_may() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        for module in imports_of(path):
            target = module.split(".")
            if parts[0] == "core" and target[0] != "core":
                problems.append(f"{path.relative_to(PACKAGE)} (core) imports {module}")
            if parts[0] == "models" and target[0] not in ("core", "models"):
                problems.append(f"{path.relative_to(PACKAGE)} (models) imports {module}")
            if parts[0] == "stages" and len(parts) > 1 and target[0] == "stages" and target[1] != parts[1]:
                problems.append(f"{path.relative_to(PACKAGE)} (stage {parts[1]}) imports another stage: {module}")
    assert problems == []


def test_no_module_or_folder_is_named_like_a_standard_library_module() -> None:
    names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.rglob("*") if p.is_dir()}
    assert sorted(n for n in names if n in sys.stdlib_module_names and n != "__init__") == []


def test_every_subcommand_module_exists_and_has_its_entry_points() -> None:
    import importlib

    from medmax_pipeline.cli import SUBCOMMANDS

    for name, (module_name, _) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        suffix = name.replace("-", "_")
        assert hasattr(module, f"run_{suffix}") or hasattr(module, "run"), name
        assert hasattr(module, f"add_{suffix}_arguments") or hasattr(module, "add_arguments"), name
