"""unCLIP's decoder through ``ddpm train`` and the unCLIP recipe through ``ddpm pipeline``, against real components:
``ddpm data shapes`` scenes ingested by the real Ray Data job, a CLIP folder (random weights, a tokenizer learned on
the captions: training a CLIP is test_train_clip.py's business), Ray Train on two workers (DDP over gloo), a real
MLflow server for the runs and the registry, and the doors on the registered versions.

One scenario (each Ray Train start costs tens of seconds on two cores):

1. ``ddpm pipeline --config configs/shapes-unclip.yaml`` without its CLIP stage (``train.image_encoder`` = the CLIP
   folder): ingest reused, a prior trained on the CLIP, the decoder trained to 32 images (model.image_dim from the
   CLIP's width, the CLIP pinned in model/image_encoder/ and named in the version's tags, a sample grid of each image
   then its variations), prior + decoder registered as one model, evaluated with prompts (alignment, FD-cls) and
   promoted by the gate;
2. ``ddpm vary`` on the registered decoder writes the bytes ``ddpm.generate_images`` gives for that image's
   embedding, and a different image gives different variations; ``ddpm vary`` on a model without a CLIP is refused;
3. ``ddpm unclip`` of a (random) prior over the same CLIP and that decoder: the version's tags, the same bytes for a
   prompt through ``ddpm generate`` (a file, and Ray Data's batch job) and the pyfunc model; the same two parts
   again reuse the version; a prior over another CLIP is refused;
4. the decoder's run resumed with a CLIP of other weights is refused in one line.

The decoder's network, embedding dropout and variations are tested in tests/ddpm/test_decoder.py; the whole model's
plumbing in tests/ddpm/test_unclip.py; the checks that run before Ray starts are the parametrized test at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import cli
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "shapes-unclip.yaml")
TINY = [
    "--set", "model.image_size=16",
    "--set", "model.base_channels=16",
    "--set", "model.channel_mults=[1, 2]",
    "--set", "model.attention_resolutions=[8]",
    "--set", "model.num_heads=2",
    "--set", "train.batch_size=16",
    "--set", "train.max_minutes=null",
    "--set", "train.warmup_images=0",
    "--set", "train.log_every_steps=1",
    "--set", "train.checkpoint_every_images=32",
    "--set", "train.sample_every_images=32",
]


def _clip_folder(folder: Path, seed: int, captions: list[str]) -> Path:
    """A random CLIP that reads 16x16 RGB images (embeddings of 16) in ddpm.clip's layout."""
    import torch

    from ddpm import clip, text

    tokenizer = text.train_tokenizer(captions, vocab_size=600, context_length=16)
    torch.manual_seed(seed)
    config = clip.ClipConfig.for_tokenizer(tokenizer, image_size=16, in_channels=3, image_channels=(8, 16),
                                           image_heads=2, embed_dim=16, text_width=16, text_layers=1, text_heads=2)
    return clip.save(folder, clip.Clip(config), tokenizer)


def _prior_folder(folder: Path, clip_folder: Path) -> Path:
    """A random prior over ``clip_folder``'s embeddings, in ddpm train-prior's registered layout (its CLIP in clip/)."""
    import shutil

    import torch

    from ddpm import NoiseSchedule, prior

    torch.manual_seed(3)
    prior.save(folder, prior.DiffusionPrior(prior.PriorConfig(embed_dim=16, text_dim=16, width=32, depth=1, heads=2)),
               NoiseSchedule.cosine())
    shutil.copytree(clip_folder, folder / "clip")
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """80 captioned scenes preprocessed at 16x16 with --captions, a CLIP folder, and the raw folder's images."""
    from pipelines.data.shapes import write_shapes
    from tests.support import start_local_ray

    start_local_ray()
    root = tmp_path_factory.mktemp("decoder")
    raw, data = root / "raw", root / "processed"
    write_shapes(str(raw), count=80, size=24, seed=0)
    assert cli.main(["preprocess", "--input", str(raw), "--output", str(data), "--resolution", "16", "--channels",
                     "3", "--captions"]) == 0
    captions = [p.read_text().strip() for p in sorted(raw.rglob("*.txt"))]
    return str(data), _clip_folder(root / "clip", 0, captions), captions


def _train(data: str, clip_folder, runs: str, tracking_uri: str, total_images: int) -> int:
    return cli.main(["train", "--data", data, "--config", CONFIG, *TINY, "--set", f"train.image_encoder={clip_folder}",
                     "--set", f"train.total_images={total_images}", "--num-workers", "2", "--storage", runs,
                     "--name", "tiny-decoder", "--tracking-uri", tracking_uri,
                     "--experiment", "test-train-decoder"])


def test_train_register_vary_and_refuse_another_clip(shapes, mlflow_server, tmp_path, capsys):
    from PIL import Image

    import ddpm
    from ddpm import checkpoint
    from pipelines import registry, storage, tracking

    data, clip_folder, captions = shapes
    runs, server = str(tmp_path / "runs"), mlflow_server.uri

    # -- 1. the recipe through ddpm pipeline: a prior and the decoder trained, registered together, gated ----------
    pipeline = [f"pipeline.raw={Path(data).parent / 'raw'}", f"pipeline.processed={data}", "pipeline.resolution=16",
                "pipeline.captions=keep", "pipeline.clip_config=null", f"train.image_encoder={clip_folder}",
                f"pipeline.storage={runs}", "pipeline.run_name=tiny-decoder", "pipeline.register_as=tiny-pipe",
                "pipeline.prior_name=tiny-pipe-prior", "pipeline.experiment=test-train-decoder",
                "pipeline.eval_samples=16", "pipeline.eval_steps=4", "pipeline.eval_images_per_prompt=1",
                "pipeline.gate_max_ratio=null", "pipeline.gate_min_recall=null", "train.total_images=32"]
    prior_set = ["model.width=32", "model.depth=1", "model.heads=2", "train.batch_size=16", "train.warmup_images=0",
                 "train.total_images=32", "train.eval_images=16", "train.eval_steps=4"]
    capsys.readouterr()
    code = cli.main(["pipeline", "--config", CONFIG, *TINY, *[x for v in pipeline for x in ("--set", v)],
                     "--set", f"pipeline.prior_set={prior_set}", "--tracking-uri", server])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-1000:]
    assert "[ingest] reusing" in out and "[prior] registered models:/tiny-pipe-prior/1" in out, out
    assert "[unclip] registered tiny-pipe version 1" in out and "[gate] promoted to production" in out, out
    client = tracking.client(server)
    [piped] = client.search_model_versions("name = 'tiny-pipe'")
    assert piped.tags["kind"] == "unclip" and piped.tags["prior"] == "models:/tiny-pipe-prior/1"
    assert piped.tags["decoder"] == "models:/tiny-pipe-decoder/1" and piped.tags["gate.decision"] == "promote"
    assert 0 <= client.get_run(piped.run_id).data.metrics["ddim4/align_seen_all"] <= 1  # evaluated with prompts
    state = storage.read_json(f"{runs}/tiny-decoder/checkpoint_000000000032/training_state.json")
    assert state["config"]["model"]["image_dim"] == 16 and state["config"]["model"]["text_dim"] == 0
    [version] = client.search_model_versions("name = 'tiny-pipe-decoder'")
    assert version.tags["image_encoder"] == str(clip_folder) and len(version.tags["image_encoder_sha256"]) == 64
    loaded = checkpoint.load(registry.resolve_model("models:/tiny-pipe-decoder/1", server).path)
    assert loaded.image_encoder is not None and loaded.config.image_dim == 16 and loaded.prior is None
    grid = Image.open(client.download_artifacts(version.run_id, "samples/images_000000000032.png", str(tmp_path)))
    assert grid.size == (8 * 17 + 1, 4 * 17 + 1)  # 4 rows: the image, then 7 variations of it

    # -- 2. ddpm vary on the registered version: the library's bytes ------------------------------------------------
    scenes = sorted((Path(data).parent / "raw").rglob("*.png"))[:2]
    images = [np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BICUBIC)) for p in scenes]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"scene{i}.png")
    out = tmp_path / "variations.npz"
    assert cli.main(["vary", "--model", "models:/tiny-pipe-decoder/1", "--image", str(tmp_path / "scene0.png"),
                     "--num-images", "3", "--seed", "5", "--steps", "4", "--guidance-scale", "3", "--out", str(out),
                     "--tracking-uri", server]) == 0
    varied = np.load(out)["images"]
    expected = ddpm.generate_images(loaded, [5, 6, 7], condition=loaded.condition(3, images=images[0]), steps=4,
                                    guidance_scale=3.0)
    assert varied.shape == (3, 16, 16, 3) and np.array_equal(varied, expected)
    other = ddpm.generate_images(loaded, [5, 6, 7], condition=loaded.condition(3, images=images[1]), steps=4,
                                 guidance_scale=3.0)
    assert not np.array_equal(other, expected)  # the image, not only the seed, decides the variations
    capsys.readouterr()
    assert cli.main(["vary", "--model", "models:/tiny-pipe-decoder/1", "--image", str(tmp_path / "scene0.png"),
                     "--out", str(tmp_path / "v"), "--tracking-uri", server]) == 1
    assert "variations are written to one file here" in capsys.readouterr().err

    # -- 3. prior + decoder registered as one unCLIP model, called with a prompt on three doors ---------------------
    prior_folder = _prior_folder(tmp_path / "prior", clip_folder)
    capsys.readouterr()
    assert cli.main(["unclip", "--prior", str(prior_folder), "--decoder", "models:/tiny-pipe-decoder/1", "--register-as",
                     "tiny-unclip", "--alias", "production", "--tracking-uri", server]) == 0
    assert "registered tiny-unclip version 1" in capsys.readouterr().out
    [whole] = client.search_model_versions("name = 'tiny-unclip'")
    assert whole.tags["kind"] == "unclip" and whole.tags["decoder"] == "models:/tiny-pipe-decoder/1"
    assert whole.tags["prior"] == str(prior_folder) and whole.tags["clip"] == str(clip_folder)
    assert cli.main(["unclip", "--prior", str(prior_folder), "--decoder", "models:/tiny-pipe-decoder/1", "--register-as",
                     "tiny-unclip", "--tracking-uri", server]) == 0  # the same two parts: the same version
    assert "tiny-unclip version 1 already holds" in capsys.readouterr().out
    prompt = captions[0]
    assert cli.main(["generate", "--model", "models:/tiny-unclip@production", "--prompt", prompt, "--seed", "3",
                     "--num-images", "2", "--steps", "4", "--guidance-scale", "2", "--prior-steps", "5",
                     "--out", str(tmp_path / "u.npz"), "--tracking-uri", server]) == 0
    via_cli = np.load(tmp_path / "u.npz")["images"]
    unclip = checkpoint.load(registry.resolve_model("models:/tiny-unclip/1", server).path)
    assert unclip.prior is not None and via_cli.shape == (2, 16, 16, 3)
    assert np.array_equal(via_cli, ddpm.generate_images(unclip, [3, 4], condition=unclip.condition(2, prompts=prompt),
                                                        steps=4, guidance_scale=2.0, prior_steps=5))
    import mlflow

    mlflow.set_tracking_uri(server)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-unclip@production")
    via_pyfunc = pyfunc.predict([{"prompt": prompt, "seed": 3, "num_images": 2, "steps": 4, "guidance_scale": 2.0,
                                  "prior_steps": 5}])
    assert np.array_equal(via_pyfunc, via_cli)
    assert cli.main(["generate", "--model", "models:/tiny-unclip/1", "--prompt", prompt, "--seed", "3",
                     "--num-images", "2", "--steps", "4", "--guidance-scale", "2", "--prior-steps", "5", "--format",
                     "parquet", "--output", str(tmp_path / "batch"), "--tracking-uri", server]) == 0
    from pipelines.data.dataset import load_numpy

    assert np.array_equal(load_numpy(str(tmp_path / "batch"))[0], via_cli)  # Ray Data's sampler actors
    other_prior = _prior_folder(tmp_path / "other-prior", _clip_folder(tmp_path / "clip-2", 2, captions))
    capsys.readouterr()
    assert cli.main(["unclip", "--prior", str(other_prior), "--decoder", "models:/tiny-pipe-decoder/1", "--register-as",
                     "tiny-unclip", "--tracking-uri", server]) == 1
    assert "was trained on another CLIP than --decoder" in capsys.readouterr().err

    # -- 4. the run resumed with other CLIP weights: refused before anything starts --------------------------------
    other_clip = _clip_folder(tmp_path / "other-clip", 1, captions)
    capsys.readouterr()
    assert _train(data, other_clip, runs, server, 64) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the folder it resolved ("using ..."), then the error
    assert err[-1].startswith("ddpm train: error: run tiny-decoder was trained with CLIP "), err
    assert str(clip_folder) in err[-1] and len(err) <= 2, err


def test_vary_refuses_a_model_without_a_clip(tmp_path, capsys):
    import torch

    from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint

    torch.manual_seed(0)
    folder = checkpoint.save(tmp_path / "plain", UNet(UNetConfig.preset("tiny")), NoiseSchedule.linear())
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert cli.main(["vary", "--model", str(folder), "--image", str(image), "--out", str(tmp_path / "v.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--image: this model takes no image to condition on" in err[0], err


def _manifest(**fields) -> dict:
    return {"format_version": 1, "image_shape": [16, 16, 3], "fingerprint": "x", "shards": [],
            "counts": {"rows": 100}, "caption_policy": "keep", **fields}


@pytest.mark.parametrize("fields, settings, message", [
    ({"image_shape": [32, 32, 3]}, ["model.image_size=32"], "holds 32x32x3 images; the CLIP .* embeds 16x16x3"),
    ({"kind": "latents", "dtype": "float32", "image_shape": [4, 4, 4]}, ["train.random_flip=false"],
     "holds latents, but unCLIP's decoder embeds each training image with its CLIP"),
    ({"class_names": ["a", "b"]}, ["train.class_conditional=true"], "a decoder is conditioned on image embeddings"),
])
def test_fit_refuses_what_a_decoder_cannot_train_on(shapes, fields, settings, message):
    from pipelines.config import load_config
    from pipelines.train.driver import fit_to_dataset
    from pipelines.train.encoders import resolve_image_encoder

    _, clip_folder, _ = shapes
    base = [*TINY[1::2], f"train.image_encoder={clip_folder}"]
    resolved = resolve_image_encoder(str(clip_folder))
    assert resolved.width == 16 and resolved.image_shape == (16, 16, 3)
    assert fit_to_dataset(load_config(CONFIG, base), _manifest(), "data",
                          image_encoder=resolved).model.image_dim == 16
    with pytest.raises(UserError, match=message):
        fit_to_dataset(load_config(CONFIG, [*base, *settings]), _manifest(**fields), "data", image_encoder=resolved)
    plain = load_config(CONFIG, [*TINY[1::2], "train.image_encoder=null", "model.image_dim=16"])
    with pytest.raises(UserError, match="model.image_dim=16 is set from the CLIP's embedding width"):
        fit_to_dataset(plain, _manifest(), "data")
