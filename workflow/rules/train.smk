# Stage 5: LoRA finetune of the HF-format base model on the assembled train split.
# Always through DeepSpeed ZeRO-2 (train.deepspeed): gpus 0 runs one process on the CPU (gloo),
# N > 0 runs torchrun over N GPUs (NCCL, bf16). Checkpoints go to train/checkpoints/<run id>
# (a hash of the settings): a rerun with changed settings starts its own, a killed run resumes.

TRAIN = config["train"]


rule train:
    input:
        dataset=results("assemble", "train", "dataset.parquet"),
        eval_dataset=results("assemble", "validation", "dataset.parquet"),
        separator_stats=results("assemble", "train", "separator_stats.parquet"),
        base_model=base_model_path(),
        manifests=folder_manifest("base_model", config["base_model"]),
        deepspeed=workflow.source_path("../deepspeed/zero2.json") if TRAIN["deepspeed"] == "workflow/deepspeed/zero2.json" else TRAIN["deepspeed"],
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
        target_modules=",".join(TRAIN["target_modules"]),
        max_steps=f"--max-steps {TRAIN['max_steps']}" if TRAIN["max_steps"] else "",
        merge="--merge" if TRAIN["merge"] else "",
        recipe=(
            f"--lora-r {TRAIN['lora_r']} --lora-alpha {TRAIN['lora_alpha']} --lora-dropout {TRAIN['lora_dropout']}"
            f" --lr {TRAIN['learning_rate']} --scheduler {TRAIN['scheduler']} --warmup-ratio {TRAIN['warmup_ratio']}"
            f" --epochs {TRAIN['epochs']} --batch-size {TRAIN['batch_size']} --grad-accum {TRAIN['grad_accum']}"
            f" --max-length {TRAIN['max_length']} --precision {TRAIN['precision']}"
            f" --save-every {TRAIN['save_every']} --seed {TRAIN['seed']}"
            f" --loss-mask {TRAIN['loss_mask']} --loss-normalization {TRAIN['loss_normalization']}"
            f" --max-masked-fraction {TRAIN['max_masked_fraction']} --max-dropped-fraction {TRAIN['max_dropped_fraction']}"
            f" --log-interval {TRAIN['log_interval']}"
        ),
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
        " {params.recipe} --target-modules {params.target_modules} --deepspeed {input.deepspeed:q} {params.max_steps} {params.merge}"
        " --no-progress"
        " > {log:q} 2>&1"
