"""``ddpm train`` of a text-conditioned model against real components: ``ddpm data shapes`` scenes in moto's S3,
ingested with ``--captions`` by the real Ray Data job, Ray Train on two workers (DDP over gloo), a real MLflow
server for the runs, the registry and the CLIP the model conditions on.

The text encoder is a tiny CLIP (random weights, a tokenizer learned on the captions) registered as ``ddpm
train-clip`` registers one, so ``train.text_encoder=models:/NAME/VERSION`` goes through the registry; training
that CLIP is ``test_train_clip.py``'s business.

One scenario (each Ray Train start costs tens of seconds on two cores):

1. a run to 32 images, then the same command to 64: it resumes from the checkpoint in the same MLflow run, every
   step logged once (nothing trained twice);
2. the registered version carries a ``text_encoder`` tag; its checkpoint loads with the text encoder, and a prompt
   gives images through ``ddpm.generate_images``; the sample grid has one row per caption;
3. the same run resumed with a text encoder of other weights is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "shapes-text.yaml")
BUCKET = "train-text"
TINY = [
    "--set", "model.image_size=16",
    "--set", "model.base_channels=16",
    "--set", "model.channel_mults=[1, 2]",
    "--set", "model.attention_resolutions=[8]",
    "--set", "model.num_heads=2",
    "--set", "train.batch_size=16",
    "--set", "train.max_minutes=null",
    "--set", "train.lr_decay=constant",  # a run to 32 and a run to 64 then share their learning rates
    "--set", "train.warmup_images=0",
    "--set", "train.caption_dropout=0.5",  # so that the resume's exactness covers many dropped captions
    "--set", "train.log_every_steps=1",
    "--set", "train.checkpoint_every_images=32",
    "--set", "train.sample_every_images=32",
]


def _tokenizer():
    from ddpm import text
    from pipelines.data.shapes import scene

    captions = [scene(0, i, 24).caption for i in range(200)]  # the grammar's words, as the data has them
    return text.train_tokenizer(captions, vocab_size=600, context_length=16)


def _text_folder(folder: Path, seed: int) -> Path:
    """A random CLIP text encoder (width 16) in ddpm.text's layout."""
    import torch

    from ddpm import text

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = text.TextTransformer(text.TextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id))
    return text.save(folder, tokenizer, model)


@pytest.fixture(scope="module")
def shapes_s3(s3):
    """160 captioned scenes written to a bucket and preprocessed there at 16x16 with --captions."""
    from pipelines.data.shapes import write_shapes
    from tests.support import start_local_ray

    start_local_ray()
    s3.create_bucket(Bucket=BUCKET)
    raw, data = f"s3://{BUCKET}/raw", f"s3://{BUCKET}/processed"
    write_shapes(raw, count=160, size=24, seed=0)
    assert cli.main(["preprocess", "--input", raw, "--output", data, "--resolution", "16", "--channels", "3",
                     "--captions"]) == 0
    return data


def _register_clip(tmp_path: Path, tracking_uri: str) -> str:
    """A tiny random CLIP registered as ddpm train-clip registers one; returns its models:/ URI."""
    import mlflow
    import torch

    from ddpm import clip
    from pipelines import registry, tracking

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = clip.Clip(clip.ClipConfig.for_tokenizer(
        tokenizer, image_size=16, image_channels=(8, 16), image_heads=2, embed_dim=16, text_width=16,
        text_layers=1, text_heads=2))
    folder = clip.save(tmp_path / "clip", model, tokenizer)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = tracking.ensure_experiment("test-train-text-clip", tracking_uri)
    run = tracking.client(tracking_uri).create_run(experiment)
    uri = registry.log_clip(folder, run_id=run.info.run_id, tracking_uri=tracking_uri)
    version = registry.register(uri, "tiny-text-clip", tags={"kind": "clip"}, tracking_uri=tracking_uri)
    return f"models:/tiny-text-clip/{version}"


def _train(data: str, tracking_uri: str, text_encoder: str, total_images: int, name: str,
           register_as: str | None = None) -> int:
    return cli.main([
        "train", "--data", data, "--config", CONFIG, *TINY, "--set", f"train.text_encoder={text_encoder}",
        "--set", f"train.total_images={total_images}", "--num-workers", "2", "--storage", f"s3://{BUCKET}/runs",
        "--name", name, *(["--register-as", register_as] if register_as else []), "--tracking-uri", tracking_uri,
        "--experiment", "test-train-text",
    ])


def test_train_resume_register_and_generate(shapes_s3, mlflow_server, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import ddpm
    from ddpm import checkpoint
    from pipelines import registry, storage, tracking

    data, server = shapes_s3, mlflow_server.uri
    clip_uri = _register_clip(tmp_path, server)
    runs = f"s3://{BUCKET}/runs"

    # -- 1. 32 images, then to 64 (a resume) through ddpm pipeline: it reuses the ingested captions, trains on, and
    # evaluates (alignment, FD-cls with prompts), registers and gates the text model
    assert _train(data, server, clip_uri, 32, "resumed") == 0
    pipeline = [f"pipeline.raw=s3://{BUCKET}/raw", f"pipeline.processed={data}", "pipeline.resolution=16",
                "pipeline.captions=keep", "pipeline.clip_config=null", f"pipeline.storage={runs}",
                "pipeline.run_name=resumed", "pipeline.register_as=tiny-text", "pipeline.experiment=test-train-text",
                "pipeline.eval_samples=16", "pipeline.eval_steps=4", "pipeline.eval_images_per_prompt=1",
                "pipeline.gate_max_ratio=null",
                "pipeline.gate_min_recall=null", f"train.text_encoder={clip_uri}", "train.total_images=64"]
    capsys.readouterr()
    code = cli.main(["pipeline", "--config", CONFIG, *TINY, *[x for s in pipeline for x in ("--set", s)],
                     "--tracking-uri", server])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-1000:]
    assert "[ingest] reusing" in out and "[clip]" not in out and "[gate] promoted to production" in out, out
    resumed = storage.read_json(f"{runs}/resumed/checkpoint_000000000064/training_state.json")
    assert resumed["restarts"] == 1 and resumed["step"] == 4
    assert resumed["config"]["model"]["text_dim"] == 16  # from the text encoder's width
    client = tracking.client(server)
    [version] = client.search_model_versions("name = 'tiny-text'")
    history = client.get_metric_history(version.run_id, "images_seen")
    assert sorted((m.step, m.value) for m in history) == [(1, 16), (2, 32), (3, 48), (4, 64)]

    # -- 2. the registered version: its tag, its gate, its text encoder, a prompt --------------------------------
    assert version.tags["text_encoder"] == clip_uri and version.tags["images_seen"] == "64"
    assert version.tags["gate.decision"] == "promote"
    logged = client.get_run(version.run_id).data.metrics
    assert 0 <= logged["ddim4/align_seen_all"] <= 1 and 0 <= logged["ddim4/align_held_out_colour"] <= 1  # DDIM-4
    loaded = checkpoint.load(registry.resolve_model("models:/tiny-text/1", server).path)
    assert loaded.text_encoder is not None and loaded.config.text_dim == 16
    prompts = ["a small red circle", "a large blue square"]
    images = ddpm.generate_images(loaded, [0, 1], condition=loaded.condition(2, prompts=prompts), steps=4,
                                  guidance_scale=3.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    again = ddpm.generate_images(loaded, [0, 1], condition=loaded.condition(2, prompts=prompts[::-1]), steps=4,
                                 guidance_scale=3.0)
    assert not np.array_equal(images, again)  # the prompt, not only the seed, decides the image
    # promotion recorded the canary (the empty prompt's images) that a Serve replica checks before serving it
    assert registry.check_canary(loaded, "tiny-text", "1", server).status == "passed"

    run_id = version.run_id
    grid = Image.open(client.download_artifacts(run_id, "samples/images_000000000064.png", str(tmp_path)))
    # 4 caption rows of 16 pixels, each with its 1-pixel gap and a 12-pixel caption band; 8 columns
    assert grid.size == (8 * 17 + 1, 4 * (17 + 12) + 1)

    # -- 3. the run resumed with other text-encoder weights: refused before anything starts ---------------------
    other = _text_folder(tmp_path / "other-text", seed=1)
    capsys.readouterr()
    assert _train(data, server, str(other), 96, "resumed") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run resumed was trained with text encoder models:/tiny-text-clip/1" in err[0]


def _fake_dataset(folder: Path, **fields) -> str:
    """A folder with only a manifest: enough for the checks that run before anything is read."""
    folder.mkdir()
    manifest = {"format_version": 1, "image_shape": [32, 32, 3], "fingerprint": "x", "shards": [],
                "counts": {"rows": 100}, "caption_policy": "keep", **fields}
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return str(folder)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return _text_folder(tmp_path_factory.mktemp("text") / "encoder", seed=0)


@pytest.mark.parametrize("fields, settings, message", [
    ({"caption_policy": None}, [], "has no captions for train.text_encoder to encode: run ddpm preprocess "
                                   "--captions"),
    ({"class_names": ["a", "b"]}, ["train.class_conditional=true"],
     "train.class_conditional and train.text_encoder: a model is conditioned on class labels or on captions"),
    ({}, ["train.text_encoder=null", "model.text_dim=16"], "model.text_dim=16 is set from the text encoder's width"),
    ({}, ["train.text_encoder=/no/such/folder"], "train.text_encoder /no/such/folder: no such folder"),
    ({}, ["train.caption_dropout=1.5"], "train.caption_dropout must be between 0 and 1, got 1.5"),
])
def test_unusable_text_settings_are_one_line(fields, settings, message, text_folder, capsys, tmp_path):
    data = _fake_dataset(tmp_path / "data", **fields)
    sets = [x for s in [f"train.text_encoder={text_folder}", *settings] for x in ("--set", s)]
    code = cli.main(["train", "--data", data, "--config", CONFIG, *sets, "--storage", str(tmp_path / "runs"),
                     "--name", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ddpm train: error:") and message in err[0], err[0]


def test_a_folder_that_is_not_a_text_encoder_is_refused(tmp_path):
    from pipelines.train.encoders import resolve_text_encoder

    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError, match=f"train.text_encoder {tmp_path}: "):
        resolve_text_encoder(str(tmp_path))


def test_fit_sets_text_dim_from_the_encoder_and_a_local_folder_resolves(text_folder):
    from ddpm import text
    from pipelines.config import load_config
    from pipelines.train.driver import fit_to_dataset
    from pipelines.train.encoders import TEXT, WEIGHTS, resolve_text_encoder

    resolved = resolve_text_encoder(str(text_folder))
    assert resolved.width == 16 and resolved.context_length == 16
    assert resolved.source["name"] is None and resolved.source["uri"] == str(text_folder)
    assert resolved.source["sha256"] == __import__("hashlib").sha256(resolved.files[WEIGHTS[TEXT]]).hexdigest()
    assert text.load(text_folder).width == 16
    manifest = {"image_shape": [32, 32, 3], "caption_policy": "keep"}
    config = load_config(CONFIG, [f"train.text_encoder={text_folder}"])
    fitted = fit_to_dataset(config, manifest, "data", resolved)
    assert fitted.model.text_dim == 16 and fitted.model.num_classes == 0
    latent = {"image_shape": [8, 8, 4], "kind": "latents", "dtype": "float32", "caption_policy": "keep"}
    fitted = fit_to_dataset(load_config(str(ROOT / "configs" / "shapes-latent-text.yaml"),
                                        [f"train.text_encoder={text_folder}"]), latent, "latents", resolved)
    assert (fitted.model.image_size, fitted.model.in_channels, fitted.model.text_dim) == (8, 4, 16)


def test_rows_give_each_position_its_caption(ray_local):
    import numpy as np
    import ray

    from pipelines.train.rows import Blocks, Rows

    blocks = [{"image": np.full((k, 2, 2, 1), i, np.uint8), "label": np.arange(k, dtype=np.int64),
               "caption": np.array([f"block {i} row {r}" for r in range(k)], dtype=object)}
              for i, k in enumerate((3, 5, 4))]
    rows = Rows(Blocks(tuple(ray.put(b) for b in blocks), (3, 5, 4)), seed=7)
    images, labels = rows.take(5, 20)  # past the end of a pass: the next one's order
    captions = rows.captions(5, 20)
    assert captions == [f"block {int(im[0, 0, 0])} row {int(y)}" for im, y in zip(images, labels)]


def test_train_local_refuses_a_text_model(capsys, tmp_path):
    code = cli.main(["train-local", "--set", "train.text_encoder=/some/folder", "--out", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "ddpm train-local trains no text or image-embedding models" in err[0], err


def test_encode_carries_the_captions_to_the_latents(shapes_s3, tmp_path):
    """``ddpm encode`` of a captioned dataset: every latent row keeps its image's caption, and the manifest says the
    latents are captioned, so a text model trains on them (the Stable Diffusion row)."""
    import torch

    from ddpm import Autoencoder, AutoencoderConfig, autoencoder
    from pipelines.data.dataset import is_captioned, read_columns, read_manifest
    from pipelines.data.encode import encode

    torch.manual_seed(0)
    folder = autoencoder.save(tmp_path / "ae", Autoencoder(AutoencoderConfig.preset("tiny")))
    latents = f"s3://{BUCKET}/latents"
    manifest = encode(shapes_s3, str(folder), latents, num_actors=1, progress=None)
    assert is_captioned(manifest) and manifest["image_shape"] == [4, 4, 4]
    source = read_manifest(shapes_s3)
    assert manifest["caption_policy"] == source["caption_policy"]
    captions = lambda uri, m: dict(zip(*[read_columns(uri, m["shards"], ["key", "caption"], None)[c].to_pylist()
                                         for c in ("key", "caption")]))  # noqa: E731
    assert captions(latents, manifest) == captions(shapes_s3, source) and len(captions(latents, manifest)) == 160


def test_a_text_models_checkpoint_is_whole_only_with_its_text_encoder(tmp_path):
    """latest_checkpoint's completeness check reads what a DDPM's config.json says it carries: a text model's
    checkpoint missing a file of its text/ folder, or with its encoder's weights cut short, is passed over (it would
    not load), and a whole one is found."""
    import shutil

    import torch

    from ddpm import checkpoint
    from pipelines.train.checkpoints import MODEL_DIR, TrainingState, complete_checkpoint, write_training_state
    from tests.support import save_text_checkpoint

    whole = tmp_path / "checkpoint_000000000032"
    save_text_checkpoint(whole / MODEL_DIR)
    net = checkpoint.load(whole / MODEL_DIR).model
    write_training_state(whole, state=TrainingState(step=2, images_seen=32),
                         optimizer=torch.optim.Adam(net.parameters()), rng_states={"rng.cpu.0": torch.get_rng_state()})
    assert complete_checkpoint(str(whole)).images_seen == 32

    for cut in ("text/tokenizer/vocab.json", "text/text_encoder/model.safetensors", "text/text_encoder/config.json"):
        broken = tmp_path / f"broken-{cut.replace('/', '-')}"
        shutil.copytree(whole, broken)
        (broken / MODEL_DIR / cut).unlink()
        assert complete_checkpoint(str(broken)) is None, cut
    truncated = tmp_path / "truncated"
    shutil.copytree(whole, truncated)
    weights = truncated / MODEL_DIR / "text" / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert complete_checkpoint(str(truncated)) is None
