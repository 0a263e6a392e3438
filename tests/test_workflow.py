"""The whole workflow on the embedded demo, through Snakemake, as README line 1 runs it.

The demo runs once (module fixture) with `evaluate.judge` pointing at a fake OpenAI-compatible
judge on 127.0.0.1 (judge_server.py), so open VQA, visual chat and mm_out are judged over real
HTTP through the `openai` client; every rerun passes the same judge overlay.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from medmax_pipeline.core.artifacts import ARTIFACT_SCHEMA_VERSIONS, read_artifact, read_meta

sys.path.insert(0, str(Path(__file__).parent))
from judge_server import OPEN_VQA_REPLIES, FakeJudgeServer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {"medmax.artifact", "medmax.schema_version", "medmax.fingerprint", "medmax.lineage", "medmax.credential", "medmax.pipeline_version"}
JUDGE_MODEL = "fake-judge-mini"
JUDGE_KEY_ENV = "MEDMAX_TEST_JUDGE_KEY"
JUDGE_KEY = "test-key-not-secret"
MODELS = ("base", "trained")
OPEN_TASKS = ("vqa_rad", "slake", "pathvqa", "quilt_vqa")

pytestmark = pytest.mark.slow


def snakemake(
    workdir: Path, *args: str, configfiles: tuple[Path, ...] = (), env: dict[str, str] | None = None, repo: Path = REPO,
    python: str = sys.executable,
) -> subprocess.CompletedProcess:
    """`repo`: the folder of the Snakefile, whose package the Snakefile imports (an edited copy);
    `python`: the interpreter that runs Snakemake (and so the rules)."""
    command = [python, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    # The default config (the demo) with its relative paths resolved inside `workdir`, plus overlays.
    command += ["--configfile", str(REPO / "config.yaml"), *map(str, configfiles)]
    if env is None:
        env = {**os.environ, JUDGE_KEY_ENV: JUDGE_KEY}
    env.pop("MEDMAX_SKIP_JUDGE_CHECK", None)  # the start-of-run check is part of what is tested
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=workdir, env=env)


def judge_overlay(path: Path, base_url: str, api_key_env: str = JUDGE_KEY_ENV) -> Path:
    # The demo trains on its (synthetic) credentialed rows, so the trained model's predictions are
    # credentialed: the judge sends them only with allow_credentialed (the test endpoint is local).
    judge = {"base_url": base_url, "model": JUDGE_MODEL, "api_key_env": api_key_env, "allow_credentialed": True}
    path.write_text(yaml.safe_dump({"evaluate": {"judge": judge}}))
    return path


@pytest.fixture(scope="module")
def judge_server():
    with FakeJudgeServer(max_requests=400, lifetime_s=3 * 3600) as server:
        yield server


@pytest.fixture(scope="module")
def judge_config(tmp_path_factory: pytest.TempPathFactory, judge_server: FakeJudgeServer) -> Path:
    return judge_overlay(tmp_path_factory.mktemp("judge") / "judge.yaml", judge_server.url)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, judge_config: Path) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    result = snakemake(workdir, configfiles=(judge_config,))
    if result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results" / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-4000:]}\n{logs}")
    return workdir


def eval_rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "results/demo/eval/eval.jsonl").read_text().splitlines()]


def summary_rows(run_dir: Path, rule_set: str) -> list[dict]:
    return read_artifact(run_dir / f"results/evaluate/{rule_set}/score_summary.parquet", "score_summary").to_pylist()


def test_every_parquet_is_an_artifact_with_the_footer_metadata(run_dir: Path) -> None:
    parquets = sorted((run_dir / "results").rglob("*.parquet"))
    assert len(parquets) >= 15
    for path in parquets:
        kv = {k.decode() for k in (pq.read_metadata(path).metadata or {})}
        assert REQUIRED_KEYS <= kv, f"{path} lacks {REQUIRED_KEYS - kv}"
        meta = read_meta(path)
        assert meta.schema_version == ARTIFACT_SCHEMA_VERSIONS[meta.artifact]


def test_public_export_has_no_credentialed_row_and_dataset_has_every_fillable_one(run_dir: Path) -> None:
    for split in ("train", "validation"):
        public = read_artifact(run_dir / f"results/assemble/{split}/dataset_public.parquet", "dataset_public")
        assert read_meta(run_dir / f"results/assemble/{split}/dataset_public.parquet").credential == "public"
        assert set(public.column("credential").to_pylist()) == {"no"}
        dataset = read_artifact(run_dir / f"results/assemble/{split}/dataset.parquet", "dataset")
        problems = read_artifact(run_dir / f"results/assemble/{split}/dataset_problems.parquet", "dataset_problems")
        credentialed_rows = [r for r in dataset.to_pylist() if r["credential"] == "yes"]
        if split == "train":
            assert credentialed_rows, "no credentialed row was filled"
            assert read_meta(run_dir / f"results/assemble/{split}/dataset.parquet").credential == "credentialed"
        assert all(r["tokens"][0] == 0 and 8197 in r["tokens"] for r in credentialed_rows)
        reasons = " ".join(problems.column("reason").to_pylist())
        if split == "train":
            assert "bad JSON" in reasons


def test_broken_credentialed_images_are_reported_not_tokenized(run_dir: Path) -> None:
    errors = read_artifact(run_dir / "results/tokenize/image_token_errors.parquet", "image_token_errors")
    assert errors.num_rows == 3
    problems = read_artifact(run_dir / "results/collect/image_path_problems.parquet", "image_path_problems")
    assert any("missing" in r for r in problems.column("reason").to_pylist())


def test_rerun_does_nothing(run_dir: Path, judge_config: Path) -> None:
    result = snakemake(run_dir, "-n", configfiles=(judge_config,))
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """The rules a dry run plans (empty when there is nothing to be done)."""
    plan = result.stdout + result.stderr
    if "Job stats:" not in plan:
        return set()
    return {line.split()[0] for line in plan.split("Job stats:")[1].splitlines()[3:] if line.strip() and not line.startswith("total")}


def workflow_copy(tmp_path: Path) -> Path:
    """A copy of the Snakefile, its rule files and the package beside it: Snakemake puts the
    Snakefile's folder first on the import path, so the rules' code params come from this copy."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy2(REPO / "Snakefile", copy / "Snakefile")
    for folder in ("workflow", "envs", "medmax_pipeline"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


COMPUTE_RULES = {"demo", "collect", "tokenize_shard", "gather_tokens", "assemble", "train", "export", "generate", "clip_scores"}


def test_edits_rerun_exactly_the_rules_whose_code_changed(run_dir: Path, judge_config: Path, tmp_path: Path) -> None:
    """Issue 21 item 2. Bookkeeping edits (a comment in cli.py, core/plots.py and report.py, a help
    string, a log line in training) plan no compute job; then a computing edit in training plans
    training onward but no tokenization; then one in tokenization plans tokenization onward but
    not the collection of image paths."""
    copy = workflow_copy(tmp_path)
    package = copy / "medmax_pipeline"
    for rel in ("cli.py", "core/plots.py", "stages/evaluate/report.py"):
        (package / rel).write_text("# an edited comment\n" + (package / rel).read_text())
    edit(package / "cli.py", "stage 2: VQGAN-tokenize one shard of images", "stage 2: tokenize one shard")
    edit(package / "stages/train/recipe.py", "reporter.close()", "print('an added log line')\n    reporter.close()")
    result = snakemake(run_dir, "-n", configfiles=(judge_config,), repo=copy)
    assert result.returncode == 0, result.stderr
    assert planned_jobs(result) & COMPUTE_RULES == set()

    (package / "stages/train/loss.py").write_text((package / "stages/train/loss.py").read_text() + "\nEDITED_CONSTANT = 1\n")
    result = snakemake(run_dir, "-n", configfiles=(judge_config,), repo=copy)
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result)
    assert {"train", "export", "generate"} <= jobs
    assert jobs & {"demo", "collect", "tokenize_shard", "gather_tokens", "assemble"} == set()
    assert "params have changed since last execution" in result.stdout + result.stderr

    tokenize = package / "stages/tokenize_images.py"
    tokenize.write_text(tokenize.read_text() + "\nEDITED_CONSTANT = 1\n")
    jobs = planned_jobs(snakemake(run_dir, "-n", configfiles=(judge_config,), repo=copy))
    assert {"tokenize_shard", "gather_tokens", "assemble", "train"} <= jobs
    assert jobs & {"demo", "collect"} == set()


def moved_virtualenv(tmp_path: Path) -> Path:
    """The interpreter of this virtualenv as if the virtualenv had moved: a new prefix (its own
    bin/python and pyvenv.cfg) whose lib/ is this one's, so sys.executable is another path."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtualenv")
    prefix = tmp_path / "moved-venv"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    shutil.copy2(Path(sys.prefix) / "pyvenv.cfg", prefix / "pyvenv.cfg")
    (prefix / "lib").symlink_to(Path(sys.prefix) / "lib")
    return prefix / "bin" / "python"


def test_a_moved_project_and_virtualenv_rerun_nothing(run_dir: Path, judge_config: Path, tmp_path: Path) -> None:
    """The interpreter's path reaches the jobs through $MEDMAX_PYTHON, not through any rule's
    params or command: another virtualenv path and another workflow folder plan nothing."""
    python = moved_virtualenv(tmp_path)
    probe = subprocess.run([str(python), "-c", "import sys, snakemake; print(sys.executable)"], capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == str(python), probe.stderr
    result = snakemake(run_dir, "-n", configfiles=(judge_config,), repo=workflow_copy(tmp_path), python=str(python))
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]


def test_changing_the_shard_count_reruns_tokenization_onward_only(run_dir: Path, judge_config: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "shards.yaml"
    overlay.write_text(yaml.safe_dump({"tokenize": {"num_shards": 3}}))
    result = snakemake(run_dir, "-n", configfiles=(judge_config, overlay))
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result)
    assert {"tokenize_shard", "gather_tokens"} <= jobs
    assert "collect" not in jobs and "demo" not in jobs


def test_report_renders(run_dir: Path, judge_config: Path) -> None:
    result = snakemake(run_dir, "--report", "report.html", configfiles=(judge_config,))
    assert result.returncode == 0, result.stderr
    html = (run_dir / "report.html").read_text()
    assert "Evaluation" in html and "loss curve" in html.lower()


# ----------------------------------------------------------------------------------------------
# The LLM judge through the workflow (a fake OpenAI-compatible server on 127.0.0.1)
# ----------------------------------------------------------------------------------------------


def test_judge_artifacts_exist_per_model_with_a_reply_per_judged_row(run_dir: Path) -> None:
    rows = eval_rows(run_dir)
    judged = [r for r in rows if r["question_type"] == "open" or r["task_name"] in ("visual_chat", "mm_out")]
    for model in MODELS:
        replies = read_artifact(run_dir / f"results/evaluate/judge_{model}.parquet", "judge_replies").to_pylist()
        assert len(replies) == len(judged)
        assert {r["protocol"] for r in replies} == {"open_vqa", "visual_chat", "mm_out"}
        assert all(r["judge_reply"] is not None and r["failure"] is None for r in replies)
        assert (run_dir / f"results/evaluate/judge_cache_{model}.jsonl").is_file()  # the cache lives under results
        params = read_meta(run_dir / f"results/evaluate/judge_{model}.parquet").lineage["params"]
        assert params["judge_model"] == JUDGE_MODEL and params["judge_request_fields"] == ["model", "messages"]


def test_open_questions_are_scored_by_the_judge_not_the_stand_in(run_dir: Path) -> None:
    truths: dict[str, list[str]] = {}
    for r in eval_rows(run_dir):
        if r["question_type"] == "open":
            truths.setdefault(r["task_name"], []).append(r["answer"])
    # The fake judge's verdict follows the ground truth; the demo must hold a reply with no verdict.
    assert any(OPEN_VQA_REPLIES[t] in ("I cannot tell from this answer.", "**Correctness:** 1") for ts in truths.values() for t in ts)
    for rule_set, accepted in (("medmax", {"Correctness: 1"}), ("medmax_tolerant", {"Correctness: 1", "**Correctness:** 1"})):
        summary = {(r["model"], r["task_name"]): r for r in summary_rows(run_dir, rule_set) if r["question_type"] == "open"}
        for model in MODELS:
            for task in OPEN_TASKS:
                row, replies = summary[(model, task)], [OPEN_VQA_REPLIES[t] for t in truths[task]]
                verdicts = [reply in accepted for reply in replies if reply in accepted or reply == "Correctness: 0"]
                assert row["metric"] == "judge_accuracy" and not row["stand_in"], row
                assert row["unjudged"] == len(replies) - len(verdicts), row
                assert row["accuracy"] == pytest.approx(sum(verdicts) / len(replies)), row  # unjudged counted wrong
                if verdicts:
                    assert row["accuracy_judged"] == pytest.approx(sum(verdicts) / len(verdicts)), row
                else:
                    assert math.isnan(row["accuracy_judged"])
        averages = [r for r in summary_rows(run_dir, rule_set) if r["task_name"] == "vqa_average"]
        assert averages and not any("/open" in r["note"] for r in averages)  # no open task is a stand-in


def test_visual_chat_and_mm_out_get_relative_scores(run_dir: Path) -> None:
    rows = eval_rows(run_dir)
    chat = [r for r in rows if r["task_name"] == "visual_chat"]
    scored = [r for r in chat if r["prompt"].rstrip().endswith("<image>")]  # the others get a first line that is not two numbers
    n_mm_out = sum(r["task_name"] == "mm_out" for r in rows)
    assert 0 < len(scored) < len(chat)
    summary = {(r["model"], r["task_name"], r["question_type"]): r for r in summary_rows(run_dir, "medmax")}
    for model in MODELS:
        overall = summary[(model, "visual_chat", "overall")]
        assert (overall["metric"], overall["n"], overall["n_judged"], overall["unjudged"]) == ("relative_score", len(chat), len(scored), len(chat) - len(scored))
        assert overall["accuracy_judged"] == pytest.approx(4 / 8)  # "8 4": s2 / s1
        assert (overall["mean_reference_score"], overall["mean_model_score"]) == (8, 4)
        for question_type in ("conversation", "detailed_description"):
            assert summary[(model, "visual_chat", question_type)]["n"] == sum(r["question_type"] == question_type for r in chat)
        for r in scored:  # per domain
            domain = next((d for d, flag in ast.literal_eval(r["answer"])["domain"].items() if flag), None)
            if domain is not None:
                assert summary[(model, "visual_chat", domain)]["accuracy_judged"] == pytest.approx(0.5)
        text = summary[(model, "mm_out", "overall")]
        assert (text["n"], text["n_judged"], text["unjudged"]) == (n_mm_out, n_mm_out, 0)
        assert text["accuracy_judged"] == pytest.approx(5 / 10)  # "10 5"
        assert summary[(model, "mm_out", "image")]["n"] == n_mm_out


def test_judge_requests_carry_model_and_messages_only(run_dir: Path, judge_server: FakeJudgeServer) -> None:
    assert judge_server.bodies
    assert all(set(body) == {"model", "messages"} for body in judge_server.bodies)  # no temperature
    assert {body["model"] for body in judge_server.bodies} == {JUDGE_MODEL}
    assert set(judge_server.authorizations) == {f"Bearer {JUDGE_KEY}"}  # the key from the named variable
    asked = sum(not r["cached"] for model in MODELS
                for r in read_artifact(run_dir / f"results/evaluate/judge_{model}.parquet", "judge_replies").to_pylist())
    assert judge_server.requests == asked


def test_a_real_rerun_asks_the_judge_nothing(run_dir: Path, judge_server: FakeJudgeServer, judge_config: Path) -> None:
    before = judge_server.requests
    result = snakemake(run_dir, configfiles=(judge_config,))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr
    assert judge_server.requests == before


@pytest.mark.parametrize("problem", ["missing key", "closed port"])
def test_start_of_run_check_stops_before_any_job(problem: str, tmp_path: Path, judge_server: FakeJudgeServer) -> None:
    """A real (not dry) run with a judge it cannot use stops with one line before any job runs."""
    env = {k: v for k, v in os.environ.items() if k != JUDGE_KEY_ENV}
    if problem == "missing key":
        base_url, expected = judge_server.url, f"evaluate.judge: the judge's API key variable {JUDGE_KEY_ENV} is not set"
    else:
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base_url, expected = f"http://127.0.0.1:{port}/v1", f"evaluate.judge: the judge endpoint http://127.0.0.1:{port}/v1 is unreachable"
        env[JUDGE_KEY_ENV] = JUDGE_KEY
    overlay = judge_overlay(tmp_path / "judge.yaml", base_url)
    workdir = tmp_path / "run"
    workdir.mkdir()
    before = judge_server.requests
    # --until demo: should the check not stop the run, only the cheap first job would run.
    result = snakemake(workdir, "--until", "demo", configfiles=(overlay,), env=env)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "evaluate.judge:" in line]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-2000:]
    assert not (workdir / "results").exists()  # no job ran: no output, no log
    assert judge_server.requests == before


def test_forced_judge_rerun_reads_every_reply_from_the_cache(run_dir: Path, judge_server: FakeJudgeServer, judge_config: Path) -> None:
    """Last in the module: it rewrites the judge artifacts (their request statistics change)."""
    before = judge_server.requests
    result = snakemake(run_dir, "--forcerun", "judge", "--until", "judge", configfiles=(judge_config,))
    assert result.returncode == 0, result.stderr[-3000:]
    assert judge_server.requests == before
    for model in MODELS:
        path = run_dir / f"results/evaluate/judge_{model}.parquet"
        assert all(r["cached"] for r in read_artifact(path, "judge_replies").to_pylist())
        assert read_meta(path).lineage["params"]["judge_stats"]["requests"] == 0
