"""The gate's absolute bar: a version, the first one included, is promoted only if its metric is within
``max_ratio`` of the floor and its recall at least ``min_recall``. Against real components: tests/pipelines/
test_quickstart.py (a first version below the bar is registered, tagged, not promoted, served by number) and
tests/pipelines/test_status.py (``ddpm status`` says why)."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.evaluate.gate import decide_promotion

# The bad first version of the issue: photos-latent on an AVX2-only CPU, FD-cls 4,771 against a floor of 19.2.
BLOBS = {"fd_cls": 4771.0, "fd_cls_floor": 19.2, "fd_cls_ratio": 4771.0 / 19.2, "recall": 0.004}
GOOD = {"fd_cls": 194.5, "fd_cls_floor": 18.86, "fd_cls_ratio": 10.32, "recall": 0.588}  # benchmarks/RESULTS.md


def test_a_first_version_below_the_bar_is_not_promoted():
    bar = load_config("configs/photos-latent.yaml").pipeline
    kept = decide_promotion(BLOBS, None, max_ratio=bar.gate_max_ratio, min_recall=bar.gate_min_recall)
    assert not kept.promote
    assert kept.reason == "below the bar: fd_cls 4771 is 248x its floor (at most 30x)"
    # the measured good run clears the preset's bar, and with no incumbent is promoted
    good = decide_promotion(GOOD, None, max_ratio=bar.gate_max_ratio, min_recall=bar.gate_min_recall)
    assert good.promote and good.reason == "no incumbent; candidate fd_cls 194.5"
    # recall alone fails too; a missing number is an error, not a pass
    low_recall = decide_promotion(GOOD | {"recall": 0.1}, None, max_ratio=30.0, min_recall=0.2)
    assert not low_recall.promote and low_recall.reason == "below the bar: recall 0.1 (at least 0.2)"
    assert not decide_promotion(GOOD | {"fd_cls_ratio": float("nan")}, None, max_ratio=30.0).promote
    with pytest.raises(ValueError, match="fd_cls_ratio"):
        decide_promotion({"fd_cls": 1.0}, None, max_ratio=30.0)
    # a candidate that beats its incumbent still has to clear the bar
    assert not decide_promotion(BLOBS, {"fd_cls": 9000.0}, max_ratio=30.0).promote
    # no bar: the old rule
    assert decide_promotion(BLOBS, None).promote


def test_the_presets_bars_sit_between_measured_good_and_bad_runs():
    digits = load_config("configs/digits.yaml").pipeline
    latent = load_config("configs/photos-latent.yaml").pipeline
    # digits: the quickstart's 5-minute runs scored 1.04-1.93x, recall 0.88-0.93 (benchmarks/RESULTS.md)
    assert 1.93 < digits.gate_max_ratio < 10 and 0.2 < digits.gate_min_recall < 0.88
    assert 10.32 < latent.gate_max_ratio < 248 and 0.004 < latent.gate_min_recall < 0.588
    with pytest.raises(Exception, match="pipeline.gate_max_ratio"):
        load_config("configs/digits.yaml", ["pipeline.gate_max_ratio=-1"])
    with pytest.raises(Exception, match="pipeline.gate_min_recall"):
        load_config("configs/digits.yaml", ["pipeline.gate_min_recall=2"])


def test_the_alignment_bar_holds_a_text_model_to_its_prompts():
    # A text model's numbers: fidelity that clears the bar, alignment on seen compositions that may not.
    text = GOOD | {"align_seen_all": 0.42, "align_held_out_all": 0.2}
    kept = decide_promotion(text, None, max_ratio=30.0, min_recall=0.2, min_alignment=0.6)
    assert not kept.promote and kept.reason == "below the bar: align_seen_all 0.42 (at least 0.6)"
    assert decide_promotion(text | {"align_seen_all": 0.6}, None, max_ratio=30.0, min_alignment=0.6).promote
    assert not decide_promotion(text | {"align_seen_all": float("nan")}, None, min_alignment=0.6).promote
    # past the bar, the incumbent comparison is FD-cls's, as for every model
    assert not decide_promotion(text, {"fd_cls": 100.0}, min_alignment=0.4).promote
    assert decide_promotion(text, {"fd_cls": 200.0}, min_alignment=0.4).promote
    # a model without alignment (a class model) cannot be held to an alignment bar: an error, not a pass
    with pytest.raises(ValueError, match="align_seen_all"):
        decide_promotion(GOOD, None, min_alignment=0.5)
