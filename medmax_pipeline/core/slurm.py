"""SLURM facts the workflow checks before it submits anything, as pure functions over the text
SLURM prints (tests pin them with known outputs):

- `expand_hostlist`: SLURM's compressed host lists (`gpu[01-03,07],login1`) as host names;
- `parse_sinfo_nodes` / `requests_that_do_not_fit`: the nodes of each partition from
  `sinfo -h -N -o '%N %P %c %m %G'` against every planned job's request (CPUs per task, memory per
  node, GPUs per node, nodes): a job asking more than any node of its partition has is accepted by
  sbatch and stays PENDING forever (Reason=PartitionConfig), so it is refused before submission;
- `parse_scontrol_config` / `status_command_problem`: Snakemake's slurm executor asks `sacct` for
  job states whenever the binary exists, and on a cluster without accounting it then waits
  forever; `squeue` works only while MinJobAge >= 3 x init_seconds_before_status_checks (else the
  executor silently falls back to sacct).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

SINFO_NODE_FORMAT = "%N %P %c %m %G"


class SlurmError(Exception):
    """A SLURM answer that cannot be read, or a plan the cluster cannot run."""


# ----------------------------------------------------------------------------------------------
# Host lists
# ----------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"host list {text!r}: ']' without '['")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmError(f"host list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(item: str, hostlist: str) -> list[str]:
    """'01-03' -> ['01', '02', '03'] (the width of the lower bound kept), '7' -> ['7']."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
    if not match:
        raise SlurmError(f"host list {hostlist!r}: {item!r} is not a number or a range")
    low, high = match.group(1), match.group(2) or match.group(1)
    if int(high) < int(low):
        raise SlurmError(f"host list {hostlist!r}: range {item!r} runs backwards")
    width = len(low) if low.startswith("0") else 0
    return [str(n).zfill(width) for n in range(int(low), int(high) + 1)]


def _expand_one(pattern: str, hostlist: str) -> list[str]:
    """One host pattern, brackets possibly repeated ('r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2)."""
    bracket = pattern.find("[")
    if bracket < 0:
        return [pattern]
    close = pattern.index("]", bracket)
    prefix, inner, rest = pattern[:bracket], pattern[bracket + 1 : close], pattern[close + 1 :]
    tails = _expand_one(rest, hostlist)
    return [prefix + number + tail for item in inner.split(",") for number in _expand_range(item, hostlist) for tail in tails]


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list as host names, in order: 'gpu[01-03,07],login1' ->
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (what `scontrol show hostnames` prints)."""
    hosts = [host for part in _split_top_level(hostlist.strip()) for host in _expand_one(part, hostlist)]
    if not hosts:
        raise SlurmError(f"host list {hostlist!r} names no host")
    return hosts


# ----------------------------------------------------------------------------------------------
# Nodes and requests
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    cpus: int
    mem_mb: int
    gpus: int


@dataclass(frozen=True)
class JobRequest:
    """What one planned job asks SLURM for: per task CPUs, per node memory and GPUs."""

    rule: str
    partition: str | None  # None: the cluster's default partition
    cpus_per_task: int
    mem_mb: int
    gpus_per_node: int
    nodes: int = 1
    tasks_per_node: int = 1


def gpus_in_gres(gres: str) -> int:
    """GPUs in one node's GRES as sinfo prints it: 'gpu:4', 'gpu:a100:8(S:0-1)', 'gpu:2,tmp:10G' -> 4, 8, 2;
    '(null)' -> 0."""
    total = 0
    for entry in gres.split(","):
        fields = re.sub(r"\(.*\)$", "", entry.strip()).split(":")
        if fields[0] != "gpu":
            continue
        count = fields[-1] if len(fields) > 1 else "1"
        if not count.isdigit():
            count = "1"  # 'gpu:a100' names a type without a count
        total += int(count)
    return total


def parse_sinfo_nodes(text: str) -> list[Node]:
    """Lines of `sinfo -h -N -o '%N %P %c %m %G'` as nodes (a node once per partition; the
    default partition's '*' dropped)."""
    nodes = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 5:
            raise SlurmError(f"sinfo line {number}: expected 5 fields (node partition cpus memory gres), got {line!r}")
        name, partition, cpus, mem, gres = fields
        try:
            nodes.append(Node(name, partition.rstrip("*"), int(cpus.rstrip("+")), int(mem.rstrip("+")), gpus_in_gres(gres)))
        except ValueError:
            raise SlurmError(f"sinfo line {number}: CPUs and memory must be numbers, got {line!r}") from None
    return nodes


def default_partition(sinfo_text: str) -> str | None:
    """The partition sinfo marks with '*', if any."""
    for line in sinfo_text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].endswith("*"):
            return fields[1].rstrip("*")
    return None


def _describe_request(request: JobRequest) -> str:
    parts = [f"{request.cpus_per_task * request.tasks_per_node} CPU(s)", f"{request.mem_mb} MB", f"{request.gpus_per_node} GPU(s)"]
    where = f"{request.nodes} node(s) each with " if request.nodes > 1 else ""
    return f"{where}{', '.join(parts)}"


def requests_that_do_not_fit(requests: Iterable[JobRequest], nodes: Sequence[Node], default: str | None) -> list[str]:
    """One line per rule whose request no (or too few) node(s) of its partition can hold, naming
    the rule, the request and the largest node; [] when every job fits. A rule is named once."""
    problems: dict[str, str] = {}
    for request in requests:
        if request.rule in problems:
            continue
        partition = request.partition or default
        members = [n for n in nodes if n.partition == partition]
        if not members:
            known = ", ".join(sorted({n.partition for n in nodes})) or "none"
            problems[request.rule] = f"rule {request.rule}: partition {partition!r} does not exist (sinfo lists: {known})"
            continue
        cpus = request.cpus_per_task * request.tasks_per_node
        fitting = [n for n in members if n.cpus >= cpus and n.mem_mb >= request.mem_mb and n.gpus >= request.gpus_per_node]
        if len(fitting) >= request.nodes:
            continue
        largest = max(members, key=lambda n: (n.gpus, n.cpus, n.mem_mb))
        short = [
            what for what, asked, most in (
                ("CPUs", cpus, max(n.cpus for n in members)),
                ("memory", request.mem_mb, max(n.mem_mb for n in members)),
                ("GPUs", request.gpus_per_node, max(n.gpus for n in members)),
            ) if asked > most
        ]
        reason = f"too much {' and '.join(short)}" if short else f"only {len(fitting)} node(s) can hold it"
        problems[request.rule] = (
            f"rule {request.rule} asks for {_describe_request(request)} on partition {partition!r}, but the largest node "
            f"there ({largest.name}) has {largest.cpus} CPU(s), {largest.mem_mb} MB, {largest.gpus} GPU(s) ({reason}); "
            f"SLURM would leave the job pending forever"
        )
    return list(problems.values())


# ----------------------------------------------------------------------------------------------
# How Snakemake's slurm executor learns job states
# ----------------------------------------------------------------------------------------------


def parse_scontrol_config(text: str) -> dict[str, str]:
    """`scontrol show config` as KEY -> value text."""
    config = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            config[key.strip()] = value.strip()
    return config


def min_job_age_seconds(value: str | None) -> int | None:
    """MinJobAge as `scontrol show config` prints it ('300 sec', '1h', '300') in seconds."""
    if value is None:
        return None
    match = re.match(r"^(\d+)\s*([a-zA-Z]*)", value)
    if not match:
        return None
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * 3600 if unit in ("h", "hour", "hours") else number


def status_command_problem(status_command: str | None, slurm_config: Mapping[str, str], init_seconds: int) -> str | None:
    """Why the executor's status command cannot see this cluster's jobs, or None.

    sacct needs accounting (AccountingStorageType other than accounting_storage/none); squeue needs
    finished jobs to stay visible for 3 polls (MinJobAge >= 3 x init_seconds), else the executor
    switches to sacct on its own."""
    no_accounting = slurm_config.get("AccountingStorageType", "") in ("", "accounting_storage/none")
    min_age = min_job_age_seconds(slurm_config.get("MinJobAge"))
    if status_command not in ("sacct", "squeue"):
        return (
            f"the profile sets no slurm-status-command (got {status_command!r}): set `slurm-status-command: sacct` "
            "(clusters with accounting) or `squeue` (clusters without) in the profile"
        )
    if status_command == "sacct" and no_accounting:
        return (
            "the profile checks job states with sacct, but this cluster keeps no accounting "
            "(AccountingStorageType=accounting_storage/none): sacct never sees the jobs and the run would wait forever; "
            "set `slurm-status-command: squeue` in the profile"
        )
    if status_command == "squeue" and (min_age is None or min_age < 3 * init_seconds):
        limit = f"MinJobAge={min_age} s" if min_age is not None else "MinJobAge unknown"
        fix = f"set slurm-init-seconds-before-status-checks to at most {min_age // 3}" if min_age and min_age >= 3 else "raise MinJobAge in slurm.conf"
        return (
            f"the profile checks job states with squeue, which sees a finished job only for MinJobAge seconds ({limit}); "
            f"the executor needs MinJobAge >= 3 x slurm-init-seconds-before-status-checks (3 x {init_seconds} s) and "
            f"otherwise switches to sacct{' (which this cluster cannot answer)' if no_accounting else ''}: {fix}"
        )
    return None


def run_slurm_command(argv: Sequence[str]) -> str:
    """stdout of a SLURM client command, or SlurmError with its stderr."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


# ----------------------------------------------------------------------------------------------
# Node-local paths
# ----------------------------------------------------------------------------------------------

# Filesystems that are node-local by construction: a job on another node sees its own, not ours.
NODE_LOCAL_FILESYSTEMS = ("tmpfs", "ramfs")


def this_machines_mounts() -> list[tuple[str, str]]:
    """This machine's mounts (Linux's /proc/mounts), or none where it has no such file."""
    mounts = Path("/proc/mounts")
    return parse_mounts(mounts.read_text()) if mounts.is_file() else []


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """/proc/mounts as (mount point, filesystem type), octal escapes (\\040 for a space) decoded."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            mounts.append((point, fields[2]))
    return mounts


def filesystem_of(path: str, mounts: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(mount point, type) of the mount holding an absolute path: the longest matching mount point
    (the last one mounted wins among equals)."""
    best = ("/", "unknown")
    for point, fstype in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def node_local_paths(paths: Mapping[str, str], mounts: Sequence[tuple[str, str]]) -> list[str]:
    """One line per named absolute path that lies on a node-local filesystem (tmpfs, ramfs)."""
    problems = []
    for name, path in paths.items():
        point, fstype = filesystem_of(path, mounts)
        if fstype in NODE_LOCAL_FILESYSTEMS:
            problems.append(
                f"{name} {path} is on {fstype} ({point}), which each node has its own of: jobs on other nodes "
                "would not see it; put it on a filesystem the nodes share"
            )
    return problems
