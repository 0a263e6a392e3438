"""The conda envs of the workflow pin the same versions as requirements.lock, and the lock pins torch."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        for item in dep["pip"] if isinstance(dep, dict) else []:
            name, version = item.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_env_pin_matches_the_lock() -> None:
    lock = lock_pins()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "no conda envs under envs/"
    for env in envs:
        pins = env_pins(env)
        assert pins, f"{env.name} pins nothing"
        for name, version in pins.items():
            assert name in lock, f"{env.name}: {name} is not in requirements.lock"
            assert lock[name] == version, f"{env.name}: {name}=={version}, requirements.lock has {lock[name]}"


def test_lock_pins_torch_and_the_stage_dependencies() -> None:
    lock = lock_pins()
    # torchvision 0.29.1 (open_clip's timm towers) imports only beside torch 2.14.1.
    assert (lock["torch"], lock["torchvision"]) == ("2.14.1", "0.29.1")
    for name in ("snakemake", "transformers", "pyarrow", "polars", "pillow", "peft", "deepspeed", "pytest", "open-clip-torch", "timm"):
        assert name in lock, f"requirements.lock lacks {name}"


def test_every_rule_names_an_existing_env() -> None:
    for rule_file in (REPO / "workflow" / "rules").glob("*.smk"):
        for line in rule_file.read_text().splitlines():
            if line.strip().startswith('"../../envs/'):
                env = (rule_file.parent / line.strip().strip('"')).resolve()
                assert env.is_file(), f"{rule_file.name} names missing env {env}"
