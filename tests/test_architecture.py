"""The package's rooms keep their rules (docs/architecture.md): core imports only core, models
import core and models, a stage never imports another stage, and no module shadows the standard
library (running a file inside the package must not break `import tokenize` and the like)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from medmax_pipeline.core.code_identity import imported_modules

PACKAGE = Path(__file__).resolve().parents[1] / "medmax_pipeline"


def imports_of(path: Path, package: Path = PACKAGE) -> list[str]:
    """The package modules PATH imports, absolute (`medmax_pipeline.core.rows`) and relative
    (`from .recipe import ...`) alike, without the package prefix."""
    return sorted(m.removeprefix("medmax_pipeline.") for m in imported_modules(path, package) if m != "medmax_pipeline")


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


def test_the_demos_models_stay_out_of_the_pipeline() -> None:
    """The demo's and tests' random model factories live in demo_models.py, which core, models and
    the stages never import (issue 21 item 4)."""
    import medmax_pipeline.models.chameleon as chameleon
    import medmax_pipeline.models.clip as clip
    import medmax_pipeline.models.vqgan as vqgan

    importers = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
                 if path.relative_to(PACKAGE).parts[0] in ("core", "models", "stages") and "demo_models" in imports_of(path)]
    assert importers == []
    factories = {"build_tiny_chameleon": chameleon, "tiny_vq_config": chameleon, "make_random_vqgan": vqgan,
                 "random_vqgan": vqgan, "make_random_biomedclip": clip}
    assert sorted(name for name, module in factories.items() if hasattr(module, name)) == []


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


def test_relative_imports_are_checked_too(tmp_path: Path) -> None:
    """A stage module reaching another stage through a relative import is seen (issue 21 item 6)."""
    package = tmp_path / "medmax_pipeline"
    (package / "stages" / "train").mkdir(parents=True)
    (package / "stages" / "assemble").mkdir(parents=True)
    for rel in ("__init__.py", "stages/__init__.py", "stages/train/__init__.py", "stages/assemble/__init__.py", "stages/assemble/stage.py"):
        (package / rel).write_text("")
    (package / "stages/train/recipe.py").write_text("from ..assemble import stage\nfrom . import data\n")
    (package / "stages/train/data.py").write_text("")
    assert imports_of(package / "stages/train/recipe.py", package) == ["stages.assemble", "stages.assemble.stage", "stages.train", "stages.train.data"]


def test_cli_owns_the_error_boundary() -> None:
    """Issue 21 item 5: a stage raises; cli.main prints the one `error:` line (on stderr) and sets
    the exit code. No stage, model or the demo prints an `error:` line of its own."""
    printers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ("cli.py", "core/termination.py", "core/inspection.py"):
            continue  # the boundary itself, its signal line, and inspect's per-file lines
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" and node.args:
                first = node.args[0]
                text = first.value if isinstance(first, ast.Constant) else (
                    first.values[0].value if isinstance(first, ast.JoinedStr) and first.values and isinstance(first.values[0], ast.Constant) else "")
                if isinstance(text, str) and "error:" in text:
                    printers.append(f"{rel}:{node.lineno}")
    assert printers == []


def test_planning_imports_no_torch_and_the_lazy_train_names_resolve() -> None:
    """Snakemake parses the rule files at every planning, in every cluster job too: the package
    modules they import must not import torch (seconds per parse). stages/train re-exports its
    torch-using names lazily from a hand-written table: each must exist where the table says."""
    import re
    import subprocess

    rule_files = [PACKAGE.parent / "Snakefile", *sorted((PACKAGE.parent / "workflow" / "rules").glob("*.smk"))]
    modules = sorted({m for path in rule_files for m in re.findall(r"^\s*from (medmax_pipeline[\w.]*) import", path.read_text(), re.M)})
    assert "medmax_pipeline.stages.train.config" in modules and len(modules) >= 10
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint(sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

    import importlib

    import medmax_pipeline.stages.train as train

    for name, module in train._LAZY.items():
        assert hasattr(importlib.import_module(f"medmax_pipeline.stages.train.{module}"), name), (name, module)
        assert getattr(train, name) is getattr(importlib.import_module(f"medmax_pipeline.stages.train.{module}"), name)
