# Before a run with the slurm executor submits anything, check it against the cluster (not in dry
# runs, not inside jobs): the profile's status command must be able to see the jobs (sacct needs
# accounting; squeue needs MinJobAge >= 3 x slurm-init-seconds-before-status-checks), every
# planned job must fit on some node of its partition (a larger request stays PENDING forever), and
# the results folder, the interpreter and the input folders must not be on a node-local
# filesystem (tmpfs). Under any other executor, train.nodes > 1 is refused (it needs srun).
# MEDMAX_SKIP_SLURM_CHECK=1 skips it (e.g. where sinfo or scontrol are not allowed).
import os
import sys

from medmax_pipeline.core.slurm import (
    SINFO_NODE_FORMAT,
    JobRequest,
    SlurmError,
    default_partition,
    gpus_in_gres,
    node_local_paths,
    this_machines_mounts,
    parse_scontrol_config,
    parse_sinfo_nodes,
    requests_that_do_not_fit,
    run_slurm_command,
    status_command_problem,
)


def slurm_job_request(job):
    """What the slurm executor will ask SLURM for on this job's behalf (its submit_string.py):
    --cpus-per-task = cpus_per_task or threads, --mem = mem_mb per node, GPUs from `gpu` (a total
    over the job's nodes) or a `gres` gpu:N (per node), --nodes = nodes."""
    resources = job.resources
    nodes = int(resources.get("nodes") or 1)
    gpus_total = int(resources.get("gpu") or 0)
    gpus_per_node = gpus_in_gres(str(resources.get("gres") or "")) or -(-gpus_total // nodes)
    mem_mb = resources.get("mem_mb")
    return JobRequest(
        job.rule.name,
        partition=resources.get("slurm_partition") or None,
        cpus_per_task=int(resources.get("cpus_per_task") or job.threads),
        mem_mb=int(mem_mb) if isinstance(mem_mb, (int, float)) else 0,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
    )


def slurm_preflight():
    settings = workflow.executor_settings
    try:
        slurm_config = parse_scontrol_config(run_slurm_command(["scontrol", "show", "config"]))
        sinfo = run_slurm_command(["sinfo", "-h", "-N", "-o", SINFO_NODE_FORMAT])
        nodes = parse_sinfo_nodes(sinfo)
    except SlurmError as exc:
        raise WorkflowError(f"SLURM check (MEDMAX_SKIP_SLURM_CHECK=1 skips it): {exc}") from None
    problems = []
    status = status_command_problem(
        getattr(settings, "status_command", None), slurm_config, getattr(settings, "init_seconds_before_status_checks", 40) or 40
    )
    if status:
        problems.append(status)
    requests = [slurm_job_request(job) for job in workflow.dag.needrun_jobs() if not job.is_local]
    problems += requests_that_do_not_fit(requests, nodes, default_partition(sinfo))
    problems += node_local_paths(shared_paths(), this_machines_mounts())
    if problems:
        raise WorkflowError("SLURM check: nothing was submitted.\n" + "\n".join(f"  {p}" for p in problems))
    partitions = sorted({r.partition or default_partition(sinfo) or "default" for r in requests})
    print(
        f"SLURM check: {len(requests)} job(s) fit the nodes of partition(s) {', '.join(partitions) or '-'}; "
        f"job states from {settings.status_command}",
        file=sys.stderr,
    )


def shared_paths():
    """The paths every node must see, as absolute paths (symlinks followed), by what they are."""
    paths = {"results_dir": RESULTS, "the Python interpreter (its environment)": sys.executable, "checkpoint": config["checkpoint"]}
    paths["images.public_root"] = config["images"]["public_root"]
    paths.update({f"images.credentialed root of {e['source']}": e["root"] for e in CREDENTIALED})
    paths["evaluate.image_root"] = EVAL["image_root"]
    return {name: str(Path(path).resolve()) for name, path in paths.items() if path}


# Snakemake keeps one onstart handler: this one runs the check, then the handler registered
# before it (evaluate.smk's judge check).
_onstart_before_slurm = globals().get("onstart")


onstart:
    plugin = workflow.executor_plugin
    on_slurm = plugin is not None and plugin.name == "slurm"
    if on_slurm and os.environ.get("MEDMAX_SKIP_SLURM_CHECK") != "1":
        slurm_preflight()
    if not on_slurm and config["train"]["nodes"] > 1 and any(job.rule.name == "train" for job in workflow.dag.needrun_jobs()):
        raise WorkflowError(
            f"train.nodes is {config['train']['nodes']}: training across nodes runs under SLURM (srun), "
            "with --workflow-profile workflow/profiles/slurm-gpu (or slurm-cpu); set train.nodes: 1 to train here"
        )
    if _onstart_before_slurm is not None:
        _onstart_before_slurm()
