"""Stage 4: credential-aware dataset assembly, one job per split.

Input: one MedMax row file (train.jsonl / validation.jsonl), the image blocks of stage 3, the
problems of stages 1 and 2, and the modified text tokenizer. Output, in --output-dir:

    dataset.parquet          (artifact dataset) every row that could be filled, in file order:
                             ROW_SCHEMA columns + n_tokens int32 + truncated bool. Credentialed
                             as soon as one credential = yes row is in it: stays on this machine.
    dataset_public.parquet   (artifact dataset_public, written as public) the credential = no rows
                             of dataset.parquet, identical to them. Its lineage names the row file
                             only: public rows keep their published tokens and need nothing else,
                             so no credentialed input can reach it, and the writer's guard holds.
    dataset_problems.parquet (artifact dataset_problems) every input row that is not in dataset:
                             file, line, row_id, source, task, credential, category, reason.
    coverage.parquet         (artifact coverage) per split, source, task, credential: rows
                             expected / filled / missing and the missing rows by category.
    coverage_summary.txt     the same, as printed at the end.

Sequences. Public rows (credential = no) keep their published tokens after check_published_tokens.
Credentialed rows get [0] + BPE(text) + [2], each <image> (8711) replaced by the 1026-id block of
the row's image (image_key_for_row -> image_blocks.block).

Truncation (--max-length, --overflow truncate): keep the first max_length ids, but never cut
inside an image block: when the cut falls inside one, cut just before its begin id 8197, so the
sequence may end up shorter than max_length. No eos is appended after a cut (the public release
truncated the same way; an eos there would teach the model to stop mid-answer). A published
sequence that the publisher already truncated (no eos, exactly --published-max-length ids) is
accepted; a partial image block at its end is cut off the same way. `truncated` is true for both.
--overflow drop instead moves rows longer than max_length to dataset_problems.

Failing: malformed input (unreadable lines, <image> / image mismatches, invalid published tokens)
is reported per row and the rest processed; past --max-error-fraction of the input rows the stage
exits non-zero and writes none of its outputs (older outputs in the folder are removed, so that
nothing stale looks complete).

The package: sequence_logic.py (pure, vectorised checks and truncation of token lists),
coverage.py (categories of a missing row and the coverage counts), image_lookup.py (the image
blocks credentialed rows are filled from) and stage.py (one batch, the run over a row file, the
command line). Reading the row file with worker processes is core/parallel_rows.py.
"""

from medmax_pipeline.stages.assemble.coverage import CATEGORIES, ERROR_CATEGORIES, COVERAGE_SCHEMA, Coverage, coverage_summary
from medmax_pipeline.stages.assemble.image_lookup import ImageLookup, load_image_lookup
from medmax_pipeline.stages.assemble.sequence_logic import (
    PUBLISHED_MAX_LENGTH,
    check_published_tokens,
    select_lists,
    take_prefixes,
    truncation_lengths,
)
from medmax_pipeline.stages.assemble.stage import (
    DATASET_SCHEMA,
    OUTPUT_FILES,
    PROBLEM_SCHEMA,
    AssemblyError,
    BatchResult,
    Settings,
    add_arguments,
    assemble,
    assemble_batch,
    parse_credentialed,
    run,
)

__all__ = [
    "CATEGORIES",
    "COVERAGE_SCHEMA",
    "DATASET_SCHEMA",
    "ERROR_CATEGORIES",
    "OUTPUT_FILES",
    "PROBLEM_SCHEMA",
    "PUBLISHED_MAX_LENGTH",
    "AssemblyError",
    "BatchResult",
    "Coverage",
    "ImageLookup",
    "Settings",
    "add_arguments",
    "assemble",
    "assemble_batch",
    "check_published_tokens",
    "coverage_summary",
    "load_image_lookup",
    "parse_credentialed",
    "run",
    "select_lists",
    "take_prefixes",
    "truncation_lengths",
]
