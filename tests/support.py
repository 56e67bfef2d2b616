"""Helpers the tests share: plain functions and classes, imported as ``tests.support``.

Fixtures live in the ``conftest.py`` files and are never imported; what a test calls directly lives here.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = free_port()  # chosen once per test session, before pytest_configure sets AWS_ENDPOINT_URL


def start_local_ray():
    """A local single-node Ray on 127.0.0.1 with 2 CPUs, started once per process and reused."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster that `ray start` (the quickstart) left on this machine
            num_cpus=2,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    return ray


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200, at most ``timeout`` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException as exc:  # not up yet
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout}s: {last}")


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend; ``stop``/``start`` simulate an outage."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"{self.uri}/health", timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class _WritesSentinel:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.write_text, (self.sentinel, "unpickled\n")


def logged_pyfunc(checkpoint: Path, tracking_uri: str, experiment: str):
    """``checkpoint`` logged as the MLflow pyfunc model (``pipelines.registry.log_model``) into a new run of
    ``experiment`` on ``tracking_uri``, and loaded back by MLflow as a user would."""
    import mlflow

    from pipelines import registry, tracking

    run_id = tracking.client(tracking_uri).create_run(tracking.ensure_experiment(experiment, tracking_uri)).info.run_id
    model_uri = registry.log_model(checkpoint, run_id=run_id, tracking_uri=tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)


def planted_pickle(sentinel: Path) -> bytes:
    """A well-formed pickle whose unpickling writes the file ``sentinel`` (it calls ``pathlib.Path.write_text``).

    Plant it where a pickle-based loader would look, load, then assert that ``sentinel`` does not exist: a loader that
    ran the pickle, in this process or another one on this machine, leaves the file behind. Unpickling it needs nothing
    from the tests, so any process can run it.
    """
    return pickle.dumps(_WritesSentinel(Path(sentinel)), protocol=4)


TEXT_CAPTIONS = ("a small red circle", "a large blue square", "a green triangle above a yellow circle",
                 "a cyan square left of a magenta triangle")
TEXT_CONTEXT = 16  # tokens: short, so that a test prompt runs past it easily


def save_text_checkpoint(path: Path, *, seed: int = 0, width: int = 16, context: int = TEXT_CONTEXT,
                         captions=TEXT_CAPTIONS, **unet_overrides) -> Path:
    """A tiny random text model (8x8x1 U-Net with cross-attention of ``width``, a one-layer text encoder whose
    tokenizer is learned from ``captions`` and pads to ``context`` tokens) saved as a checkpoint folder at ``path``.

    Random, not trained: different prompts give different images, and a word not in ``captions`` is unknown.
    """
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, text

    tok = text.train_tokenizer(list(captions), vocab_size=600, context_length=context)
    torch.manual_seed(seed)
    cfg = text.TextConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=context,
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    encoder = text.TextEncoder(tok, text.TextTransformer(cfg))
    net = UNet(UNetConfig.preset("tiny", text_dim=width, **unet_overrides))
    return checkpoint.save(path, net, NoiseSchedule.linear(1000), text_encoder=encoder,
                           text_encoder_source={"uri": "tests.support.save_text_checkpoint"})


def save_unclip_checkpoint(path: Path, *, seed: int = 0, prior: bool = True, size: int = 8, channels: int = 1,
                           captions=TEXT_CAPTIONS, context: int = TEXT_CONTEXT) -> Path:
    """A tiny random unCLIP decoder (``size`` x ``size`` x ``channels`` U-Net predicting x_0, conditioned on the
    embeddings (E = 16) of a small random CLIP whose tokenizer is learned from ``captions``), with a random prior
    when ``prior`` (a whole unCLIP model, as ``ddpm unclip`` registers), saved at ``path``.

    x_0 prediction: with random weights an epsilon model drives nearly every pixel to 0 or 255, where "the same bytes"
    would hold almost trivially."""
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, clip, text
    from ddpm.prior import DiffusionPrior, LoadedPrior, PriorConfig

    tok = text.train_tokenizer(list(captions), vocab_size=600, context_length=context)
    torch.manual_seed(seed)
    cfg = clip.ClipConfig.for_tokenizer(tok, image_size=size, in_channels=channels, image_channels=(8, 16),
                                        image_heads=2, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
    the_clip = clip.LoadedClip(clip.Clip(cfg).eval(), tok)
    net = UNet(UNetConfig.preset("tiny", image_size=size, in_channels=channels, image_dim=16))
    loaded_prior = None
    if prior:
        loaded_prior = LoadedPrior(DiffusionPrior(PriorConfig(embed_dim=16, text_dim=16, width=32, depth=1,
                                                              heads=2)), NoiseSchedule.cosine(), {})
    return checkpoint.save(path, net, NoiseSchedule.linear(1000), prediction_type="sample", image_encoder=the_clip,
                           image_encoder_source={"uri": "tests.support.save_unclip_checkpoint"}, prior=loaded_prior,
                           prior_source=None if loaded_prior is None else {"uri": "tests.support"})
