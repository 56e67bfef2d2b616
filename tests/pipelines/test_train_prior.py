"""``ddpm train-prior`` against real components: ``ddpm data shapes`` scenes ingested with ``--captions`` by the real
Ray Data job, a CLIP folder, Ray Train on two workers, a real MLflow server for the run and the registry.

One scenario (each Ray Train start costs tens of seconds on two cores):

1. a fresh run to 32 images: loss and the held-out evaluation (the prior's cosine to the true image embedding and
   the text-embedding baseline's, top-1 of each) in the MLflow run; the prior registered with kind=prior and the
   CLIP it pins; the registered pyfunc model samples unit-norm embeddings from captions, the same for a seed on
   every call;
2. the same command with a larger ``total_images``: it resumes from the 32-image checkpoint in the same MLflow run,
   and a CLIP whose weights changed since is refused.

The prior's network and its sampling are tested against a synthetic caption -> embedding world in
tests/ddpm/test_prior.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "prior-shapes.yaml")
TINY = [
    "--set", "model.width=32", "--set", "model.depth=1", "--set", "model.heads=2",
    "--set", "train.batch_size=16", "--set", "train.warmup_images=0", "--set", "train.log_every_steps=1",
    "--set", "train.checkpoint_every_images=32", "--set", "train.sample_every_images=32",
    "--set", "train.eval_images=16", "--set", "train.eval_steps=4",
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """80 captioned scenes preprocessed at 16x16 with --captions, and a random CLIP (tokenizer learned on them)."""
    import torch

    from ddpm import clip, text
    from pipelines.data.shapes import write_shapes
    from tests.support import start_local_ray

    start_local_ray()
    root = tmp_path_factory.mktemp("prior")
    raw, data = root / "raw", root / "processed"
    write_shapes(str(raw), count=80, size=24, seed=0)
    assert cli.main(["preprocess", "--input", str(raw), "--output", str(data), "--resolution", "16", "--channels",
                     "3", "--captions"]) == 0
    captions = [p.read_text().strip() for p in sorted(raw.rglob("*.txt"))]
    tokenizer = text.train_tokenizer(captions, vocab_size=600, context_length=16)
    torch.manual_seed(0)
    config = clip.ClipConfig.for_tokenizer(tokenizer, image_size=16, in_channels=3, image_channels=(8, 16),
                                           image_heads=2, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
    folder = clip.save(root / "clip", clip.Clip(config), tokenizer)
    return str(data), folder


def _train(data: str, clip_folder, runs: str, tracking_uri: str, total_images: int) -> int:
    return cli.main(["train-prior", "--data", data, "--clip", str(clip_folder), "--config", CONFIG, *TINY,
                     "--set", f"train.total_images={total_images}", "--num-workers", "2", "--storage", runs,
                     "--name", "tiny-prior", "--register-as", "tiny-prior", "--tracking-uri", tracking_uri,
                     "--experiment", "test-train-prior"])


def test_train_register_sample_resume(shapes, mlflow_server, tmp_path, capsys):
    import mlflow
    import pandas as pd
    import torch

    from ddpm import clip, prior
    from pipelines import registry, tracking

    data, clip_folder = shapes
    runs = str(tmp_path / "runs")
    client = tracking.client(mlflow_server.uri)

    # -- 1. a fresh run on two workers ----------------------------------------------------------------------------
    assert _train(data, clip_folder, runs, mlflow_server.uri, total_images=32) == 0
    out = capsys.readouterr().out
    assert "64 training images" in out and "16 held out" in out and "embeddings of 16" in out
    last = out.strip().splitlines()[-1]
    assert "models:/tiny-prior/1" in last and "prior_cosine" in last and "text_cosine" in last
    version = client.get_model_version("tiny-prior", "1")
    assert version.tags["kind"] == "prior" and version.tags["clip"] == str(clip_folder)
    run_id = version.run_id
    metrics = client.get_run(run_id).data.metrics
    for key in ("loss", "prior_cosine", "text_cosine", "prior_top1", "text_top1"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert -1 <= metrics["prior_cosine"] <= 1 and 0 <= metrics["prior_top1"] <= 1

    # the registered folder: the prior, and the CLIP it was trained on, byte for byte the same weights
    folder = registry.resolve_clip("models:/tiny-prior/1", mlflow_server.uri).path
    loaded = prior.load(folder.parent)
    assert loaded.model.config.embed_dim == 16 and loaded.metadata["images_seen"] == 32
    pinned = clip.load(folder).model.state_dict()
    assert all(torch.equal(v, clip.load(clip_folder).model.state_dict()[k]) for k, v in pinned.items())

    # the pyfunc door: captions (and seeds) -> unit-norm embeddings, a seed's the same on every call
    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pyfunc.load_model("models:/tiny-prior/1")
    frame = pd.DataFrame({"text": ["a small red circle", "a large blue square"], "seed": [3, 4]})
    first = model.predict(frame, params={"steps": 4})
    assert first.shape == (2, 16) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert np.array_equal(first[1:], model.predict(frame.iloc[1:], params={"steps": 4}))
    assert not np.array_equal(first, model.predict(frame, params={"steps": 8}))  # the params reach the sampler

    # -- 2. resume to 64 images in the same MLflow run ------------------------------------------------------------
    assert _train(data, clip_folder, runs, mlflow_server.uri, total_images=64) == 0
    assert "models:/tiny-prior/2" in capsys.readouterr().out
    assert client.get_model_version("tiny-prior", "2").run_id == run_id
    run = client.get_run(run_id)
    assert run.data.metrics["restarts"] == 1 and run.data.metrics["resumed_at_images"] == 32
    history = client.get_metric_history(run_id, "images_seen")
    # every step logged exactly once: 1-2 in the first run, 3 and 4 after resuming (nothing trained twice)
    assert sorted((m.step, m.value) for m in history) == [(1, 16), (2, 32), (3, 48), (4, 64)]
    state = json.loads(Path(runs, "tiny-prior", "checkpoint_000000000064", "training_state.json").read_text())
    assert state["step"] == 4 and state["restarts"] == 1 and state["mlflow_run_id"] == run_id

    # a CLIP with other weights under the same path: the run's checkpoints pin the one it was trained on
    loaded_clip = clip.load(clip_folder)
    with torch.no_grad():
        next(loaded_clip.model.parameters()).add_(1.0)
    clip.save(clip_folder, loaded_clip.model, loaded_clip.tokenizer)
    assert _train(data, clip_folder, runs, mlflow_server.uri, total_images=96) == 1
    assert "was trained on a CLIP with weights sha256" in capsys.readouterr().err


def test_data_the_clip_cannot_embed_is_refused_before_anything_starts():
    """The dataset checks run on the driver, before the MLflow run and the workers: latents, no captions, images of
    another size than the CLIP's, too few rows to hold out."""
    from ddpm import clip
    from pipelines.errors import UserError
    from pipelines.train.prior import check_dataset
    from pipelines.train.prior_config import load_config

    config = load_config(CONFIG)
    cfg = clip.ClipConfig(image_size=16, in_channels=3, image_channels=(8, 16), image_heads=2, embed_dim=16,
                          text_width=16, text_layers=1, text_heads=2, vocab_size=600, context_length=16,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    good = {"image_shape": [16, 16, 3], "caption_policy": "keep", "counts": {"rows": 1000}}
    assert check_dataset(config, good, "d", cfg, "c") is config
    for manifest, message in [
        (good | {"kind": "latents"}, "d is a latent dataset (ddpm encode output); train the prior on"),
        ({k: v for k, v in good.items() if k != "caption_policy"}, "d has no captions"),
        (good | {"image_shape": [32, 32, 3]}, "d holds 32x32x3 images; the CLIP c takes 16x16x3"),
        (good | {"counts": {"rows": 256}}, "d has 256 images, not more than train.eval_images=256"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_dataset(config, manifest, "d", cfg, "c")
