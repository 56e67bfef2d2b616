"""The autoencoder (ddpm/autoencoder.py): shapes for f = 4 and 8, our folder format, parity with diffusers'
AutoencoderKL loaded from its own folder, refused folders, and loading that never unpickles."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm import Autoencoder, AutoencoderConfig, autoencoder, count_parameters
from tests.support import planted_pickle

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough for two busy CPU cores, and still every kind of block: three levels (f = 4), two ResNets per encoder
# level (three per decoder level), a channel change (conv_shortcut), the mid block's attention.
DIFFUSERS_CONFIG = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=32,
                        latent_channels=4, scaling_factor=0.5, shift_factor=0.1)
PARITY_ATOL = 1e-4


def small(levels: int, **overrides) -> AutoencoderConfig:
    chans = (8, 16, 16, 16)[:levels]
    return AutoencoderConfig(block_out_channels=chans, layers_per_block=1, norm_num_groups=8, **overrides)


@pytest.mark.parametrize("levels, f", [(3, 4), (4, 8)])
def test_shapes_for_f4_and_f8(levels, f):
    torch.manual_seed(0)
    ae = Autoencoder(small(levels)).eval()
    assert ae.downsample_factor == f and ae.latent_shape((3, 32, 48)) == (4, 32 // f, 48 // f)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        mean, logvar = ae.encode_dist(x)
        recon, mean2, _ = ae(x, generator=torch.Generator().manual_seed(0))
        assert z.shape == mean.shape == logvar.shape == (2, 4, 32 // f, 48 // f)
        assert ae.decode(z).shape == recon.shape == x.shape
        assert torch.equal(mean, mean2) and torch.equal(z, mean)  # scaling 1, shift 0 until measured


def test_latent_channels_and_scaling_are_configurable():
    torch.manual_seed(0)
    ae = Autoencoder(small(3, latent_channels=3, in_channels=1)).eval()
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, _ = ae.encode_dist(x)
        ae.set_scaling_factor(0.25, shift_factor=0.5)
        z = ae.encode(x)
        torch.testing.assert_close(z, (mean - 0.5) * 0.25)
        torch.testing.assert_close(ae.decode(z), ae.decode_unscaled(mean))
    assert z.shape == (1, 3, 4, 4)


def test_bad_shapes_are_refused():
    ae = Autoencoder(small(3)).eval()
    with pytest.raises(ValueError, match="divisible by f = 4"):
        ae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="3 channels"):
        ae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        AutoencoderConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        AutoencoderConfig.preset("f16")


def test_kl_and_the_posterior_sample():
    """KL(N(m, e^lv) || N(0, 1)) per image in closed form; sampling follows its generator."""
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(autoencoder.kl_divergence(mean, logvar), expected)
    assert torch.equal(autoencoder.kl_divergence(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)), torch.zeros(1))
    a = autoencoder.sample_latent(mean, logvar, torch.Generator().manual_seed(3))
    b = autoencoder.sample_latent(mean, logvar, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_measured_scaling_factor_gives_unit_variance_latents():
    torch.manual_seed(0)
    ae = Autoencoder(small(3)).eval()
    batches = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(3)]
    scale = autoencoder.measure_scaling_factor(ae, batches)
    ae.set_scaling_factor(scale)
    with torch.no_grad():
        z = torch.cat([ae.encode(x) for x in batches])
    assert float(z.std()) == pytest.approx(1.0, abs=1e-5)


def test_presets():
    sizes = {}
    for name, f in [("tiny", 4), ("small-f4", 4), ("small-f8", 8), ("f4", 4), ("f8", 8)]:
        cfg = AutoencoderConfig.preset(name)
        assert cfg.downsample_factor == f and cfg.latent_channels == 4
        with torch.device("meta"):
            sizes[name] = count_parameters(Autoencoder(cfg))
    assert sizes["f8"] == 83_653_863  # Stable Diffusion's VAE (the layout test below checks every tensor)
    assert sizes["tiny"] < 3e5 and sizes["small-f8"] < 5e6


def test_f8_preset_has_the_sd_vae_layout():
    """Every tensor of diffusers' AutoencoderKL in Stable Diffusion's configuration has the same name and shape here,
    so the SD VAE a user downloaded loads into the f8 preset. Built on the meta device: no memory, no time."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        theirs = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
        ours = Autoencoder(AutoencoderConfig.preset("f8"))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# our folder format


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    ae = Autoencoder(small(3))
    with torch.no_grad():  # GroupNorm's affine parameters start at 1 and 0: move them, so a swap would show
        for p in ae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ae.set_scaling_factor(0.7, shift_factor=-0.2)
    return autoencoder.save(tmp_path / "ae", ae, metadata={"data": "photos"}), ae.eval()


def test_round_trip_is_bit_exact(saved):
    path, ae = saved
    loaded = autoencoder.load(path)
    assert loaded.config == ae.config and not loaded.training
    assert autoencoder.read_config(path)["metadata"] == {"data": "photos"}
    torch.testing.assert_close(loaded.state_dict(), ae.state_dict(), rtol=0, atol=0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), ae.decode(z))


def test_truncated_or_mismatched_folders_are_refused(saved, tmp_path):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    config = json.loads((path / "config.json").read_text())

    config["autoencoder"]["block_out_channels"] = [8, 16, 32]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(autoencoder.AutoencoderError, match="do not match config.json"):
        autoencoder.load(path)

    config["autoencoder"]["block_out_channels"] = [8, 16, 16]
    config["autoencoder"]["depth"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(autoencoder.AutoencoderError, match="unknown autoencoder config keys"):
        autoencoder.load(path)

    del config["autoencoder"]["depth"]
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(autoencoder.AutoencoderError, match="unreadable or truncated"):
        autoencoder.load(path)

    with pytest.raises(autoencoder.AutoencoderError, match="no config.json"):
        autoencoder.load(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"format": "ddpm-checkpoint", "version": 1}')
    with pytest.raises(autoencoder.AutoencoderError, match="neither"):
        autoencoder.load(tmp_path)


# Where a pickle-based loader would look: torch.save's names, diffusers' and LDM's pickled weights.
PICKLE_NAMES = ("model.pt", "model.pkl", "diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt")


def test_loading_never_unpickles(saved, diffusers_folder, tmp_path):
    """Pickles planted next to the weights, in our folder and in a diffusers one, are never opened; one in place of
    the safetensors file is refused as unreadable; a diffusers folder whose only weights are a pickle is refused."""
    sentinel = tmp_path / "UNPICKLED"
    payload = planted_pickle(sentinel)
    path, ae = saved
    dpath = diffusers_folder[0]
    for folder in (path, dpath):
        for name in PICKLE_NAMES:
            (folder / name).write_bytes(payload)
    torch.testing.assert_close(autoencoder.load(path).state_dict(), ae.state_dict(), rtol=0, atol=0)
    autoencoder.load(dpath)
    assert not sentinel.exists(), "a planted pickle was unpickled"

    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(autoencoder.AutoencoderError, match="unreadable or truncated"):
        autoencoder.load(path)
    (dpath / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(autoencoder.AutoencoderError, match="is a pickle and is never loaded"):
        autoencoder.load(dpath)
    assert not sentinel.exists(), "a planted pickle was unpickled"


# ---------------------------------------------------------------------------------------------------------------
# diffusers' format


@pytest.fixture
def diffusers_folder(tmp_path):
    """A randomly initialised diffusers AutoencoderKL (every parameter jittered), saved by diffusers itself."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**DIFFUSERS_CONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
    path = tmp_path / "sd-vae"
    vae.save_pretrained(path, safe_serialization=True)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    return path, vae


def parity(ae: Autoencoder, vae, x: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
    """Max |ours - diffusers'| of the latent mean, the log-variance, the scaled latents and the decoded images."""
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, logvar = ae.encode_dist(x)
        decoded = vae.decode(z).sample  # diffusers decodes unscaled latents; pipelines divide by the scale first
        return {
            "mean": float((mean - posterior.mean).abs().max()),
            "logvar": float((logvar - posterior.logvar).abs().max()),
            "encode": float((ae.encode(x) - (posterior.mean - shift) * scale).abs().max()),
            "decode": float((ae.decode((z - shift) * scale) - decoded).abs().max()),
        }


def test_diffusers_folder_matches_diffusers(diffusers_folder):
    path, vae = diffusers_folder
    ae = autoencoder.load(path)
    assert ae.config == AutoencoderConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=32,
                                          scaling_factor=0.5, shift_factor=0.1)
    torch.manual_seed(1)
    x, z = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 8, 8)
    diffs = parity(ae, vae, x, z)
    print("max |ours - diffusers|:", diffs)
    assert max(diffs.values()) < PARITY_ATOL, diffs


def test_old_attention_names_load_too(diffusers_folder):
    """Checkpoints written before diffusers 0.14 name the mid block's attention query/key/value/proj_attn."""
    path, vae = diffusers_folder
    file = path / "diffusion_pytorch_model.safetensors"
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(str(file)).items():
        for new, old in new_to_old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, str(file))
    torch.manual_seed(1)
    diffs = parity(autoencoder.load(path), vae, torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 4, 4, 4))
    assert max(diffs.values()) < PARITY_ATOL, diffs


def test_foreign_diffusers_folders_are_refused(diffusers_folder):
    path, _ = diffusers_folder
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderTiny"}))
    with pytest.raises(autoencoder.AutoencoderError, match="not 'AutoencoderKL'"):
        autoencoder.load(path)
    (path / "config.json").write_text(json.dumps({**config, "latents_mean": [0.0] * 4}))
    with pytest.raises(autoencoder.AutoencoderError, match="latents_mean is not supported"):
        autoencoder.load(path)
    (path / "config.json").write_text(json.dumps({**config, "layers_per_block": 1}))
    with pytest.raises(autoencoder.AutoencoderError, match="do not match config.json"):
        autoencoder.load(path)
