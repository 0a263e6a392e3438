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
    separator_stats.parquet  (artifact separator_stats) per split, task, source, credential: rows
                             with 0, 1, 2+ separators 8710 and rows whose final eos the
                             first_separator / alternating loss masks would mask (separator_stats.py).
    published_token_check.parquet (artifact published_token_check) per public image: its rows'
                             first published block against the block re-derived from the image
                             (published_check.py). Empty when no public block was re-derived
                             (collect without images.include_public); the summary says so.
    coverage_summary.txt     the coverage, as printed at the end, and a line on the published check.

Label-only trust: a credential = no row whose published tokens hold a complete image block equal
(all 1024 codes) to the block of a credentialed image of image_blocks is refused, category
credentialed_image_in_public_row (counted as an error toward --max-error-fraction). It is left out
of dataset too, so that dataset_public stays exactly the credential = no rows of dataset, and
every input row is in dataset or in dataset_problems. The decision reads credentialed blocks but
only removes rows: no credentialed value enters dataset_public, whose lineage stays the row file.
The same for text (copied_text.py): a credential = no row whose normalised response equals a
credential = yes row's of the same file is refused, category credentialed_text_in_public_row
(responses of 64+ normalised characters only; not counted toward --max-error-fraction).

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
is reported per row and the rest processed; past --max-error-fraction of the input rows, or past
--max-published-mismatch-fraction of the compared public images, the stage exits non-zero and
writes none of its outputs. On any failure (those, a writer or an input's lineage failing, ...)
older outputs in the folder are removed too, so that nothing stale looks complete, and so are the
writers' temporary files and the shared-memory folders of the worker processes: a retry starts clean.

The package: sequence_logic.py (pure, vectorised checks and truncation of token lists),
copied_text.py (public rows holding a credentialed row's response), coverage.py (categories of a
missing row and the coverage counts), image_lookup.py (the image blocks credentialed rows are
filled from, and the re-derived public blocks), separator_stats.py, published_check.py and
stage.py: one batch (assemble_batch: public rows checked, credentialed rows built, length limit),
the run over a row file (assemble: plan, execute, finalize, its seven outputs staged in one
core/artifacts.ArtifactGroup that publishes all or none and, on failure, removes the older ones)
and the command line. Reading the row file with worker processes is core/parallel_rows.py.
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
