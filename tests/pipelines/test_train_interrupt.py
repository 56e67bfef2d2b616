"""Ctrl-C during ``ddpm train`` and ``ddpm train-autoencoder``, as a user does it: the command runs in its own process
against a real MLflow server, gets SIGINT once training has printed its first progress line, and must say so in one
line, exit 130 and leave its MLflow run KILLED (not RUNNING). The same run shows that the first progress line comes
after the first step (its lines come by time, not every ``train.log_every_steps``) and that the resolved config
prints as short lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "train": ["--config", str(ROOT / "configs/digits.yaml"), "--set", "model.preset=tiny"],
    "train-autoencoder": ["--config", str(ROOT / "configs/autoencoder-f4.yaml"), "--set", "model.preset=tiny",
                          "--set", "model.in_channels=1", "--set", "train.eval_images=8",
                          "--set", "train.scaling_images=16"],
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """64 of scikit-learn's digits, preprocessed to 8x8x1 by the real ingest."""
    from pipelines.data.digits import write_digits
    from pipelines.data.preprocess import preprocess
    from tests.support import start_local_ray

    start_local_ray()
    root = tmp_path_factory.mktemp("digits")
    write_digits(str(root / "raw"), limit=64)
    preprocess(str(root / "raw"), str(root / "processed"), resolution=8, channels=1, progress=None)
    return str(root / "processed")


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_says_interrupted_exits_130_and_marks_the_run_killed(command, digits, mlflow_server, tmp_path):
    from pipelines import tracking

    experiment = f"interrupt-{command}"
    argv = [sys.executable, "-m", "pipelines.cli", command, "--data", digits, *COMMANDS[command],
            "--set", "train.batch_size=16", "--set", "train.total_images=1000000", "--set", "train.warmup_images=16",
            "--set", "train.log_every_steps=1000",  # a line every N steps would print none before the SIGINT
            "--storage", str(tmp_path / "runs"), "--name", "run", "--tracking-uri", mlflow_server.uri,
            "--experiment", experiment]
    env = {**os.environ, "DDPM_PROGRESS_EVERY_S": "600", "DDPM_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 400
            while "[train]" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert proc.poll() is None, f"exited {proc.returncode} before training: {proc.stderr.read()[-2000:]}"
            lines = out.read_text().splitlines()
            [first] = [line for line in lines if line.startswith("[train]")]
            assert re.match(r"\[train\] +16/1,000,000 images", first), first  # after the first step
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    client = tracking.client(mlflow_server.uri)
    [run] = client.search_runs([tracking.ensure_experiment(experiment, mlflow_server.uri)])
    assert code == 130, err
    assert err[-1] == (f"ddpm {command}: interrupted; MLflow run {run.info.run_id} marked KILLED; "
                       f"no checkpoint was written yet"), err
    assert run.info.status == "KILLED"
    # The resolved config is one line's mention on the terminal and indented YAML in the run's config.yaml.
    [where] = [line for line in lines if line.startswith(f"MLflow run {run.info.run_id} at ")]
    assert "config.yaml artifact" in where and max(len(line) for line in lines) < 200
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text().splitlines()
    assert config[0] == "config:" and "  model:" in config
