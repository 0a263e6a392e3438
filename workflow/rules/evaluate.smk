# Stage 6: generate on the evaluation suite with the base and the trained model; per model, decode
# generated images + CLIP similarities (clip_scores) and LLM judge replies (judge, when configured);
# then score with each named rule set (cheap: it reads those per-model artifacts) and draw the
# figures of the Snakemake report.
from medmax_pipeline.stages.evaluate.judge_replies import judge_command_options

EVAL = config["evaluate"]


rule generate:
    input:
        eval_set=EVAL["eval_set"],
        image_root=EVAL["image_root"],
        checkpoint=config["checkpoint"],
        base_model=base_model_path(),
        adapter=lambda wildcards: results("train", "adapter") if wildcards.model == "trained" else [],
    output:
        predictions=results("evaluate", "predictions_{model}.parquet"),
    params:
        code=code_version("stages/evaluate/generate.py"),
        medmax=MEDMAX,
        adapter=lambda wildcards, input: f"--adapter {input.adapter}" if wildcards.model == "trained" else "",
        max_items=f"--max-items {EVAL['max_items']}" if EVAL["max_items"] else "",
        batch_size=EVAL["batch_size"],
        device=EVAL["device"],
        decoding=EVAL["decoding"],
        budgets=(
            "--max-new-tokens " + " ".join(f"{k}={v}" for k, v in sorted(EVAL["max_new_tokens"].items()))
            if EVAL["max_new_tokens"] else ""
        ),
        image_generation_rows=(
            f"--image-generation-rows {EVAL['image_generation_rows']}" if EVAL["image_generation_rows"] else
            "--image-generation-rows 0"
        ),
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
        "{params.medmax} generate --eval-set {input.eval_set} --image-root {input.image_root}"
        " --ckpt {input.checkpoint} --base-model {input.base_model} {params.adapter}"
        " --model-name {wildcards.model} --output {output.predictions} --batch-size {params.batch_size}"
        " --device {params.device} --decoding {params.decoding} {params.budgets}"
        " {params.image_generation_rows} {params.max_items} > {log} 2>&1"


rule clip_scores:
    input:
        predictions=results("evaluate", "predictions_{model}.parquet"),
        checkpoint=config["checkpoint"],
        image_root=EVAL["image_root"],
        clip=EVAL["clip"] or [],
    output:
        clip_scores=results("evaluate", "clip_{model}.parquet"),
        images=directory(results("evaluate", "images_{model}")),
    params:
        medmax=MEDMAX,
        clip=f"--clip {EVAL['clip']}" if EVAL["clip"] else "",
    wildcard_constraints:
        model="base|trained",
    log:
        log_path("clip_scores/{model}"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} clip-scores --predictions {input.predictions} --output {output.clip_scores}"
        " --image-dir {output.images} --ckpt {input.checkpoint} --image-root {input.image_root} {params.clip}"
        " > {log} 2>&1"


# Only planned when evaluate.judge is set. The reply cache lives beside the artifact, one per model
# (two jobs never append to one file), and is not an output: Snakemake would delete it before a rerun.
rule judge:
    input:
        predictions=results("evaluate", "predictions_{model}.parquet"),
    output:
        replies=results("evaluate", "judge_{model}.parquet"),
    params:
        medmax=MEDMAX,
        # The judge config is built from config values here, not read from a file.
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
        "{params.medmax} judge --predictions {input.predictions} --output {output.replies} {params.options} > {log} 2>&1"


rule score:
    input:
        predictions=expand(results("evaluate", "predictions_{model}.parquet"), model=MODELS),
        clip_scores=expand(results("evaluate", "clip_{model}.parquet"), model=MODELS),
        # Only the medmax rule set asks the judge (open questions).
        judge_replies=lambda wildcards: (
            expand(results("evaluate", "judge_{model}.parquet"), model=MODELS)
            if EVAL["judge"] and wildcards.rules == "medmax"
            else []
        ),
    output:
        scores=results("evaluate", "{rules}", "scores.parquet"),
        summary=results("evaluate", "{rules}", "score_summary.parquet"),
    params:
        medmax=MEDMAX,
        output_dir=lambda wildcards, output: Path(output.scores).parent,
        judge_replies=lambda wildcards, input: f"--judge-replies {' '.join(input.judge_replies)}" if input.judge_replies else "",
        bootstrap=EVAL["bootstrap_samples"],
    wildcard_constraints:
        rules="medmax|llava_med|strict",
    log:
        log_path("score/{rules}"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} score --predictions {input.predictions} --clip-scores {input.clip_scores} {params.judge_replies}"
        " --output {params.output_dir} --rules {wildcards.rules} --n-bootstrap {params.bootstrap} --seed 0 > {log} 2>&1"


rule report_figures:
    input:
        summary=results("evaluate", "medmax", "score_summary.parquet"),
        summaries=expand(results("evaluate", "{rules}", "score_summary.parquet"), rules=EVAL["rules"]),
        metrics=results("train", "train_metrics.parquet"),
        coverage=expand(results("assemble", "{split}", "coverage.parquet"), split=SPLITS),
    output:
        table=report(results("report", "summary.html"), category="Evaluation", labels={"figure": "score summary"}),
        bars=report(results("report", "vqa_accuracy.png"), category="Evaluation", labels={"figure": "accuracy per task"}),
        coverage=report(results("report", "coverage.html"), category="Dataset coverage", labels={"figure": "coverage summary"}),
        # The same figure as train's loss_curve.png (one plotting function); only train's is in the report.
        loss_curve=results("report", "loss_curve.png"),
    params:
        medmax=MEDMAX,
        output_dir=lambda wildcards, output: Path(output.table).parent,
    log:
        log_path("report_figures"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} report --summary {input.summaries} --train-metrics {input.metrics}"
        " --coverage {input.coverage} --output-dir {params.output_dir} > {log} 2>&1"
