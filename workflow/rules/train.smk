# Stage 5: LoRA finetune of the HF-format base model on the assembled train split.
# Always through DeepSpeed ZeRO-2 (train.deepspeed): gpus 0 runs one process on the CPU (gloo),
# N > 0 runs torchrun over N GPUs (NCCL, bf16). Checkpoints go to train/checkpoints/<run id>
# (a hash of the settings): a rerun with changed settings starts its own, a killed run resumes.

from medmax_pipeline.core.file_modes import write_text_atomic
from medmax_pipeline.stages.train.config import workflow_arguments as train_workflow_arguments

TRAIN = config["train"]


# The shipped DeepSpeed JSON, written into the results folder (see deepspeed_json_path in common.smk):
# its content, not its path, is what reruns training when it changes.
rule deepspeed_config:
    output:
        results("train", "deepspeed.json"),
    params:
        content=Path(workflow.source_path("../deepspeed/zero2.json")).read_text(),
    localrule: True
    log:
        log_path("deepspeed_config"),
    run:
        write_text_atomic(output[0], params.content)  # Snakemake removed the old output before the job
        with open(log[0], "a") as log_file:
            print(f"{output[0]}: the shipped DeepSpeed JSON", file=log_file)


rule train:
    input:
        dataset=results("assemble", "train", "dataset.parquet"),
        eval_dataset=results("assemble", "validation", "dataset.parquet"),
        separator_stats=results("assemble", "train", "separator_stats.parquet"),
        base_model=base_model_path(),
        manifests=folder_manifest("base_model", config["base_model"]),
        deepspeed=deepspeed_json_path(),
    output:
        adapter=directory(results("train", "adapter")),
        metrics=results("train", "train_metrics.parquet"),
        loss_curve=report(
            results("train", "loss_curve.png"), category="Training", labels={"figure": "loss curve"}
        ),
    params:
        code=code_version("stages/train"),
        output_dir=lambda wildcards, output: Path(output.metrics).parent,
        launcher=train_launcher(),
        # Every train: key that is a training setting becomes its option, from the one definition
        # of the settings (stages/train/config.py: TrainConfig's Settings); resources stay below.
        options=shlex.join(train_workflow_arguments(TRAIN)),
    threads: TRAIN_THREADS
    resources:
        **train_resources(),
    log:
        log_path("train"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.launcher} train --dataset {input.dataset:q} --eval-dataset {input.eval_dataset:q}"
        " --separator-stats {input.separator_stats:q} --base-model {input.base_model:q} --output {params.output_dir:q}"
        " {params.options} --deepspeed {input.deepspeed:q}"
        " --no-progress"
        " >> {log:q} 2>&1"
