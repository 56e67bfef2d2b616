"""Bad input at every door of the command line: one line that names the culprit, exit 1, nothing created.

Each case is one of issue 26's findings, run through the real entry point (``pipelines.cli.main``, or the
``ddpm`` console script in a subprocess where the process boundary matters).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint
from ddpm.settings import MAX_SEED
from pipelines.cli import main
from tests.support import logged_pyfunc

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A class-conditional tiny checkpoint (3 classes, 8x8x1)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=3))
    return checkpoint.save(tmp_path_factory.mktemp("tiny") / "ckpt", model, NoiseSchedule.linear(1000),
                           prediction_type="sample")


def one_line_error(argv: list[str], capsys) -> str:
    """Run ``ddpm ARGV``; assert it failed with exactly one ``ddpm <command>: error:`` line; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith(f"ddpm {argv[0]}: error: "), err
    return err.strip()


# (ddpm generate's flags, the same request to the pyfunc model or None, the one message both give)
GENERATE_CASES = [
    (["--steps", "0"], {"steps": 0}, "--steps: must be in [1, 1000], got 0"),  # 0 is not "the default"
    (["--steps", "1001"], {"steps": 1001}, "--steps: must be in [1, 1000], got 1001"),
    (["--guidance-scale", "-2", "--class-label", "1"], {"guidance_scale": -2.0, "class_label": 1},
     "--guidance-scale: must be at least 0, got -2"),
    (["--guidance-scale", "3"], {"guidance_scale": 3.0},
     "--guidance-scale: applies only with a class label, a non-empty prompt or an image"),
    (["--guidance-scale", "nan", "--class-label", "1"], {"guidance_scale": float("nan"), "class_label": 1},
     "--guidance-scale: must be a finite number"),
    (["--seed", "-1"], {"seed": -1}, f"--seed: must be in [0, {MAX_SEED}], got -1"),
    (["--seed", "99999999999999999999"], None, f"--seed: must be in [0, {MAX_SEED}]"),
    (["--class-label", "3"], {"class_label": 3}, "--class-label: unknown class 3; this model has classes 0..2"),
    (["--class-label", "7"], {"class_label": 7}, "--class-label: unknown class 7; this model has classes 0..2"),
    (["--num-images", "5000", "--steps", "1"], None, "a PNG grid holds at most 4096 images"),
    # prompts (issue 33): this model has no text encoder; the rules of any model come first
    (["--prompt", "a red circle"], {"prompt": "a red circle"},
     "--prompt: this model takes no prompt; it has no text encoder (it takes a class label)"),
    (["--prompt", ""], {"prompt": ""}, "--prompt: this model takes no prompt"),
    (["--prompt", "é" * 501], {"prompt": "é" * 501}, "--prompt: must be at most 1000 bytes (UTF-8), got 1002"),
    (["--negative-prompt", "blurry", "--guidance-scale", "2"], {"negative_prompt": "blurry", "guidance_scale": 2.0},
     "--negative-prompt: needs a prompt"),
    (["--prompt", "a red circle", "--negative-prompt", "blurry"],
     {"prompt": "a red circle", "negative_prompt": "blurry"}, "--negative-prompt: applies only with guidance"),
    (["--prompt", "a red circle", "--class-label", "1"], {"prompt": "a red circle", "class_label": 1},
     "--prompt: send a class label or a prompt, not both"),
]


@pytest.mark.parametrize("flags, request_, message", GENERATE_CASES)
def test_generate_refuses_what_the_endpoint_refuses(tiny, tmp_path, capsys, flags, request_, message):
    line = one_line_error(["generate", "--model", str(tiny), "--out", str(tmp_path / "g.png"), *flags], capsys)
    assert message in line
    assert not (tmp_path / "g.png").exists()


@pytest.fixture(scope="module")
def pyfunc_model(tiny, mlflow_server):
    """``tiny`` logged as the MLflow pyfunc model (``pipelines.registry.log_model``) and loaded back by MLflow."""
    return logged_pyfunc(tiny, mlflow_server.uri, "bad-input")


def field_message(cli_message: str) -> str:
    """The CLI's ``--class-label: reason`` as ``ddpm.settings`` words it: ``class_label: reason``."""
    flag, reason = cli_message.split(": ", 1)
    return f"{flag.removeprefix('--').replace('-', '_')}: {reason}"


@pytest.mark.parametrize("request_, message", [
    *[(request_, field_message(message)) for _, request_, message in GENERATE_CASES if request_ is not None],
    ({"num_images": 65}, "num_images: must be in [1, 64], got 65"),  # the endpoint's limit (ddpm.settings)
    ({"seeds": list(range(65))}, "num_images: must be in [1, 64], got 65"),
    ({"seeds": [0, 2**32]}, f"seed: must be in [0, {MAX_SEED}], got {2**32}"),
])
def test_the_pyfunc_model_refuses_what_the_command_line_refuses(pyfunc_model, request_, message):
    """The MLflow pyfunc model applies ddpm.settings too, with the same message (class 3 of 3 used to select the null
    class silently, class 7 to raise IndexError, and num_images had no limit)."""
    from ddpm.settings import SettingError

    with pytest.raises(SettingError) as refused:
        pyfunc_model.predict([{"steps": 2, **request_}])
    assert message in str(refused.value)
    with pytest.raises(SettingError):  # a good request first does not change that: all are checked before any runs
        pyfunc_model.predict([{"steps": 1}, {"steps": 2, **request_}])


def test_the_pyfunc_model_still_samples_a_good_request(pyfunc_model):
    assert pyfunc_model.predict([{"steps": 1, "num_images": 2, "class_label": 2}]).shape == (2, 8, 8, 1)
    assert pyfunc_model.predict([{"steps": 1, "seeds": [5, 2**32 - 1]}]).shape == (2, 8, 8, 1)


def test_generate_refuses_an_output_that_cannot_fit_before_sampling(tiny, tmp_path, capsys):
    """100 million images of 8x8 is 6 GiB in one array: refused at once (the old code grew past 4 GB first)."""
    line = one_line_error(["generate", "--model", str(tiny), "--num-images", "100000000", "--steps", "1",
                           "--out", str(tmp_path / "huge.npz")], capsys)
    assert "GiB of pixels in one file" in line


def test_generate_shows_progress_on_stderr(tiny, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny), "--num-images", "20", "--steps", "2",
                 "--out", str(tmp_path / "a.npz")]) == 0
    captured = capsys.readouterr()
    assert "generated 20/20 images" in captured.err and "wrote 20 images" in captured.out


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps: must be in [1, 1000], got 0"),
    (["--resample-times", "101"], "--resample-times: must be in [1, 100], got 101"),
    (["--eta", "1.5"], "--eta: must be in [0, 1], got 1.5"),
])
def test_inpaint_refuses_what_the_endpoint_refuses(tiny, tmp_path, capsys, flags, message):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "mask.png")
    line = one_line_error(["inpaint", "--model", str(tiny), "--image", str(tmp_path / "img.png"),
                           "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "o.png"), *flags], capsys)
    assert message in line


@pytest.mark.parametrize("minutes", ["0", "-1"])
def test_train_local_refuses_a_non_positive_time_limit(tmp_path, capsys, minutes):
    line = one_line_error(["train-local", "--minutes", minutes, "--out", str(tmp_path / "run")], capsys)
    assert f"--minutes must be positive, got {minutes}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("- model\n- train\n", "the top level must be a mapping of sections"),
    ("train: 3\n", "section train must be a mapping"),
])
def test_a_broken_config_file_is_named(tmp_path, capsys, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert message in one_line_error(["train-local", "--config", str(path), "--out", str(tmp_path / "r")], capsys)


def test_a_checkpoint_with_malformed_json_is_called_damaged_not_missing(tiny, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text('{"format": "ddpm-checkpoint", ')
    line = one_line_error(["generate", "--model", str(broken), "--out", str(tmp_path / "g.png")], capsys)
    assert "config.json: invalid JSON" in line and "damaged" in line


def test_preprocess_names_a_missing_folder(tmp_path, capsys):
    line = one_line_error(["preprocess", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"),
                           "--resolution", "8"], capsys)
    assert line.endswith(f"{tmp_path / 'nowhere'}: no such folder")


def test_pipeline_validates_its_config_before_creating_anything(tmp_path, capsys, monkeypatch):
    """num_workers = 0 used to fail with a division by zero after the MLflow run was open."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    line = one_line_error(["pipeline", "--config", CONFIG, "--set", "pipeline.num_workers=0"], capsys)
    assert "pipeline.num_workers must be at least 1, got 0" in line
    assert not (tmp_path / "home").exists() and not (tmp_path / ".ddpm").exists()


@pytest.mark.parametrize("argv", [
    ["--verbose", "generate", "--model", "/nonexistent", "--out", "x.png"],
    ["generate", "--verbose", "--model", "/nonexistent", "--out", "x.png"],
    ["models", "promote", "no-such-model", "1", "--alias", "production", "--verbose",
     "--tracking-uri", "sqlite:///{tmp}/m.db"],
])
def test_verbose_works_before_or_after_the_command(argv, tmp_path):
    """--verbose anywhere adds the traceback above the one-line error (it used to be ignored or refused)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "DDPM_HOME": str(tmp_path / "home")}, timeout=120)
    assert done.returncode == 1, done.stderr
    command = next(a for a in argv if not a.startswith("-"))
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"ddpm {command}: error: ")


@pytest.mark.slow
def test_training_workers_the_cluster_cannot_hold_fail_at_once(ray_local, tmp_path, capsys):
    """16 CPUs per worker, or 8 workers, on a 2-CPU local Ray: one line naming the request and the nodes, at once,
    and no MLflow run opened (it used to wait for ever)."""
    from pipelines.data.digits import write_digits
    from pipelines.data.preprocess import preprocess

    write_digits(str(tmp_path / "raw"), limit=20)
    preprocess(str(tmp_path / "raw"), str(tmp_path / "data"), resolution=8, channels=1)
    base = ["train", "--data", str(tmp_path / "data"), "--config", CONFIG, "--set", "model.preset=tiny",
            "--storage", str(tmp_path / "runs"), "--name", "r", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    line = one_line_error([*base, "--cpus-per-worker", "16"], capsys)
    assert "the cluster cannot hold 1 training worker(s) of 16 CPU: its nodes have 2 CPU" in line
    line = one_line_error([*base, "--num-workers", "8", "--cpus-per-worker", "1"], capsys)
    assert "cannot hold 8 training worker(s) of 1 CPU" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()

    # The cluster could hold them, but an actor holds the CPUs: wait the stated time, then name the holder.
    @ray_local.remote(num_cpus=2)
    class CpuHolder:
        def ready(self) -> bool:
            return True

    holder = CpuHolder.remote()
    try:
        ray_local.get(holder.ready.remote(), timeout=60)
        line = one_line_error([*base, "--num-workers", "1", "--cpus-per-worker", "2", "--resource-wait-s", "1"],
                              capsys)
        assert "did not get their resources within 1 s" in line and "held by" in line and "CpuHolder" in line
    finally:
        ray_local.kill(holder)
    assert not (tmp_path / "mlflow.db").exists()


def test_serve_names_a_damaged_model_or_a_bad_port_before_starting_ray(tiny, tmp_path, capsys):
    """A truncated weights file, a port outside [1, 65535] and a port in use: one line each, before Ray starts
    (they used to end in ~180 and ~55 lines of Ray tracebacks)."""
    import shutil
    import socket

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny, damaged)
    (damaged / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:1000])
    assert "model.safetensors: unreadable or truncated" in one_line_error(["serve", "--model", str(damaged)], capsys)
    assert "--port 99999: a TCP port is in [1, 65535]" in one_line_error(
        ["serve", "--model", str(tiny), "--port", "99999"], capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(["serve", "--model", str(tiny), "--port", str(port)], capsys)
    assert f"--port {port} on 127.0.0.1 is in use by another program" in line


def test_serve_refuses_an_open_endpoint_beyond_loopback_before_starting_ray(tiny, tmp_path, capsys, monkeypatch):
    """--host 0.0.0.0 (or any non-loopback address) without an API key is one line, unless --insecure says so; a
    key from $DDPM_API_KEY or --api-key-file counts. Each case that passes this check stops at the next one
    (--port 99999), which also comes before Ray starts."""
    monkeypatch.delenv("DDPM_API_KEY", raising=False)
    base = ["serve", "--model", str(tiny)]
    for host in ["0.0.0.0", "192.0.2.7", "::", "example.org"]:
        line = one_line_error([*base, "--host", host], capsys)
        assert f"--host {host} serves beyond this machine without an API key" in line and "--insecure" in line
    key_file = tmp_path / "key"
    key_file.write_text("file-key-123\n")
    bad_port = "--port 99999: a TCP port is in [1, 65535]"
    for flags in [["--host", "0.0.0.0", "--insecure"], ["--host", "0.0.0.0", "--api-key-file", str(key_file)],
                  ["--host", "localhost"], ["--host", "::1"], ["--host", "127.0.0.2"]]:
        assert bad_port in one_line_error([*base, *flags, "--port", "99999"], capsys), flags
    monkeypatch.setenv("DDPM_API_KEY", "env-key-456")
    assert bad_port in one_line_error([*base, "--host", "0.0.0.0", "--port", "99999"], capsys)


def test_serve_reads_the_api_key_from_a_file_or_the_environment(tmp_path, capsys, monkeypatch):
    """The key need not be in argv (where ps and the shell history show it): --api-key-file's first line, else
    $DDPM_API_KEY; an unreadable or empty file is one line."""
    import argparse

    from deploy.cli import add_arguments, app_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("DDPM_API_KEY", "env-key-456")
    key_file = tmp_path / "key"
    key_file.write_text("  file-key-123  \nsecond line ignored\n")
    assert app_args(parser.parse_args(["--model", "m", "--api-key-file", str(key_file)]))["api_key"] == "file-key-123"
    assert app_args(parser.parse_args(["--model", "m"]))["api_key"] == "env-key-456"
    monkeypatch.delenv("DDPM_API_KEY")
    assert "api_key" not in app_args(parser.parse_args(["--model", "m"]))
    assert "--api-key-file" in parser.format_help() and "DDPM_API_KEY" in parser.format_help()

    (tmp_path / "empty").write_text("\n")
    line = one_line_error(["serve", "--model", "m", "--api-key-file", str(tmp_path / "empty")], capsys)
    assert line.endswith(f"--api-key-file {tmp_path / 'empty'}: its first line is empty")
    line = one_line_error(["serve", "--model", "m", "--api-key-file", str(tmp_path / "nowhere")], capsys)
    assert f"--api-key-file {tmp_path / 'nowhere'}: cannot read it (No such file or directory)" in line
