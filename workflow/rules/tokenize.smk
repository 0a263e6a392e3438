# Stage 2: VQGAN tokenization, scattered over shards (one GPU job each), then gathered.
# Shard files live under a folder named for the shard count, so changing tokenize.num_shards
# re-plans tokenization (and what follows) but not collection.

from medmax_pipeline.stages.tokenize_images import workflow_arguments as tokenize_workflow_arguments


rule tokenize_shard:
    input:
        csv=results("collect", "img_paths.csv"),
        checkpoint=config["checkpoint"],
        credentialed_roots=credentialed_roots(),
        manifests=[*folder_manifest("checkpoint", config["checkpoint"]), *image_root_manifests()],
    output:
        tokens=results("tokenize", f"n{NUM_SHARDS}", "shard-{shard}-of-" + str(NUM_SHARDS) + ".parquet"),
        errors=results("tokenize", f"n{NUM_SHARDS}", "shard-{shard}-of-" + str(NUM_SHARDS) + ".errors.parquet"),
    params:
        code=code_version("stages/tokenize_images.py"),
        num_shards=NUM_SHARDS,
        output_dir=lambda wildcards, output: Path(output.tokens).parent,
        # Every tokenize: key that is a tokenize setting becomes its option, from the one definition
        # of the settings (stages/tokenize_images.py: TokenizeConfig's Settings); resources stay below.
        options=shlex.join(tokenize_workflow_arguments(config["tokenize"])),
        launcher=torchrun(tokenize_gpus()) if tokenize_gpus() > 1 else MEDMAX,
        # Images under these roots are credential = yes whatever the CSV says. A function, so
        # Snakemake does not format the quoted paths (a brace in a folder name is no wildcard).
        credentialed_roots=lambda wildcards: " ".join(f"--credentialed-root {single_quoted(root)}" for root in credentialed_roots()),
    wildcard_constraints:
        shard=r"\d+",
    threads: max(1, config["tokenize"]["workers"])
    resources:
        gpu=tokenize_gpus(),
        mem_mb=config["tokenize"]["mem_mb"],
        runtime=config["tokenize"]["runtime_min"],
    log:
        log_path("tokenize/shard-{shard}"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.launcher} tokenize --input {input.csv:q} --output {params.output_dir:q} --ckpt {input.checkpoint:q}"
        " --shard {wildcards.shard} --num-shards {params.num_shards} {params.options}"
        " {params.credentialed_roots} >> {log:q} 2>&1"


rule gather_tokens:
    input:
        expand(
            results("tokenize", f"n{NUM_SHARDS}", "shard-{shard}-of-{n}.parquet"),
            shard=range(NUM_SHARDS),
            n=NUM_SHARDS,
        ),
    output:
        tokens=results("tokenize", "image_tokens.parquet"),
        errors=results("tokenize", "image_token_errors.parquet"),
    params:
        code=code_version("stages/tokenize_images.py"),
        medmax=MEDMAX,
        shards_dir=lambda wildcards, input: Path(input[0]).parent,
        num_shards=NUM_SHARDS,
    log:
        log_path("gather_tokens"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} gather-tokens --shards {params.shards_dir:q} --num-shards {params.num_shards}"
        " --output {output.tokens:q} --errors {output.errors:q} >> {log:q} 2>&1"
