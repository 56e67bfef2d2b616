"""The checkpoint format (ddpm/checkpoint.py): round trips, refused folders, and loading that never unpickles."""

import json

import pytest
import torch

from ddpm import EMA, NoiseSchedule, UNet, UNetConfig, checkpoint, noise_from_seeds, sample
from tests.support import planted_pickle


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", num_classes=2))
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    schedule = NoiseSchedule.cosine(100)
    path = checkpoint.save(tmp_path / "ckpt", model, schedule, ema_state=ema.state_dict(),
                           prediction_type="v_prediction", class_names=["a", "b"], metadata={"run": "r1"})
    return path, model, ema, schedule


def test_checkpoint_round_trip_gives_identical_outputs(saved):
    path, model, ema, schedule = saved
    loaded_raw = checkpoint.load(path, weights="model")
    loaded = checkpoint.load(path)
    assert loaded.prediction_type == "v_prediction" and loaded.class_names == ["a", "b"]
    assert loaded.metadata == {"run": "r1"} and loaded.image_shape == (1, 8, 8)
    torch.testing.assert_close(loaded.schedule.betas, schedule.betas)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(loaded_raw.model(x, t), model.eval()(x, t), rtol=0, atol=0)
        ema.copy_to(model)
        torch.testing.assert_close(loaded.model(x, t), model(x, t), rtol=0, atol=0)
        x_T, g = noise_from_seeds([1], (1, 8, 8))
        x_T2, g2 = noise_from_seeds([1], (1, 8, 8))
        a = sample(model, schedule, x_T, sampler="ddpm", steps=10, generator=g, prediction_type="v_prediction")
        b = sample(loaded.model, loaded.schedule, x_T2, sampler="ddpm", steps=10, generator=g2,
                   prediction_type="v_prediction")
    assert torch.equal(a, b)


def test_truncated_weights_are_refused(saved):
    path = saved[0]
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)


def test_config_with_wrong_shape_is_refused(saved):
    path = saved[0]
    config = json.loads((path / "config.json").read_text())
    config["unet"]["base_channels"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.load(path)


def test_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "pytorch-pickle"}')
    with pytest.raises(checkpoint.CheckpointError, match="unsupported checkpoint format"):
        checkpoint.load(tmp_path)


# Where a pickle-based loader would look: torch.save's names, a pickled model, the training state, MLflow's pyfunc.
PICKLE_NAMES = ("model.pt", "model.pkl", "pytorch_model.bin", "training_state.pt", "python_model.pkl")


def test_loading_never_unpickles(saved, tmp_path):
    """Pickles planted next to the weights are never opened: loading reads only config.json and safetensors; one in
    place of model.safetensors is refused as unreadable, not run. Each pickle is well formed and writes ``sentinel``
    when unpickled, so a loader that ran any of them would leave the file behind."""
    path, model, ema, _ = saved
    sentinel = tmp_path / "UNPICKLED"
    payload = planted_pickle(sentinel)
    for name in PICKLE_NAMES:
        (path / name).write_bytes(payload)
    loaded = checkpoint.load(path)
    raw, ema_state = checkpoint.load_training_weights(path)
    assert not sentinel.exists(), "a planted pickle was unpickled"
    # ... and what loaded is the saved safetensors, not anything beside it
    torch.testing.assert_close(raw, {n: p.detach() for n, p in model.named_parameters()}, rtol=0, atol=0)
    torch.testing.assert_close(ema_state, ema.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(dict(loaded.model.named_parameters()), ema.state_dict(), rtol=0, atol=0)

    (path / "model.safetensors").write_bytes(payload)  # the pickle in place of the weights
    with pytest.raises(checkpoint.CheckpointError, match="unreadable or truncated"):
        checkpoint.load(path)
    assert not sentinel.exists(), "the safetensors reader unpickled a pickle"


# A config.json that is JSON but not an object, and one that is not UTF-8 text: both loaders read it with the one
# reader (ddpm.folder_format.read_config) and refuse it in the same words. Before that reader, checkpoint.load
# crashed with AttributeError ('list' object has no attribute 'get') and UnicodeDecodeError.
BAD_CONFIGS = {
    "not an object": (b'[1, 2, 3]', "config.json: expected a JSON object, got an array"),
    "not UTF-8": (b'{"format": "\xff\xfe"}', "config.json: invalid JSON (not UTF-8 text: invalid start byte"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_both_loaders_refuse_a_bad_config_file_in_the_same_words(case, saved, tmp_path):
    from ddpm import Autoencoder, AutoencoderConfig, autoencoder

    content, message = BAD_CONFIGS[case]
    ckpt = saved[0]
    ae_path = autoencoder.save(tmp_path / "ae", Autoencoder(AutoencoderConfig.preset("tiny")))
    for folder in (ckpt, ae_path):
        (folder / "config.json").write_bytes(content)

    errors = []
    for load, folder in ((checkpoint.load, ckpt), (autoencoder.load, ae_path)):
        with pytest.raises(checkpoint.CheckpointError) as caught:
            load(folder)
        text = str(caught.value)
        assert text.startswith(str(folder / "config.json")) and message in text and "\n" not in text, text
        errors.append(text[len(str(folder)):])
    assert errors[0] == errors[1]  # one reader: the same message after the folder's name
    assert isinstance(caught.value, autoencoder.AutoencoderError)
