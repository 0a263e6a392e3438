"""One source for every stage setting other than train's and assemble's (issue 21 item 1): each
stage's settings dataclass (core/settings.py Settings) gives its command line and its rule's
options, and the config schema agrees with it; scoring_rules.RULE_SETS is the one list of rule sets."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from medmax_pipeline.stages.evaluate.scoring_rules import RULE_SETS

REPO = Path(__file__).resolve().parent.parent
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]


def test_the_rule_sets_are_written_once() -> None:
    rules = SCHEMA["evaluate"]["properties"]["rules"]
    assert rules["items"]["enum"] == list(RULE_SETS)
    assert rules["default"] == list(RULE_SETS)
    # evaluate.smk's `rules` wildcard constraint is built from RULE_SETS, not written out.
    smk = (REPO / "workflow/rules/evaluate.smk").read_text()
    assert 'rules="|".join(RULE_SETS)' in smk and re.search(r'rules\s*=\s*"\w', smk) is None
