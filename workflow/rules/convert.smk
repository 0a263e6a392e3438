# The published checkpoint (original Chameleon layout: models/7b/consolidated.pth + params.json,
# tokenizer/) converted to the HF folder that train and generate read. Used when base_model is
# null in the config (common.smk: base_model_path); a configured base_model is used as is.

from medmax_pipeline.stages.convert_checkpoint import workflow_arguments as convert_workflow_arguments


rule convert_checkpoint:
    input:
        checkpoint=config["checkpoint"],
        manifests=folder_manifest("checkpoint", config["checkpoint"]),
    output:
        base_model=directory(results("convert", "base_model")),
    params:
        code=code_version("stages/convert_checkpoint.py"),
        medmax=MEDMAX,
        # The convert: keys (stages/convert_checkpoint.py: ConvertConfig's Settings).
        options=shlex.join(convert_workflow_arguments(config["convert"])),
    log:
        log_path("convert_checkpoint"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} convert-checkpoint --checkpoint {input.checkpoint:q} --output {output.base_model:q} {params.options} >> {log:q} 2>&1"
