"""Evaluation as a DAG: per-model CLIP scores and judge replies, then cheap score jobs over them.

The per-model artifacts must give exactly the scores that score computed the old way (loading
CLIP, the VQGAN and the judge itself), for every rule set.
"""

import json
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from medmax_pipeline.cli import main
from medmax_pipeline.core.artifacts import read_artifact, read_meta, write_artifact
from medmax_pipeline.demo_models import make_random_biomedclip
from medmax_pipeline.stages.evaluate.judge import JudgeError
from medmax_pipeline.stages.evaluate.judge_replies import (
    add_arguments as add_judge_arguments,
    judge_command_options,
    judge_config_from_args,
)
from medmax_pipeline.stages.evaluate.score import ScoreError, score_predictions

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_fixtures import write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VISUAL_CHAT_ANSWER = repr({"gpt4_answer": "ref", "fig_label": "Fig 1", "fig_caption": "cap", "in_text_mention": "ctx",
                           "domain": {"chest_xray": True, "mri": False, "histology": False, "gross": False, "ct_scan": False}})


class FakeJudge:
    """An OpenAI-compatible /chat/completions: 'lung' answers are right, 'mumble' gets no verdict."""

    def __init__(self):
        self.requests = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                content = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
                judge.requests += 1
                if "[Assistant 1]" in content:  # visual chat / mm_out: two scores on the first line
                    reply = "8 4\nAssistant 1 is better."
                else:
                    determined = content.split("answer to be determined:")[1].splitlines()[0]
                    reply = "I cannot tell." if "mumble" in determined else f"Correctness: {int('lung' in determined)}"
                body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def fake_judge():
    judge = FakeJudge()
    yield judge
    judge.close()


def _image(seed):
    return Image.fromarray((np.random.default_rng(seed).random((40, 48, 3)) * 255).astype("uint8"))


def _row(task, qtype, answer, prediction, model, image_path=None, tokens=(), prompt="Which organ?"):
    return {"task_name": task, "question_type": qtype, "prompt": prompt, "answer": answer, "image_path": image_path,
            "model": model, "prediction": prediction, "prediction_first_token": None,
            "generated_image_tokens": list(tokens)}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two models' predictions (VQA, open, captioning, image generation), a CLIP folder, a checkpoint."""
    root = tmp_path_factory.mktemp("dag")
    images = root / "images"
    images.mkdir()
    for k in range(3):
        _image(k).save(images / f"im{k}.png")
    clip_dir = make_random_biomedclip(root / "clip", root / "biomedbert", seed=0)
    ckpt = root / "ckpt"
    write_checkpoint(ckpt, seed=0)
    paths = []
    for m, model in enumerate(("base", "trained")):
        # Only the trained model made an image: each decode costs seconds and the old way decodes per rule set.
        tokens = [8197, *(int(t) + 4 for t in np.random.default_rng(m).integers(0, 8192, 1024)), 8196] if m else []
        rows = [
            _row("vqa_rad", "closed", "yes", "Yes." if m else "No.", model),
            _row("slake", "open", "lung", "the lung" if m else "heart", model),
            # Not the same question and answer for both models: the old in-process judge served the
            # second model's duplicate from its memory, noted "(cached)"; per-model jobs ask each.
            _row("pathvqa", "open", "lung", f"mumble {model}", model),
            _row("image_captioning", "pmc_oa", "ref", f"a chest x-ray {m}", model, image_path="im0.png"),
            _row("image_generation", "pmc_oa", "", "", model, image_path="im1.png", tokens=tokens,
                 prompt="a lung"),
            _row("image_generation", "quilt", "", "", model, image_path="im2.png", prompt="a slide"),  # no image made
            _row("visual_chat", "conversation", VISUAL_CHAT_ANSWER, f"text of {model}", model),
        ]
        path = root / f"predictions_{model}.parquet"
        write_artifact(pa.Table.from_pylist(rows), path, artifact="predictions")
        paths.append(path)
    return {"root": root, "images": images, "clip": clip_dir, "clip_text_tower": root / "biomedbert", "ckpt": ckpt,
            "predictions": paths}


def _judge_config(root, url, name, cache=None):
    path = root / f"{name}.json"
    path.write_text(json.dumps({"base_url": url, "model": "judge-x", "api_key_env": None, "cache_path": str(cache) if cache else None}))
    return path


def test_clip_scores_artifact_on_a_tiny_case(case):
    trained = case["predictions"][1]
    out = case["root"] / "clip_trained.parquet"
    image_dir = case["root"] / "images_trained"
    assert main(["clip-scores", "--predictions", str(trained), "--output", str(out), "--image-dir", str(image_dir),
                 "--clip", str(case["clip"]), "--clip-text-tower", str(case["clip_text_tower"]), "--ckpt", str(case["ckpt"]),
                 "--image-root", str(case["images"])]) == 0
    rows = read_artifact(out, artifact="clip_scores").to_pylist()
    assert [r["row"] for r in rows] == [3, 4, 5]  # captioning and image generation only
    caption, generated, missing = rows
    assert caption["note"] == "CLIP cosine(image, generated caption)" and -1 <= caption["score"] <= 1
    assert caption["generated_image"] is None
    assert generated["score_ref_image"] is not None and not generated["unjudged"]
    png = Path(generated["generated_image"])
    assert png.parent == image_dir and png.is_file()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (512, 512)
    assert missing["score"] == 0.0 and missing["note"] == "no image generated: scored 0" and missing["generated_image"] is None
    meta = read_meta(out)
    assert meta.lineage["params"]["predictions_fingerprint"] == read_meta(trained).fingerprint
    assert meta.lineage["params"]["clip"] == str(case["clip"])
    # Without a CLIP folder: images are still decoded, nothing is scored.
    bare = case["root"] / "clip_bare.parquet"
    assert main(["clip-scores", "--predictions", str(trained), "--output", str(bare), "--ckpt", str(case["ckpt"]),
                 "--image-dir", str(case["root"] / "bare_images")]) == 0
    bare_rows = read_artifact(bare, artifact="clip_scores").to_pylist()
    assert all(r["unjudged"] and r["score"] is None for r in bare_rows)
    assert bare_rows[1]["generated_image"] is not None and Path(bare_rows[1]["generated_image"]).is_file()


def test_clip_scores_prints_progress_lines_on_stderr(case, tmp_path, capsys):
    base = case["predictions"][0]
    assert main(["clip-scores", "--predictions", str(base), "--output", str(tmp_path / "clip.parquet")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"clip-scores: 3 of 7 rows to score ({base})",
                                "clip-scores: rows 3/3 (100.0%), " + err.split("(100.0%), ")[1].split(",")[0] + ", ETA 0h00m00s"]
    assert " rows/s" in err and out.startswith("wrote ")


def test_judge_replies_artifact_and_cache(case, fake_judge, tmp_path):
    base = case["predictions"][0]
    out = tmp_path / "judge_base.parquet"
    options = judge_command_options({"base_url": fake_judge.url, "model": "judge-x", "concurrency": 2, "api_key_env": None},
                                    str(tmp_path / "cache.jsonl"))
    before = fake_judge.requests
    assert main(["judge", "--predictions", str(base), "--output", str(out), *shlex.split(options)]) == 0
    rows = read_artifact(out, artifact="judge_replies").to_pylist()
    assert [r["row"] for r in rows] == [1, 2, 6]  # the open questions and visual chat
    assert [r["protocol"] for r in rows] == ["open_vqa", "open_vqa", "visual_chat"]
    assert rows[0]["judge_reply"] == "Correctness: 0" and rows[1]["judge_reply"] == "I cannot tell."
    assert fake_judge.requests - before == 3
    params = read_meta(out).lineage["params"]
    assert params["judge_model"] == "judge-x" and params["judge_stats"]["requests"] == 3
    assert params["judge_request_fields"] == ["model", "messages"]
    # A rerun is answered from the cache: no request, the replies flagged cached.
    assert main(["judge", "--predictions", str(base), "--output", str(out), *shlex.split(options)]) == 0
    assert fake_judge.requests - before == 3
    assert all(r["cached"] for r in read_artifact(out, artifact="judge_replies").to_pylist())


def test_score_with_per_model_artifacts_equals_score_computed_the_old_way(case, fake_judge, tmp_path):
    root, preds = case["root"], case["predictions"]
    clip_artifacts, judge_artifacts = [], []
    for path, model in zip(preds, ("base", "trained")):
        clip_out, judge_out = tmp_path / f"clip_{model}.parquet", tmp_path / f"judge_{model}.parquet"
        assert main(["clip-scores", "--predictions", str(path), "--output", str(clip_out), "--clip", str(case["clip"]),
                     "--clip-text-tower", str(case["clip_text_tower"]),
                     "--ckpt", str(case["ckpt"]), "--image-root", str(case["images"])]) == 0
        assert main(["judge", "--predictions", str(path), "--output", str(judge_out),
                     "--judge-config", str(_judge_config(tmp_path, fake_judge.url, "judge_job"))]) == 0
        clip_artifacts.append(clip_out)
        judge_artifacts.append(judge_out)
    for rules in ("medmax", "medmax_tolerant", "llava_med", "strict"):
        old_scores, old_summary = score_predictions(
            preds, tmp_path / f"old_{rules}", rules, judge_config=_judge_config(tmp_path, fake_judge.url, "judge_old"),
            clip_dir=case["clip"], ckpt_dir=case["ckpt"], image_root=case["images"], n_bootstrap=100,
            clip_text_tower=case["clip_text_tower"])
        # Artifacts in the other order: they are paired with predictions by fingerprint.
        new_scores, new_summary = score_predictions(
            preds, tmp_path / f"new_{rules}", rules, clip_scores=clip_artifacts[::-1], judge_replies=judge_artifacts[::-1],
            n_bootstrap=100)
        assert read_meta(new_scores).fingerprint == read_meta(old_scores).fingerprint, rules
        assert read_meta(new_summary).fingerprint == read_meta(old_summary).fingerprint, rules
        scores = read_artifact(new_scores).to_pylist()
        if rules == "medmax":
            assert [s["judge_reply"] for s in scores[1:3]] == ["Correctness: 0", "I cannot tell."]
            assert scores[2]["unjudged"] and "no 'Correctness: 1' or 'Correctness: 0'" in scores[2]["note"]
        assert scores[7 + 4]["score_ref_image"] is not None and scores[4]["note"] == "no image generated: scored 0"
        inputs = [i["artifact"] for i in read_meta(new_scores).lineage["inputs"]]
        assert inputs == ["predictions", "predictions", "clip_scores", "clip_scores", "judge_replies", "judge_replies"]


def test_score_refuses_artifacts_of_other_predictions(case, tmp_path):
    base, trained = case["predictions"]
    clip_base = tmp_path / "clip_base.parquet"
    assert main(["clip-scores", "--predictions", str(base), "--output", str(clip_base)]) == 0
    with pytest.raises(ScoreError, match=rf"{trained.name}: none of the --clip-scores artifacts was made from it"):
        score_predictions([trained], tmp_path / "s", "strict", clip_scores=[clip_base], n_bootstrap=100)
    clip_trained = tmp_path / "clip_trained.parquet"
    assert main(["clip-scores", "--predictions", str(trained), "--output", str(clip_trained)]) == 0
    with pytest.raises(ScoreError, match="clip_trained.parquet'] match none of the predictions files"):
        score_predictions([base], tmp_path / "s", "strict", clip_scores=[clip_base, clip_trained], n_bootstrap=100)
    with pytest.raises(ScoreError, match="either --clip-scores or --clip"):
        score_predictions([base], tmp_path / "s", "strict", clip_dir=case["clip"], clip_scores=[clip_base])
    # An artifact that does not cover the file's CLIP rows (here: made from a file with fewer rows).
    short = tmp_path / "short.parquet"
    write_artifact(read_artifact(base).slice(0, 4), short, artifact="predictions")
    clip_short = tmp_path / "clip_short.parquet"
    assert main(["clip-scores", "--predictions", str(short), "--output", str(clip_short)]) == 0
    from medmax_pipeline.stages.evaluate.clip_scores import check_clip_scores, read_clip_scores

    results, _ = read_clip_scores(clip_short)
    with pytest.raises(ScoreError, match=r"row 4 of .*predictions_base.parquet has no entry"):
        check_clip_scores(results, read_artifact(base).to_pylist(), clip_short, base)


def test_eval_images_under_a_credentialed_root_make_clip_scores_pngs_and_scores_credentialed(case, tmp_path):
    from medmax_pipeline.core.artifacts import read_provenance

    base = case["predictions"][0]  # a public artifact; its captioning image is images/im0.png
    assert read_meta(base).credential == "public"
    link = tmp_path / "eval_images"
    link.symlink_to(case["images"])  # the image root as a symlink into the credentialed root
    cred_link = tmp_path / "mimic"
    cred_link.symlink_to(case["images"])  # the credentialed root spelled through a symlink
    elsewhere = tmp_path / "other_credentialed"
    elsewhere.mkdir()
    runs = {
        "link_root": (link, case["images"], "credentialed"),
        "link_credentialed_root": (case["images"], cred_link, "credentialed"),
        "other_root": (case["images"], elsewhere, "public"),
    }
    for name, (image_root, credentialed_root, expected) in runs.items():
        out, pngs = tmp_path / f"clip_{name}.parquet", tmp_path / f"images_{name}"
        assert main(["clip-scores", "--predictions", str(base), "--output", str(out), "--clip", str(case["clip"]),
                     "--clip-text-tower", str(case["clip_text_tower"]), "--image-root", str(image_root),
                     "--image-dir", str(pngs), "--credentialed-root", str(credentialed_root)]) == 0
        assert read_meta(out).credential == expected, name
        assert read_provenance(pngs)["credential"] == expected, name
        scores, summary = score_predictions([base], tmp_path / f"scores_{name}", "strict", clip_scores=[out], n_bootstrap=10)
        assert read_meta(scores).credential == read_meta(summary).credential == expected, name
    # score on its own marks them too (no clip-scores artifact: the image paths decide).
    scores, summary = score_predictions([base], tmp_path / "scores_direct", "strict", image_root=link,
                                        credentialed_roots=[case["images"]], n_bootstrap=10)
    assert read_meta(scores).credential == read_meta(summary).credential == "credentialed"
    with pytest.raises(ScoreError, match="--credentialed-root .*nowhere: folder does not exist"):
        score_predictions([base], tmp_path / "s", "strict", credentialed_roots=[tmp_path / "nowhere"])


def test_judge_options_built_from_config_values():
    settings = {"base_url": "https://x.example/v1", "model": "gpt 4o", "api_key_env": "KEY", "concurrency": 3,
                "max_retries": 2, "timeout_s": 9.5, "max_retry_wait_s": 7.0, "max_reply_bytes": 5000,
                "max_total_minutes": 1.5, "max_unjudged_fraction": 0.0, "allow_credentialed": True}
    options = judge_command_options(settings, "results/c.jsonl")
    import argparse

    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    args = parser.parse_args(["--predictions", "p", "--output", "o", *shlex.split(options)])
    config = judge_config_from_args(args)
    assert (config.base_url, config.model, config.api_key_env, config.cache_path) == ("https://x.example/v1", "gpt 4o", "KEY", "results/c.jsonl")
    assert (config.concurrency, config.max_retries, config.timeout_s) == (3, 2, 9.5)
    assert (config.max_retry_wait_s, config.max_reply_bytes, config.max_total_minutes) == (7.0, 5000, 1.5)
    assert config.max_unjudged_fraction == 0.0 and config.allow_credentialed is True
    # allow_credentialed: false is the default, given as no flag at all.
    assert "--allow-credentialed" not in judge_command_options({**settings, "allow_credentialed": False})
    off = judge_config_from_args(parser.parse_args(["--predictions", "p", "--output", "o",
                                                    *shlex.split(judge_command_options({**settings, "allow_credentialed": False}))]))
    assert off.allow_credentialed is False
    with pytest.raises(JudgeError, match="not options of medmax judge"):
        judge_command_options({"base_url": "u", "model": "m", "top_p": 0.5})
    with pytest.raises(JudgeError, match="either --judge-config or the settings"):
        judge_config_from_args(parser.parse_args(["--predictions", "p", "--output", "o", "--judge-config", "j.json",
                                                  "--base-url", "u"]))


def test_score_job_imports_no_torch():
    # The score rule runs in the data env (no torch): its imports must not pull torch in.
    code = "import sys, medmax_pipeline.stages.evaluate.score, medmax_pipeline.stages.evaluate.judge_replies; " \
           "print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_dry_run_plans_judge_once_per_model_and_every_score_job_reads_it(tmp_path):
    overlay = tmp_path / "judge.yaml"
    overlay.write_text(yaml.safe_dump({"evaluate": {"judge": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}}))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n",
               "-p", "--configfile", str(REPO / "config.yaml"), str(overlay)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = result.stdout + result.stderr
    stats = plan.split("Job stats:")[1].split("\ntotal")[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    # The endpoint (port 9) is unreachable: a dry run does not check it (onstart does not run).
    assert counts["clip_scores"] == 2 and counts["judge"] == 2 and counts["score"] == 4
    score_commands = [line for line in plan.splitlines() if " medmax_pipeline score " in line]
    assert len(score_commands) == 4
    for line in score_commands:
        assert "--judge-replies" in line  # visual_chat / mm_out relative scores in every rule set
        assert "--clip-scores" in line and "--clip " not in line and "--ckpt" not in line
    assert "--judge-config" not in plan
