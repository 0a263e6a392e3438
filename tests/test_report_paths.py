"""No machine path in Snakemake's report: the interpreter, the results folder, configured inputs
(credentialed image roots included) and Snakemake's source cache become placeholders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from medmax_pipeline.stages.evaluate.report import machine_path_placeholders, scrub_machine_paths, scrub_report_file

REPO = Path(__file__).resolve().parent.parent
# What the workflow's report marks (report() outputs): the report needs them to exist.
REPORT_FILES = ("train/loss_curve.png", "report/summary.html", "report/families.html", "report/vqa_accuracy.png",
                "report/family_scores.png", "report/gallery.png", "report/coverage.html")


def test_placeholders_name_the_config_key_and_cover_real_and_relative_paths(tmp_path):
    real = tmp_path / "mimic-real"
    real.mkdir()
    (tmp_path / "mimic").symlink_to(real)
    config = {"results_dir": "runs/out", "images": {"credentialed": [{"source": "mimic_cxr", "root": str(tmp_path / "mimic")}]},
              "evaluate": {"judge": {"base_url": "https://api.example/v1"}, "rules": ["medmax"]}, "train": {"lora_r": 16}}
    placeholders = machine_path_placeholders(config, tmp_path, {"${python}": "/opt/venv/bin/python"})
    assert placeholders[str(tmp_path / "runs/out")] == "${results_dir}"  # relative to the working folder
    assert placeholders[str(tmp_path / "mimic")] == placeholders[str(real)] == "${images.credentialed[0].root}"
    assert placeholders["/opt/venv/bin/python"] == "${python}"
    assert not any("api.example" in p for p in placeholders)  # a URL is no path
    assert "/" not in placeholders


def test_scrub_replaces_whole_paths_and_leading_parts_only():
    placeholders = {"/data/mimic": "${mimic}", "/data/run": "${results_dir}", "/data/run/python": "${python}"}
    text = ('"input": ["/data/mimic/p10/s1.jpg", "/data/run/train/adapter"], "params": "medmax=/data/run/python -m x", '
            '"other": "/data/mimic2/x", "mid": "/x/data/mimic/y", "url": "%2Fdata%2Fmimic", "quoted": "/data/mimic&amp;"')
    out = scrub_machine_paths(text, placeholders)
    assert '"${mimic}/p10/s1.jpg", "${results_dir}/train/adapter"' in out
    assert "medmax=${python} -m x" in out  # the longest path first
    assert "/data/mimic2/x" in out and "/x/data/mimic/y" in out  # another folder; a path inside another
    assert json.loads("{" + out + "}")["input"][0] == "${mimic}/p10/s1.jpg"  # still valid JSON
    spaced = scrub_machine_paths("/data/my run/x and /data/my%20run/y", {"/data/my run": "${r}"})
    assert spaced == "${r}/x and ${r}/y"


def test_scrub_report_file_html_and_zip(tmp_path):
    html = tmp_path / "r.html"
    html.write_text("<script>var rules = {\"a\": [\"/secret/root/x\"]};</script>", encoding="utf-8")
    scrub_report_file(html, {"/secret/root": "${root}"})
    assert html.read_text() == "<script>var rules = {\"a\": [\"${root}/x\"]};</script>"
    report_zip = tmp_path / "r.zip"
    with zipfile.ZipFile(report_zip, "w") as z:
        z.writestr("r/report.html", "see /secret/root/y")
        z.writestr("r/data/x.png", b"\x89PNG/secret/root")
    scrub_report_file(report_zip, {"/secret/root": "${root}"})
    with zipfile.ZipFile(report_zip) as z:
        assert z.read("r/report.html") == b"see ${root}/y"
        assert z.read("r/data/x.png") == b"\x89PNG/secret/root"  # a result file is left as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.zip"]  # no temporary left


@pytest.mark.slow
def test_snakemake_report_holds_no_machine_path(tmp_path):
    """The demo rule runs (its job gives the report a rule record), the report's figures are stand-ins;
    every path in the config is absolute, as a real config's are."""
    results = tmp_path / "results"
    overlay = {
        "results_dir": str(results),
        "checkpoint": str(results / "demo/checkpoint"),
        "dataset": {"train": str(results / "demo/data/train.jsonl"), "validation": str(results / "demo/data/validation.jsonl")},
        "images": {"public_root": str(results / "demo/images/public"), "include_public": True,
                   "credentialed": [{"source": "mimic_cxr", "root": str(results / "demo/images/credentialed/mimic-cxr-jpg"),
                                     "template": "mimic_cxr_jpg"}]},
        "evaluate": {"eval_set": str(results / "demo/eval/eval.jsonl"), "image_root": str(results / "demo/eval/images"),
                     "clip": str(results / "demo/biomedclip"), "clip_text_tower": str(results / "demo/biomedbert")},
    }
    config = tmp_path / "absolute.yaml"
    config.write_text(yaml.safe_dump(overlay))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
               "--configfile", str(REPO / "config.yaml"), str(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*command, "--until", "demo"], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in REPORT_FILES:
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / name).write_text("stand-in")
    done = subprocess.run([*command, "--report", str(tmp_path / "report.html")], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    rules = json.JSONDecoder().raw_decode(text[text.rindex("var rules = ") + len("var rules = "):])[0]
    assert "demo" in rules  # a rule record with the configured paths as its outputs
    assert "${images.credentialed[0].root}" in json.dumps(rules["demo"]["output"])
    # The rules' commands name the interpreter through the environment ($MEDMAX_PYTHON), not by path.
    assert "$MEDMAX_PYTHON" in text and "${results_dir}/report/summary.html" in text
    machine = [str(tmp_path), os.path.realpath(tmp_path), sys.executable, os.path.realpath(sys.executable), str(REPO),
               str(Path.home() / ".cache")]
    assert [p for p in machine if p in text] == []
