"""A rule's code identity is the import closure of what it runs, read as syntax (issue 21 item 2):
another stage, the command line, plots, the report, comments, docstrings and log lines change
nothing; a change to code that computes changes the identity of exactly the rules that run it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medmax_pipeline.core.code_identity import (
    PACKAGE_DIR,
    code_identity,
    import_closure,
    imported_modules,
    normalized_source,
    stage_modules,
)

RULE_ENTRIES = {
    "collect": ["stages/collect.py"],
    "tokenize_shard": ["stages/tokenize_images.py"],
    "assemble": ["stages/assemble"],
    "train": ["stages/train"],
    "generate": ["stages/evaluate/generate.py"],
    "score": ["stages/evaluate/score.py"],
    "report_figures": ["stages/evaluate/report.py"],
}


def identities(package_dir: Path) -> dict[str, str]:
    return {
        rule: code_identity([m for part in parts for m in stage_modules(part, package_dir)], package_dir)
        for rule, parts in RULE_ENTRIES.items()
    }


@pytest.fixture()
def package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "medmax_pipeline"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found (the test's edit point moved)"
    path.write_text(text.replace(old, new, 1))


def test_relative_and_lazy_imports_are_part_of_the_closure() -> None:
    train = import_closure(stage_modules("stages/train"))
    assert "medmax_pipeline.stages.train.recipe" in train  # `from .recipe import ...` in __init__
    assert "medmax_pipeline.models.chameleon" in train  # imported inside a function
    assert "medmax_pipeline.core.artifacts" in train
    assert "medmax_pipeline.stages.train" in train and "medmax_pipeline" in train  # enclosing packages run too
    recipe = PACKAGE_DIR / "stages/train/recipe.py"
    assert all(m.startswith("medmax_pipeline.") for m in imported_modules(recipe))


def test_a_closure_leaves_out_other_stages_and_bookkeeping() -> None:
    collect = import_closure(stage_modules("stages/collect.py"))
    assert not any(m.startswith("medmax_pipeline.stages.") and m != "medmax_pipeline.stages.collect" for m in collect if m.count(".") >= 2)
    train = import_closure(stage_modules("stages/train"))
    for bookkeeping in ("medmax_pipeline.cli", "medmax_pipeline.core.plots", "medmax_pipeline.core.inspection"):
        assert bookkeeping not in train and bookkeeping not in collect
    generate = import_closure(stage_modules("stages/evaluate/generate.py"))
    assert "medmax_pipeline.stages.evaluate.report" not in generate
    # ... but a bookkeeping module that is the rule's own entry counts
    assert "medmax_pipeline.stages.evaluate.report" in import_closure(stage_modules("stages/evaluate/report.py"))


def test_comments_docstrings_and_log_lines_change_no_identity(package_copy: Path) -> None:
    before = identities(package_copy)
    recipe = package_copy / "stages/train/recipe.py"
    recipe.write_text("# a new comment at the top\n" + recipe.read_text())
    edit(recipe, '"""', '"""Edited docstring. ')
    edit(recipe, "reporter.update(1, stats.tokens", "reporter.update(1, stats.tokens + 0")
    edit(package_copy / "core/plots.py", "import math", "import math  # edited")
    (package_copy / "core/plots.py").write_text((package_copy / "core/plots.py").read_text() + "\nX_PLOT_EDIT = 1\n")
    (package_copy / "cli.py").write_text((package_copy / "cli.py").read_text().replace("stage 2: VQGAN-tokenize one shard of images", "tokenize a shard"))
    (package_copy / "stages/evaluate/report.py").write_text((package_copy / "stages/evaluate/report.py").read_text() + "\nX_REPORT_EDIT = 1\n")
    after = identities(package_copy)
    assert {rule: after[rule] for rule in after if rule != "report_figures"} == {rule: before[rule] for rule in before if rule != "report_figures"}
    assert after["report_figures"] != before["report_figures"]  # its own code changed


def test_a_change_that_computes_reruns_exactly_the_rules_that_run_it(package_copy: Path) -> None:
    before = identities(package_copy)
    (package_copy / "stages/tokenize_images.py").write_text((package_copy / "stages/tokenize_images.py").read_text() + "\nX_TOKENIZE_EDIT = 1\n")
    after = identities(package_copy)
    assert {rule for rule in before if before[rule] != after[rule]} == {"tokenize_shard"}
    (package_copy / "core/sequences.py").write_text((package_copy / "core/sequences.py").read_text() + "\nX_SHARED_EDIT = 1\n")
    now = identities(package_copy)
    changed = {rule for rule in after if now[rule] != after[rule]}
    readers = {
        rule for rule, parts in RULE_ENTRIES.items()
        if "medmax_pipeline.core.sequences" in import_closure([m for p in parts for m in stage_modules(p, package_copy)], package_copy)
    }
    assert changed == readers and "assemble" in changed and "collect" not in changed


def test_normalized_source_keeps_what_computes(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('"""doc"""\ndef f(x):\n    """doc"""\n    print("step", x)\n    return x + 1\n')
    base = normalized_source(module)
    module.write_text('"""other doc"""\n# comment\ndef f(x):\n    print("other log line")\n    return x + 1\n')
    assert normalized_source(module) == base
    module.write_text('def f(x):\n    return x + 2\n')
    assert normalized_source(module) != base
    module.write_text('def f(x):\n    out.write(x)\n    return x + 1\n')  # a write is not a log line
    assert normalized_source(module) != base


def test_an_unknown_part_is_refused() -> None:
    with pytest.raises(FileNotFoundError, match="no such part"):
        stage_modules("stages/no_such_stage.py")
