"""Stage 6: generation on the evaluation suite, scoring with each named rule set, and the report."""
