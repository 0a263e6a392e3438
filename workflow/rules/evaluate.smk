# Stage 6: generate on the evaluation suite with the base and the trained model; per model, decode
# generated images + CLIP similarities (clip_scores) and LLM judge replies (judge, when configured);
# then score with each named rule set (cheap: it reads those per-model artifacts) and draw the
# figures of the Snakemake report.
import os

from medmax_pipeline.stages.evaluate.clip_scores import workflow_arguments as clip_scores_workflow_arguments
from medmax_pipeline.stages.evaluate.generate import workflow_arguments as generate_workflow_arguments
from medmax_pipeline.stages.evaluate.judge_replies import judge_command_options
from medmax_pipeline.stages.evaluate.report import scrub_reports_of
from medmax_pipeline.stages.evaluate.score import workflow_arguments as score_workflow_arguments
from medmax_pipeline.stages.evaluate.scoring_rules import RULE_SETS

EVAL = config["evaluate"]


# --credentialed-root ROOT for each credentialed image root, single-quoted: an eval image under one
# makes the predictions, clip scores, PNGs and scores credentialed. Given to params as a function, so
# Snakemake does not format the quoted paths (a brace in a folder name is no wildcard).
CREDENTIALED_ROOT_OPTIONS = " ".join(f"--credentialed-root {single_quoted(root)}" for root in credentialed_roots())


# With evaluate.judge set, check the key and the endpoint before any job runs: one clear line
# instead of a failure after hours of generation. onstart does not run for dry runs (-n); set
# MEDMAX_SKIP_JUDGE_CHECK=1 to skip it otherwise (e.g. offline reruns whose judge replies exist).
onstart:
    if EVAL["judge"] and not os.environ.get("MEDMAX_SKIP_JUDGE_CHECK"):
        from medmax_pipeline.stages.evaluate.judge import JudgeError, check_endpoint, judge_config_from_mapping

        try:
            check_endpoint(judge_config_from_mapping(dict(EVAL["judge"]), "config evaluate.judge"))
        except JudgeError as exc:
            raise WorkflowError(f"evaluate.judge: {exc}") from None


rule generate:
    input:
        eval_set=EVAL["eval_set"],
        image_root=EVAL["image_root"],
        checkpoint=config["checkpoint"],
        base_model=base_model_path(),
        adapter=lambda wildcards: results("train", "adapter") if wildcards.model == "trained" else [],
        manifests=[*folder_manifest("checkpoint", config["checkpoint"]), *folder_manifest("base_model", config["base_model"]),
                   *folder_manifest("eval_images", EVAL["image_root"])],
    output:
        predictions=results("evaluate", "predictions_{model}.parquet"),
    params:
        code=code_version("stages/evaluate/generate.py"),
        medmax=MEDMAX,
        adapter=lambda wildcards, input: f"--adapter {shlex.quote(input.adapter)}" if wildcards.model == "trained" else "",
        # Every evaluate: key that is a generate setting becomes its option, from the one definition
        # of the settings (stages/evaluate/generate.py: GenerateConfig's Settings).
        options=shlex.join(generate_workflow_arguments(EVAL)),
        credentialed_roots=lambda wildcards: CREDENTIALED_ROOT_OPTIONS,
    wildcard_constraints:
        model="base|trained",
    threads: 2
    resources:
        gpu=1 if EVAL["device"] == "cuda" else 0,
    log:
        log_path("generate/{model}"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} generate --eval-set {input.eval_set:q} --image-root {input.image_root:q}"
        " --ckpt {input.checkpoint:q} --base-model {input.base_model:q} {params.adapter}"
        " --model-name {wildcards.model} --output {output.predictions:q} {params.options}"
        " {params.credentialed_roots} >> {log:q} 2>&1"


rule clip_scores:
    input:
        predictions=results("evaluate", "predictions_{model}.parquet"),
        checkpoint=config["checkpoint"],
        image_root=EVAL["image_root"],
        clip=EVAL["clip"] or [],
        clip_text_tower=EVAL["clip_text_tower"] or [],
        manifests=[
            *folder_manifest("checkpoint", config["checkpoint"]),
            *folder_manifest("eval_images", EVAL["image_root"]),
            *folder_manifest("clip", EVAL["clip"]),
            *folder_manifest("clip_text_tower", EVAL["clip_text_tower"]),
        ],
    output:
        clip_scores=results("evaluate", "clip_{model}.parquet"),
        images=directory(results("evaluate", "images_{model}")),
    params:
        medmax=MEDMAX,
        code=code_version("stages/evaluate/clip_scores.py"),
        clip=f"--clip {shlex.quote(EVAL['clip'])}" if EVAL["clip"] else "",
        clip_text_tower=f"--clip-text-tower {shlex.quote(EVAL['clip_text_tower'])}" if EVAL["clip_text_tower"] else "",
        # The evaluate: keys that are clip-scores settings (stages/evaluate/clip_scores.py: ClipScoresConfig).
        options=shlex.join(clip_scores_workflow_arguments(EVAL)),
        credentialed_roots=lambda wildcards: CREDENTIALED_ROOT_OPTIONS,
    wildcard_constraints:
        model="base|trained",
    resources:
        gpu=1 if EVAL["clip_device"] == "cuda" else 0,
    log:
        log_path("clip_scores/{model}"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} clip-scores --predictions {input.predictions:q} --output {output.clip_scores:q}"
        " --image-dir {output.images:q} --ckpt {input.checkpoint:q} --image-root {input.image_root:q} {params.clip}"
        " {params.clip_text_tower} {params.options} {params.credentialed_roots} >> {log:q} 2>&1"


# Only planned when evaluate.judge is set: open VQA, visual_chat and mm_out text. The reply cache lives beside the artifact, one per model
# (two jobs never append to one file), and is not an output: Snakemake would delete it before a rerun.
rule judge:
    input:
        predictions=results("evaluate", "predictions_{model}.parquet"),
    output:
        replies=results("evaluate", "judge_{model}.parquet"),
    params:
        medmax=MEDMAX,
        code=code_version("stages/evaluate/judge_replies.py"),
        # The judge config is built from config values here, not read from a file: every evaluate.judge
        # key (retry and size/time limits, max_unjudged_fraction, allow_credentialed) becomes an option.
        options=lambda wildcards: judge_command_options(
            EVAL["judge"], results("evaluate", f"judge_cache_{wildcards.model}.jsonl")
        ),
    wildcard_constraints:
        model="base|trained",
    # The judge endpoint is on the internet, which cluster compute nodes often cannot reach.
    localrule: True
    log:
        log_path("judge/{model}"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} judge --predictions {input.predictions:q} --output {output.replies:q} {params.options} >> {log:q} 2>&1"


rule score:
    input:
        predictions=expand(results("evaluate", "predictions_{model}.parquet"), model=MODELS),
        clip_scores=expand(results("evaluate", "clip_{model}.parquet"), model=MODELS),
        # Every rule set reads the judge's replies when it is configured: visual_chat and mm_out
        # relative scores are the same for all; open VQA verdicts only for medmax / medmax_tolerant.
        judge_replies=expand(results("evaluate", "judge_{model}.parquet"), model=MODELS) if EVAL["judge"] else [],
    output:
        scores=results("evaluate", "{rules}", "scores.parquet"),
        summary=results("evaluate", "{rules}", "score_summary.parquet"),
    params:
        medmax=MEDMAX,
        code=code_version("stages/evaluate/score.py"),
        output_dir=lambda wildcards, output: Path(output.scores).parent,
        judge_replies=lambda wildcards, input: f"--judge-replies {shlex.join(input.judge_replies)}" if input.judge_replies else "",
        # The evaluate: keys that are score settings (stages/evaluate/score.py: ScoreConfig's Settings).
        options=shlex.join(score_workflow_arguments(EVAL)),
        credentialed_roots=lambda wildcards: CREDENTIALED_ROOT_OPTIONS,
    wildcard_constraints:
        # The rule sets scoring_rules.py defines (the schema's evaluate.rules enum is tested against them).
        rules="|".join(RULE_SETS),
    log:
        log_path("score/{rules}"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} score --predictions {input.predictions:q} --clip-scores {input.clip_scores:q} {params.judge_replies}"
        " --output {params.output_dir:q} --rules {wildcards.rules} {params.options}"
        " {params.credentialed_roots} >> {log:q} 2>&1"


rule report_figures:
    input:
        summaries=expand(results("evaluate", "{rules}", "score_summary.parquet"), rules=EVAL["rules"]),
        metrics=results("train", "train_metrics.parquet"),
        coverage=expand(results("assemble", "{split}", "coverage.parquet"), split=SPLITS),
        # Generated images decoded by clip_scores (the gallery).
        images=expand(results("evaluate", "images_{model}"), model=MODELS),
    output:
        table=report(results("report", "summary.html"), category="Evaluation", subcategory="Tables",
                     labels={"figure": "score summary"}),
        families=report(results("report", "families.html"), category="Evaluation", subcategory="Tables",
                        labels={"figure": "base vs trained, every task family"}),
        bars=report(results("report", "vqa_accuracy.png"), category="Evaluation", subcategory="Figures",
                    labels={"figure": "VQA accuracy per task"}),
        similarity=report(results("report", "family_scores.png"), category="Evaluation", subcategory="Figures",
                          labels={"figure": "captioning, generation, visual chat, mm_out"}),
        gallery=report(results("report", "gallery.png"), category="Evaluation", subcategory="Figures",
                       labels={"figure": "generated images"}),
        coverage=report(results("report", "coverage.html"), category="Dataset coverage", labels={"figure": "coverage summary"}),
        # The same figure as train's loss_curve.png (one plotting function); only train's is in the report.
        loss_curve=results("report", "loss_curve.png"),
    params:
        medmax=MEDMAX,
        code=code_version("stages/evaluate/report.py"),
        output_dir=lambda wildcards, output: Path(output.table).parent,
        images=lambda wildcards, input: shlex.join(f"{m}={d}" for m, d in zip(MODELS, input.images)),
    log:
        log_path("report_figures"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} report --summary {input.summaries:q} --train-metrics {input.metrics:q}"
        " --coverage {input.coverage:q} --images {params.images} --output-dir {params.output_dir:q} >> {log:q} 2>&1"


# Snakemake's report (`snakemake --report FILE`) lists each rule's inputs and outputs and the params
# of the jobs that made its files, with this machine's absolute paths. Once written, each of them
# becomes a placeholder such as ${results_dir} (stages/evaluate/report.py).
scrub_reports_of(workflow, config, RESULTS)
