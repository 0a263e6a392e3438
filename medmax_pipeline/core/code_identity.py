"""The identity of the code a rule runs: the import closure of its entry modules inside the package.

A rule's `code` param (workflow/rules/common.smk) and training's run id hash this, so that a change
to the code that computes an artifact reruns it, and nothing else does:
- only modules reached by imports from the rule's own entry (its stage module or package) count,
  so editing another stage, or a help string in cli.py, reruns nothing of this rule;
- bookkeeping modules (the command line, plots, the report, artifact inspection) are left out of
  every closure but their own, so editing the loss plot does not restart training;
- each module counts by its syntax tree without docstrings, and without statements that only
  report (`print(...)`, `reporter.step(...)`, `log(...)`): comments, docstrings, formatting and
  log lines change no identity.
The closure is found statically (every `import` and `from ... import`, lazy ones inside functions
included, absolute and relative), so it needs no import of torch or the stage itself.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable, Sequence

PACKAGE = "medmax_pipeline"
PACKAGE_DIR = Path(__file__).resolve().parents[1]

# Code that shapes logs, figures and the command line, never the numbers of an artifact.
BOOKKEEPING_MODULES = frozenset({
    f"{PACKAGE}.__main__",
    f"{PACKAGE}.cli",
    f"{PACKAGE}.core.plots",
    f"{PACKAGE}.core.inspection",
    f"{PACKAGE}.core.progress",
    f"{PACKAGE}.stages.evaluate.report",
})
# Expression statements calling these only report: `print(...)`, `log(...)`, `warnings.warn(...)`.
REPORTING_FUNCTIONS = frozenset({"print", "log", "warn"})
# ... or a method of these objects: `reporter.step(...)`, `progress.update(...)`, `logger.info(...)`.
REPORTING_OBJECTS = frozenset({"reporter", "progress", "logger", "warnings"})


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of a dotted module name inside the package, or None (outside, or absent)."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    if module == PACKAGE:
        return package_dir / "__init__.py"
    rel = Path(*module.split(".")[1:])
    for candidate in (package_dir / rel.with_suffix(".py"), package_dir / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = path.relative_to(package_dir).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def imported_modules(path: Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Every package module PATH imports (anywhere in the file), as dotted names. `from X import Y`
    yields X and, where Y is a submodule, X.Y as well; relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = module_name(path, package_dir)
    this_package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = this_package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if module_file(m, package_dir) is not None}


def _parent_packages(module: str) -> list[str]:
    """medmax_pipeline.stages.train.recipe -> [medmax_pipeline, medmax_pipeline.stages, medmax_pipeline.stages.train]:
    importing a module runs each enclosing package's __init__ first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_closure(entries: Iterable[str], package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The package modules ENTRIES run: themselves, what they import, transitively, and the packages
    enclosing each; bookkeeping modules only where they are an entry. Sorted dotted names."""
    entries = list(entries)
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen or (module in BOOKKEEPING_MODULES and module not in entries):
            continue
        path = module_file(module, package_dir)
        if path is None:
            raise FileNotFoundError(f"{module}: no such module in {package_dir}")
        seen.add(module)
        todo.extend(imported_modules(path, package_dir))
        todo.extend(_parent_packages(module))
    return sorted(seen)


class _StripReporting(ast.NodeTransformer):
    """Drops docstrings and statements that only report, keeping every block non-empty."""

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        kept = [s for i, s in enumerate(body) if not (_is_docstring(s) and i == 0) and not _only_reports(s)]
        return kept or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, field, self._body(value))
        return node


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)


def _only_reports(statement: ast.stmt) -> bool:
    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
        return False
    func = statement.value.func
    if isinstance(func, ast.Name):
        return func.id in REPORTING_FUNCTIONS
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in REPORTING_OBJECTS


def normalized_source(path: Path) -> str:
    """PATH's syntax tree without docstrings, comments, layout or reporting statements."""
    tree = _StripReporting().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def code_identity(entries: Sequence[str], package_dir: Path = PACKAGE_DIR) -> str:
    """A short hash of what ENTRIES (dotted module names) compute: the normalized source of every
    module of their import closure, with its name."""
    digest = hashlib.blake2b(digest_size=8)
    for module in import_closure(entries, package_dir):
        path = module_file(module, package_dir)
        assert path is not None
        digest.update(module.encode() + b"\0" + normalized_source(path).encode() + b"\0")
    return digest.hexdigest()


def stage_modules(stage_part: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The dotted entry modules of a path under the package ("stages/collect.py", or a package
    folder such as "stages/train", which stands for all its modules)."""
    path = package_dir / stage_part
    if path.is_dir():
        return sorted(module_name(p, package_dir) for p in path.rglob("*.py"))
    if path.is_file():
        return [module_name(path, package_dir)]
    raise FileNotFoundError(f"{path}: no such part of the package")
