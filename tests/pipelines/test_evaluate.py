"""Evaluation: FD-cls and its floor, precision/recall in classifier features, FID's extractor contract, the sampler
report, the CLI, and the promotion gate (as a pure rule and against a real MLflow server).

Everything runs at 8x8 (scikit-learn's digits at their native size) with a tiny U-Net and a few dozen samples: what
is under test is the measurement, not the quality of an untrained model. The FD formula itself is tested in
test_core_parts.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm import NoiseSchedule, UNet, UNetConfig, checkpoint
from ddpm.metrics import frechet_distance_features, precision_recall
from pipelines import cli
from pipelines.evaluate.inception import InceptionFeatures
from pipelines.evaluate.quality import EvalSettings, evaluate_model, prepare_reference
from pipelines.evaluate.real import load_data
from pipelines.evaluate.report import REPORT_ROWS, sampler_report
from pipelines.evaluate.gate import decide_promotion, evaluate_and_gate

N = 50  # samples per set: small, yet enough for FD to separate what it must


# tests/conftest.py: one intra-op thread for tiny tensors, and a DDPM_HOME of the module's own (the FD-cls classifier
# is trained once, then read from that cache by the later tests)
pytestmark = pytest.mark.usefixtures("one_thread", "ddpm_home")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", 8)  # (1797, 8, 8, 1) uint8, (1797,) labels


@pytest.fixture(scope="module")
def reference(digits):
    return prepare_reference(*digits, num_samples=N, log=lambda _: None)


def tiny_checkpoint(path: Path, seed: int, num_classes: int = 0) -> Path:
    torch.manual_seed(seed)
    net = UNet(UNetConfig.preset("tiny", num_classes=num_classes))
    return checkpoint.save(path, net, NoiseSchedule.linear(1000), class_names=[str(i) for i in range(num_classes)])


# -- FD-cls and precision/recall --------------------------------------------------------------------------------
def test_fd_cls_separates_noise_from_digits_and_real_from_real_by_little(digits, reference, ddpm_home):
    images, _ = digits
    extract = reference.extractors["fd_cls"]
    assert list((ddpm_home / "classifiers").glob("*.safetensors")) and reference.classifier_accuracy > 0.9

    noise = np.random.default_rng(0).integers(0, 256, size=(N, 8, 8, 1), dtype=np.uint8)
    fd_noise = frechet_distance_features(extract(noise), reference.reference["fd_cls"])
    # Real vs real, other images than the floor's: held-out rows N..2N against the same train reference.
    from pipelines.evaluate.classifier import split

    _, held_out = split(len(images))
    fd_real = frechet_distance_features(extract(images[held_out[N:2 * N]]), reference.reference["fd_cls"])
    floor = reference.floors["fd_cls"]
    assert fd_noise > 10 * floor
    assert 0.5 * floor < fd_real < 2 * floor


def test_precision_recall_in_classifier_features_see_mode_collapse(digits, reference):
    images, labels = digits
    extract, real = reference.extractors["fd_cls"], reference.reference["fd_cls"]
    zeros_only = extract(images[labels == 0][:N])  # a generator that draws one class: precise, little recall
    p, r = precision_recall(real, zeros_only)
    assert p > 0.7 and r < 0.3
    assert reference.floor_precision > 0.7 and reference.floor_recall > 0.7  # fresh real images: both high


def test_classifier_cache_is_reused_and_needs_labels(digits):
    from pipelines.evaluate import classifier as classifier
    from pipelines.errors import UserError

    images, labels = digits
    logged = []
    again = classifier.load_or_train(images, labels, log=logged.append)
    assert logged and logged[0].startswith("[classifier] cached")
    assert again.key.endswith(classifier.recipe_hash())
    with pytest.raises(UserError, match="label for every image"):
        classifier.load_or_train(images[:100], np.full(100, -1))


def test_a_small_train_half_gets_fewer_classifier_steps():
    """At most ``max_epochs`` passes over the train half: the digits' 899 images keep the recipe's steps, a test's
    80 images train a tenth of them (the reader of text alignment follows the same rule)."""
    from pipelines.evaluate import alignment, classifier

    recipe = classifier.RECIPE
    assert classifier.training_steps(recipe, 899) == recipe["steps"] == 600
    assert classifier.training_steps(recipe, 80) == 63  # ceil(100 * 80 / 128)
    assert classifier.training_steps(recipe, 0) == 1
    assert classifier.training_steps(alignment.RECIPE, 1600) == alignment.RECIPE["steps"]


def test_classifier_sees_large_images_pooled_to_its_max_side():
    from pipelines.evaluate.classifier import FeatureNet

    torch.manual_seed(0)
    net = FeatureNet(3, 4, max_side=32).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    pooled = torch.nn.functional.avg_pool2d(x, 2)  # (2, 3, 32, 32): what the convolutions must see
    with torch.no_grad():
        assert torch.equal(net.features(x), net.features(pooled))
        assert not torch.equal(net.features(x[..., :32, :32]), net.features(pooled))
        assert net.features(torch.rand(2, 3, 16, 16)).shape == (2, 64)  # small images pass unchanged


# -- evaluating a model -------------------------------------------------------------------------------------------
def test_evaluate_model_names_its_numbers_and_depends_only_on_seeds(tmp_path, reference):
    loaded = checkpoint.load(tiny_checkpoint(tmp_path / "m", seed=0, num_classes=10))
    settings = EvalSettings(num_samples=N, sampler="ddim", steps=5)
    e = evaluate_model(loaded, reference, settings, batch_size=N, log=lambda _: None)
    assert e.images.shape == (N, 8, 8, 1) and e.images.dtype == np.uint8
    assert {"fd_cls", "fd_cls_floor", "fd_cls_ratio", "precision", "recall", "images_per_s"} <= e.metrics.keys()
    assert e.metrics["fd_cls_ratio"] == pytest.approx(e.metrics["fd_cls"] / e.metrics["fd_cls_floor"])
    assert settings.row == "ddim5" and EvalSettings(sampler="dpm++", steps=20).row == "dpmpp20"
    json.dumps(e.to_dict())  # everything recorded is plain JSON
    again = evaluate_model(loaded, reference, settings, batch_size=7, log=lambda _: None)
    assert np.array_equal(e.images, again.images)  # batch size does not change any image
    with pytest.raises(ValueError, match="samples"):
        evaluate_model(loaded, reference, EvalSettings(num_samples=N + 1), log=lambda _: None)


def test_sampler_report_has_every_row_a_table_and_a_plot(tmp_path, digits):
    # 10 samples a row: the report's DDPM-1000 row dominates this test's time
    reference = prepare_reference(*digits, num_samples=10, log=lambda _: None)
    loaded = checkpoint.load(tiny_checkpoint(tmp_path / "m", seed=0))
    report = sampler_report(EvalSettings(num_samples=10),
                            lambda settings: evaluate_model(loaded, reference, settings, log=lambda _: None))
    assert [(e.settings.sampler, e.settings.steps) for e in report.evaluations] == list(REPORT_ROWS)
    for sampler, steps in REPORT_ROWS:
        assert f"| {sampler} | {steps} |" in report.markdown
    assert "DDPM-1000" in report.markdown.splitlines()[-1]  # the answer line
    assert report.plot_png.startswith(b"\x89PNG")
    first_images = {e.images[0].tobytes() for e in report.evaluations}
    assert len(first_images) > 1  # the rows really sampled differently


# -- FID's extractor ----------------------------------------------------------------------------------------------
class StandIn(torch.nn.Module):
    """NVIDIA's Inception file's contract: (N, 3, 299, 299) in [0, 255] -> logits, or 2048-d with return_features."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Linear(3 * 4 * 4, 2048)
        self.logits = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        f = torch.relu(self.features(torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)))
        return f if return_features else self.logits(f)


def test_fid_with_a_torchscript_stand_in(tmp_path, digits):
    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    torch.jit.script(StandIn()).save(str(path))
    n = 10  # the contract is under test, not the statistics: 299x299 inputs are costly
    reference = prepare_reference(*digits, num_samples=n, inception=InceptionFeatures(path), log=lambda _: None)
    assert reference.reference["fid"].shape == (n, 2048) and reference.floors["fid"] > 0
    loaded = checkpoint.load(tiny_checkpoint(tmp_path / "m", seed=0))
    e = evaluate_model(loaded, reference, EvalSettings(num_samples=n, steps=5), log=lambda _: None)
    assert {"fid", "fid_floor", "fid_ratio", "fd_cls"} <= e.metrics.keys() and e.metrics["fid_ratio"] > 1


@pytest.mark.parametrize("flags", [["--inception-weights", "/nonexistent/inception.pt"], ["--metric", "fid"]])
def test_missing_inception_weights_is_a_one_line_error(flags, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--model", str(tmp_path / "none"),
                           "--data", "digits", *flags], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--inception-weights" in lines[0], proc.stderr


# -- the gate -----------------------------------------------------------------------------------------------------
def test_decide_promotion_both_ways():
    first = decide_promotion({"fd_cls": 3.0}, None)
    assert first.promote and first.incumbent_value is None and "no incumbent" in first.reason
    better = decide_promotion({"fd_cls": 2.0}, {"fd_cls": 3.0})
    assert better.promote and (better.candidate_value, better.incumbent_value) == (2.0, 3.0)
    worse = decide_promotion({"fd_cls": 3.5}, {"fd_cls": 3.0})
    assert not worse.promote and "3.5" in worse.reason and "3" in worse.reason
    assert not decide_promotion({"fd_cls": 3.0}, {"fd_cls": 3.0}).promote  # a tie keeps the incumbent
    assert not decide_promotion({"fd_cls": float("nan")}, None).promote
    assert decide_promotion({"fd_cls": 9.0, "fid": 10.0}, {"fd_cls": 1.0, "fid": 12.0}, metric="fid").promote
    with pytest.raises(ValueError, match="fid"):
        decide_promotion({"fd_cls": 1.0}, None, metric="fid")


@pytest.mark.slow
def test_gate_against_mlflow_records_the_decision_on_the_version(tmp_path, mlflow_server):
    from pipelines import registry, tracking

    uri, name = mlflow_server.uri, f"gate-{uuid.uuid4().hex[:6]}"
    client = tracking.client(uri)
    experiment = tracking.ensure_experiment("test-gate", uri)
    versions = []
    for seed in (0, 1):
        run_id = client.create_run(experiment).info.run_id
        model_uri = registry.log_model(tiny_checkpoint(tmp_path / f"m{seed}", seed), run_id=run_id, tracking_uri=uri)
        versions.append(registry.register(model_uri, name, tags={"run_id": run_id}, tracking_uri=uri))

    kwargs = dict(data="digits", num_samples=N, steps=5, tracking_uri=uri, log=lambda _: None)
    first = evaluate_and_gate(name, versions[0], **kwargs)
    assert first.promote and first.incumbent_value is None
    tags = client.get_model_version(name, versions[0]).tags
    assert tags["gate.decision"] == "promote" and tags["gate.incumbent_version"] == "none"
    assert json.loads(tags["gate.settings"])["settings"]["num_samples"] == N
    run = client.get_run(client.get_model_version(name, versions[0]).run_id)
    assert "ddim5/fd_cls" in run.data.metrics  # the evaluation joined the training run
    registry.promote(name, versions[0], "production", tracking_uri=uri)

    second = evaluate_and_gate(name, versions[1], **kwargs)
    assert second.incumbent_value is not None
    assert second.promote == (second.candidate_value < second.incumbent_value)
    tags = client.get_model_version(name, versions[1]).tags
    assert tags["gate.incumbent_version"] == versions[0]
    assert float(tags["gate.candidate_value"]) == pytest.approx(second.candidate_value, rel=1e-5)
    assert float(tags["gate.incumbent_value"]) == pytest.approx(second.incumbent_value, rel=1e-5)
    assert tags["gate.decision"] == ("promote" if second.promote else "keep")
    # The incumbent evaluated under the candidate's settings gives the number it got when it was the candidate.
    assert second.incumbent_value == pytest.approx(first.candidate_value, rel=1e-6)
    assert not evaluate_and_gate(name, versions[0], **kwargs).promote  # already production


@pytest.mark.slow
def test_cli_writes_files_and_logs_to_mlflow(tmp_path, mlflow_server, capsys):
    from pipelines import tracking

    model = tiny_checkpoint(tmp_path / "m", seed=0, num_classes=10)
    out = tmp_path / "out"
    experiment = f"eval-{uuid.uuid4().hex[:6]}"
    assert cli.main(["evaluate", "--model", str(model), "--data", "digits", "--num-samples", str(N), "--steps", "5",
                     "--out", str(out), "--tracking-uri", mlflow_server.uri, "--experiment", experiment]) == 0
    assert "ddim5: fd_cls" in capsys.readouterr().out
    record = json.loads((out / "evaluation.json").read_text())
    assert record[0]["settings"] == {"num_samples": N, "sampler": "ddim", "steps": 5, "guidance_scale": 1.0,
                                     "seed": 0, "weights": "ema"}
    assert (out / "samples_ddim5.png").read_bytes().startswith(b"\x89PNG")
    client = tracking.client(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.metrics["ddim5/fd_cls"] == pytest.approx(record[0]["metrics"]["fd_cls"])
    assert run.data.tags["eval.rows"] == "ddim5" and run.data.tags["eval.num_samples"] == str(N)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.json", "evaluation/samples_ddim5.png"} <= artifacts


# -- the real side, read a shard at a time ------------------------------------------------------------------------
def write_dataset(root: Path, images: np.ndarray, labels: np.ndarray, shards: int) -> str:
    """A preprocessed dataset's layout (manifest.json + Parquet shards of image bytes and labels) in ``shards`` parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    names = []
    for s, rows in enumerate(np.array_split(np.arange(len(images)), shards)):
        pixels = pa.py_buffer(np.ascontiguousarray(images[rows]).tobytes())
        column = pa.Array.from_buffers(pa.binary(images[0].nbytes), len(rows), [None, pixels])
        names.append(f"data/shard-{s:06d}.parquet")
        pq.write_table(pa.table({"image": column, "label": pa.array(labels[rows], pa.int64())}), root / names[-1])
    (root / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "image_shape": list(images.shape[1:]), "shards": names, "fingerprint": "test",
         "class_names": [str(c) for c in range(int(labels.max()) + 1)], "counts": {"rows": len(images)}}))
    return str(root)


def test_streamed_real_statistics_equal_in_memory_and_the_driver_never_holds_the_dataset(tmp_path, ray_local,
                                                                                        monkeypatch):
    """The reference statistics at scale come from feature actors that read the shards themselves: the same moments
    as the features of the same rows in memory, and the driver's peak (numpy and Python allocations, tracemalloc)
    stays far below the dataset's size through a whole ``evaluate`` on Ray Data actors."""
    import tracemalloc

    from ddpm.metrics import FeatureStats
    from pipelines.evaluate import classifier, features
    from pipelines.evaluate.quality import evaluate
    from pipelines.evaluate.real import RealData

    monkeypatch.setitem(classifier.RECIPE, "steps", 30)  # a quick classifier (its own cache key): features, not skill
    # (28752, 32, 32, 1): 29 MB of pixels in 16 shards, well above what the driver holds besides (about 8 MB here:
    # the model's weights and their bytes for the actors), so that holding the dataset would show.
    images, labels = (np.concatenate([a] * 16) for a in load_data("digits", 32))
    data = write_dataset(tmp_path / "digits32", images, labels, shards=16)
    real = RealData.open(data)
    assert len(real) == len(images) and real.num_shards == 16 and np.array_equal(real.labels, labels)
    assert real.fingerprint() == classifier.fingerprint(images, labels)  # so both paths share the classifier cache
    clf = classifier.load_or_train(images, labels, log=lambda _: None)
    rows = clf.train_index[:600]  # spans every shard
    np.testing.assert_array_equal(real.take(rows), images[rows])

    spec = features.ExtractorSpec("fd_cls", "classifier", clf.to_bytes(), clf.weights_sha256()[:16])
    streamed = features.real_stats(real, rows, {"fd_cls": spec}, keep=100, num_actors=2)
    in_memory = clf.features(images[rows])
    expected = FeatureStats.of(in_memory)
    got = streamed.stats["fd_cls"]
    assert got.n == expected.n == len(rows) and streamed.count == len(rows)
    # The network computes in float32, whose last bits depend on the batch's size (one shard's rows on an actor, all
    # 600 here): equal to float32's precision, where a wrong row would differ in the first digit.
    np.testing.assert_allclose(got.mean, expected.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.cov, expected.cov, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(streamed.kept_features("fd_cls"), in_memory[:100], rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model = checkpoint.save(tmp_path / "m", UNet(UNetConfig.preset("tiny", image_size=32, num_classes=10)),
                            NoiseSchedule.linear(1000), class_names=[str(i) for i in range(10)])
    # A first run imports what the path needs (code objects count in tracemalloc); the measured one, at another n,
    # computes its real statistics on the actors again (the cache is per n).
    evaluate(str(model), data, EvalSettings(num_samples=32, steps=2), num_actors=2, log=lambda _: None)
    logs: list[str] = []
    tracemalloc.start()
    try:
        (evaluation,), _ = evaluate(str(model), data, EvalSettings(num_samples=64, steps=2), num_actors=2,
                                    log=logs.append)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert any(line.startswith("[classifier] cached") for line in logs), logs  # the streamed path found it
    assert sum("on feature actors" in line for line in logs) == 2, logs
    assert evaluation.n["reference"] == 64 and evaluation.metrics["fd_cls_floor"] > 0
    assert peak < images.nbytes / 2, f"the driver's peak was {peak:,} bytes for a {images.nbytes:,}-byte dataset"
