"""``ddpm train-clip`` against real components: ``ddpm data shapes`` scenes in moto's S3, ingested with
``--captions`` by the real Ray Data job, Ray Train on two workers (DDP over gloo, the contrastive loss's negatives
gathered across them), a real MLflow server for the run and the registry.

One scenario, in the order a user lives it (each Ray Train start costs tens of seconds on two cores):

1. a fresh run to 64 images: loss, logit scale, images/s and the held-out retrieval (also over one-object captions)
   in the MLflow run; the CLIP registered with kind=clip and its retrieval tags; ``ddpm.text.load`` on the
   registered folder reads its text tower, which is the CLIP's;
2. the same command with a larger ``total_images``: it resumes from the 64-image checkpoint in the same MLflow run
   with the checkpoint's tokenizer, and the steps and images seen continue exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import cli

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "clip-shapes.yaml")
TINY = [
    "--set", "model.image_channels=[8, 16]",  # 16 -> 8: a grid of 8x8
    "--set", "model.image_heads=2",
    "--set", "model.embed_dim=16",
    "--set", "model.text_width=16",
    "--set", "model.text_layers=1",
    "--set", "model.text_heads=2",
    "--set", "model.vocab_size=600",
    "--set", "train.batch_size=16",
    "--set", "train.warmup_images=0",
    "--set", "train.log_every_steps=1",
    "--set", "train.checkpoint_every_images=32",
    "--set", "train.sample_every_images=32",
    "--set", "train.eval_images=24",
]


@pytest.fixture(scope="module")
def shapes_s3(s3):
    """120 captioned scenes written to a bucket and preprocessed there at 16x16 with --captions."""
    from pipelines.data.shapes import write_shapes
    from tests.support import start_local_ray

    start_local_ray()
    s3.create_bucket(Bucket="train-clip")
    raw, data = "s3://train-clip/raw", "s3://train-clip/processed"
    write_shapes(raw, count=120, size=24, seed=0)
    assert cli.main(["preprocess", "--input", raw, "--output", data, "--resolution", "16", "--channels", "3",
                     "--captions"]) == 0
    return data


def _train(data: str, runs: str, tracking_uri: str, total_images: int) -> int:
    return cli.main(["train-clip", "--data", data, "--config", CONFIG, *TINY,
                     "--set", f"train.total_images={total_images}", "--num-workers", "2", "--storage", runs,
                     "--name", "tiny-clip", "--register-as", "tiny-clip", "--tracking-uri", tracking_uri,
                     "--experiment", "test-train-clip"])


def test_train_register_resume(shapes_s3, s3, mlflow_server, capsys):
    import torch

    from ddpm import clip, text
    from pipelines import registry, storage, tracking
    from pipelines.commands.pipeline import clip_stage
    from pipelines.config import load_config

    data = shapes_s3
    runs = "s3://train-clip/runs"
    client = tracking.client(mlflow_server.uri)

    # -- 1. a fresh run on two workers ----------------------------------------------------------------------------
    assert _train(data, runs, mlflow_server.uri, total_images=64) == 0
    out = capsys.readouterr().out
    assert "96 training images" in out and "24 held out" in out
    last_line = out.strip().splitlines()[-1]
    [run] = client.search_runs([tracking.ensure_experiment("test-train-clip", mlflow_server.uri)])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.metrics["images_seen"] == 64
    assert run.data.params["model.image_channels"] == "[8, 16]"
    for key in ("loss", "logit_scale", "lr", "grad_norm", "images_per_sec"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4], key
    top1 = client.get_metric_history(run_id, "retrieval_top1")
    assert [m.step for m in top1] == [2, 4]  # at the checkpoints of 32 and 64 images (steps of 16)
    for key in ("retrieval_top5", "retrieval_top1_one_object", "retrieval_top5_one_object"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [2, 4], key
    assert 0 <= top1[-1].value <= run.data.metrics["retrieval_top5"] <= 1
    assert run.data.metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=0.1)  # exp(t), t learned from log(1/0.07)

    [version] = client.search_model_versions("name = 'tiny-clip'")
    tags = version.tags
    assert version.version == "1" and version.run_id == run_id
    assert tags["kind"] == "clip" and tags["images_seen"] == "64" and tags["run_id"] == run_id
    assert float(tags["retrieval_top1"]) == pytest.approx(top1[-1].value, abs=1e-3)
    assert "retrieval_top1_one_object" in tags and tags["embed_dim"] == "16"
    assert "models:/tiny-clip/1" in last_line and "held-out text->image retrieval: top1 " in last_line

    folder = registry.resolve_clip("models:/tiny-clip/1", mlflow_server.uri).path
    encoder = text.load(folder)  # text_encoder/ + tokenizer/: what a text-conditioned U-Net pins
    states, pooled = encoder.encode(["a small red square", "a green circle left of a blue square"])
    assert states.shape == (2, 16, 16) and pooled.shape == (2, 16)
    assert encoder.report(["a small purple square"])[0].unknown_words == ("purple",)  # the learned vocabulary
    loaded = clip.load(folder)
    with torch.no_grad():
        expected = loaded.model.text_states(loaded.tokenizer.tokenize(["a small red square"]))[1]
    assert torch.equal(encoder.encode(["a small red square"])[1], expected)

    # -- 2. the same command, further: resumes in the same run and trains only the new images --------------------
    first = storage.read_json(f"{runs}/tiny-clip/checkpoint_000000000064/training_state.json")
    assert first["step"] == 4 and first["images_seen"] == 64
    # (through ddpm pipeline's train-clip stage, which is the same command: its run is <run_name>-clip)
    config = load_config(ROOT / "configs" / "shapes-text.yaml", [
        f"pipeline.clip_config={CONFIG}", "pipeline.clip_set=" + json.dumps(
            [item for item in TINY if item != "--set"] + ["train.total_images=96"]),
        "pipeline.run_name=tiny", "pipeline.clip_name=tiny-clip", f"pipeline.storage={runs}",
        "pipeline.num_workers=2", "pipeline.experiment=test-train-clip"])
    said = []
    assert clip_stage(config, data, tracking_uri=mlflow_server.uri, seconds={}, log=said.append) == \
        "models:/tiny-clip/2"
    assert said[-1].startswith("[clip] registered models:/tiny-clip/2; held-out text->image retrieval: top1 ")
    [run] = client.search_runs([tracking.ensure_experiment("test-train-clip", mlflow_server.uri)])
    assert run.info.run_id == run_id and run.data.metrics["images_seen"] == 96
    assert run.data.metrics["restarts"] == 1 and run.data.metrics["resumed_at_images"] == 64
    history = client.get_metric_history(run_id, "images_seen")
    # every step logged exactly once: 1-4 in the first run, 5 and 6 after resuming (nothing trained twice)
    assert sorted((m.step, m.value) for m in history) == [(1, 16), (2, 32), (3, 48), (4, 64), (5, 80), (6, 96)]
    resumed = storage.read_json(f"{runs}/tiny-clip/checkpoint_000000000096/training_state.json")
    assert resumed["step"] == 6 and resumed["restarts"] == 1 and resumed["mlflow_run_id"] == run_id
    assert resumed["train_seconds"] > first["train_seconds"]
    for name in ("vocab.json", "merges.txt"):  # the resumed run kept the checkpoint's tokenizer
        assert (storage.read_bytes(f"{runs}/tiny-clip/checkpoint_000000000064/model/tokenizer/{name}")
                == storage.read_bytes(f"{runs}/tiny-clip/checkpoint_000000000096/model/tokenizer/{name}"))
    assert {v.version: v.tags["images_seen"] for v in client.search_model_versions("name = 'tiny-clip'")} == {
        "1": "64", "2": "96"}


def _tiny_task(tmp_path):
    """A ClipTask of a 16x16 CLIP with a tokenizer learned on two captions (no Ray: its refs are unused here)."""
    from ddpm.text import train_tokenizer
    from pipelines.train.clip_config import load_config
    from pipelines.train.clip_worker import ClipTask, tokenizer_files

    config = load_config(CONFIG, [item for item in TINY if item != "--set"] + ["model.image_size=16"])
    tokenizer = train_tokenizer(["a small red square", "a blue circle above a red square"], vocab_size=600,
                                context_length=16)
    task = ClipTask(clip_config=config.model.clip_config(tokenizer).to_dict(), tokenizer=tokenizer_files(tokenizer),
                    caption_ids=None, held_out=None)
    return config, task


def test_a_clip_checkpoint_is_whole_only_with_all_its_files(tmp_path):
    """latest_checkpoint's completeness check knows the CLIP layout (clip/, text_encoder/, tokenizer/ in model/): a
    whole one is found, one cut short (a tokenizer file or the CLIP's weights missing or truncated) is passed over."""
    import shutil

    import torch

    from pipelines.train.checkpoints import TrainingState, complete_checkpoint

    config, task = _tiny_task(tmp_path)
    torch.manual_seed(0)
    net = task.build(config)
    optimizer = config.train.build_optimizer(net.parameters())
    whole = tmp_path / "checkpoint_000000000032"
    whole.mkdir()
    task.write(whole, state=TrainingState(step=2, images_seen=32), net=net, optimizer=optimizer,
               rng_states={"rng.cpu.0": torch.get_rng_state()})
    assert complete_checkpoint(str(whole)).images_seen == 32

    for cut in ("model/tokenizer/merges.txt", "model/clip/model.safetensors", "model/text_encoder/config.json"):
        broken = tmp_path / f"broken-{cut.replace('/', '-')}"
        shutil.copytree(whole, broken)
        (broken / cut).unlink()
        assert complete_checkpoint(str(broken)) is None, cut
    truncated = tmp_path / "truncated"
    shutil.copytree(whole, truncated)
    weights = truncated / "model" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert complete_checkpoint(str(truncated)) is None

    state, _, _ = task.restore(task.build(config), whole)  # and the loop reads it back
    assert state.images_seen == 32


def test_contrastive_sum_over_an_empty_share_is_zero_and_sums_match_the_mean():
    """reduction="sum" (the CLIP loop's per-rank loss): the mean times the rows, and 0 with a zero gradient for a
    rank whose share of a short last step is empty."""
    import torch

    from ddpm import clip

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(14.0)
    assert clip.contrastive_loss(image, texts, scale, reduction="sum").item() == pytest.approx(
        5 * clip.contrastive_loss(image, texts, scale).item(), rel=1e-6)
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = clip.contrastive_loss(empty, empty, scale, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and empty.grad is not None and empty.grad.shape == (0, 8)
    with pytest.raises(ValueError, match="reduction must be mean or sum"):
        clip.contrastive_loss(image, texts, scale, reduction="max")


def _fake_dataset(folder: Path, **fields) -> str:
    """A folder with only a manifest: enough for the checks that run before anything is read."""
    folder.mkdir()
    manifest = {"format_version": 1, "image_shape": [16, 16, 3], "fingerprint": "x", "shards": [],
                "counts": {"rows": 100}, "caption_policy": "keep", **fields}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


@pytest.mark.parametrize("fields, message", [
    ({"caption_policy": None}, "has no captions: run ddpm preprocess --captions"),
    ({"kind": "latents", "dtype": "float32", "image_shape": [4, 4, 4]}, "is a latent dataset (ddpm encode output)"),
    ({"image_shape": [16, 24, 3]}, "holds 16x24 images; the CLIP's image tower takes square images"),
    ({"image_shape": [17, 17, 3]}, "holds 17x17x3 images, which the CLIP's image tower cannot take"),
    ({"counts": {"rows": 24}}, "has 24 images, not more than train.eval_images=24 held out"),
])
def test_unusable_data_is_one_line(fields, message, capsys, tmp_path):
    data = _fake_dataset(tmp_path / "data", **fields)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    code = cli.main(["train-clip", "--data", data, "--config", CONFIG, *TINY,
                     "--storage", str(tmp_path / "runs"), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ddpm train-clip: error:") and message in err[0]


@pytest.mark.parametrize("setting, message", [
    ("train.bogus=1", "unknown key"),
    ("model.vocab_size=100", "vocab_size must be at least 514"),
    ("model.image_channels=[8, 15]", "not divisible by image_heads"),
    ("train.weight_decay=-1", "train.weight_decay must be at least 0"),
])
def test_bad_config_is_one_line(setting, message, capsys, tmp_path):
    code = cli.main(["train-clip", "--data", str(tmp_path), "--config", CONFIG, "--set", setting,
                     "--storage", str(tmp_path), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ddpm train-clip: error:") and message in err[0]
