# The published checkpoint (original Chameleon layout: models/7b/consolidated.pth + params.json,
# tokenizer/) converted to the HF folder that train and generate read. Used when base_model is
# null in the config (common.smk: base_model_path); a configured base_model is used as is.


rule convert_checkpoint:
    input:
        checkpoint=config["checkpoint"],
        manifests=folder_manifest("checkpoint", config["checkpoint"]),
    output:
        base_model=directory(results("convert", "base_model")),
    params:
        code=code_version("stages/convert_checkpoint.py"),
        medmax=MEDMAX,
    log:
        log_path("convert_checkpoint"),
    conda:
        "../../envs/torch.yaml"
    shell:
        "{params.medmax} convert-checkpoint --checkpoint {input.checkpoint:q} --output {output.base_model:q} >> {log:q} 2>&1"
