# Stage 4: public rows (published tokens, checked) + credentialed rows filled in locally.
# dataset.parquet stays on this machine; dataset_public.parquet is the shareable export.

from medmax_pipeline.stages.assemble.stage import workflow_arguments as assemble_workflow_arguments


rule assemble:
    input:
        rows=lambda wildcards: config["dataset"][wildcards.split],
        blocks=results("vocab", "image_blocks.parquet"),
        path_problems=results("collect", "image_path_problems.parquet"),
        token_errors=results("tokenize", "image_token_errors.parquet"),
        checkpoint=config["checkpoint"],
        manifests=folder_manifest("checkpoint", config["checkpoint"]),
        mappings=[e["mapping"] for e in CREDENTIALED if e.get("mapping") is not None],
    output:
        dataset=results("assemble", "{split}", "dataset.parquet"),
        public=results("assemble", "{split}", "dataset_public.parquet"),
        problems=results("assemble", "{split}", "dataset_problems.parquet"),
        # Not in the report: a credentialed run's coverage is credentialed; the report shows coverage.html.
        coverage=results("assemble", "{split}", "coverage.parquet"),
        separator_stats=results("assemble", "{split}", "separator_stats.parquet"),
        published_check=results("assemble", "{split}", "published_token_check.parquet"),
        summary=results("assemble", "{split}", "coverage_summary.txt"),
    params:
        code=code_version("stages/assemble"),
        medmax=MEDMAX,
        tokenizer=TOKENIZER,
        credentialed=credentialed_args(),
        # The assemble: keys that are assemble settings (stages/assemble/stage.py: AssembleConfig's Settings).
        options=shlex.join(assemble_workflow_arguments(config["assemble"])),
        output_dir=lambda wildcards, output: Path(output.dataset).parent,
    wildcard_constraints:
        split="train|validation",
    threads: 2
    resources:
        mem_mb=config["assemble"]["mem_mb"],
    log:
        log_path("assemble/{split}"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} assemble --rows {input.rows:q} --split {wildcards.split} --image-blocks {input.blocks:q}"
        " --path-problems {input.path_problems:q} --token-errors {input.token_errors:q}"
        " --tokenizer {params.tokenizer:q} {params.credentialed} {params.options}"
        " --output-dir {params.output_dir:q} >> {log:q} 2>&1"
