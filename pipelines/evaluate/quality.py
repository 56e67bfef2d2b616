"""``ddpm evaluate``: how good are a model's samples? FD-cls beside its floor, precision/recall, FID, a sampler report.

The measurement, for a model and a labelled dataset::

    real data   split once (pipelines.evaluate.classifier.split): a train half and a held-out half
    extractor   FD-cls: a small CNN classifier trained on the train half (cached per dataset); FID: Inception-v3
                pool features (2048-d) from a TorchScript file the user provides (--inception-weights)
    reference   n images of the train half                                       -> features R
    floor       n images of the held-out half                                    -> features H
    model       n samples, seeds K..K+n-1, EMA weights, the stated sampler and steps, quantised to uint8 (exactly
                what a user receives), labelled like the held-out images when the model is class-conditional
                                                                                 -> features G
    numbers     fd = FD(G, R); floor = FD(H, R); ratio = fd / floor; precision, recall = P/R(R, G) (k = 3)

Why the floor: a Fréchet distance estimated from n samples is biased upwards by roughly (feature dimension / n),
so even two halves of the same dataset are at a distance > 0, and that distance depends on n and on the extractor.
The floor is what a perfect generator would score under the same settings; ``ratio`` = 1 means "as close to the
data as fresh real images are". Every set has the same n, so fd and floor carry the same bias.

Every number is named with its sampler and steps (``ddim50/fd_cls``) and logged to MLflow with the settings, the
sample grid and ``evaluation.json`` (which holds everything). ``--report`` repeats the measurement for DDPM-1000,
DDIM-10/20/50/100 and DPM-Solver++-10/20 on the same seeds and answers how few steps reach DDPM-1000's quality.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipelines.errors import UserError

if TYPE_CHECKING:
    import numpy as np

HELP = "measure a model's sample quality: FD-cls beside its real-vs-real floor, precision/recall, FID, sampler report"
EXAMPLE = """example:
  ddpm evaluate --model models:/digits@production --data .ddpm/data/digits --num-samples 500
  ddpm evaluate --model .ddpm/local/digits --data digits --report --out .ddpm/eval/digits
  ddpm evaluate --model models:/cifar@staging --data s3://bucket/processed/cifar10 --num-samples 10000 \\
      --inception-weights ~/models/pt_inception-2015-12-05.pt --metric fid --tracking-uri http://mlflow:5000

--data is a preprocessed dataset (manifest.json + shards), or `digits` for scikit-learn's digits exactly as
`ddpm train-local` reads them. FD-cls trains a small classifier on the data's labels once (cached in .ddpm/).
Numbers go to MLflow when --tracking-uri, --run-id or $MLFLOW_TRACKING_URI is given; files go to --out.
"""

# The sampler report's rows: (sampler, steps).
REPORT_ROWS = (("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100), ("dpm++", 10), ("dpm++", 20))
METRICS = ("fd_cls", "fid")  # headline metrics: lower is better
GRID_IMAGES = 100
INCEPTION_SIZE = 299
SCALE_FROM = 5_000  # from this many samples on, samples and features are computed on Ray Data actors
PR_SAMPLES = 5_000  # precision/recall at scale: at most this many points per set (k-NN needs n x n distances)
BIAS_WARNING_N = 10_000  # below this n, say that Fréchet distances are biased at that size


@dataclass(frozen=True)
class EvalSettings:
    """What must be equal for two evaluations to be comparable (the gate evaluates both models with one)."""

    num_samples: int = 500
    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 1.0
    seed: int = 0
    weights: str = "ema"

    @property
    def row(self) -> str:
        """``ddim50``, ``dpmpp20``: the sampler and steps as an MLflow-safe name ('+' is not allowed there)."""
        return f"{self.sampler.replace('+', 'p')}{self.steps}"


@dataclass
class Reference:
    """The real side of every comparison, prepared once per dataset, sample count and extractor set.

    ``extractors`` maps a metric name ("fd_cls", "fid") to a function (N, H, W, C) uint8 -> (N, D) features.
    """

    fingerprint: str
    classifier_key: str
    classifier_accuracy: float
    labels: "np.ndarray"                        # (n,) the held-out images' labels, reused for conditional sampling
    extractors: dict[str, Callable]
    reference: dict[str, "np.ndarray"] = field(default_factory=dict)  # metric -> (n, D) features of train images
    floors: dict[str, float] = field(default_factory=dict)            # metric -> FD(held-out, reference)
    floor_precision: float = 0.0
    floor_recall: float = 0.0

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def identity(self) -> dict:
        """What a number depends on besides the model and the sampler settings."""
        return {"dataset_fingerprint": self.fingerprint, "classifier": self.classifier_key,
                "extractors": sorted(self.extractors)}


@dataclass
class Evaluation:
    """One model under one :class:`EvalSettings`: the numbers, and the images they were computed from."""

    settings: EvalSettings
    metrics: dict[str, float]    # fd_cls, fd_cls_floor, fd_cls_ratio, precision, recall, ..., images_per_s
    images: "np.ndarray"         # (n, H, W, C) uint8; at scale only the first GRID_IMAGES (the grid's)
    identity: dict
    n: dict = field(default_factory=dict)         # samples, reference, held_out, precision_recall: the n of each set
    warnings: list = field(default_factory=list)  # e.g. the small-n bias of Fréchet distances

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "metrics": self.metrics, "n": self.n, "warnings": self.warnings,
                **self.identity}


def bias_warnings(n: int) -> list[str]:
    """The warning evaluation.json carries (and the log prints) when n is too small for an unbiased FD."""
    if n >= BIAS_WARNING_N:
        return []
    return [f"n = {n:,} samples < {BIAS_WARNING_N:,}: FID (and FD-cls) are biased upwards at this size, by roughly "
            f"the feature dimension / n; compare numbers only at the same n (FD-cls beside its floor at that n), "
            f"and use --num-samples 50000 for a number comparable with papers' FID-50k"]


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors


class InceptionFeatures:
    """FID's extractor: Inception-v3 2048-d pool features from a TorchScript file given by the user.

    torchvision (which builds Inception-v3) is not used, so the network comes as a TorchScript archive, such as
    the ``pt_inception-2015-12-05`` file of NVIDIA's StyleGAN2-ADA metrics (a port of the TensorFlow graph that
    defined FID). ``torch.jit.load`` runs TorchScript, a restricted language interpreted by PyTorch, not pickled
    Python objects; still, load only files from a source you trust. The contract: (N, 3, 299, 299) float images
    with values in [0, 255] -> (N, 2048); a module whose ``forward`` has a ``return_features`` argument (NVIDIA's)
    is called with ``return_features=True``. Images are quantised uint8 first, grey is repeated to RGB, and the
    resize to 299x299 is bilinear.
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights {path}: no such file (FID needs a TorchScript Inception-v3, "
                            f"e.g. pt_inception-2015-12-05.pt)")
        self._load(path.read_bytes(), f"--inception-weights {path}", device)

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "cpu") -> "InceptionFeatures":
        """The same extractor from the file's bytes: how Ray actors, which may not see the driver's disk, get it."""
        self = cls.__new__(cls)
        self._load(data, "inception weights", device)
        return self

    def _load(self, data: bytes, name: str, device) -> None:
        import hashlib
        import io

        import torch

        self.key = "inception-" + hashlib.sha256(data).hexdigest()[:16]  # names the extractor in a cache key
        self.device = torch.device(device)
        try:
            self.module = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{name}: not a TorchScript file "
                            f"({(str(exc).strip().splitlines() or ['unreadable'])[0]})") from None
        arguments = [a.name for a in self.module.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in arguments else {}

    def __call__(self, images: "np.ndarray", batch_size: int = 64) -> "np.ndarray":
        import numpy as np
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).float()  # (B, C, H, W), 0..255
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
                features = self.module(x, **self.kwargs)
                if features.dim() != 2 or features.shape[0] != x.shape[0]:
                    raise UserError(f"--inception-weights: the module returned shape {tuple(features.shape)}, "
                                    f"expected ({x.shape[0]}, 2048)")
                out.append(features.double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))


# ---------------------------------------------------------------------------------------------------------------
# The real side


def load_data(data: str, resolution: int | None = None) -> tuple["np.ndarray", "np.ndarray"]:
    """(images (N, H, W, C) uint8, labels (N,)) from a preprocessed dataset URI, or ``digits``.

    ``digits`` is scikit-learn's digits exactly as ``ddpm train-local`` trains on them (at ``resolution``), so a
    locally trained model is compared with the very images it learned from.
    """
    if data == "digits":
        from ddpm import to_uint8
        from pipelines.train.local import digits_dataset

        x, y = digits_dataset(resolution or 16)
        return to_uint8(x), y.numpy()
    from pipelines.data.dataset import is_latent, load_numpy, read_manifest

    manifest = read_manifest(data)
    if is_latent(manifest):
        raise UserError(f"{data} holds latents (ddpm encode); evaluate against the images they were encoded from, "
                        f"{manifest['source']['uri']}")
    return load_numpy(data)


def prepare_reference(images: "np.ndarray", labels: "np.ndarray", *, num_samples: int,
                      inception: InceptionFeatures | None = None, log=print) -> Reference:
    """Train (or load) the classifier, pick the reference and held-out images, compute features and floors."""
    from ddpm.metrics import frechet_distance_features, precision_recall
    from pipelines.evaluate import classifier as cls

    clf = cls.load_or_train(images, labels, log=log)
    available = min(len(clf.train_index), len(clf.held_out_index))
    if not 2 <= num_samples <= available:
        raise UserError(f"--num-samples {num_samples}: this dataset's halves hold {available} images each; "
                        f"choose 2..{available}")
    ref_images = images[clf.train_index[:num_samples]]
    held_images = images[clf.held_out_index[:num_samples]]
    extractors = {"fd_cls": clf.features}
    if inception is not None:
        extractors["fid"] = inception
    ref = Reference(clf.fingerprint, clf.key, clf.accuracy, labels[clf.held_out_index[:num_samples]], extractors)
    for metric, extract in extractors.items():
        ref.reference[metric] = extract(ref_images)
        held = extract(held_images)
        ref.floors[metric] = frechet_distance_features(held, ref.reference[metric])
        if metric == "fd_cls":
            ref.floor_precision, ref.floor_recall = precision_recall(ref.reference[metric], held)
    log("[evaluate] floors (held-out vs train, n={}): {}".format(
        num_samples, ", ".join(f"{m} {v:.3f}" for m, v in ref.floors.items())))
    return ref


# ---------------------------------------------------------------------------------------------------------------
# The model side


def evaluate_model(loaded, reference: Reference, settings: EvalSettings, *, batch_size: int = 128,
                   device: str = "cpu", log=print) -> Evaluation:
    """Sample ``reference.num_samples`` images from ``loaded`` (a ``ddpm.checkpoint.LoadedModel``) and score them.

    ``settings.num_samples`` must match the reference's n (the floor is only the floor at that n).
    """
    from ddpm import generate_images, image_seeds
    from ddpm.metrics import frechet_distance_features, precision_recall

    n = reference.num_samples
    if settings.num_samples != n:
        raise ValueError(f"settings ask for {settings.num_samples} samples but the reference holds {n}")
    num_classes = loaded.config.num_classes
    labels = None
    if num_classes:
        if int(reference.labels.max()) >= num_classes:
            raise UserError(f"the data has labels up to {int(reference.labels.max())} but the model knows "
                            f"{num_classes} classes")
        labels = reference.labels
    loaded.model.to(device)
    start = time.perf_counter()
    # The core's one path: the same pixels as ddpm generate and POST /generate for these seeds and settings.
    images = generate_images(loaded, image_seeds(settings.seed, n), class_labels=labels, sampler=settings.sampler,
                             steps=settings.steps, guidance_scale=settings.guidance_scale, batch_size=batch_size)
    seconds = time.perf_counter() - start

    metrics: dict[str, float] = {}
    for metric, extract in reference.extractors.items():
        features = extract(images)
        fd, floor = frechet_distance_features(features, reference.reference[metric]), reference.floors[metric]
        metrics |= {metric: fd, f"{metric}_floor": floor, f"{metric}_ratio": fd / floor}
        if metric == "fd_cls":
            metrics["precision"], metrics["recall"] = precision_recall(reference.reference[metric], features)
    metrics |= {"precision_floor": reference.floor_precision, "recall_floor": reference.floor_recall,
                "classifier_accuracy": reference.classifier_accuracy, "images_per_s": n / seconds}
    log(f"[evaluate] {settings.row}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    warnings = bias_warnings(n)
    for warning in warnings:
        log(f"[evaluate] warning: {warning}")
    return Evaluation(settings, metrics, images, reference.identity(),
                      {"samples": n, "reference": n, "held_out": n, "precision_recall": n}, warnings)


# ---------------------------------------------------------------------------------------------------------------
# At scale: Ray Data actors for the samples and the features, the real side's statistics cached beside the data


@dataclass
class ScaleReference:
    """The real side at scale: moments instead of feature sets, from feature actors or the cache.

    Reference = the train half's first min(n, half) images, held-out (the floor) likewise; with n above a half's size
    those sets are the whole half, while the samples are all n. The first ``n_pr`` rows' FD-cls features of each
    set are kept for precision/recall.
    """

    fingerprint: str
    classifier_key: str
    classifier_accuracy: float
    labels: "np.ndarray"                 # (num_samples,) held-out labels, repeated in order past the half's size
    specs: dict                          # metric -> features.ExtractorSpec
    stats: dict                          # metric -> ddpm.metrics.FeatureStats of the reference images
    floors: dict[str, float]
    pr_reference: "np.ndarray"           # (n_pr, D) FD-cls features of the first reference images
    floor_precision: float
    floor_recall: float
    num_samples: int
    n_reference: int
    n_held_out: int
    n_pr: int

    def identity(self) -> dict:
        return {"dataset_fingerprint": self.fingerprint, "classifier": self.classifier_key,
                "extractors": sorted(self.specs)}


def use_scale(num_samples: int, available: int, num_actors: int | None, use_gpu: bool) -> bool:
    """Whether ``ddpm evaluate`` runs on Ray Data actors: many samples, more than a half holds, or actors asked for."""
    return num_samples >= SCALE_FROM or num_samples > available or num_actors is not None or use_gpu


def prepare_reference_at_scale(images: "np.ndarray", labels: "np.ndarray", *, data: str, num_samples: int,
                               inception_weights: str | Path | None = None, num_actors: int | None = None,
                               cpus_per_actor: int = 1, use_gpu: bool = False, log=print) -> ScaleReference:
    """The classifier (cached), then per set (reference, held-out) and extractor: {mean, cov, n} from the cache
    beside the data, or from feature actors and then cached."""
    import numpy as np

    from ddpm.metrics import frechet_distance_stats, precision_recall
    from pipelines.evaluate import classifier as cls
    from pipelines.evaluate import features as ft

    if num_samples < 2:
        raise UserError(f"--num-samples must be at least 2, got {num_samples}")
    clf = cls.load_or_train(images, labels, log=log)
    specs = {"fd_cls": ft.ExtractorSpec("fd_cls", "classifier", clf.to_bytes(), clf.weights_sha256()[:16])}
    if inception_weights:
        inception = InceptionFeatures(inception_weights)  # a bad file fails here, in one line, before any actor starts
        specs["fid"] = ft.ExtractorSpec("fid", "inception", Path(inception_weights).expanduser().read_bytes(),
                                        inception.key.split("-", 1)[1])
    n_ref, n_held = min(num_samples, len(clf.train_index)), min(num_samples, len(clf.held_out_index))
    n_pr = min(num_samples, n_ref, n_held, PR_SAMPLES)
    root = ft.cache_root(data)
    sets = {}
    for role, rows in (("reference", clf.train_index[:n_ref]), ("held_out", clf.held_out_index[:n_held])):
        keys = {m: ft.cache_key(clf.fingerprint, cls.recipe_hash(), spec, role, len(rows)) for m, spec in specs.items()}
        found = {m: ft.read_cached(root, keys[m], log) for m in specs}
        missing = {m: specs[m] for m, c in found.items() if c is None or (m == "fd_cls" and len(c.kept) < n_pr)}
        if missing:
            log(f"[evaluate] {role} features of {len(rows):,} images on feature actors: {', '.join(missing)}")
            reduction = ft.real_stats(images[rows], missing, keep=PR_SAMPLES, num_actors=num_actors,
                                      cpus_per_actor=cpus_per_actor, use_gpu=use_gpu)
            for m in missing:
                kept = reduction.kept_features(m) if m == "fd_cls" else np.zeros((0, reduction.stats[m].mean.size))
                found[m] = ft.CachedStats(reduction.stats[m], kept)
                ft.write_cached(root, keys[m], found[m], log)
        if len(missing) < len(specs):
            log(f"[evaluate] {role} statistics ({', '.join(m for m in specs if m not in missing)}, n={len(rows):,}) "
                f"from the cache in {root}")
        sets[role] = found
    floors = {m: frechet_distance_stats(sets["held_out"][m].stats, sets["reference"][m].stats) for m in specs}
    pr_reference = sets["reference"]["fd_cls"].kept[:n_pr]
    floor_precision, floor_recall = precision_recall(pr_reference, sets["held_out"]["fd_cls"].kept[:n_pr])
    held_labels = labels[clf.held_out_index]
    sample_labels = held_labels[np.arange(num_samples) % len(held_labels)]
    log("[evaluate] floors (held-out n={:,} vs reference n={:,}): {}".format(
        n_held, n_ref, ", ".join(f"{m} {v:.3f}" for m, v in floors.items())))
    return ScaleReference(clf.fingerprint, clf.key, clf.accuracy, sample_labels, specs,
                          {m: sets["reference"][m].stats for m in specs}, floors, pr_reference, floor_precision,
                          floor_recall, num_samples, n_ref, n_held, n_pr)


def evaluate_at_scale(source, reference: ScaleReference, settings: EvalSettings, *, num_actors: int | None = None,
                      cpus_per_actor: int = 1, use_gpu: bool = False, log=print) -> Evaluation:
    """Sample ``settings.num_samples`` images from ``source`` (a ``pipelines.generate.model_source.ModelSource``) on
    the batch job's sampler actors and score them from per-shard partial sums: the same seeds, labels and pixels as
    :func:`evaluate_model` (and ``ddpm generate``), in memory bounded at any n."""
    from ddpm import FORWARD_ROWS
    from ddpm.metrics import frechet_distance_stats, precision_recall
    from pipelines.evaluate import features as ft
    from pipelines.generate.job import SHARD_IMAGES, Labels, Plan, Sampling, check_job
    from pipelines.generate.progress import ProgressLine
    from pipelines.generate.sampler_actor import run_shards

    n = reference.num_samples
    if settings.num_samples != n:
        raise ValueError(f"settings ask for {settings.num_samples} samples but the reference is for {n}")
    if source.num_classes:
        if int(reference.labels.max()) >= source.num_classes:
            raise UserError(f"the data has labels up to {int(reference.labels.max())} but the model knows "
                            f"{source.num_classes} classes")
        labels = Labels.per_image(reference.labels)
    else:
        labels = Labels.none()
    sampling = Sampling(settings.sampler, settings.steps, 0.0, settings.guidance_scale, FORWARD_ROWS)
    check_job(source, sampling, labels)
    plan = Plan(settings.seed, n, SHARD_IMAGES)
    reduction = ft.Reduction(list(reference.specs), source.image_shape)
    line = ProgressLine(n, what=f"[evaluate] {settings.row}: sampled and scored")

    def on_row(row: dict) -> None:
        reduction.add(row)
        line(reduction.count)

    sink = ft.FeatureSink(reference.specs, keep=reference.n_pr, grid=GRID_IMAGES)
    start = time.perf_counter()
    run_shards(source, plan, sampling, labels, sink, list(range(plan.num_shards)), num_actors=num_actors,
               cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, on_row=on_row, weights=settings.weights,
               errors_name="sampler actors")
    seconds = time.perf_counter() - start

    metrics: dict[str, float] = {}
    for metric in reference.specs:
        fd, floor = frechet_distance_stats(reduction.stats[metric], reference.stats[metric]), reference.floors[metric]
        metrics |= {metric: fd, f"{metric}_floor": floor, f"{metric}_ratio": fd / floor}
    kept = reduction.kept_features("fd_cls")[:reference.n_pr]
    metrics["precision"], metrics["recall"] = precision_recall(reference.pr_reference, kept)
    metrics |= {"precision_floor": reference.floor_precision, "recall_floor": reference.floor_recall,
                "classifier_accuracy": reference.classifier_accuracy, "images_per_s": n / seconds}
    log(f"[evaluate] {settings.row}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    warnings = bias_warnings(n)
    if reference.n_reference < n:
        warnings.append(f"the reference and held-out sets hold {reference.n_reference:,} and "
                        f"{reference.n_held_out:,} images (the data's halves), fewer than the {n:,} samples: the "
                        f"floor is at their n, so a ratio below 1 is possible")
    for warning in warnings:
        log(f"[evaluate] warning: {warning}")
    return Evaluation(settings, metrics, reduction.grid_images(), reference.identity(),
                      {"samples": n, "reference": reference.n_reference, "held_out": reference.n_held_out,
                       "precision_recall": reference.n_pr}, warnings)


# ---------------------------------------------------------------------------------------------------------------
# The sampler report


@dataclass
class Report:
    evaluations: list[Evaluation]
    markdown: str
    plot_png: bytes


def sampler_report(loaded, reference: Reference, base: EvalSettings, *, rows=REPORT_ROWS, tolerance: float = 0.1,
                   batch_size: int = 128, device: str = "cpu", log=print,
                   run: Callable[[EvalSettings], Evaluation] | None = None) -> Report:
    """Evaluate every (sampler, steps) of ``rows`` on the same seeds and labels; a markdown table and a plot.

    The answer line names the cheapest row whose FD-cls is within ``tolerance`` (10%) of DDPM-1000's, or better.
    ``run(settings)``: how one row is evaluated (default: :func:`evaluate_model` in this process).
    """
    from dataclasses import replace

    if run is None:
        def run(settings: EvalSettings) -> Evaluation:
            return evaluate_model(loaded, reference, settings, batch_size=batch_size, device=device, log=log)
    evaluations = [run(replace(base, sampler=s, steps=k)) for s, k in rows]
    return Report(evaluations, report_markdown(evaluations, tolerance), report_plot(evaluations))


def report_markdown(evaluations: list[Evaluation], tolerance: float = 0.1) -> str:
    """The report's table, and which row is the fewest steps at DDPM-1000's quality."""
    first = evaluations[0]
    lines = [f"n = {first.settings.num_samples:,} samples per row, seeds {first.settings.seed}.."
             f"{first.settings.seed + first.settings.num_samples - 1}, {first.settings.weights.upper()} weights, "
             f"guidance {first.settings.guidance_scale:g}; FD-cls floor (held-out vs train) "
             f"{first.metrics['fd_cls_floor']:.3f}, precision/recall floor {first.metrics['precision_floor']:.3f}/"
             f"{first.metrics['recall_floor']:.3f}.", "",
             "| sampler | steps | FD-cls | ratio to floor | precision | recall | images/s |",
             "|---|---|---|---|---|---|---|"]
    for e in evaluations:
        m = e.metrics
        lines.append(f"| {e.settings.sampler} | {e.settings.steps} | {m['fd_cls']:.3f} | {m['fd_cls_ratio']:.2f} | "
                     f"{m['precision']:.3f} | {m['recall']:.3f} | {m['images_per_s']:.1f} |")
    ddpm = next((e for e in evaluations if (e.settings.sampler, e.settings.steps) == ("ddpm", 1000)), None)
    if ddpm is not None:
        target = ddpm.metrics["fd_cls"] * (1 + tolerance)
        good = [e for e in evaluations if e is not ddpm and e.metrics["fd_cls"] <= target]
        lines.append("")
        if good:
            best = min(good, key=lambda e: (e.settings.steps, e.metrics["fd_cls"]))
            lines.append(f"Fewest steps at DDPM-1000's quality (FD-cls within {tolerance:.0%} of "
                         f"{ddpm.metrics['fd_cls']:.3f}, or better): {best.settings.sampler} with "
                         f"{best.settings.steps} steps (FD-cls {best.metrics['fd_cls']:.3f}, "
                         f"{best.metrics['images_per_s'] / ddpm.metrics['images_per_s']:.0f}x the images/s).")
        else:
            lines.append(f"No row with fewer steps comes within {tolerance:.0%} of DDPM-1000's FD-cls "
                         f"({ddpm.metrics['fd_cls']:.3f}).")
    return "\n".join(lines) + "\n"


def report_plot(evaluations: list[Evaluation]) -> bytes:
    """PNG: FD-cls ratio to the floor against steps (log scale), one line per sampler."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for sampler in dict.fromkeys(e.settings.sampler for e in evaluations):
        rows = sorted((e.settings.steps, e.metrics["fd_cls_ratio"]) for e in evaluations
                      if e.settings.sampler == sampler)
        ax.plot(*zip(*rows), marker="o", label=sampler)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="floor (real vs real)")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD-cls / floor")
    ax.set_title(f"Sample quality against steps (n = {evaluations[0].settings.num_samples})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Files and MLflow


def write_outputs(out: Path, evaluations: list[Evaluation], report: Report | None = None) -> list[Path]:
    """``evaluation.json`` (every number with its settings), ``samples_<row>.png`` grids, and the report files."""
    from ddpm import encode_png, make_grid

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "evaluation.json"]
    written[0].write_text(json.dumps([e.to_dict() for e in evaluations], indent=2, sort_keys=True))
    for e in evaluations:
        path = out / f"samples_{e.settings.row}.png"
        path.write_bytes(encode_png(make_grid(e.images[:GRID_IMAGES], ncols=10)))
        written.append(path)
    if report is not None:
        (out / "report.md").write_text(report.markdown)
        (out / "report.png").write_bytes(report.plot_png)
        written += [out / "report.md", out / "report.png"]
    return written


def log_to_mlflow(evaluations: list[Evaluation], files: list[Path], *, tracking_uri: str, run_id: str | None = None,
                  experiment: str = "evaluation", tags: dict[str, str] | None = None) -> str:
    """Log metrics (``<row>/<metric>``), settings tags and ``files`` (under ``evaluation/``); returns the run id.

    With ``run_id`` the numbers join that run (e.g. the training run); otherwise a new run in ``experiment`` is
    created and closed.
    """
    from mlflow.entities import Metric

    from pipelines import tracking

    client = tracking.client(tracking_uri)
    own_run = run_id is None
    if own_run:
        run_id = client.create_run(tracking.ensure_experiment(experiment, tracking_uri)).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"{e.settings.row}/{k}", float(v), now, 0) for e in evaluations for k, v in e.metrics.items()]
    client.log_batch(run_id, metrics=metrics)
    first = evaluations[0]
    settings = {f"eval.{k}": str(v) for k, v in asdict(first.settings).items() if k not in ("sampler", "steps")}
    for key, value in {**settings, **{f"eval.{k}": str(v) for k, v in first.identity.items()},
                       "eval.rows": ",".join(e.settings.row for e in evaluations), **(tags or {})}.items():
        client.set_tag(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------------------------
# The library entry point and the command line


def evaluate(model_uri: str, data: str, settings: EvalSettings, *, report: bool = False,
             inception_weights: str | Path | None = None, out: str | Path | None = None,
             tracking_uri: str | None = None, run_id: str | None = None, experiment: str = "evaluation",
             device: str = "cpu", num_actors: int | None = None, cpus_per_actor: int = 1, use_gpu: bool = False,
             log=print) -> tuple[list[Evaluation], Report | None]:
    """Resolve the model, prepare the real side, evaluate (one row, or every report row), write and log.

    In this process for small n; on Ray Data actors (:func:`evaluate_at_scale`) from ``SCALE_FROM`` samples, above
    the data's halves, or when ``num_actors`` / ``use_gpu`` ask for it.
    """
    from ddpm import checkpoint
    from pipelines import tracking
    from pipelines.registry import resolve_model

    inception = InceptionFeatures(inception_weights) if inception_weights else None  # a bad path fails first
    resolved = resolve_model(model_uri, tracking_uri)
    loaded = checkpoint.load(resolved.path, device=device, weights=settings.weights)
    c, h, w = loaded.image_shape  # a latent model's decoded images
    images, labels = load_data(data, h)
    shape = tuple(images.shape[1:])
    if shape != (h, w, c):
        raise UserError(f"{data} holds {'x'.join(map(str, shape))} images but the model makes {h}x{w}x{c}")
    from pipelines.evaluate.classifier import split

    halves = min(len(part) for part in split(len(images)))
    if use_scale(settings.num_samples, halves, num_actors, use_gpu):
        from pipelines.generate.model_source import ModelSource

        source = ModelSource.resolve(model_uri, tracking_uri)
        reference = prepare_reference_at_scale(images, labels, data=data, num_samples=settings.num_samples,
                                               inception_weights=inception_weights, num_actors=num_actors,
                                               cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, log=log)

        def run(s: EvalSettings) -> Evaluation:
            return evaluate_at_scale(source, reference, s, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                                     use_gpu=use_gpu, log=log)
    else:
        reference = prepare_reference(images, labels, num_samples=settings.num_samples, inception=inception, log=log)

        def run(s: EvalSettings) -> Evaluation:
            return evaluate_model(loaded, reference, s, device=device, log=log)
    if report:
        rep = sampler_report(loaded, reference, settings, device=device, log=log, run=run)
        evaluations = rep.evaluations
    else:
        rep, evaluations = None, [run(settings)]
    files = write_outputs(Path(out), evaluations, rep) if out else []
    if tracking_uri or run_id:
        model_tags = {"eval.model": model_uri} | (
            {"eval.model_name": resolved.name, "eval.model_version": resolved.version} if resolved.name else {})
        logged = log_to_mlflow(evaluations, files, tracking_uri=tracking_uri or tracking.tracking_uri(),
                               run_id=run_id, experiment=experiment, tags=model_tags)
        log(f"[evaluate] logged to MLflow run {logged}")
    return evaluations, rep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddpm import SAMPLERS
    from pipelines.actors import add_actor_arguments

    parser.add_argument("--model", required=True, metavar="URI",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local checkpoint folder")
    parser.add_argument("--data", required=True, metavar="URI",
                        help="a preprocessed dataset (s3://... or a folder with manifest.json), or 'digits'")
    parser.add_argument("--num-samples", type=int, default=EvalSettings.num_samples, metavar="N",
                        help="samples, reference and held-out images per comparison (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=EvalSettings.sampler,
                        help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=EvalSettings.steps, metavar="S", help="default: %(default)s")
    parser.add_argument("--guidance-scale", type=float, default=EvalSettings.guidance_scale, metavar="W",
                        help="classifier-free guidance for class-conditional models (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=EvalSettings.seed, metavar="K",
                        help="sample i uses seed K+i (default: %(default)s)")
    parser.add_argument("--weights", choices=("ema", "model"), default=EvalSettings.weights,
                        help="which weights to sample with (default: %(default)s)")
    parser.add_argument("--metric", choices=METRICS, default="fd_cls",
                        help="the headline number; fid needs --inception-weights (default: %(default)s)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="TorchScript Inception-v3 file (e.g. pt_inception-2015-12-05.pt): adds FID")
    parser.add_argument("--report", action="store_true",
                        help="compare DDPM-1000, DDIM-10/20/50/100 and DPM-Solver++-10/20 (ignores --sampler/--steps)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write evaluation.json, sample grids, report")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow server to log to (default: $MLFLOW_TRACKING_URI; unset: no logging)")
    parser.add_argument("--run-id", default=None, help="log into this MLflow run (e.g. the training run)")
    parser.add_argument("--experiment", default="evaluation", help="MLflow experiment for a new run")
    parser.add_argument("--device", default="cpu", help="torch device in this process (default: cpu)")
    scale = parser.add_argument_group(
        f"at scale (from {SCALE_FROM:,} samples, more than the data's halves hold, or when asked with "
        f"--num-actors/--use-gpu): samples and features on Ray Data actors")
    add_actor_arguments(scale, "sampler (and feature) actors")

def main(args: argparse.Namespace) -> int:
    import os

    if args.metric == "fid" and not args.inception_weights:
        raise UserError("--metric fid needs Inception-v3 weights: pass --inception-weights PATH "
                        "(a TorchScript file such as pt_inception-2015-12-05.pt)")
    if args.num_samples < 2:
        raise UserError(f"--num-samples must be at least 2, got {args.num_samples}")
    settings = EvalSettings(args.num_samples, args.sampler, args.steps, args.guidance_scale, args.seed, args.weights)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.cpus_per_actor < 1:
        raise UserError(f"--cpus-per-actor must be at least 1, got {args.cpus_per_actor}")
    evaluations, report = evaluate(args.model, args.data, settings, report=args.report,
                                   inception_weights=args.inception_weights, out=args.out,
                                   tracking_uri=tracking_uri, run_id=args.run_id, experiment=args.experiment,
                                   device=args.device, num_actors=args.num_actors,
                                   cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu)
    if report is not None:
        print(report.markdown, end="")
    else:
        m = evaluations[0].metrics
        print(f"{settings.row}: {args.metric} {m[args.metric]:.4f} (floor {m[args.metric + '_floor']:.4f}, "
              f"ratio {m[args.metric + '_ratio']:.2f}), precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
              f"{m['images_per_s']:.1f} images/s, n={settings.num_samples}")
    if args.out:
        print(f"wrote {args.out}/evaluation.json")
    return 0
