# The trained adapter merged into the base model and written back in both formats: the original
# Chameleon layout (models/7b/consolidated.pth, params.json, the checkpoint's tokenizer/ folder)
# for the public Chameleon/MedMax inference and evaluation code, and a merged HF folder.

from medmax_pipeline.stages.export import workflow_arguments as export_workflow_arguments


rule export:
    input:
        base_model=base_model_path(),
        adapter=results("train", "adapter"),
        checkpoint=config["checkpoint"],
        manifests=[*folder_manifest("checkpoint", config["checkpoint"]), *folder_manifest("base_model", config["base_model"])],
    output:
        checkpoint=directory(results("export", "checkpoint")),
        merged_hf=directory(results("export", "merged_hf")),
    params:
        code=code_version("stages/export.py"),
        medmax=MEDMAX,
        # The export: keys (stages/export.py: ExportConfig's Settings).
        options=shlex.join(export_workflow_arguments(config["export"])),
    log:
        log_path("export"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} export --base-model {input.base_model:q} --adapter {input.adapter:q} --checkpoint {input.checkpoint:q}"
        " --output-checkpoint {output.checkpoint:q} --output-hf {output.merged_hf:q} {params.options} >> {log:q} 2>&1"
