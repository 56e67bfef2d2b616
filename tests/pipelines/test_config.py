"""Config errors name what the user wrote (the ``--set`` or the file), and the resolved config prints readably."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"train": "configs/digits.yaml", "train-autoencoder": "configs/autoencoder-f4.yaml"}


def _error(capsys, command: str, config: str, *sets: str) -> str:
    argv = [command, "--data", "nowhere", "--config", config, "--storage", "nowhere", "--name", "x"]
    for item in sets:
        argv += ["--set", item]
    assert cli.main(argv) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("command", PRESETS)
@pytest.mark.parametrize("setting, says", [
    ("train.totl_images=5", "--set train.totl_images=5: unknown key train.totl_images; valid keys: "),
    ("train.lr=fast", "--set train.lr=fast: train.lr must be a number, got 'fast'"),
    ("trian.lr=1", "--set trian.lr=1: unknown section 'trian'"),
])
def test_a_bad_set_is_named_not_the_file(command, setting, says, capsys):
    line = _error(capsys, command, str(ROOT / PRESETS[command]), "train.batch_size=8", setting)
    assert line.startswith(f"ddpm {command}: error: {says}"), line
    assert PRESETS[command] not in line


def test_a_bad_key_in_the_file_still_names_the_file(capsys, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  totl_images: 5\n")
    line = _error(capsys, "train", str(preset), "train.total_images=7")
    assert line.startswith(f"ddpm train: error: unknown key {preset}: train.totl_images; valid keys: "), line
    assert "--set" not in line


def test_the_resolved_config_prints_as_indented_yaml_that_reads_back():
    from pipelines.config import load_config, readable

    config = load_config(ROOT / "configs/digits.yaml", ["train.total_images=64"])
    text = readable(config.to_dict())
    lines = text.splitlines()
    assert lines[0] == "config:" and all(line.startswith("  ") for line in lines[1:])
    assert max(map(len, lines)) <= 100  # was one line of about 1,500 characters
    assert "    channel_mults: [1, 2, 2]" in lines and "    total_images: 64" in lines
    assert yaml.safe_load(text)["config"] == yaml.safe_load(yaml.safe_dump(config.to_dict()))
