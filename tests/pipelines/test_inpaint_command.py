"""``ddpm inpaint``: the command end to end on a tiny checkpoint, its one-line errors for bad images and masks,
``--resize``, and (slow) a briefly trained digits model completing right halves that the evaluation's classifier reads
as the right digit.

RePaint itself is tested against closed forms in tests/ddpm/test_inpaint.py.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, from_uint8, inpaint, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors, and the digits rates below are for one thread


# -- the command --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "tiny", UNet(UNetConfig.preset("tiny")),
                           NoiseSchedule.linear())


def _write_png(path, pixels):
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def digit(tmp_path):
    """An 8x8 grey image and a mask whose right half is white (generate)."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8))
    mask = np.zeros((8, 8))
    mask[:, 4:] = 255
    return _write_png(tmp_path / "in.png", pixels), _write_png(tmp_path / "mask.png", mask), pixels, mask


def test_cli_end_to_end(tiny_checkpoint, digit, tmp_path):
    image_path, mask_path, pixels, mask = digit
    out = tmp_path / "sub" / "out.png"
    cmd = [sys.executable, "-m", "pipelines.cli", "inpaint", "--model", str(tiny_checkpoint), "--image", image_path,
           "--mask", mask_path, "--out", str(out), "--sampler", "ddpm", "--steps", "10", "--resample-jumps", "2",
           "--resample-times", "3", "--seed", "7"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "32 of 64 pixels generated" in done.stdout
    with Image.open(out) as img:
        assert img.size == (8, 8) and img.mode == "L"
        result = np.asarray(img)
    keep = mask == 0
    assert np.array_equal(result[keep], pixels[keep])  # the kept half is the input, bit for bit
    assert not np.array_equal(result[~keep], pixels[~keep])


def _cli(args, capsys):
    from pipelines.cli import main

    code = main(["inpaint", *args])
    err = capsys.readouterr().err
    return code, err


def test_cli_rejects_bad_images_and_masks(tiny_checkpoint, tmp_path, capsys):
    base = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out.png"), "--steps", "2",
            "--resample-times", "1"]
    img8 = _write_png(tmp_path / "img8.png", np.full((8, 8), 100))
    img12 = _write_png(tmp_path / "img12.png", np.full((12, 10), 100))
    half8 = np.zeros((8, 8))
    half8[:, 4:] = 255
    cases = {
        "size": (img12, _write_png(tmp_path / "m12.png", np.full((12, 10), 255)),
                 "img12.png: the image is 10x12 but the model expects 8x8 (pass --resize"),
        "mismatch": (img8, _write_png(tmp_path / "m12b.png", np.full((12, 10), 255)),
                     "m12b.png: the mask is 10x12 but the image"),
        "grey": (img8, _write_png(tmp_path / "grey.png", half8 / 2),
                 "grey.png: the mask must be black (0 = keep) and white (255 = generate) only; found 1 other"),
        "empty": (img8, _write_png(tmp_path / "black.png", np.zeros((8, 8))),
                  "black.png: the mask is all black, so there is nothing to generate"),
        "missing": (str(tmp_path / "nope.png"), _write_png(tmp_path / "m8.png", half8), "nope.png: no such file"),
    }
    for name, (image, mask, message) in cases.items():
        code, err = _cli([*base, "--image", image, "--mask", mask], capsys)
        assert code == 1 and err.count("\n") == 1, (name, err)
        assert err.startswith("ddpm inpaint: error: ") and message in err, (name, err)

    code, err = _cli([*base, "--image", img8, "--mask", _write_png(tmp_path / "ok.png", half8), "--steps", "5",
                      "--resample-times", "2", "--resample-jumps", "5"], capsys)
    assert code == 1 and "--resample-jumps: must be in [1, steps - 1] = [1, 4]" in err
    code, err = _cli([*base, "--image", img8, "--mask", str(tmp_path / "ok.png"), "--class-label", "1"], capsys)
    assert code == 1 and "--class-label: this model is unconditional" in err


def test_edit_needs_no_mask_and_refuses_a_bad_strength(tiny_checkpoint, tmp_path, capsys):
    """``ddpm edit`` is ``ddpm inpaint`` with SDEdit's defaults: no mask (the whole image), strength 0.8."""
    from pipelines.cli import main

    img8 = _write_png(tmp_path / "img8.png", np.random.default_rng(1).integers(0, 256, (8, 8)))
    base = ["edit", "--model", str(tiny_checkpoint), "--image", img8, "--steps", "5"]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert "64 of 64 pixels generated" in capsys.readouterr().out
    assert main([*base, "--strength", "0.8", "--mask", _write_png(tmp_path / "all.png", np.full((8, 8), 255)),
                 "--out", str(tmp_path / "b.png")]) == 0  # the default strength, and a mask of everything
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    for strength, message in (("0", "--strength: must be in (0, 1], got 0"),
                              ("1.5", "--strength: must be in (0, 1], got 1.5")):
        assert main([*base, "--strength", strength, "--out", str(tmp_path / "c.png")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ddpm edit: error: ") and message in err, err
    assert main([*base, "--strength", "0.4", "--resample-times", "2", "--resample-jumps", "2",
                 "--out", str(tmp_path / "c.png")]) == 1  # 0.4 of 5 steps runs 2: jumps of 1 at most
    assert "--resample-jumps: must be in [1, the steps the edit runs - 1] = [1, 1]" in capsys.readouterr().err


def test_cli_resize_stretches_image_and_mask(tiny_checkpoint, tmp_path, capsys):
    image = _write_png(tmp_path / "big.png", np.full((16, 16, 3), 200))  # RGB: converted to the model's grey
    mask = np.zeros((16, 16))
    mask[:, 8:] = 255
    out = tmp_path / "out.png"
    args = ["--model", str(tiny_checkpoint), "--image", image, "--mask", _write_png(tmp_path / "m.png", mask),
            "--out", str(out), "--resize", "--steps", "3", "--resample-times", "1"]
    code, err = _cli(args, capsys)
    assert code == 0, err
    result = np.asarray(Image.open(out))
    assert result.shape == (8, 8) and (result[:, :4] == 200).all()


def test_cli_inpaints_a_latent_model_whose_latents_leave_the_pixel_range(tmp_path, capsys):
    """A latent model whose scaled latents leave [-1, 1], as a trained autoencoder's do: the command used to fail on
    every such model with "error: image must be in [-1, 1], got values in [-1.82, 1.39]" (the pixels' range check
    applied to the latents)."""
    from tests.ddpm.latent_checkpoint import latent_extent, random_pixels, save_latent_checkpoint

    model, ae = save_latent_checkpoint(tmp_path / "latent")
    pixels = random_pixels(1, seed=1)[0]  # (32, 32, 3)
    assert latent_extent(ae, pixels[None]) > 1.5
    mask = np.zeros((32, 32))
    mask[8:20, 10:30] = 255
    out = tmp_path / "inp.png"
    code, err = _cli(["--model", str(model), "--image", _write_png(tmp_path / "img.png", pixels), "--mask",
                      _write_png(tmp_path / "mask.png", mask), "--out", str(out), "--steps", "3",
                      "--resample-times", "1"], capsys)
    assert code == 0, err
    with Image.open(out) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
        result = np.asarray(img)
    keep = mask == 0
    assert np.array_equal(result[keep], pixels[keep])  # the kept pixels are the input's, bit for bit
    assert (result[~keep] != pixels[~keep]).any(axis=-1).mean() > 0.5  # the hole is the model's


# -- a trained digits model ---------------------------------------------------------------------------------------
# The right half of held-out digits, inpainted by a digits model trained here, read back by the evaluation's
# classifier (pipelines.evaluate.classifier, 98% held-out accuracy at 8x8; it never saw these digits, nor did the model).
# Baselines from the same digits: the right half filled with the train images' mean, or with uniform noise: what the
# classifier makes of the left half alone. A rate p over n digits has binomial standard error sqrt(p (1 - p) / n):
# for n = 300, 0.017 at chance (p = 0.1), 0.028 at 0.35, 0.029 at 0.5; a difference of two rates near 0.5 and 0.35,
# sqrt(0.029^2 + 0.028^2) = 0.040. Everything is seeded and runs on one thread, so the rates are the same every run
# on a given machine and preset; measured (torch 2.13 CPU; digits.yaml with v-prediction and min-SNR-5): inpainting
# 0.517 (155 of 300), mean fill 0.340, noise fill 0.370, the full digits 0.970. Asserted: more than chance + 10
# standard errors (0.27), and more than the better baseline by 2 standard errors of the difference (0.080; measured
# 0.147, 3.7 of them). 100-120 s on a busy 2-core machine.
N_DIGITS = 300


@pytest.mark.slow
def test_digits_model_completes_right_halves_as_the_right_digit(tmp_path):
    from pipelines.evaluate.classifier import load_or_train
    from pipelines.config import load_config
    from pipelines.evaluate.quality import load_data
    from pipelines.train.local import train_local

    images, labels = load_data("digits", 8)  # (1797, 8, 8, 1) uint8, (1797,): scikit-learn's digits at native size
    clf = load_or_train(images, labels, log=lambda _: None)  # cached under DDPM_HOME, as ``ddpm evaluate`` does
    # configs/digits.yaml at 8x8, unconditional (the mask is the only condition), one residual block per level and
    # 20,000 images (batch 64): about a minute of one core, on the classifier's train half only.
    config = load_config("configs/digits.yaml", [
        "model.image_size=8", "model.num_res_blocks=1", "train.class_conditional=false", "train.total_images=20000",
        "train.batch_size=64", "train.lr=2e-3", "train.warmup_images=1280", "train.log_every_steps=1000000"])
    train = clf.train_index
    run = train_local(config, from_uint8(images[train]), torch.from_numpy(labels[train]), out_dir=tmp_path / "digits",
                      log=lambda *_: None)
    loaded = checkpoint.load(run.checkpoint)  # EMA weights

    rows = clf.held_out_index[:N_DIGITS]
    known, y = images[rows], labels[rows]  # (N, 8, 8, 1) uint8, (N,)
    mask = torch.zeros(N_DIGITS, 1, 8, 8)
    mask[..., 4:] = 1  # generate the right half
    x_0 = inpaint(loaded.model, loaded.schedule, from_uint8(known), mask, sampler="ddpm", steps=20, resample_jumps=1,
                  resample_times=3, prediction_type=loaded.prediction_type, generator=torch.Generator().manual_seed(0))
    filled = to_uint8(x_0)  # (N, 8, 8, 1)
    assert np.array_equal(filled[:, :, :4], known[:, :, :4])

    mean_fill, noise_fill = known.copy(), known.copy()
    mean_fill[:, :, 4:] = np.round(images[train].mean(axis=0))[:, 4:]
    noise_fill[:, :, 4:] = np.random.default_rng(0).integers(0, 256, noise_fill[:, :, 4:].shape)

    @torch.no_grad()
    def rate(pixels):  # (N, 8, 8, 1) uint8 -> the fraction the classifier assigns to the original digit's class
        return float((clf.net(from_uint8(pixels)).argmax(dim=1).numpy() == y).mean())

    p, p_mean, p_noise, p_full = rate(filled), rate(mean_fill), rate(noise_fill), rate(known)
    print(f"right half inpainted: {p:.3f}, mean fill {p_mean:.3f}, noise fill {p_noise:.3f}, full digits {p_full:.3f}, "
          f"chance 0.1 (n = {N_DIGITS})")
    se = lambda q: math.sqrt(q * (1 - q) / N_DIGITS)  # noqa: E731
    baseline = max(p_mean, p_noise)
    assert p > 0.1 + 10 * se(0.1)  # far above chance: at least 0.27
    assert p - baseline > 2 * math.sqrt(se(p) ** 2 + se(baseline) ** 2)  # above what the left half alone gives
