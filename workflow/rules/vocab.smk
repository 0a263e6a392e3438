# Stage 3: VQGAN code c -> vocabulary id c + 4, framed as 8197 ... 8196, after checking the tokenizer.

from medmax_pipeline.stages.vocab import workflow_arguments as vocab_workflow_arguments


rule map_vocab:
    input:
        tokens=results("tokenize", "image_tokens.parquet"),
        checkpoint=config["checkpoint"],
    output:
        blocks=results("vocab", "image_blocks.parquet"),
    params:
        code=code_version("stages/vocab.py"),
        medmax=MEDMAX,
        tokenizer=TOKENIZER,
        # The vocab: keys (stages/vocab.py: VocabConfig's Settings).
        options=shlex.join(vocab_workflow_arguments(config["vocab"])),
    log:
        log_path("map_vocab"),
    conda:
        "../../envs/data.yaml"
    shell:
        "{params.medmax} map-vocab --tokens {input.tokens:q} --tokenizer {params.tokenizer:q}"
        " --output {output.blocks:q} {params.options} >> {log:q} 2>&1"
