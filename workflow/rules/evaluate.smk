# Stage 6: generate on the evaluation suite with the base and the trained model, score with each
# named rule set, and draw the figures of the Snakemake report.

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
        medmax=MEDMAX,
        adapter=lambda wildcards, input: f"--adapter {input.adapter}" if wildcards.model == "trained" else "",
        max_items=f"--max-items {EVAL['max_items']}" if EVAL["max_items"] else "",
        batch_size=EVAL["batch_size"],
        device=EVAL["device"],
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
        " --device {params.device} {params.max_items} > {log} 2>&1"


rule score:
    input:
        predictions=expand(results("evaluate", "predictions_{model}.parquet"), model=MODELS),
        checkpoint=config["checkpoint"],
        image_root=EVAL["image_root"],
        clip=EVAL["clip"] or [],
    output:
        scores=results("evaluate", "{rules}", "scores.parquet"),
        summary=results("evaluate", "{rules}", "score_summary.parquet"),
    params:
        medmax=MEDMAX,
        output_dir=lambda wildcards, output: Path(output.scores).parent,
        clip=f"--clip {EVAL['clip']}" if EVAL["clip"] else "",
        judge=f"--judge-config {results('evaluate', 'judge.json')}" if EVAL["judge"] else "",
        bootstrap=EVAL["bootstrap_samples"],
    wildcard_constraints:
        rules="medmax|llava_med|strict",
    log:
        log_path("score/{rules}"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} score --predictions {input.predictions} --output {params.output_dir} --rules {wildcards.rules}"
        " --ckpt {input.checkpoint} --image-root {input.image_root} {params.clip} {params.judge}"
        " --n-bootstrap {params.bootstrap} --seed 0 > {log} 2>&1"


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
