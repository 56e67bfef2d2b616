"""The ``ddpm`` command line: every subcommand documents itself with a worked example; mistakes exit non-zero."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from pipelines.cli import SUBCOMMANDS, main


def _require(name: str):
    """The subcommand's module: one that is missing or fails to import fails the test (every subcommand in the
    table is written)."""
    return importlib.import_module(SUBCOMMANDS[name])


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_shows_a_worked_example(name, capsys):
    module = _require(name)
    assert module.HELP.strip() and "\n" not in module.HELP.strip(), "HELP is one line"
    assert f"ddpm {name}" in module.EXAMPLE, "the example runs the command it documents"

    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert f"usage: ddpm {name}" in shown
    assert module.EXAMPLE.strip() in shown, "the epilog is printed verbatim"


def test_top_level_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(SUBCOMMANDS)


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown command 'no-such-command'" in error


@pytest.mark.parametrize("setting, message", [
    ("train.precision=fp16", "train.precision must be auto, fp32 or bf16, got 'fp16'"),
    ("train.timestep_sampling=lognormal", "train.timestep_sampling must be uniform or importance, got 'lognormal'"),
    ("train.max_minutes=0", "train.max_minutes must be positive (or null for no time limit), got 0.0"),
    ("train.max_minutes=soon", "train.max_minutes must be a number, got 'soon'"),
    ("train.lr=", "--set train.lr=: no value after '='"),
    ("train.lr=null", "train.lr must be a number, got an empty value (null)"),
    ("model.channel_mults=3", "model.channel_mults must be a list like"),
    ("model.channel_mults=[1, two]", "model.channel_mults[1] must be a whole number, got 'two'"),
    ("train=3", "override 'train=3' must look like section.key=value"),
    ("pipeline.num_workers=0", "pipeline.num_workers must be at least 1, got 0"),
    ("pipeline.num_workers=4-2", "pipeline.num_workers: MIN must be at most MAX, got 4-2"),
    ("pipeline.num_workers=many", "pipeline.num_workers must be N or MIN-MAX (e.g. 4 or 1-4), got 'many'"),
    ("train.elastic_check_s=-1", "train.elastic_check_s must be at least 0, got -1.0"),
    ("pipeline.gate_metric=fid", "pipeline.gate_metric fid needs pipeline.inception_weights"),
    ("train.adam_beta2=1", "train.adam_beta2 must be in [0, 1), got 1.0"),
    ("pipeline.eval_guidance_scale=-1", "pipeline.eval_guidance_scale must be a finite number >= 0, got -1.0"),
    ("pipeline.eval_guidance_scale=.inf", "pipeline.eval_guidance_scale must be a finite number >= 0, got inf"),
    ("pipeline.eval_steps=0", "pipeline.eval_samples and pipeline.eval_steps must be positive, got 500 and 0"),
    ("pipeline.gate_min_alignment=1.5", "pipeline.gate_min_alignment must be between 0 and 1 or null, got 1.5"),
    ("pipeline.eval_images_per_prompt=0", "pipeline.eval_images_per_prompt must be at least 1 or null, got 0"),
    ("pipeline.captions=maybe", "pipeline.captions must be keep, required or null, got 'maybe'"),
    ("pipeline.shapes_count=0", "pipeline.photos_count and pipeline.shapes_count must be at least 1, got 2000 and 0"),
])
def test_an_invalid_setting_is_one_line_naming_it(setting, message, capsys, tmp_path):
    assert main(["train-local", "--set", setting, "--out", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error


@pytest.mark.parametrize("workers, message", [
    ("0", "--num-workers must be at least 1, got 0"),
    ("2-1", "--num-workers: MIN must be at most MAX, got 2-1"),
    ("1..4", "--num-workers must be N or MIN-MAX (e.g. 4 or 1-4), got '1..4'"),
])
def test_train_names_a_bad_worker_count_before_anything_starts(workers, message, capsys, tmp_path):
    assert main(["train", "--data", str(tmp_path), "--config", "configs/digits.yaml", "--num-workers", workers,
                 "--storage", str(tmp_path), "--name", "x"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
