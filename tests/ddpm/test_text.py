"""ddpm.text against transformers' own CLIPTokenizer and CLIPTextModel (a test dependency, as diffusers is), and the
platform's learned tokenizer + text tower through save/load."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm import text
from ddpm.folder_format import CheckpointError

transformers = pytest.importorskip("transformers")

CAPTIONS = [
    "a photo of a cat", "a small red circle left of a large blue square", "a green triangle above a yellow circle",
    "Don't stop! It's 3 o'clock, they're here; we'll see.", "café naïve résumé", "a dog (brown) -- running fast",
]
PROMPTS = [
    "a photo of a cat",
    "A RED Circle Left Of A Blue SQUARE",  # case
    "hello, world!!! (test) -- ok? #tag @user",  # punctuation runs
    "it's they're we'll I'd you've I'm can't",  # contractions
    "Café naïve Cafe\u0301 Ünïcödé ß",  # accents, NFC vs decomposed
    "🐱 a cat 🚀 猫 Ελληνικά",  # emoji and other scripts (bytes)
    "  a \t\n red   circle  ",  # extra whitespace
    "",  # empty
    "1234 3.14 x2",  # digits split one by one
    "a <|endoftext|> inside <|startoftext|>",  # special tokens typed in the prompt
    "x<|ENDOFTEXT|>y",  # ... matched after lowercasing only where added_tokens_decoder says "normalized"
    "a small red circle " * 30,  # past the 77-token context
]


def write_sd_tokenizer(folder, tok, pad_token, added_tokens_decoder: bool):
    """The tokenizer/ folder of a Stable Diffusion checkpoint (transformers 4.x wrote it): vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json with the special tokens as AddedToken dicts; since 4.34
    tokenizer_config.json also lists ``added_tokens_decoder``, whose flags change how typed special tokens match."""
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(tok.vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tok.merges),
                                       encoding="utf-8")
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
                       "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, "errors": "replace",
        "bos_token": added(text.BOS), "eos_token": added(text.EOS), "unk_token": added(text.EOS),
        "pad_token": pad_token,
        **({"added_tokens_decoder": {str(tok.vocab[t]): {**added(t), "special": True} for t in (text.BOS, text.EOS)}}
           if added_tokens_decoder else {})}))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": added(text.BOS), "eos_token": added(text.EOS), "unk_token": added(text.EOS),
        "pad_token": pad_token}))


def write_sd_text_encoder(folder, model, legacy: bool):
    """text_encoder/ as transformers saves it; ``legacy`` writes it as Stable Diffusion 1.x's file is (transformers
    4.x): keys under ``text_model.`` and the position_ids buffer among the tensors."""
    model.save_pretrained(folder)
    if legacy:
        state = load_file(folder / "model.safetensors")
        state = {f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(state, folder / "model.safetensors")


@pytest.fixture(scope="module")
def learned():
    return text.train_tokenizer(CAPTIONS, vocab_size=700)


@pytest.fixture(scope="module", params=[
    dict(hidden_act="quick_gelu", legacy_eos=False, pad="<|endoftext|>"),  # transformers 5.x config and file
    dict(hidden_act="gelu", legacy_eos=True, pad="!"),  # SD 1.x's eos_token_id 2 and key names; SD 2's pad "!"
], ids=["quick_gelu-eos", "gelu-legacy-eos2-pad!"])
def sd_folder(request, tmp_path_factory, learned):
    """A Stable Diffusion root holding a tiny random transformers CLIPTextModel and its CLIPTokenizer."""
    p = request.param
    root = tmp_path_factory.mktemp("sd")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    vocab = learned.vocab
    if p["legacy_eos"]:  # BOS and EOS first, so that the legacy rule's argmax id is not EOS: pooling must follow it
        specials = [text.BOS, text.EOS]
        vocab = {t: i for i, t in enumerate(specials + [t for t in vocab if t not in specials])}
        learned = text.ClipTokenizer(vocab, learned.merges)
    write_sd_tokenizer(root / "tokenizer", learned, p["pad"], added_tokens_decoder=not p["legacy_eos"])
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=p["hidden_act"], bos_token_id=vocab[text.BOS],
        eos_token_id=2 if p["legacy_eos"] else vocab[text.EOS], pad_token_id=vocab[p["pad"]])
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped or skipped norm shows
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    write_sd_text_encoder(root / "text_encoder", model, legacy=p["legacy_eos"])
    hf_tok = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    return root, model, hf_tok


def hf_ids(hf_tok, prompts):
    # what Stable Diffusion's pipelines call
    return hf_tok(prompts, padding="max_length", max_length=hf_tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids


def test_token_ids_match_transformers_exactly(sd_folder):
    root, _, hf_tok = sd_folder
    enc = text.load(root)
    ids = enc.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    expected = hf_ids(hf_tok, PROMPTS)
    for prompt, mine, theirs in zip(PROMPTS, ids, expected):
        assert mine.tolist() == theirs.tolist(), prompt


def test_states_and_pooled_match_transformers(sd_folder):
    root, model, hf_tok = sd_folder
    enc = text.load(root, device="cpu")
    states, pooled = enc.encode(PROMPTS)
    assert states.shape == (len(PROMPTS), 77, 32) and pooled.shape == (len(PROMPTS), 32)
    assert states.dtype == torch.float32 and not states.requires_grad
    with torch.no_grad():
        out = model(input_ids=hf_ids(hf_tok, PROMPTS))
    torch.testing.assert_close(states, out.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=0)
    assert enc.context_length == 77 and enc.width == 32


def test_the_layouts_load_accepts_give_the_same_encoder(sd_folder, tmp_path):
    root, _, _ = sd_folder
    reference = text.load(root).encode(["a red circle"])[0]
    one = tmp_path / "one"  # a Hugging Face CLIP repository: every file in one folder
    one.mkdir()
    for sub in ("text_encoder", "tokenizer"):
        for f in (root / sub).iterdir():
            (one / f.name).write_bytes(f.read_bytes())
    for enc in (text.load(one), text.load(root / "text_encoder"),
                text.load(root / "text_encoder", tokenizer=root / "tokenizer")):
        torch.testing.assert_close(enc.encode(["a red circle"])[0], reference, atol=0, rtol=0)


def test_empty_prompt_is_bos_eos_then_padding(learned):
    ids = learned.tokenize([""])[0].tolist()
    assert ids == [learned.bos_id, learned.eos_id] + [learned.pad_id] * 75


def test_a_prompt_does_not_depend_on_its_batch(learned):
    enc = text.TextEncoder(learned, text.TextTransformer(text.TextConfig(
        vocab_size=len(learned.vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, bos_token_id=learned.bos_id, eos_token_id=learned.eos_id,
        pad_token_id=learned.pad_id)))
    alone = enc.encode(["a cat"])
    batched = enc.encode(["a cat", "a small red circle " * 30, ""])
    torch.testing.assert_close(batched[0][:1], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1][:1], alone[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode(["a cat"])[0], alone[0], atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(enc.encode_ids(enc.tokenize(["a cat"]))[1], alone[1], atol=0, rtol=0)


def test_learned_tokenizer_and_tower_round_trip(tmp_path, learned):
    torch.manual_seed(1)
    cfg = text.TextConfig(vocab_size=len(learned.vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, hidden_act="gelu", bos_token_id=learned.bos_id,
                          eos_token_id=learned.eos_id, pad_token_id=learned.pad_id)
    model = text.TextTransformer(cfg).eval()
    text.save(tmp_path / "clip", learned, model)
    assert sorted(p.name for p in (tmp_path / "clip" / "tokenizer").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]
    assert not [p for p in (tmp_path / "clip").rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    enc = text.load(tmp_path / "clip")
    assert enc.tokenizer.learned and enc.model.config == cfg
    ids = learned.tokenize(PROMPTS)
    assert torch.equal(enc.tokenize(PROMPTS), ids)
    with torch.no_grad():
        expected = model(ids)
    states, pooled = enc.encode(PROMPTS)
    torch.testing.assert_close(states, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(pooled, expected[1], atol=0, rtol=0)
    # transformers reads the platform's folder as a CLIPTextModel + CLIPTokenizer and agrees
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip" / "tokenizer")
    assert torch.equal(hf_ids(hf_tok, PROMPTS), ids)
    hf_model = transformers.CLIPTextModel.from_pretrained(tmp_path / "clip" / "text_encoder").eval()
    with torch.no_grad():
        out = hf_model(input_ids=ids)
    torch.testing.assert_close(states, out.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=0)


def test_learned_tokenizer_gives_each_caption_word_one_token(learned):
    ids = learned.tokenize(["a small red circle left of a large blue square"])[0]
    assert ids[:12].tolist().index(learned.eos_id) == 11  # BOS, ten words, EOS


def test_unknown_words_are_reported_for_a_learned_tokenizer_only(sd_folder, learned):
    prompts = ["a purple Circle ox", "A RED circle", "zebra-striped hexagon"]
    assert [learned.tokenize([w])[0].tolist()[1:].index(learned.eos_id) for w in ("ox", "purple")] == [2, 6]
    reports = learned.report(prompts)
    assert [r.unknown_words for r in reports] == [("purple", "ox"), (), ("zebra", "striped", "hexagon")]
    pretrained = text.load(sd_folder[0])  # no ddpm_learned_from_captions in its tokenizer_config.json
    assert not pretrained.tokenizer.learned
    assert [r.unknown_words for r in pretrained.report(prompts)] == [(), (), ()]


def test_truncation_is_counted(learned):
    prompt = "a small red circle " * 30  # 120 word tokens + BOS + EOS
    ids = learned.tokenize([prompt])[0]
    assert ids[0] == learned.bos_id and ids[-1] == learned.eos_id  # CLIP keeps BOS ... EOS
    assert [r.dropped_tokens for r in learned.report([prompt, "a cat", ""])] == [122 - 77, 0, 0]


def test_train_tokenizer_vocab_size_is_a_cap(learned):
    small = text.train_tokenizer(CAPTIONS, vocab_size=530)
    assert len(small.vocab) <= 530 and len(small.merges) <= 530 - 514
    assert max(small.vocab.values()) == small.eos_id  # CLIP's layout: EOS has the highest id
    assert small.report(["photo"])[0].unknown_words == ("photo",)  # not enough merges to spell it in one token
    with pytest.raises(ValueError, match="vocab_size"):
        text.train_tokenizer(CAPTIONS, vocab_size=100)


def test_pickled_weights_are_refused(tmp_path, learned):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"],
                                                    "model_type": "clip_text_model"}))
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    learned.save(tmp_path / "tokenizer")
    with pytest.raises(text.TextEncoderError, match="pytorch_model.bin is a pickle and is never loaded"):
        text.load(tmp_path)


def test_bad_folders_name_what_is_missing(tmp_path, learned, sd_folder):
    assert issubclass(text.TextEncoderError, CheckpointError)
    with pytest.raises(text.TextEncoderError, match="no such folder"):
        text.load(tmp_path / "nowhere")
    learned.save(tmp_path / "only" / "tokenizer")
    with pytest.raises(text.TextEncoderError, match="no text_encoder/ folder"):
        text.load(tmp_path / "only")
    (tmp_path / "only" / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(text.TextEncoderError, match="no merges.txt"):
        text.load_tokenizer(tmp_path / "only" / "tokenizer")
    (tmp_path / "only" / "text_encoder").mkdir()
    with pytest.raises(text.TextEncoderError, match="no config.json"):
        text.load(tmp_path / "only")
    (tmp_path / "only" / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(text.TextEncoderError, match="not a CLIP text encoder"):
        text.load(tmp_path / "only")
    # weights of another shape than config.json says
    root = sd_folder[0]
    cfg = json.loads((root / "text_encoder" / "config.json").read_text())
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "model.safetensors").write_bytes((root / "text_encoder" / "model.safetensors").read_bytes())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(text.TextEncoderError, match="weights do not match config.json"):
        text.load(tmp_path / "wrong", tokenizer=root / "tokenizer")


def test_prompts_must_be_a_list_of_strings(learned):
    with pytest.raises(TypeError, match="list of strings"):
        learned.tokenize("a cat")
    with pytest.raises(TypeError, match="list of strings"):
        learned.tokenize(["a cat", 3])


def test_core_text_module_loads_neither_transformers_nor_the_hub():
    code = ("import sys, ddpm, ddpm.text\nddpm.text.train_tokenizer(['a cat'], vocab_size=520).tokenize(['a'])\n"
            "print(','.join(m for m in ('transformers', 'huggingface_hub', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
