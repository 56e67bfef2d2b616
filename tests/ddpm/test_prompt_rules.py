"""The prompt rules of ddpm.settings (what every door accepts and refuses), guided() for prompts, and
ddpm.conditioning.describe, the warning for what tokenizing a prompt lost. No Ray, no servers."""

import pytest

from ddpm import checkpoint
from ddpm.conditioning import describe, guided
from ddpm.settings import MAX_PROMPT_BYTES, SettingError, check_for_model, check_settings
from ddpm.text import TokenReport
from tests.support import TEXT_CONTEXT, save_text_checkpoint

MODEL = dict(steps=None, num_classes=0, num_timesteps=1000)


@pytest.mark.parametrize("settings, message", [
    (dict(prompt=3), "prompt: must be a string, got int"),
    (dict(prompt="a", negative_prompt=["b"]), "negative_prompt: must be a string, got list"),
    (dict(prompt="é" * (MAX_PROMPT_BYTES // 2 + 1)), f"prompt: must be at most {MAX_PROMPT_BYTES} bytes (UTF-8), "
                                                       f"got {MAX_PROMPT_BYTES + 2}"),
    (dict(prompt="a \ud800"), "prompt: must be valid Unicode text"),
    (dict(negative_prompt="blurry", guidance_scale=3.0), "negative_prompt: needs a prompt"),
    (dict(prompt="", negative_prompt="blurry", guidance_scale=3.0), "negative_prompt: needs a prompt"),
    (dict(prompt="a red circle", negative_prompt="blurry"), "negative_prompt: applies only with guidance"),
    (dict(prompt="", guidance_scale=3.0), "guidance_scale: applies only with a class label, a non-empty prompt or an image"),
    (dict(guidance_scale=3.0), "guidance_scale: applies only with a class label, a non-empty prompt or an image"),
    (dict(class_label=1, prompt="a red circle"), "prompt: send a class label or a prompt, not both"),
])
def test_check_settings_refuses_a_bad_prompt_naming_the_field(settings, message):
    with pytest.raises(SettingError) as err:
        check_settings(**settings)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("settings", [
    dict(prompt="a red circle", guidance_scale=3.0),
    dict(prompt="a red circle", negative_prompt="a blue square", guidance_scale=3.0),
    dict(prompt="x" * MAX_PROMPT_BYTES),
    dict(prompt=""),  # unconditional
    dict(prompt="", negative_prompt=""),
    dict(class_label=1, prompt="", guidance_scale=2.0),
])
def test_check_settings_accepts_good_prompts(settings):
    check_settings(**settings)


def test_check_for_model_refuses_a_prompt_without_a_text_encoder_and_a_label_with_one():
    with pytest.raises(SettingError, match=r"^prompt: this model takes no prompt; it has no text encoder$"):
        check_for_model(**MODEL, class_label=None, prompt="a red circle")
    with pytest.raises(SettingError, match=r"^prompt: this model takes no prompt; .* \(it takes a class label\)$"):
        check_for_model(**MODEL | dict(num_classes=3), class_label=None, prompt="")
    with pytest.raises(SettingError, match=r"^negative_prompt: this model takes no prompt"):
        check_for_model(**MODEL, class_label=None, negative_prompt="blurry")
    with pytest.raises(SettingError, match=r"^class_label: this model is conditioned on text: send a prompt instead$"):
        check_for_model(**MODEL, class_label=0, takes_text=True)
    check_for_model(**MODEL, class_label=None, prompt="a red circle", takes_text=True)
    check_for_model(**MODEL, class_label=None, takes_text=True)  # no prompt: the empty prompt, unconditional


def test_loaded_model_condition_applies_the_same_rules(tmp_path):
    loaded = checkpoint.load(save_text_checkpoint(tmp_path / "text"))
    with pytest.raises(SettingError, match=r"^class_label: this model is conditioned on text"):
        loaded.condition(2, class_labels=[0, 1])
    assert len(loaded.condition(2, prompts="a red circle")) == 2


def test_a_request_is_guided_with_a_label_or_a_non_empty_prompt_and_w_not_1():
    assert guided(0, 2.0) and guided("a red circle", 2.0) and guided("a red circle", 0.0)
    assert not guided("", 2.0) and not guided(None, 2.0) and not guided("a red circle", 1.0)


def test_describe_words_what_tokenizing_lost():
    assert describe(TokenReport()) == ""
    assert describe(TokenReport(12, ("purple",)), 77) == \
        "12 tokens past the 77-token context were dropped; unknown word: 'purple'"
    assert describe(TokenReport(1)) == "1 token past the context was dropped"
    assert describe(TokenReport(0, ("purple", "hexagon"))) == "unknown words: 'purple', 'hexagon'"


def test_describe_reports_a_real_encoders_truncation_and_unknown_words(tmp_path):
    encoder = checkpoint.load(save_text_checkpoint(tmp_path / "text")).text_encoder
    long, unseen, seen = "a red circle " * 6, "a purple hexagon", "a small red circle"
    reports = encoder.report([long, unseen, seen])
    assert reports[0].dropped_tokens == 3 * 6 + 2 - TEXT_CONTEXT and not reports[0].unknown_words  # BOS ... EOS
    assert describe(reports[0], encoder.context_length) == \
        f"4 tokens past the {TEXT_CONTEXT}-token context were dropped"
    assert describe(reports[1]) == "unknown words: 'purple', 'hexagon'"
    assert describe(reports[2]) == ""
