# The embedded demo: small random models and data, generated in the real on-disk layouts at the
# paths the config names. With demo.enabled: false this rule does not exist and those paths are
# the user's own copies.

if config["demo"]["enabled"]:

    rule demo:
        output:
            checkpoint=directory(config["checkpoint"]),
            # Only when the config names an HF base model; with base_model null the workflow converts the checkpoint.
            base_model=directory(config["base_model"]) if config["base_model"] else [],
            train=config["dataset"]["train"],
            validation=config["dataset"]["validation"],
            public_root=directory(config["images"]["public_root"]),
            credentialed_roots=[directory(root) for root in credentialed_roots()],
            eval_set=config["evaluate"]["eval_set"],
            eval_images=directory(config["evaluate"]["image_root"]),
            clip=directory(config["evaluate"]["clip"]),
            clip_text_tower=directory(config["evaluate"]["clip_text_tower"]),
        params:
            medmax=MEDMAX,
            code=code_version("demo.py", "stages/convert_checkpoint.py"),
            seed=config["demo"]["seed"],
            vqgan_channels=config["demo"]["vqgan_channels"],
            rows_per_task=config["demo"]["rows_per_task"],
            credentialed=credentialed_args(),
            base_model=f"--base-model {shlex.quote(config['base_model'])}" if config["base_model"] else "--no-base-model",
        log:
            log_path("demo"),
        conda:
            "../../envs/torch.yaml"
        shell:
            "{params.medmax} demo --seed {params.seed} --vqgan-channels {params.vqgan_channels}"
            " --rows-per-task {params.rows_per_task}"
            " --checkpoint {output.checkpoint:q} {params.base_model}"
            " --train {output.train:q} --validation {output.validation:q}"
            " --public-root {output.public_root:q} {params.credentialed}"
            " --eval-set {output.eval_set:q} --eval-image-root {output.eval_images:q} --clip {output.clip:q}"
            " --clip-text-tower {output.clip_text_tower:q}"
            " >> {log:q} 2>&1"
