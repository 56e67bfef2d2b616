"""The text recipe's own parts of ``ddpm pipeline`` and ``ddpm quickstart``: built-in captioned data, ingest that
reuses a dataset only with the same caption policy, and the quickstart's grid of held-out compositions.

The recipe's stages run for real elsewhere, each where a run of it already happens: the train-clip stage resumes the
CLIP of tests/pipelines/test_train_clip.py, and ``ddpm pipeline`` (ingest reused, training resumed, text evaluation,
register, gate) carries tests/pipelines/test_train_text.py's model from 32 to 64 images.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_writes_shapes_and_reuses_a_dataset_only_with_the_same_caption_policy(tmp_path, ray_local):
    from pipelines.commands.pipeline import ingest
    from pipelines.config import load_config
    from pipelines.data.dataset import read_manifest

    processed = tmp_path / "processed"
    config = load_config(ROOT / "configs" / "shapes-text.yaml", [
        "pipeline.shapes_count=12", "pipeline.resolution=24", f"pipeline.raw_output={tmp_path / 'raw'}",
        f"pipeline.processed={processed}"])
    said = []
    assert ingest(config, log=said.append)[0] == str(processed)
    assert said[0] == f"[data] writing 12 captioned scenes of shapes at 24x24 to {tmp_path / 'raw'}"
    # the ingest's progress goes through the same log (the quickstart indents it under its stage), ending on 12/12
    assert any(line.startswith("[ingest] 12/12 objects (100%)") for line in said), said
    manifest = read_manifest(str(processed))
    assert manifest["caption_policy"] == "required" and manifest["counts"]["rows"] == 12
    said.clear()
    ingest(config, log=said.append)
    assert said[0].startswith("[ingest] reusing")
    said.clear()
    ingest(replace(config, pipeline=replace(config.pipeline, captions=None)), log=said.append)
    assert not any("reusing" in line for line in said)  # an uncaptioned dataset is another dataset
    assert "caption_policy" not in read_manifest(str(processed))


def test_the_quickstarts_text_grid_asks_for_each_held_out_composition_in_words():
    from pipelines.commands.quickstart import grid_rows
    from pipelines.data.shapes import HELD_OUT, parse_caption

    rows = grid_rows(["red-square", "green-circle"], text=True)
    asked = [parse_caption(row["prompt"])["objects"][0] for row in rows]
    assert [(a["colour"], a["shape"]) for a in asked] == list(HELD_OUT)
    assert grid_rows(["zero", "one"], text=False) == [{"class_label": 0}, {"class_label": 1}]
    assert grid_rows([], text=False) == [{}] * 10
