"""One conditioning object through the core (ddpm/conditioning.py): its row operations, the text-conditioned U-Net,
guidance with a negative prompt, a checkpoint that carries its text encoder, and the batch-invariance rule for
prompts. Tiny sizes: an 8x8x1 U-Net and a one-layer text encoder of width 16 over 8 tokens."""

import json

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint, generate_images, inpaint_images, text
from ddpm.conditioning import Condition, encode_prompts, from_labels, guided
from ddpm.folder_format import CheckpointError
from ddpm.generation import fixed_size_forward
from ddpm.sampling import predict
from ddpm.settings import SettingError
from ddpm.training import drop_condition, train_step

CAPTIONS = ["a small red circle", "a large blue square", "a green triangle above a yellow circle",
            "a cyan square left of a magenta triangle"]
WIDTH, CONTEXT = 16, 8


@pytest.fixture(scope="module")
def encoder():
    tok = text.train_tokenizer(CAPTIONS, vocab_size=600, context_length=CONTEXT)
    torch.manual_seed(3)
    cfg = text.TextConfig(vocab_size=tok.vocab_size, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=CONTEXT, bos_token_id=tok.bos_id,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return text.TextEncoder(tok, text.TextTransformer(cfg))


@pytest.fixture(scope="module")
def text_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.preset("tiny", text_dim=WIDTH)).eval()


@pytest.fixture(scope="module")
def loaded(text_unet, encoder):
    return checkpoint.LoadedModel(text_unet, NoiseSchedule.linear(), "epsilon", text_encoder=encoder)


def _text(rows: int, seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(text=torch.randn(rows, CONTEXT, WIDTH, generator=g), pooled=torch.randn(rows, WIDTH, generator=g))


# -- the object -----------------------------------------------------------------------------------------------------
def test_rows_select_pad_cat_and_null():
    c = Condition(labels=torch.tensor([0, 1, 2]))
    assert len(c) == 3 and c.fields() == ("labels",)
    assert c.select(slice(1, 3)).labels.tolist() == [1, 2]
    assert c.select(torch.tensor([2, 0])).labels.tolist() == [2, 0]
    assert c.pad_to(5).labels.tolist() == [0, 1, 2, -1, -1]  # padding rows: the null class
    assert c.null().labels.tolist() == [-1, -1, -1]
    assert Condition.cat([c, c.null()]).labels.tolist() == [0, 1, 2, -1, -1, -1]

    t = Condition(text=_text(3).text, pooled=_text(3).pooled, negative=_text(3, seed=1))
    padded = t.pad_to(4)
    assert torch.equal(padded.text[:3], t.text) and not padded.text[3].any() and not padded.pooled[3].any()
    assert torch.equal(padded.negative.text[:3], t.negative.text) and len(padded.negative) == 4
    picked = t.select(torch.tensor([1]))
    assert torch.equal(picked.pooled, t.pooled[1:2]) and torch.equal(picked.negative.pooled, t.negative.pooled[1:2])
    assert t.null() is t.negative  # guidance pushes away from the negative prompt
    both = Condition.cat([t, t])
    assert len(both) == 6 and len(both.negative) == 6
    assert Condition.cat([t, t.null()]).negative is None  # not every part has one
    half = t.to("cpu", torch.float16)
    assert half.text.dtype == torch.float16 and half.negative.pooled.dtype == torch.float16
    assert Condition(labels=torch.tensor([1])).to("cpu", torch.float16).labels.dtype == torch.int64  # floats only


def test_malformed_conditions_are_refused():
    with pytest.raises(ValueError, match="labels, text or an image"):
        Condition()
    with pytest.raises(ValueError, match="both or neither"):
        Condition(text=torch.zeros(2, CONTEXT, WIDTH))
    with pytest.raises(ValueError, match="row counts"):
        Condition(labels=torch.tensor([0, 1]), text=_text(3).text, pooled=_text(3).pooled)
    with pytest.raises(ValueError, match="same rows"):
        Condition(labels=torch.tensor([0, 1]), negative=Condition(labels=torch.tensor([-1])))
    with pytest.raises(ValueError, match="same rows .* and fields"):
        Condition(text=_text(1).text, pooled=_text(1).pooled, negative=Condition(labels=torch.tensor([-1])))
    with pytest.raises(ValueError, match="encode_prompts"):
        _text(2).null()  # a text condition without its negative has no null form
    with pytest.raises(ValueError, match="different fields"):
        Condition.cat([_text(1), Condition(labels=torch.tensor([0]))])


def test_from_labels_and_guided():
    assert from_labels(None, 3) is None
    assert from_labels(2, 3).labels.tolist() == [2, 2, 2]
    assert from_labels(np.array([0, 1]), 2).labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 class labels for 3 seeds"):
        from_labels([0, 1], 3)
    assert guided(0, 2.0) and guided("a cat", 2.0) and guided(_text(1), 2.0) and guided(torch.tensor([1]), 2.0)
    assert not guided(None, 2.0) and not guided("", 2.0) and not guided(0, 1.0)


# -- the text-conditioned U-Net -------------------------------------------------------------------------------------
def test_text_unet_reads_the_token_states_and_the_pooled_embedding(text_unet):
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    a, b = _text(2, seed=0), _text(2, seed=1)
    with torch.no_grad():
        out = text_unet(x, t, a)
        other_text = text_unet(x, t, Condition(text=b.text, pooled=a.pooled))
        other_pooled = text_unet(x, t, Condition(text=a.text, pooled=b.pooled))
    assert out.shape == (2, 1, 8, 8)
    assert (out - other_text).abs().max() > 1e-4 and (out - other_pooled).abs().max() > 1e-4
    with pytest.raises(ValueError, match="text-conditioned"):
        text_unet(x, t)
    with pytest.raises(ValueError, match="unconditional"):  # a class label to a model without classes
        text_unet(x, t, Condition(labels=torch.tensor([0, 1]), text=a.text, pooled=a.pooled))
    plain = UNet(UNetConfig.preset("tiny", num_classes=3)).eval()
    with pytest.raises(ValueError, match="takes no text"):
        plain(x, t, a)
    assert not any("pooled_proj" in n or ".k." in n for n, _ in plain.named_parameters())  # names as before


def test_zero_init_starts_text_blocks_as_the_identity():
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny", text_dim=WIDTH, zero_init=True))
    for block in [m for m in model.modules() if type(m).__name__ == "CrossAttnBlock"]:
        h = torch.randn(2, block.proj.in_channels, 4, 4)
        assert torch.equal(block(h, _text(2).text), h)
    old = {k: v for k, v in UNetConfig.preset("tiny").to_dict().items() if k != "text_dim"}
    assert UNetConfig.from_dict(old).text_dim == 0  # configs saved before text_dim load as before


def test_guidance_with_a_negative_is_neg_plus_w_times_the_difference(text_unet):
    x, w = torch.randn(3, 1, 8, 8), 4.0
    c = Condition(text=_text(3).text, pooled=_text(3).pooled, negative=_text(3, seed=5))
    tt = torch.full((3,), 300)
    with torch.no_grad():
        cond, neg = text_unet(x, tt, c), text_unet(x, tt, c.negative)
        got = predict(text_unet, x, 300, c, w)
    torch.testing.assert_close(got, neg + w * (cond - neg), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # w = 1: the conditional model alone, no negative needed
        torch.testing.assert_close(predict(text_unet, x, 300, _text(3), 1.0), text_unet(x, tt, _text(3)))


def test_training_step_and_caption_dropout(text_unet, encoder):
    c = encode_prompts(encoder, ["a red circle", "a blue square"])
    dropped = drop_condition(c, 1.0)
    assert dropped.negative is None and torch.equal(dropped.text, c.negative.text)  # all rows: the empty caption
    assert torch.equal(drop_condition(c, 0.0).text, c.text)
    assert drop_condition(Condition(labels=torch.tensor([3, 4])), 1.0).labels.tolist() == [-1, -1]
    torch.manual_seed(1)
    model = UNet(UNetConfig.preset("tiny", text_dim=WIDTH))
    k = next(m for m in model.modules() if type(m).__name__ == "CrossAttnBlock").k.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, _ = train_step(model, optimizer, NoiseSchedule.linear(), torch.rand(2, 1, 8, 8) * 2 - 1, lr=1e-3,
                         condition=drop_condition(c, 0.5, torch.Generator().manual_seed(0)))
    assert np.isfinite(loss)
    assert not torch.equal(next(m for m in model.modules() if type(m).__name__ == "CrossAttnBlock").k.weight, k)


# -- prompts --------------------------------------------------------------------------------------------------------
def test_each_distinct_prompt_is_encoded_once_and_does_not_depend_on_its_batch(encoder):
    seen = []
    original = encoder.tokenize
    encoder.tokenize = lambda prompts: seen.append(list(prompts)) or original(prompts)
    try:
        c = encode_prompts(encoder, ["a red circle", "a blue square", "a red circle"], ["", "a blue square", ""])
    finally:
        del encoder.tokenize
    assert seen == [["a red circle", "a blue square", ""]]
    assert torch.equal(c.text[0], c.text[2]) and torch.equal(c.negative.pooled[1], c.pooled[1])
    states, pooled = encoder.encode([""])
    torch.testing.assert_close(c.negative.text[0], states[0], atol=1e-6, rtol=0)  # the default negative: ""
    many = [f"a red circle {i}" for i in range(11)]  # past one encoder call of ENCODE_ROWS
    alone = encode_prompts(encoder, ["a blue square"])
    among = encode_prompts(encoder, many + ["a blue square"])
    assert torch.equal(alone.text[0], among.text[-1]) and torch.equal(alone.pooled[0], among.pooled[-1])


def test_an_image_from_a_prompt_does_not_depend_on_the_other_prompts(loaded):
    settings = dict(steps=4, guidance_scale=3.0, forward_rows=4)
    alone = generate_images(loaded, [7], condition=loaded.condition(1, prompts="a red circle",
                                                                    negative_prompts="a blue square"), **settings)
    prompts = ["a green triangle", "", "a red circle", "a large blue square", "a cyan square", "a yellow circle"]
    negatives = ["", "", "a blue square", "", "a red circle", ""]
    mixed = generate_images(loaded, [1, 2, 7, 3, 4, 5], condition=loaded.condition(6, prompts=prompts,
                                                                                 negative_prompts=negatives),
                            batch_size=4, **settings)
    assert np.array_equal(alone[0], mixed[2])
    assert not np.array_equal(mixed[2], generate_images(loaded, [7], condition=loaded.condition(
        1, prompts="a green triangle"), **settings)[0])  # the prompt matters


def test_inpainting_repaints_to_a_prompt(loaded):
    known = torch.rand(2, 1, 8, 8) * 2 - 1
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    out = inpaint_images(loaded, [1, 2], known, masks, condition=loaded.condition(2, prompts=["a red circle", ""]),
                         steps=3, guidance_scale=2.0, forward_rows=4)
    keep = (masks[:, 0] == 0).numpy()
    assert np.array_equal(out[..., 0][keep], ((known[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()[keep])


# -- the checkpoint --------------------------------------------------------------------------------------------------
def test_a_text_checkpoint_carries_its_encoder_and_generates_the_same_bytes(tmp_path, loaded, encoder):
    source = {"uri": "models:/shapes-clip/1"}
    path = checkpoint.save(tmp_path / "ckpt", loaded.model, loaded.schedule, text_encoder=encoder,
                           text_encoder_source=source)
    config = json.loads((path / "config.json").read_text())
    assert config["text_encoder"] == {"source": source, "folder": "text", "context_length": CONTEXT, "width": WIDTH}
    assert (path / "text" / "text_encoder" / "model.safetensors").is_file() and (path / "text" / "tokenizer").is_dir()
    back = checkpoint.load(path)
    assert back.text_encoder.width == WIDTH and not any(p.requires_grad for p in back.text_encoder.model.parameters())
    kw = dict(steps=3, guidance_scale=2.0, forward_rows=4)
    before = generate_images(loaded, [0, 1], condition=loaded.condition(2, prompts=["a red circle", "a blue square"]),
                             **kw)
    after = generate_images(back, [0, 1], condition=back.condition(2, prompts=["a red circle", "a blue square"]), **kw)
    assert np.array_equal(before, after)

    del config["text_encoder"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no text encoder"):
        checkpoint.load(path)


def test_requests_a_model_cannot_take_are_refused(loaded, encoder, tmp_path):
    classes = checkpoint.LoadedModel(UNet(UNetConfig.preset("tiny", num_classes=3)).eval(), NoiseSchedule.linear(),
                                     "epsilon")
    with pytest.raises(SettingError, match="prompt: this model takes no prompt"):
        classes.condition(1, prompts="a red circle")
    with pytest.raises(SettingError, match="class_label: unknown class 3"):
        classes.condition(2, class_labels=[0, 3])
    assert classes.condition(2, class_labels=1).labels.tolist() == [1, 1] and classes.condition(2) is None
    with pytest.raises(SettingError, match="class_label: this model is conditioned on text"):
        loaded.condition(1, class_labels=0)
    with pytest.raises(SettingError, match="prompt: must be a string"):
        loaded.condition(1, prompts=[3])
    empty = loaded.condition(2)  # no prompt: the empty prompt's encoding, the unconditional model
    assert torch.equal(empty.text, encode_prompts(encoder, ["", ""]).text)
    with pytest.raises(ValueError, match="text encoder of width 16"):
        checkpoint.save(tmp_path / "bad", loaded.model, loaded.schedule)
    with pytest.raises(ValueError, match="no text encoder"):
        checkpoint.save(tmp_path / "bad", classes.model, classes.schedule, text_encoder=encoder)


def test_fixed_size_forward_pads_text_rows(text_unet):
    c = _text(5)
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 100)
    with torch.no_grad():
        chunked = fixed_size_forward(text_unet, 2)(x, t, c)
        alone = fixed_size_forward(text_unet, 2)(x[3:4], t[3:4], c.select(slice(3, 4)))
    assert torch.equal(chunked[3:4], alone)
