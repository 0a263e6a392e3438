"""Config validation: schema, defaults, one clear message naming the key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from medmax_pipeline.core.config import ConfigError, load_config, validate_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def config() -> dict:
    with open(REPO / "config.yaml") as f:
        return yaml.safe_load(f)


def test_default_config_is_valid_and_gets_defaults(config: dict) -> None:
    validated = validate_config(copy.deepcopy(config))
    assert validated["tokenize"]["gpus_per_job"] == 1
    assert validated["train"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert validated["train"]["lora_dropout"] == 0.05


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["tokenize"].update(num_shard=2), r"unknown key 'tokenize.num_shard'"),
        (lambda c: c.update(extra_section={}), r"unknown key 'extra_section'"),
        (lambda c: c["tokenize"].update(num_shards="two"), r"key 'tokenize.num_shards': 'two' is not of type 'integer'"),
        (lambda c: c["tokenize"].update(num_shards=0), r"key 'tokenize.num_shards'"),
        (lambda c: c["assemble"].update(overflow="wrap"), r"key 'assemble.overflow'"),
        (lambda c: c["images"]["credentialed"][0].pop("template"), r"key 'images.credentialed.0': give exactly one of template or mapping"),
        (lambda c: c["images"]["credentialed"][0].update(mapping="m.csv"), r"key 'images.credentialed.0': give exactly one of template or mapping"),
        (lambda c: c["images"]["credentialed"][0].update(template="files/{subject_id:d}.jpg"),
         r"key 'images.credentialed.0.template': template 'files/\{subject_id:d\}.jpg': format spec 'd' .* does not apply to text"),
        (lambda c: c["images"]["credentialed"][0].update(template="files/{subject_id"), r"key 'images.credentialed.0.template': .*not a valid format string"),
        (lambda c: c["images"]["credentialed"][0].update(source="mimic=cxr"), r"key 'images.credentialed.0.source'"),
        (lambda c: c["images"]["credentialed"][0].update(root="/data/a=b"), r"key 'images.credentialed.0.root': .*may not hold '='"),
        (lambda c: c["images"]["credentialed"][0].update(root="/data/{x}"), r"key 'images.credentialed.0.root': .*may not hold '\{'"),
        (lambda c: c["images"]["credentialed"][0].update(mapping="m.txt") or c["images"]["credentialed"][0].pop("template"), r"key 'images.credentialed.0.mapping': .*\.csv or \.jsonl"),
        (lambda c: c.pop("dataset"), r"missing key 'dataset'"),
        (lambda c: c["tokenize"].update(precision="bf16"), r"key 'tokenize.precision': bf16 needs device cuda"),
        (lambda c: c["images"]["credentialed"].append(dict(c["images"]["credentialed"][0])), r"listed twice"),
        (lambda c: c["evaluate"].update(clip=None), r"key 'evaluate.clip_text_tower': it is the text tower of evaluate.clip, which is not set"),
        (lambda c: c["evaluate"].update(clip=None, clip_text_tower=None), r"key 'evaluate.clip': demo.enabled is true .* the demo writes a folder there"),
        (lambda c: c["evaluate"].update(clip_text_tower=None), r"key 'evaluate.clip_text_tower': demo.enabled is true .* the demo writes a folder there"),
    ],
)
def test_bad_config_names_the_key(config: dict, mutate, message: str) -> None:
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


@pytest.mark.parametrize("template", ["files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg", "it's {dicom_id} .jpg"])
def test_custom_templates_are_valid(config: dict, template: str) -> None:
    config["images"]["credentialed"][0]["template"] = template
    assert validate_config(config)["images"]["credentialed"][0]["template"] == template


def user_inputs(config: dict, tmp_path: Path) -> None:
    """Point every input path at empty stand-ins under tmp_path, as a real run's own copies."""
    config["checkpoint"] = str(tmp_path / "checkpoint")
    for rel in ("tokenizer/vqgan.yaml", "tokenizer/vqgan.ckpt", "tokenizer/text_tokenizer_modified.json"):
        (tmp_path / "checkpoint" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoint" / rel).write_text("")
    for section, key in (("dataset", "train"), ("dataset", "validation"), ("evaluate", "eval_set")):
        config[section][key] = str(tmp_path / f"{key}.jsonl")
        (tmp_path / f"{key}.jsonl").write_text("")
    for section, key in (("images", "public_root"), ("evaluate", "image_root"), ("evaluate", "clip"), ("evaluate", "clip_text_tower")):
        config[section][key] = str(tmp_path / key)
        (tmp_path / key).mkdir()


def test_a_mapping_file_must_exist_when_the_demo_does_not_make_inputs(config: dict, tmp_path: Path) -> None:
    user_inputs(config, tmp_path)
    config["base_model"] = str(tmp_path / "base_model")
    (tmp_path / "base_model").mkdir()
    config["demo"]["enabled"] = False
    config["images"]["credentialed"] = [{"source": "mimic_cxr", "root": str(tmp_path / "public_root"), "mapping": str(tmp_path / "m.csv")}]
    with pytest.raises(ConfigError, match=rf"key 'images.credentialed.0.mapping': file {re.escape(str(tmp_path / 'm.csv'))} does not exist"):
        validate_config(config)
    (tmp_path / "m.csv").write_text("row_id,image_path\n")
    assert validate_config(config)["images"]["credentialed"][0]["mapping"] == str(tmp_path / "m.csv")


def test_missing_path_is_reported_when_the_demo_does_not_make_it(
    config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative paths resolve here, where no demo was made
    config["demo"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"key 'checkpoint': folder results/demo/checkpoint does not exist"):
        validate_config(config)


def test_load_config_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tokenize: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_snakemake_stops_with_the_message(tmp_path: Path, config: dict) -> None:
    import subprocess
    import sys

    config["tokenize"]["num_shardz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad), "--directory", str(REPO)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode != 0
    assert f"{bad}: unknown key 'tokenize.num_shardz'" in result.stdout + result.stderr  # names the --configfile


def test_snakemake_and_validate_config_agree_on_templates(tmp_path: Path, config: dict, capsys: pytest.CaptureFixture) -> None:
    """A template validate-config accepts plans (no WildcardError from the braces); one it refuses
    stops the workflow before planning with the same message."""
    import subprocess
    import sys

    from medmax_pipeline import cli

    def dry_run(template: str) -> tuple[subprocess.CompletedProcess, int, str]:
        config["images"]["credentialed"][0]["template"] = template
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "--directory", str(REPO)],
            capture_output=True, text=True, cwd=REPO,
        )
        code = cli.main(["validate-config", str(path)])
        return result, code, capsys.readouterr().err

    result, code, _ = dry_run("files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id} it's.jpg")
    assert result.returncode == 0 and code == 0, result.stdout + result.stderr
    assert "WildcardError" not in result.stdout + result.stderr
    result, code, error = dry_run("files/p{subject_id:d}.jpg")
    assert result.returncode != 0 and code == 1
    message = error.strip().removeprefix("error: ")
    assert "does not apply to text" in message and message in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# Issue 11: a config error names the file the bad key came from
# ----------------------------------------------------------------------------------------------


def _merged(base: dict, overlay: dict) -> dict:
    """What Snakemake's update_config does with --configfile: nested mappings merged, overlay wins."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"tokenize": {"num_shardz": 3}}, r"^{overlay}: unknown key 'tokenize.num_shardz'"),
        ({"tokenize": {"num_shards": "two"}}, r"^{overlay}: key 'tokenize.num_shards': 'two' is not of type"),
        ({"tokenize": {"precision": "bf16"}}, r"^{overlay}: key 'tokenize.precision': bf16 needs device cuda"),
        ({"results_dir": "elsewhere", "extra_section": {}}, r"^{overlay}: unknown key 'extra_section'"),
    ],
)
def test_config_error_names_the_file_that_set_the_key(config: dict, tmp_path: Path, overlay: dict, message: str) -> None:
    base = tmp_path / "config.yaml"
    base.write_text(yaml.safe_dump(config))
    extra = tmp_path / "cluster.yaml"
    extra.write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError, match=message.format(overlay=re.escape(str(extra)))):
        validate_config(_merged(config, overlay), config_files=[base, extra])


def test_config_error_in_the_base_file_names_the_base_file(config: dict, tmp_path: Path) -> None:
    config["tokenize"]["num_shardz"] = 3
    base = tmp_path / "config.yaml"
    base.write_text(yaml.safe_dump(config))
    extra = tmp_path / "cluster.yaml"
    extra.write_text(yaml.safe_dump({"tokenize": {"num_shards": 4}}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))}: unknown key 'tokenize.num_shardz'"):
        validate_config(_merged(config, {"tokenize": {"num_shards": 4}}), config_files=[base, extra])
    # A key no file sets (a missing required key) names every file that was merged.
    del config["dataset"]
    base.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(base))} \+ {re.escape(str(extra))}: missing key 'dataset'"):
        validate_config(_merged(config, {"tokenize": {"num_shards": 4}}), config_files=[base, extra])


def test_load_config_names_its_file(config: dict, tmp_path: Path) -> None:
    config["tokenize"]["num_shardz"] = 3
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown key 'tokenize.num_shardz'"):
        load_config(path, check_paths=False)


def test_a_null_base_model_needs_the_original_weights_in_the_checkpoint(config: dict, tmp_path: Path) -> None:
    """base_model null: the workflow converts checkpoint/models/7b itself, so those files must exist."""
    user_inputs(config, tmp_path)
    config["base_model"] = None
    config["images"]["credentialed"] = []
    config["demo"]["enabled"] = False
    with pytest.raises(ConfigError, match=r"key 'checkpoint': .* lacks models/7b/consolidated.pth"):
        validate_config(config)
    for rel in ("models/7b/consolidated.pth", "models/7b/params.json"):
        (tmp_path / "checkpoint" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "checkpoint" / rel).write_text("")
    assert validate_config(config)["base_model"] is None


def _keys(document: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in document.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, prefix + key + ".")
    return out


def test_the_real_run_template_turns_the_demo_off_and_sets_every_key_the_demo_config_sets(config: dict) -> None:
    """Merged over config.yaml, the template leaves no demo value in force."""
    template_path = REPO / "config.real-run.yaml"
    template = yaml.safe_load(template_path.read_text())
    assert _keys(config) <= _keys(template), f"config.real-run.yaml lacks {sorted(_keys(config) - _keys(template))}"
    validated = load_config(template_path, check_paths=False)
    assert validated["demo"]["enabled"] is False
    assert validated["images"]["include_public"] is False  # re-encoding every public image is opt-in
    assert validated["train"]["learning_rate"] == 1.0e-4
    with pytest.raises(ConfigError, match=rf"{re.escape(str(template_path))}: key 'checkpoint': folder .* does not exist"):
        load_config(template_path)  # the placeholders are not on this machine


@pytest.mark.parametrize("key", ["checkpoint", "dataset.train", "images.public_root", "images.credentialed.0.root", "evaluate.clip",
                                 "evaluate.clip_text_tower"])
def test_with_the_demo_on_no_input_may_lie_outside_the_results_folder(config: dict, tmp_path: Path, key: str) -> None:
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    target = config
    for part in parts[:-1]:
        target = target[part]
    target[parts[-1]] = str(tmp_path / "real-data")
    with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}': demo.enabled is true .* outside results_dir 'results'"):
        validate_config(config)
    target[parts[-1]] = "results/elsewhere/real-data"  # inside the results folder it is the demo's to write
    validate_config(config)


def test_a_configfile_without_a_demo_section_cannot_make_the_demo_touch_real_data(tmp_path: Path, config: dict) -> None:
    """It is merged over config.yaml (demo on): the run stops before planning, the data untouched."""
    import subprocess
    import sys

    real = tmp_path / "anole"
    (real / "tokenizer").mkdir(parents=True)
    (real / "tokenizer" / "vqgan.ckpt").write_bytes(b"real weights")
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"checkpoint": str(real)}))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(mine), "--directory", str(REPO)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode != 0
    assert f"{mine}: key 'checkpoint': demo.enabled is true (from " in result.stdout + result.stderr
    assert (real / "tokenizer" / "vqgan.ckpt").read_bytes() == b"real weights"


# ----------------------------------------------------------------------------------------------
# Issue 20: whole-number floats, bounds, results_dir inside an input, eval images under a
# credentialed root, validate-config over the --configfile merge
# ----------------------------------------------------------------------------------------------


def _get_key(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[int(part)] if part.isdigit() else value[part]
    return value


def _set_key(config: dict, key: str, value) -> None:
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    target = config
    for part in parts[:-1]:
        target = target.setdefault(part, {}) if isinstance(target, dict) else target[part]
    target[parts[-1]] = value


@pytest.mark.parametrize(
    "key, value",
    [("tokenize.num_shards", 2.0), ("tokenize.batch_size", 4.0), ("train.lora_r", 16.0), ("train.epochs", 3.0),
     ("evaluate.max_new_tokens.image_captioning", 16.0), ("assemble.mem_mb", 8000.0), ("train.batch_size", True)],
)
def test_a_float_or_bool_where_the_schema_says_integer_is_refused_naming_key_and_file(
    config: dict, tmp_path: Path, key: str, value
) -> None:
    _set_key(config, key, value)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: key '{re.escape(key)}': .*(not an integer|not of type 'integer')"):
        load_config(path, check_paths=False)


def test_a_whole_float_message_says_what_to_write(config: dict) -> None:
    config["tokenize"]["num_shards"] = 2.0
    with pytest.raises(ConfigError, match=r"key 'tokenize.num_shards': 2.0 is not an integer \(write 2, without a decimal point\)"):
        validate_config(config)


@pytest.mark.parametrize(
    "key, value",
    [("train.learning_rate", 1e10), ("train.learning_rate", 0.0), ("train.warmup_ratio", 1.0), ("train.lora_dropout", 1.0),
     ("train.epochs", 0), ("train.lora_alpha", 0), ("train.max_masked_fraction", 1.5), ("tokenize.chunk_size", 0)],
)
def test_obviously_wrong_settings_are_out_of_bounds(config: dict, key: str, value) -> None:
    _set_key(config, key, value)
    with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}': "):
        validate_config(config)


@pytest.mark.parametrize("key", ["checkpoint", "base_model", "images.public_root", "images.credentialed.0.root",
                                 "evaluate.image_root", "evaluate.clip", "evaluate.clip_text_tower"])
@pytest.mark.parametrize("where", ["inside", "equal"])
def test_results_dir_inside_an_input_folder_is_refused_naming_both_keys(config: dict, tmp_path: Path, key: str, where: str) -> None:
    user_inputs(config, tmp_path)
    config["demo"]["enabled"] = False
    config["base_model"] = str(tmp_path / "base_model")
    (tmp_path / "base_model").mkdir()
    config["images"]["credentialed"][0]["root"] = str(tmp_path / "mimic")
    (tmp_path / "mimic").mkdir()
    config["results_dir"] = str(tmp_path / "results")
    validate_config(copy.deepcopy(config))  # beside the inputs: fine
    folder = Path(_get_key(config, key))
    config["results_dir"] = str(folder / "results" if where == "inside" else folder)
    with pytest.raises(ConfigError, match=rf"key 'results_dir': .* lies inside the input folder of key '{re.escape(key)}'"):
        validate_config(config)


def test_with_the_demo_results_dir_may_contain_the_inputs_but_not_lie_inside_one(config: dict) -> None:
    validate_config(copy.deepcopy(config))  # the demo's inputs all live inside results/
    config["results_dir"] = "results/demo/checkpoint/out"
    with pytest.raises(ConfigError, match=r"key 'results_dir': results/demo/checkpoint/out lies inside the input folder of key 'checkpoint'"):
        validate_config(config)


@pytest.mark.parametrize("image_root", ["results/demo/images/credentialed/mimic-cxr-jpg", "results/demo/images/credentialed/mimic-cxr-jpg/eval",
                                        "results/demo/images"])
def test_an_eval_image_root_overlapping_a_credentialed_root_is_named(config: dict, image_root: str, capsys: pytest.CaptureFixture) -> None:
    config["evaluate"]["image_root"] = image_root
    warnings: list[str] = []
    validate_config(copy.deepcopy(config), warn=warnings.append)
    assert len(warnings) == 1
    assert "key 'evaluate.image_root'" in warnings[0] and "key 'images.credentialed.0.root'" in warnings[0]
    assert "credentialed" in warnings[0] and "mimic_cxr" in warnings[0]
    validate_config(config)  # default: one warning line on stderr
    assert capsys.readouterr().err.startswith("warning: config.yaml: key 'evaluate.image_root'")


def test_a_judge_without_consent_beside_credentialed_sources_is_named_before_the_run(config: dict) -> None:
    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "judge-m", "api_key_env": None}
    config["evaluate"]["judge"] = dict(judge)
    warnings: list[str] = []
    validate_config(copy.deepcopy(config), warn=warnings.append)
    assert len(warnings) == 1
    assert "key 'evaluate.judge' has no allow_credentialed: true" in warnings[0] and "'mimic_cxr'" in warnings[0]
    config["evaluate"]["judge"] = {**judge, "allow_credentialed": True}
    validate_config(copy.deepcopy(config), warn=warnings.append)
    config["evaluate"]["judge"], config["images"]["credentialed"] = dict(judge), []
    validate_config(copy.deepcopy(config), warn=warnings.append)
    assert len(warnings) == 1  # consent given, or nothing credentialed: no warning


def test_an_eval_image_root_beside_the_credentialed_roots_is_not_named(config: dict) -> None:
    warnings: list[str] = []
    validate_config(config, warn=warnings.append)  # results/demo/eval/images
    config["evaluate"]["image_root"] = "results/demo/images/credentialed/mimic-cxr-jpg-eval"  # a sibling sharing a prefix
    validate_config(config, warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize(
    "base, overlay",
    [
        ({"a": {"b": 1, "c": 2}, "d": [1, 2]}, {"a": {"b": 5}, "d": [3]}),
        ({"judge": None}, {"judge": {"model": "m"}}),
        ({"judge": None}, {"judge": {}}),
        ({"judge": {"model": "m"}}, {"judge": None}),
        ({"b": {"x": {"y": 1}}}, {"b": {"x": 3}}),
        ({"b": 3}, {"b": {"x": {"y": 1}}}),
        ({"m": {"k": 1}}, {"m": {}}),
    ],
)
def test_merge_config_is_snakemakes_update_config(base: dict, overlay: dict) -> None:
    from snakemake.utils import update_config

    from medmax_pipeline.core.config import merge_config

    expected = copy.deepcopy(base)
    update_config(expected, copy.deepcopy(overlay))
    assert merge_config(copy.deepcopy(base), copy.deepcopy(overlay)) == expected


def test_validate_config_checks_the_merge_of_several_configfiles(config: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """medmax validate-config BASE --configfile A B: B over A, then over BASE, as snakemake --configfile A B."""
    from medmax_pipeline import cli
    from medmax_pipeline.core.config import merge_config_files

    base = tmp_path / "config.yaml"
    base.write_text(yaml.safe_dump(config))
    first, second = tmp_path / "cluster.yaml", tmp_path / "mine.yaml"
    first.write_text(yaml.safe_dump({"tokenize": {"num_shards": 8, "batch_size": 2}, "train": {"lora_r": 4}}))
    second.write_text(yaml.safe_dump({"tokenize": {"num_shards": 4}}))
    merged = merge_config_files(base, [first, second])
    assert merged["tokenize"] == {**config["tokenize"], "num_shards": 4, "batch_size": 2}  # nested keys merged one by one
    assert merged["train"]["lora_r"] == 4 and merged["train"]["epochs"] == config["train"]["epochs"]
    assert cli.main(["validate-config", str(base), "--configfile", str(first), str(second)]) == 0
    assert capsys.readouterr().out.strip() == f"{base} + {first} + {second}: valid"

    # A bad key in the second file: the merge is refused, naming that file.
    second.write_text(yaml.safe_dump({"tokenize": {"num_shards": 4.0}}))
    assert cli.main(["validate-config", str(base), "--configfile", str(first), str(second)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {second}: key 'tokenize.num_shards': 4.0 is not an integer (write 4, without a decimal point)"
    # ... and in the first one, when the second does not override it.
    second.write_text(yaml.safe_dump({"train": {"lora_r": 8}}))
    first.write_text(yaml.safe_dump({"tokenize": {"num_shardz": 8}}))
    assert cli.main(["validate-config", str(base), "--configfile", str(first), "--configfile", str(second)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {first}: unknown key 'tokenize.num_shardz'")
    # The merge decides: a file that turns the demo off makes the base's demo paths real inputs.
    first.write_text(yaml.safe_dump({"demo": {"enabled": False}}))
    assert cli.main(["validate-config", str(base), "--configfile", str(first)]) == 1
    assert f"error: {base}: key 'checkpoint': folder results/demo/checkpoint does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The schema and the stages' command lines agree on every type the rules pass
# ----------------------------------------------------------------------------------------------

# config key -> (medmax subcommand, option) for every numeric key a rule passes on a command line.
CLI_OPTIONS = {
    "demo.seed": ("demo", "--seed"), "demo.vqgan_channels": ("demo", "--vqgan-channels"),
    "demo.rows_per_task": ("demo", "--rows-per-task"),
    "tokenize.num_shards": ("tokenize", "--num-shards"), "tokenize.batch_size": ("tokenize", "--batch-size"),
    "tokenize.workers": ("tokenize", "--workers"), "tokenize.chunk_size": ("tokenize", "--chunk-size"),
    "assemble.max_length": ("assemble", "--max-length"), "assemble.max_error_fraction": ("assemble", "--max-error-fraction"),
    "assemble.max_published_mismatch_fraction": ("assemble", "--max-published-mismatch-fraction"),
    "train.lora_r": ("train", "--lora-r"), "train.lora_alpha": ("train", "--lora-alpha"),
    "train.lora_dropout": ("train", "--lora-dropout"), "train.learning_rate": ("train", "--lr"),
    "train.warmup_ratio": ("train", "--warmup-ratio"), "train.epochs": ("train", "--epochs"),
    "train.batch_size": ("train", "--batch-size"), "train.grad_accum": ("train", "--grad-accum"),
    "train.max_length": ("train", "--max-length"), "train.save_every": ("train", "--save-every"), "train.seed": ("train", "--seed"),
    "train.max_masked_fraction": ("train", "--max-masked-fraction"), "train.max_dropped_fraction": ("train", "--max-dropped-fraction"),
    "train.log_interval": ("train", "--log-interval"), "train.max_steps": ("train", "--max-steps"),
    "evaluate.batch_size": ("generate", "--batch-size"), "evaluate.max_items": ("generate", "--max-items"),
    "evaluate.image_generation_rows": ("generate", "--image-generation-rows"), "evaluate.bootstrap_samples": ("score", "--n-bootstrap"),
}
# Numeric keys the rules use elsewhere (Snakemake resources, threads, torchrun's process count): no stage option.
NOT_OPTIONS = {"tokenize.gpus_per_job", "tokenize.runtime_min", "tokenize.mem_mb", "assemble.mem_mb", "train.gpus",
               "train.runtime_min", "train.mem_mb", "train.nodes"}


def _schema_at(schema: dict, key: str) -> dict:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
        node = next((s for s in node.get("anyOf", []) if s.get("type") != "null"), node)
    return node


def _numeric_type(node: dict) -> str | None:
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    return next((t for t in types if t in ("integer", "number")), None)


def _rule_config_keys() -> set[str]:
    """Every config key the rule files read (config["a"]["b"], TRAIN['b'], EVAL["b"])."""
    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    keys = {f"{a}.{b}" for a, b in re.findall(r"""config\[["'](\w+)["']\]\[["'](\w+)["']\]""", text)}
    keys |= {f"train.{k}" for k in re.findall(r"""TRAIN\[["'](\w+)["']\]""", text)}
    keys |= {f"evaluate.{k}" for k in re.findall(r"""EVAL\[["'](\w+)["']\]""", text)}
    return keys


def _stage_option_type(command: str, option: str):
    import argparse
    import importlib

    from medmax_pipeline import cli

    module = importlib.import_module(cli.SUBCOMMANDS[command][0])
    suffix = command.replace("-", "_")
    parser = argparse.ArgumentParser()
    (getattr(module, f"add_{suffix}_arguments", None) or module.add_arguments)(parser)
    action = next(a for a in parser._actions if option in a.option_strings)
    return action.type


def test_the_schema_and_the_stage_command_lines_agree_on_every_numeric_type() -> None:
    from medmax_pipeline.core.config import load_schema
    from medmax_pipeline.stages.evaluate.generate import _parse_budgets
    from medmax_pipeline.stages.evaluate.judge_replies import judge_command_options

    schema = load_schema()
    python_type = {"integer": int, "number": float}
    numeric_rule_keys = {k for k in _rule_config_keys() if _numeric_type(_schema_at(schema, k))}
    assert numeric_rule_keys, "no numeric key found in the rules"
    assert numeric_rule_keys <= set(CLI_OPTIONS) | NOT_OPTIONS, f"add to CLI_OPTIONS: {sorted(numeric_rule_keys - set(CLI_OPTIONS) - NOT_OPTIONS)}"
    for key, (command, option) in CLI_OPTIONS.items():
        expected = python_type[_numeric_type(_schema_at(schema, key))]
        assert _stage_option_type(command, option) is expected, f"{key}: schema {expected.__name__}, medmax {command} {option}"
    for key in NOT_OPTIONS:
        assert _numeric_type(_schema_at(schema, key)) == "integer", key  # Snakemake resources and process counts are ints
    # evaluate.max_new_tokens.*: generate --max-new-tokens KEY=N, parsed as ints
    for name, node in _schema_at(schema, "evaluate.max_new_tokens")["properties"].items():
        assert _numeric_type(node) == "integer"
        assert type(_parse_budgets([f"{name}=16"])[name]) is int
    # evaluate.judge.*: every numeric setting becomes `medmax judge --NAME VALUE` (judge_command_options)
    judge = _schema_at(schema, "evaluate.judge")
    for name, node in judge["properties"].items():
        kind = _numeric_type(node)
        if kind is None:
            continue
        option = judge_command_options({name: 1})
        assert option.startswith(f"--{name.replace('_', '-')} ")
        assert _stage_option_type("judge", option.split()[0]) is python_type[kind], f"evaluate.judge.{name}"
