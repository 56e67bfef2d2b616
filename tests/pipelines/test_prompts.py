"""A prompt at the command line, in batch generation and in the MLflow pyfunc model (issue 33, part 5): the same bytes
for a prompt + seed + settings at every door whatever else shares the batch, the refusals in one line, and the warning
for what tokenizing lost. A tiny random text model (tests.support.save_text_checkpoint), 3 steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm import checkpoint, generate_images, image_seeds
from pipelines.cli import main
from tests.support import TEXT_CONTEXT, logged_pyfunc, save_text_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
PROMPT, NEGATIVE = "a large blue square", "a small red circle"
LONG = "a red circle " * 6  # 20 tokens with BOS and EOS: 4 past the context
UNSEEN = "a purple hexagon"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return save_text_checkpoint(tmp_path_factory.mktemp("text") / "ckpt")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def npz(path: Path) -> np.ndarray:
    return np.load(path)["images"]


def cli_images(model: Path, tmp_path: Path, capsys, *flags: str) -> np.ndarray:
    out = tmp_path / f"cli-{abs(hash(flags))}.npz"
    code, _, err = run(["generate", "--model", str(model), "--steps", str(STEPS), "--out", str(out), *flags], capsys)
    assert code == 0, err
    return npz(out)


def test_a_prompt_at_the_command_line_is_the_core_s_images_and_changes_them(text_model, tmp_path, capsys):
    loaded = checkpoint.load(text_model)
    got = cli_images(text_model, tmp_path, capsys, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                     "--guidance-scale", "3", "--seed", "7", "--num-images", "2")
    want = generate_images(loaded, image_seeds(7, 2), steps=STEPS, guidance_scale=3.0,
                           condition=loaded.condition(2, prompts=PROMPT, negative_prompts=NEGATIVE))
    assert np.array_equal(got, want)
    other = cli_images(text_model, tmp_path, capsys, "--prompt", NEGATIVE, "--negative-prompt", PROMPT,
                       "--guidance-scale", "3", "--seed", "7", "--num-images", "2")
    unconditional = cli_images(text_model, tmp_path, capsys, "--seed", "7", "--num-images", "2")
    assert not np.array_equal(got, other) and not np.array_equal(got, unconditional)
    empty = cli_images(text_model, tmp_path, capsys, "--prompt", "", "--seed", "7", "--num-images", "2")
    assert np.array_equal(empty, unconditional)  # an empty prompt means unconditional


def test_what_tokenizing_lost_is_a_warning_line(text_model, tmp_path, capsys):
    code, _, err = run(["generate", "--model", str(text_model), "--steps", "1", "--num-images", "1", "--prompt", LONG,
                        "--out", str(tmp_path / "a.npz")], capsys)
    assert code == 0
    assert f"warning: --prompt: 4 tokens past the {TEXT_CONTEXT}-token context were dropped\n" in err
    code, _, err = run(["generate", "--model", str(text_model), "--steps", "1", "--num-images", "1", "--prompt",
                        UNSEEN, "--negative-prompt", "a pig", "--guidance-scale", "2",
                        "--out", str(tmp_path / "b.npz")], capsys)
    assert code == 0
    assert "warning: --prompt: unknown words: 'purple', 'hexagon'\n" in err
    assert "warning: --negative-prompt: unknown word: 'pig'\n" in err
    code, _, err = run(["generate", "--model", str(text_model), "--steps", "1", "--num-images", "1", "--prompt",
                        PROMPT, "--out", str(tmp_path / "c.npz")], capsys)
    assert code == 0 and "warning" not in err


def one_line(argv: list[str], capsys) -> str:
    code, _, err = run(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith(f"ddpm {argv[0]}: error: "), err
    return err.strip()


@pytest.mark.parametrize("flags, message", [
    (["--class-label", "1"], "--class-label: this model is conditioned on text: send a prompt instead"),
    (["--prompt", "x" * 1001], "--prompt: must be at most 1000 bytes (UTF-8), got 1001"),
    (["--negative-prompt", NEGATIVE, "--guidance-scale", "2"], "--negative-prompt: needs a prompt"),
    (["--prompt", PROMPT, "--negative-prompt", NEGATIVE], "--negative-prompt: applies only with guidance"),
    (["--prompt", "", "--guidance-scale", "2"], "--guidance-scale: applies only with a class label, a non-empty prompt or an image"),
    (["--prompts", "p.txt", "--negative-prompt", NEGATIVE], "--negative-prompt: goes with --prompt"),
    (["--prompts", "p.txt"], "--prompts: writes one image per prompt and seed; give --out a folder"),
])
def test_a_text_model_refuses_in_one_line(text_model, tmp_path, capsys, flags, message):
    line = one_line(["generate", "--model", str(text_model), "--out", str(tmp_path / "g.png"), *flags], capsys)
    assert message in line
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a red circle"}\n{"prompt": 3}\n', "line 2: prompt: must be a string, got int"),
    ('{"prompt": "a red circle", "negative": "x"}\n', "line 1: unknown key 'negative'"),
    ('{"prompt": "a red circle"\n', "line 1: not JSON"),
    ('a red circle\n\n' + "x" * 1001 + "\n", "line 3: prompt: must be at most 1000 bytes"),
    ('{"prompt": "", "negative_prompt": "a blue square"}\n', "line 1: negative_prompt: needs a prompt"),
    ("\n\n", "no prompts"),
])
def test_a_bad_prompts_file_is_named_by_its_line(text_model, tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    line = one_line(["generate", "--model", str(text_model), "--prompts", str(prompts), "--guidance-scale", "2",
                     "--output", str(tmp_path / "out")], capsys)
    assert f"--prompts {prompts}" in line and message in line
    assert not (tmp_path / "out").exists()


def test_a_prompts_file_on_ray_data_makes_each_prompt_s_bytes_of_a_single_prompt_run(ray_local, text_model,
                                                                                    tmp_path, capsys):
    """Three prompts, 2 images each, shards of 4 that mix prompts: prompt k's image j is --prompt P_k --seed 5+j."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a small red circle"}, {"prompt": PROMPT, "negative_prompt": NEGATIVE}, {"prompt": LONG}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "out"
    argv = ["generate", "--model", str(text_model), "--prompts", str(prompts), "--num-images", "2", "--seed", "5",
            "--steps", str(STEPS), "--guidance-scale", "3", "--shard-size", "4", "--num-actors", "1",
            "--output", str(output)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"warning: --prompts {prompts} line 3: prompt: 4 tokens past the {TEXT_CONTEXT}-token context" in err
    names = sorted(p.name for p in (output / "images").iterdir())
    assert names == [f"p{k:05d}-seed-{s:06d}.png" for k in range(3) for s in (5, 6)]
    for k, row in enumerate(rows):
        flags = ["--prompt", row["prompt"], "--guidance-scale", "3", "--seed", "5", "--num-images", "2"]
        if "negative_prompt" in row:
            flags += ["--negative-prompt", row["negative_prompt"]]
        alone = cli_images(text_model, tmp_path, capsys, *flags)
        files = [np.asarray(Image.open(output / "images" / f"p{k:05d}-seed-{s:06d}.png"))[..., None] for s in (5, 6)]
        assert np.array_equal(np.stack(files), alone), f"prompt {k}"
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["prompts"]["count"] == 3 and manifest["seeds"]["per_prompt"] == 2

    code, _, err = run(argv, capsys)  # the same job again: complete, nothing regenerated
    assert code == 0 and "is complete already" in err
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    line = one_line(argv, capsys)  # another prompts file is another job
    assert "holds images of another job" in line


def test_a_single_prompt_to_parquet_shards_carries_it_as_the_caption(ray_local, text_model, tmp_path, capsys):
    import pyarrow.parquet as pq

    output = tmp_path / "out"
    code, _, err = run(["generate", "--model", str(text_model), "--prompt", PROMPT, "--num-images", "3", "--seed", "9",
                        "--steps", str(STEPS), "--format", "parquet", "--num-actors", "1", "--output", str(output)],
                       capsys)
    assert code == 0, err
    table = pq.read_table(output / "data" / "shard-000000.parquet")
    assert table.column("caption").to_pylist() == [PROMPT] * 3
    assert table.column("key").to_pylist() == ["seed-000009", "seed-000010", "seed-000011"]
    pixels = np.stack([np.frombuffer(b, np.uint8).reshape(8, 8, 1) for b in table.column("image").to_pylist()])
    assert np.array_equal(pixels, cli_images(text_model, tmp_path, capsys, "--prompt", PROMPT, "--seed", "9",
                                             "--num-images", "3"))


def test_inpaint_repaints_the_mask_to_the_prompt(text_model, tmp_path, capsys):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(image)
    generate = np.zeros((8, 8), np.uint8)
    generate[:, 4:] = 255
    Image.fromarray(generate).save(mask)
    results = []
    for prompt in (PROMPT, NEGATIVE):
        out = tmp_path / f"{len(results)}.png"
        code, _, err = run(["inpaint", "--model", str(text_model), "--image", str(image), "--mask", str(mask),
                            "--prompt", prompt, "--guidance-scale", "3", "--steps", str(STEPS), "--resample-times",
                            "1", "--out", str(out)], capsys)
        assert code == 0, err
        results.append(np.asarray(Image.open(out)))
    assert (results[0][:, :4] == 40).all() and (results[1][:, :4] == 40).all()  # kept exactly
    assert not np.array_equal(results[0][:, 4:], results[1][:, 4:])  # repainted to each prompt
    line = one_line(["inpaint", "--model", str(text_model), "--image", str(image), "--mask", str(mask),
                     "--class-label", "0", "--out", str(tmp_path / "x.png")], capsys)
    assert "--class-label: this model is conditioned on text" in line


@pytest.fixture(scope="module")
def text_pyfunc(text_model, mlflow_server):
    return logged_pyfunc(text_model, mlflow_server.uri, "prompts")


def test_the_pyfunc_model_takes_a_prompt_with_the_bytes_of_the_command_line(text_pyfunc, text_model, tmp_path,
                                                                           capsys):
    request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance_scale": 3.0, "seed": 7, "num_images": 2,
               "steps": STEPS}
    other = {"prompt": "a small red circle", "seed": 7, "num_images": 1, "steps": STEPS}
    got = text_pyfunc.predict([other, request])[1:]  # another prompt in the same call changes nothing
    want = cli_images(text_model, tmp_path, capsys, "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                      "--guidance-scale", "3", "--seed", "7", "--num-images", "2")
    assert np.array_equal(got, want)


def test_the_pyfunc_model_refuses_a_class_label_and_warns_about_what_tokenizing_lost(text_pyfunc):
    from ddpm.settings import SettingError

    with pytest.raises(SettingError, match=r"^class_label: this model is conditioned on text: send a prompt"):
        text_pyfunc.predict([{"class_label": 0, "steps": 1}])
    with pytest.warns(UserWarning, match=rf"^prompt: 4 tokens past the {TEXT_CONTEXT}-token context were dropped$"):
        text_pyfunc.predict([{"prompt": LONG, "steps": 1}])
    with pytest.warns(UserWarning, match=r"^prompt: unknown words: 'purple', 'hexagon'$"):
        text_pyfunc.predict([{"prompt": UNSEEN, "steps": 1}])
