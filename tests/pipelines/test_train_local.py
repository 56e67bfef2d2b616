"""The digits model learns: a short run ends with a loss well below its start (no timing assertions)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main as cli_main
from pipelines.config import load_config
from pipelines.train.local import digits_dataset, train_local


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with two, a busy second core stalls every convolution at an OpenMP barrier (measured
    here: a digits forward pass at batch 32 took 6.4 s with 2 threads and 0.32 s with 1 while another process ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digits_dataset():
    x, y = digits_dataset(16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert -1.0 <= x.min().item() < -0.99 and 0.9 < x.max().item() <= 1.0
    assert sorted(set(y.tolist())) == list(range(10))


def test_digits_model_loss_drops(tmp_path):
    config = load_config("configs/digits.yaml", ["train.total_images=4800", "train.batch_size=32",
                                                 "train.warmup_images=320", "train.log_every_steps=1000"])
    images, labels = digits_dataset(16)
    run = train_local(config, images, labels, out_dir=tmp_path / "ckpt", log=lambda *_: None)
    assert run.images_seen == 4800 and run.steps == 150
    # Mean loss of the first 20 steps vs the last 20: the loss falls by more than half.
    assert run.last_loss < 0.5 * run.first_loss


def test_train_local_command_writes_a_grid(tmp_path, monkeypatch):
    """Without --samples the grid goes beside the checkpoint, never to the quickstart's grid in the current folder."""
    monkeypatch.chdir(tmp_path)
    code = cli_main(["train-local", "--set", "model.preset=tiny", "--set", "model.image_size=16",
                     "--set", "train.total_images=256", "--set", "train.batch_size=64",
                     "--out", str(tmp_path / "ckpt")])
    assert code == 0
    assert not (tmp_path / "quickstart-samples.png").exists()
    grid = np.asarray(Image.open(tmp_path / "ckpt" / "samples.png"))
    assert grid.shape == (10 * 17 + 1, 10 * 17 + 1)  # 10 classes x 10 samples of 16x16, 1-pixel gutters
