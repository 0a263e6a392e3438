#!/usr/bin/env bash
# The demo on a real SLURM cluster through the shipped CPU profile (workflow/profiles/slurm-cpu),
# checked from SLURM's own records. Run as root on Debian (bookworm: SLURM 22.05); .ci/run calls it.
#  1. .ci/slurm-up.sh brings up a cluster with accounting (slurmdbd + mariadb: sacct works) of two
#     nodes, two slurmd on this host (SLURM_NODES=2), so that jobs can span nodes.
#  2. The demo runs through the profile into results-slurm/ (its own config overlay, written here);
#     sacct must list one COMPLETED job per planned job of every non-local rule, and no job of
#     the local rules.
#  3. A second run submits nothing.
#  4. scancel of a running tokenize shard (one shard of 2-image chunks, so it runs long enough),
#     then a rerun: the chunks finished before the cancel are reused, not recomputed.
#  5. A job larger than the node (tokenize workers 8 on a 2-CPU node) is refused before
#     submission, with one clear error, and nothing is submitted.
#  6. Training on two nodes (train.nodes 2): one train job of 2 nodes, srun starts `medmax
#     train-node` on each, their torchruns meet on the first node, and the run's record says
#     world size 2.
#  7. After restarting the cluster without accounting: the shipped profile (sacct, which would wait
#     forever) is refused before submission; the same profile with its status line switched to
#     squeue runs a job there.
# Environment: SNAKEMAKE, PYTHON (default .venv/bin/...), SLURM_DEMO_DIR (default results-slurm).
set -euo pipefail
cd "$(dirname "$0")/.."
SNAKEMAKE=${SNAKEMAKE:-.venv/bin/snakemake}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${SLURM_DEMO_DIR:-results-slurm}
PROFILE=workflow/profiles/slurm-cpu
MARKER=.medmax-slurm-ci
t0=$(date +%s)
log() { echo "[slurm-demo $(( $(date +%s) - t0 ))s] $*"; }
fail() { echo "slurm-demo: $*" >&2; exit 1; }
now() { date +%Y-%m-%dT%H:%M:%S; }
# sacct rows (JobIDRaw|Comment|State) of the jobs submitted since $1 (sacct -S alone also lists
# jobs that were still running then).
jobs_since() { sacct -X -n -P -S "$1" --format=JobIDRaw,Comment,State,Submit | awk -F'|' -v s="$1" '$4 >= s' | cut -d'|' -f1-3; }

# 1. the cluster -------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || { echo "slurm-demo: run as root" >&2; exit 3; }
export SLURM_NODES=2
# slurm-up.sh exits 3 when no cluster can be brought up here (.ci/run reports a skip).
up_status=0
SLURM_ACCOUNTING=slurmdbd .ci/slurm-up.sh || up_status=$?
[ "$up_status" = 0 ] || { echo "slurm-demo: .ci/slurm-up.sh failed (exit $up_status)" >&2; exit "$up_status"; }

# 2. the demo through the profile --------------------------------------------------------------
if [ -e "$OUT" ] && [ ! -e "$OUT/$MARKER" ]; then
  fail "$OUT exists and was not made by this script; set SLURM_DEMO_DIR to another folder"
fi
rm -rf "$OUT" && mkdir -p "$OUT" && touch "$OUT/$MARKER"
# The demo config with every path under $OUT (the demo writes only inside results_dir).
"$PYTHON" - "$OUT" <<'EOF'
import sys, yaml
out = sys.argv[1]
def move(value):
    if isinstance(value, str) and value.startswith("results/"):
        return f"{out}/{value[len('results/'):]}"
    if isinstance(value, dict):
        return {k: move(v) for k, v in value.items()}
    if isinstance(value, list):
        return [move(v) for v in value]
    return value
config = {k: move(v) for k, v in yaml.safe_load(open("config.yaml")).items()}
config["results_dir"] = out
yaml.safe_dump(config, open(f"{out}/ci-config.yaml", "w"), sort_keys=False)
# Phase 4: one shard of 2-image chunks, a folder of its own (tokenize/n1).
yaml.safe_dump({"tokenize": {"num_shards": 1, "chunk_size": 2}}, open(f"{out}/ci-cancel.yaml", "w"))
yaml.safe_dump({"tokenize": {"workers": 8}}, open(f"{out}/ci-too-big.yaml", "w"))
# A few steps: what is checked is the launch across nodes, not the training; two ranks leave the
# odd batch of the demo's rows untrained.
yaml.safe_dump({"train": {"nodes": 2, "max_steps": 4, "max_dropped_fraction": 0.2}}, open(f"{out}/ci-two-nodes.yaml", "w"))
EOF
# One --configfile flag with every file: a second flag would replace the first.
run() { "$SNAKEMAKE" --workflow-profile "$PROFILE" --configfile config.yaml "$OUT/ci-config.yaml" "$@"; }

start=$(sleep 1; now); sleep 1  # a second apart from what came before
log "demo through $PROFILE"
run > "$OUT/run1.log" 2>&1 || { tail -50 "$OUT/run1.log"; fail "the demo run failed (log: $OUT/run1.log)"; }
grep -q "SLURM check: 13 job(s) fit the nodes of partition(s) cpu; job states from sacct" "$OUT/run1.log" || fail "no SLURM check line in $OUT/run1.log"
sleep 2
jobs_since "$start" > "$OUT/sacct-run1.txt"
"$PYTHON" - "$OUT/sacct-run1.txt" <<'EOF'
import collections, re, sys
rows = [line.split("|") for line in open(sys.argv[1]).read().splitlines() if line]
expected = {"demo": 1, "convert_checkpoint": 1, "collect": 1, "tokenize_shard": 2, "assemble": 2, "train": 1, "export": 1,
            "generate": 2, "clip_scores": 2}
local = {"deepspeed_config", "gather_tokens", "map_vocab", "score", "report_figures"}
seen = collections.Counter()
for job_id, comment, state in rows:
    match = re.match(r"rule_(\w+?)(_wildcards_.*)?$", comment)
    if not match:
        sys.exit(f"slurm-demo: sacct job {job_id} has no rule comment: {comment!r}")
    if state != "COMPLETED":
        sys.exit(f"slurm-demo: job {job_id} ({comment}) is {state}, not COMPLETED")
    seen[match.group(1)] += 1
if dict(seen) != expected:
    sys.exit(f"slurm-demo: sacct lists jobs {dict(seen)}, expected {expected}")
if local & set(seen):
    sys.exit(f"slurm-demo: local rules ran as SLURM jobs: {sorted(local & set(seen))}")
print(f"sacct: {len(rows)} jobs, all COMPLETED: {dict(sorted(seen.items()))}")
EOF

# 3. a second run submits nothing ---------------------------------------------------------------
start=$(sleep 1; now); sleep 1  # a second apart from what came before
log "second run"
run > "$OUT/run2.log" 2>&1 || { tail -30 "$OUT/run2.log"; fail "the second run failed"; }
grep -q "Nothing to be done" "$OUT/run2.log" || { tail -30 "$OUT/run2.log"; fail "the second run planned jobs"; }
sleep 2
[ -z "$(jobs_since "$start")" ] || fail "the second run submitted jobs: $(jobs_since "$start")"
echo "second run: nothing to be done, no job submitted"

# 4. scancel a running tokenize shard, rerun, finished chunks reused ----------------------------
shard="$OUT/tokenize/n1/shard-0-of-1.parquet"
chunks="$OUT/tokenize/n1/shard-0-of-1.chunks"
cancel_args=(--workflow-profile "$PROFILE" --configfile config.yaml "$OUT/ci-config.yaml" "$OUT/ci-cancel.yaml" --retries 0 "$shard")
start=$(sleep 1; now); sleep 1  # a second apart from what came before
log "tokenize shard to cancel"
# Job control on while it starts: without it bash starts background commands with SIGINT
# ignored, and the Ctrl-C below would not reach Snakemake.
set -m
"$SNAKEMAKE" "${cancel_args[@]}" > "$OUT/run-cancel.log" 2>&1 &
runner=$!  # Snakemake itself
set +m
job=""
for _ in $(seq 600); do
  if [ -d "$chunks" ] && [ "$(find "$chunks" -name 'chunk-*.parquet' | wc -l)" -ge 2 ]; then
    # squeue: sacct stores the comment (the rule) only when the job ends.
    job=$(squeue -h -t RUNNING -o '%i|%k' | awk -F'|' '$2 ~ /^rule_tokenize_shard/ {print $1; exit}')
    [ -n "$job" ] && break
  fi
  kill -0 "$runner" 2>/dev/null || break
  sleep 0.5
done
[ -n "$job" ] || { wait "$runner" || true; tail -30 "$OUT/run-cancel.log"; fail "no running tokenize job with 2 finished chunks to cancel"; }
scancel "$job"
log "scancel $job"
# With sacct as status command, the executor (snakemake-executor-plugin-slurm 2.8.0) does not
# know the state sacct reports for a cancelled job, 'CANCELLED by <uid>', and waits on: a user
# stops it with Ctrl-C (README). Give it 20 s to notice by itself, then do the same.
for _ in $(seq 20); do kill -0 "$runner" 2>/dev/null || break; sleep 1; done
if kill -0 "$runner" 2>/dev/null; then
  log "Snakemake still waits on the cancelled job: Ctrl-C (SIGINT)"
  kill -INT "$runner"
fi
if wait "$runner"; then fail "the run whose job was cancelled succeeded"; fi
[ ! -e "$shard" ] || fail "$shard exists after the cancel"
state=$(sacct -X -n -P -j "$job" --format=State | head -1)
case "$state" in CANCELLED*) ;; *) fail "job $job is $state after scancel";; esac
n_before=$(find "$chunks" -name 'chunk-*.parquet' | wc -l)
[ "$n_before" -ge 2 ] || fail "fewer than 2 finished chunks kept after the cancel"
log "rerun after the cancel"
"$SNAKEMAKE" "${cancel_args[@]}" > "$OUT/run-resume.log" 2>&1 || { tail -30 "$OUT/run-resume.log"; fail "the rerun after the cancel failed"; }
[ -s "$shard" ] || fail "$shard missing after the rerun"
# The stage's own count: chunks whose file matched were read back, the rest computed.
reused=$(grep -oE '[0-9]+ chunks computed, [0-9]+ reused' "$OUT/logs/tokenize/shard-0.log" | tail -1)
case "$reused" in *", $n_before reused") ;; *) fail "the rerun did not reuse the $n_before finished chunks: '$reused'";; esac
resume_jobs=$(jobs_since "$start" | grep -c 'rule_tokenize_shard' || true)
[ "$resume_jobs" = 2 ] || fail "expected 2 tokenize jobs (cancelled + resumed), sacct lists $resume_jobs"
echo "cancel + rerun: job $job CANCELLED with $n_before chunk(s) finished; rerun: $reused"

# 5. a request larger than the node, refused before submission ----------------------------------
start=$(sleep 1; now); sleep 1  # a second apart from what came before
log "a request larger than the node"
if "$SNAKEMAKE" --workflow-profile "$PROFILE" --configfile config.yaml "$OUT/ci-config.yaml" "$OUT/ci-too-big.yaml" \
    --forcerun tokenize_shard "$OUT/tokenize/n2/shard-0-of-2.parquet" > "$OUT/run-too-big.log" 2>&1; then
  fail "a tokenize job asking 8 CPUs on a 2-CPU node was not refused"
fi
grep -q "rule tokenize_shard asks for 8 CPU(s)" "$OUT/run-too-big.log" || { tail -20 "$OUT/run-too-big.log"; fail "no clear error for the oversized request"; }
sleep 1
[ -z "$(jobs_since "$start")" ] || fail "the oversized request was submitted"
grep "rule tokenize_shard asks for 8 CPU(s)" "$OUT/run-too-big.log"


# 6. training on two nodes ----------------------------------------------------------------------
start=$(sleep 1; now); sleep 1  # a second apart from what came before
log "training on two nodes"
"$SNAKEMAKE" --workflow-profile "$PROFILE" --configfile config.yaml "$OUT/ci-config.yaml" "$OUT/ci-two-nodes.yaml" \
    --forcerun train --until train > "$OUT/run-two-nodes.log" 2>&1 || { tail -30 "$OUT/run-two-nodes.log"; tail -30 "$OUT/logs/train.log"; fail "training on two nodes failed"; }
sleep 2
row=$(sacct -X -n -P -S "$start" --format=JobIDRaw,Comment,State,NNodes | grep '|rule_train|' || true)
case "$row" in *"|rule_train|COMPLETED|2") ;; *) fail "expected one COMPLETED train job on 2 nodes, sacct: '$row'";; esac
for n in 0 1; do
  grep -q "medmax train-node: node $n of 2" "$OUT/logs/train.log" || fail "the train log has no line of node $n"
done
"$PYTHON" - "$OUT/train/adapter/medmax_provenance.json" <<'EOF'
import json, sys
run_config = json.load(open(sys.argv[1]))["run_config"]
if run_config["world_size"] != 2:
    sys.exit(f"slurm-demo: the two-node training ran with world size {run_config['world_size']}")
EOF
echo "two nodes: train job ${row%%|*} COMPLETED on 2 nodes, one torchrun per node, world size 2"

# 7. a cluster without accounting (last: it reruns collect, outdating what follows it) ------------
log "the cluster without accounting"
SLURM_ACCOUNTING=none .ci/slurm-up.sh
if timeout 300 "$SNAKEMAKE" --workflow-profile "$PROFILE" --configfile config.yaml "$OUT/ci-config.yaml" \
    --forcerun collect --until collect > "$OUT/run-no-accounting.log" 2>&1; then
  fail "the sacct profile ran on a cluster without accounting"
fi
grep -q "keeps no accounting" "$OUT/run-no-accounting.log" || { tail -20 "$OUT/run-no-accounting.log"; fail "no clear error for sacct without accounting"; }
[ -z "$(squeue -h)" ] || fail "jobs were submitted: $(squeue -h)"
# The documented one-line switch: a copy of the profile with the squeue status command.
squeue_profile="$OUT/profile-squeue"
mkdir -p "$squeue_profile"
sed 's/^slurm-status-command: sacct$/slurm-status-command: squeue/' "$PROFILE/config.yaml" > "$squeue_profile/config.yaml"
grep -q '^slurm-status-command: squeue$' "$squeue_profile/config.yaml" || fail "could not switch the profile's status command"
timeout 300 "$SNAKEMAKE" --workflow-profile "$squeue_profile" --configfile config.yaml "$OUT/ci-config.yaml" \
    --forcerun collect --until collect > "$OUT/run-squeue.log" 2>&1 || { tail -30 "$OUT/run-squeue.log"; fail "the squeue profile failed without accounting"; }
grep -qE "Finished jobid: [0-9]+ \(Rule: collect\)" "$OUT/run-squeue.log" || { tail -30 "$OUT/run-squeue.log"; fail "the squeue run did not finish its job"; }
echo "no accounting: the sacct profile is refused before submission; with squeue the job ran"
SLURM_ACCOUNTING=slurmdbd .ci/slurm-up.sh >/dev/null  # back to the accounting cluster
log "SLURM demo checks passed"
