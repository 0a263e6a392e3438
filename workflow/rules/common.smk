# Shared by every rule: config validation, paths of the stage outputs, how rules call the package.
import os
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from medmax_pipeline.core.config import ConfigError, validate_config
from medmax_pipeline.core.code_identity import code_identity, stage_modules
from medmax_pipeline.core.folder_identity import write_manifest_if_changed
from medmax_pipeline.core.image_keys import format_credentialed_spec

try:
    # The config files in the order Snakemake merged them (configfile: first, then --configfile),
    # so an error names the file that set the bad key.
    _cli_configfiles = [str(f) for f in workflow.overwrite_configfiles]
    _workflow_configfiles = [str(f) for f in workflow.configfiles if str(f) not in _cli_configfiles]
    validate_config(
        config,
        workflow.source_path("../schemas/config.schema.yaml"),
        config_files=[*_workflow_configfiles, *_cli_configfiles],
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


# Rules run the package's command line: under --sdm conda the env's python with the package taken
# from the workflow folder, else the interpreter that runs Snakemake (the project's virtualenv).
# Both paths reach the jobs through the environment (every job's own Snakemake sets them again),
# not through the rules' params or commands: a moved project or virtualenv reruns nothing.
os.environ["MEDMAX_PYTHON"] = sys.executable
os.environ["MEDMAX_WORKFLOW_DIR"] = str(workflow.basedir)


envvars:
    "MEDMAX_PYTHON",
    "MEDMAX_WORKFLOW_DIR",


if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    PYTHON = 'env PYTHONPATH="$MEDMAX_WORKFLOW_DIR" python'
else:
    PYTHON = '"$MEDMAX_PYTHON"'
MEDMAX = f"{PYTHON} -m medmax_pipeline"


def torchrun(nproc):
    """The package's command line under torchrun, nproc ranks inside this one job."""
    return f"{PYTHON} -m torch.distributed.run --standalone --nproc-per-node {nproc} -m medmax_pipeline"

def code_version(*stage_parts):
    """A param for every rule: a hash of the package code it runs (the import closure of its stage
    module or package, core/code_identity.py), so a change to that code reruns the rule and what
    follows, and a change elsewhere (another stage, the command line's help, the report, a
    comment or a log line) reruns nothing; Snakemake's own code trigger sees only the shell command."""
    return code_identity([m for part in stage_parts for m in stage_modules(part)])


RESULTS = config["results_dir"]
SPLITS = ["train", "validation"]
MODELS = ["base", "trained"]
CREDENTIALED = config["images"]["credentialed"]
NUM_SHARDS = config["tokenize"]["num_shards"]
TOKENIZER = f"{config['checkpoint']}/tokenizer/text_tokenizer_modified.json"


def results(*parts):
    return "/".join([RESULTS, *parts])


_MANIFESTS = {}


def folder_manifest(name, folder):
    """[the manifest file] standing for a folder input the user provides, for a rule's input: ([] without one).

    Snakemake sees only a folder's own modification time, which does not move when a file inside
    is replaced. The manifest (names, sizes, times, contents of small config files:
    core/folder_identity.py) is rewritten at planning only when the folder changed, so a real change
    reruns the rules that read the folder. With the demo on, the folders are the demo rule's outputs
    and Snakemake tracks them itself: no manifest. Walking an image root costs one stat per file
    at every planning (seconds for a million local files)."""
    if config["demo"]["enabled"] or folder is None or not Path(folder).is_dir():
        return []
    if not workflow.is_main_process:
        # A job on a cluster node re-reads this file: the submitting process wrote the manifest
        # already; walking the folder again on every node would cost time and race on the file.
        return [results("manifests", f"{name}.json")]
    if name not in _MANIFESTS:
        _MANIFESTS[name] = str(write_manifest_if_changed(folder, results("manifests", f"{name}.json")))
    return [_MANIFESTS[name]]


def image_root_manifests():
    """Manifests of the public image root and every credentialed root: the images themselves."""
    roots = [("public_root", config["images"]["public_root"])]
    roots += [(f"credentialed-{e['source']}", e["root"]) for e in CREDENTIALED]
    return [m for name, root in roots for m in folder_manifest(name, root)]


def base_model_path():
    """The HF base model train and generate read: config base_model as is, or, when it is null,
    the checkpoint converted by the convert_checkpoint rule."""
    return config["base_model"] or results("convert", "base_model")


def log_path(name):
    return results("logs", f"{name}.log")


def credentialed_args():
    """A params function: --credentialed SOURCE=ROOT=TEMPLATE (or SOURCE=ROOT=mapping:PATH) for each
    credentialed source, shell-quoted. A function, not a string: Snakemake formats params strings,
    and a template's {subject_id} is no wildcard; a function's value is used as it is."""
    args = " ".join(f"--credentialed {single_quoted(format_credentialed_spec(e))}" for e in CREDENTIALED)
    return lambda wildcards: args


def single_quoted(text):
    """`text` as one shell word, always in single quotes (as these arguments were before, so the
    params of existing runs do not change); a single quote inside becomes '\''."""
    escaped = text.replace("'", "'\\''")
    return f"'{escaped}'"


def credentialed_roots():
    """The credentialed image roots, for rules' input: (their files are read by collect and tokenize)."""
    return [e["root"] for e in CREDENTIALED]


def tokenize_gpus():
    return config["tokenize"]["gpus_per_job"] if config["tokenize"]["device"] == "cuda" else 0


TRAIN_THREADS = 2


def train_launcher():
    """torchrun over train.gpus GPUs, or one process (on the CPU) when gpus is 0. With
    train.nodes > 1: srun starts `medmax train-node` once on each node of the allocation, which
    starts that node's torchrun (train.gpus processes, or 1 on CPU) with c10d rendezvous on the
    first node (stages/train/multinode.py)."""
    gpus, nodes = config["train"]["gpus"], config["train"]["nodes"]
    if nodes > 1:
        srun = f"srun --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --cpus-per-task {TRAIN_THREADS} --kill-on-bad-exit=1"
        if gpus:
            srun += f" --gres gpu:{gpus}"
        return f"{srun} {PYTHON} -m medmax_pipeline train-node --nproc-per-node {max(gpus, 1)} --"
    return torchrun(gpus) if gpus > 0 else MEDMAX


def train_resources():
    """The train job's SLURM request. One node: train.gpus GPUs. train.nodes > 1: that many
    nodes with one task each, train.gpus GPUs on every node (gres is per node; the executor's
    `gpu` would be a total that SLURM may spread unevenly), and `mpi` so the executor runs the
    job's command as it is (the command's own srun starts the nodes) instead of inside its
    one-task srun; tasks_per_gpu 0 keeps it from turning `tasks` into --ntasks-per-gpu."""
    train = config["train"]
    resources = {"mem_mb": train["mem_mb"], "runtime": train["runtime_min"]}
    if train["nodes"] == 1:
        return {**resources, "gpu": train["gpus"]}
    resources.update(nodes=train["nodes"], tasks=train["nodes"], mpi="srun", tasks_per_gpu=0, gpu=0)
    if train["gpus"]:
        resources["gres"] = f"gpu:{train['gpus']}"
    return resources


def final_targets():
    targets = [
        results("collect", "image_paths.parquet"),
        results("vocab", "image_blocks.parquet"),
        *expand(results("assemble", "{split}", "dataset.parquet"), split=SPLITS),
        *expand(results("assemble", "{split}", "dataset_public.parquet"), split=SPLITS),
        results("train", "adapter"),
        results("export", "checkpoint"),
        results("export", "merged_hf"),
        *expand(results("evaluate", "{rules}", "score_summary.parquet"), rules=config["evaluate"]["rules"]),
        results("report", "summary.html"),
    ]
    return targets


SHIPPED_DEEPSPEED = "workflow/deepspeed/zero2.json"


def deepspeed_json_path():
    """The DeepSpeed JSON train reads: the user's own file, or results/train/deepspeed.json, which
    rule deepspeed_config writes from the shipped one (train.smk). As an input by its own path the
    shipped file would name the clone's location, and moving the project (or a second clone over
    the same results) would rerun training; its content is that rule's param instead."""
    if config["train"]["deepspeed"] != SHIPPED_DEEPSPEED:
        return config["train"]["deepspeed"]
    return results("train", "deepspeed.json")
