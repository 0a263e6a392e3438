# Stage 1: dataset rows + image roots -> one row per distinct image, inside its root.

from medmax_pipeline.stages.collect import workflow_arguments as collect_workflow_arguments


rule collect:
    input:
        train=config["dataset"]["train"],
        validation=config["dataset"]["validation"],
        public_root=config["images"]["public_root"],
        credentialed_roots=credentialed_roots(),
        manifests=image_root_manifests(),
        mappings=[e["mapping"] for e in CREDENTIALED if e.get("mapping") is not None],
    output:
        image_paths=results("collect", "image_paths.parquet"),
        problems=results("collect", "image_path_problems.parquet"),
        csv=results("collect", "img_paths.csv"),
    params:
        code=code_version("stages/collect.py"),
        medmax=MEDMAX,
        credentialed=credentialed_args(),
        # The images: keys that are collect settings (stages/collect.py: CollectConfig's Settings).
        options=shlex.join(collect_workflow_arguments(config["images"])),
        output_dir=lambda wildcards, output: Path(output.image_paths).parent,
    log:
        log_path("collect"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} collect --rows train={input.train:q} --rows validation={input.validation:q}"
        " --public-root {input.public_root:q} {params.credentialed} {params.options}"
        " --output-dir {params.output_dir:q} >> {log:q} 2>&1"
