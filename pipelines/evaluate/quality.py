"""The evaluation: how good are a model's samples? FD-cls beside its floor, precision/recall, FID.

The measurement, for a model and a labelled dataset::

    real data   split once (pipelines.evaluate.classifier.split): a train half and a held-out half
    extractor   FD-cls: a small CNN classifier trained on the train half (cached per dataset); FID: Inception-v3
                pool features (2048-d) from a TorchScript file the user provides (--inception-weights)
    reference   n images of the train half                                       -> features R
    floor       n images of the held-out half                                    -> features H
    model       n samples, seeds K..K+n-1, EMA weights, the stated sampler and steps, quantised to uint8 (exactly
                what a user receives), labelled like the held-out images when the model is class-conditional,
                prompted with the held-out images' captions when it is a text model       -> features G
    numbers     fd = FD(G, R); floor = FD(H, R); ratio = fd / floor; precision, recall = P/R(R, G) (k = 3)

Why the floor: a Fréchet distance estimated from n samples is biased upwards by roughly (feature dimension / n),
so even two halves of the same dataset are at a distance > 0, and that distance depends on n and on the extractor.
The floor is what a perfect generator would score under the same settings; ``ratio`` = 1 means "as close to the
data as fresh real images are". Every set has the same n, so fd and floor carry the same bias.

Every number is named with its sampler and steps (``ddim50/fd_cls``) and logged to MLflow with the settings, the
sample grid and ``evaluation.json`` (which holds everything; :mod:`pipelines.evaluate.results`). ``--report``
repeats the measurement for DDPM-1000, DDIM-10/20/50/100 and DPM-Solver++-10/20 on the same seeds
(:mod:`pipelines.evaluate.report`). A text model also gets alignment on fixed evaluation prompts and a CLIP score
(:mod:`pipelines.evaluate.text_eval`), and ``--guidance-sweep`` evaluates it at several guidance scales.

Two paths, one metric block (:func:`scored`): in this process for small n (:func:`evaluate_model`), and at scale on
Ray Data actors (:func:`evaluate_at_scale`), where the samples and the real images stream through actors that return
per-block moments (:mod:`pipelines.evaluate.features`). Either way the real side is read through
:class:`pipelines.evaluate.real.RealData`: only the rows a comparison uses (and, once per dataset, the classifier's
training rows) are ever in the driver's memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipelines.errors import UserError
from pipelines.evaluate.inception import InceptionFeatures
from pipelines.evaluate.real import RealData, load_data
from pipelines.evaluate.report import Report, guidance_report, sampler_report
from pipelines.evaluate.results import GRID_IMAGES, log_to_mlflow, write_outputs

if TYPE_CHECKING:
    import numpy as np

    from ddpm.metrics import FeatureStats

__all__ = ["METRICS", "SCALE_FROM", "EvalSettings", "Reference", "ScaleReference", "Evaluation", "InceptionFeatures",
           "load_data", "prepare_reference", "reference_from", "evaluate_model", "prepare_reference_at_scale",
           "evaluate_at_scale", "scored", "evaluate", "write_outputs", "log_to_mlflow"]

METRICS = ("fd_cls", "fid")  # headline metrics: lower is better
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
    captions: list | None = None                # (n,) the held-out images' captions: a text model's prompts

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    n_reference = n_held_out = n_pr = num_samples  # every set holds n images

    @cached_property
    def stats(self) -> dict[str, "FeatureStats"]:
        """metric -> moments of the reference features, what :func:`scored` compares with."""
        from ddpm.metrics import FeatureStats

        return {m: FeatureStats.of(f) for m, f in self.reference.items()}

    @property
    def pr_reference(self) -> "np.ndarray":
        return self.reference["fd_cls"]

    def identity(self) -> dict:
        """What a number depends on besides the model and the sampler settings."""
        return {"dataset_fingerprint": self.fingerprint, "classifier": self.classifier_key,
                "extractors": sorted(self.extractors)}


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


@dataclass
class Evaluation:
    """One model under one :class:`EvalSettings`: the numbers, and the images they were computed from."""

    settings: EvalSettings
    metrics: dict[str, float]    # fd_cls, fd_cls_floor, fd_cls_ratio, precision, recall, ..., images_per_s
    images: "np.ndarray"         # (n, H, W, C) uint8; at scale only the first GRID_IMAGES (the grid's)
    identity: dict
    n: dict = field(default_factory=dict)         # samples, reference, held_out, precision_recall: the n of each set
    warnings: list = field(default_factory=list)  # e.g. the small-n bias of Fréchet distances
    suffix: str = ""                              # added to the row's name, e.g. "_w3" in a guidance sweep

    @property
    def row(self) -> str:
        """The name its numbers and files carry: ``ddim50``, or ``ddim50_w3`` in a guidance sweep."""
        return self.settings.row + self.suffix

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "row": self.row, "metrics": self.metrics, "n": self.n,
                "warnings": self.warnings, **self.identity}


def bias_warnings(n: int) -> list[str]:
    """The warning evaluation.json carries (and the log prints) when n is too small for an unbiased FD."""
    if n >= BIAS_WARNING_N:
        return []
    return [f"n = {n:,} samples < {BIAS_WARNING_N:,}: FID (and FD-cls) are biased upwards at this size, by roughly "
            f"the feature dimension / n; compare numbers only at the same n (FD-cls beside its floor at that n), "
            f"and use --num-samples 50000 for a number comparable with papers' FID-50k"]


# ---------------------------------------------------------------------------------------------------------------
# The metric block both paths share


def scored(reference: Reference | ScaleReference, settings: EvalSettings, samples: dict[str, "FeatureStats"],
           pr_samples: "np.ndarray", images: "np.ndarray", seconds: float, log=print) -> Evaluation:
    """The numbers of one evaluation from the samples' moments per metric and their first FD-cls features.

        fd = FD(samples, reference)   floor = FD(held-out, reference)   ratio = fd / floor
        precision, recall = P/R(reference, samples) in FD-cls features (k = 3)
    """
    from ddpm.metrics import frechet_distance_stats, precision_recall

    n = reference.num_samples
    metrics: dict[str, float] = {}
    for metric, stats in samples.items():
        fd, floor = frechet_distance_stats(stats, reference.stats[metric]), reference.floors[metric]
        metrics |= {metric: fd, f"{metric}_floor": floor, f"{metric}_ratio": fd / floor}
    metrics["precision"], metrics["recall"] = precision_recall(reference.pr_reference, pr_samples[:reference.n_pr])
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
    return Evaluation(settings, metrics, images, reference.identity(),
                      {"samples": n, "reference": reference.n_reference, "held_out": reference.n_held_out,
                       "precision_recall": reference.n_pr}, warnings)


def _check_labels(reference: Reference | ScaleReference, num_classes: int) -> bool:
    """Whether samples are labelled like the held-out images (a class-conditional model); refuses labels it lacks."""
    if not num_classes:
        return False
    if int(reference.labels.max()) >= num_classes:
        raise UserError(f"the data has labels up to {int(reference.labels.max())} but the model knows "
                        f"{num_classes} classes")
    return True


# ---------------------------------------------------------------------------------------------------------------
# In this process


def prepare_reference(images: "np.ndarray", labels: "np.ndarray", *, num_samples: int,
                      inception: InceptionFeatures | None = None, captions: list | None = None,
                      log=print) -> Reference:
    """:func:`reference_from` for a dataset held in memory."""
    return reference_from(RealData.in_memory(images, labels), num_samples=num_samples, inception=inception,
                          captions=captions, log=log)


def reference_from(real: RealData, *, num_samples: int, inception: InceptionFeatures | None = None,
                   captions: list | None = None, log=print) -> Reference:
    """Train (or load) the classifier, read the reference and held-out images, compute features and floors.
    ``captions`` (row-aligned with ``real``): a text model's data, whose held-out captions become its prompts."""
    from ddpm.metrics import frechet_distance_features, precision_recall
    from pipelines.evaluate import classifier as cls

    clf = cls.load_or_train_streamed(real, log=log)
    available = min(len(clf.train_index), len(clf.held_out_index))
    if not 2 <= num_samples <= available:
        raise UserError(f"--num-samples {num_samples}: this dataset's halves hold {available} images each; "
                        f"choose 2..{available}")
    ref_images = real.take(clf.train_index[:num_samples])
    held_images = real.take(clf.held_out_index[:num_samples])
    extractors = {"fd_cls": clf.features}
    if inception is not None:
        extractors["fid"] = inception
    ref = Reference(clf.fingerprint, clf.key, clf.accuracy, real.labels[clf.held_out_index[:num_samples]],
                    extractors)
    if captions is not None:
        ref.captions = [captions[i] for i in clf.held_out_index[:num_samples]]
    for metric, extract in extractors.items():
        ref.reference[metric] = extract(ref_images)
        held = extract(held_images)
        ref.floors[metric] = frechet_distance_features(held, ref.reference[metric])
        if metric == "fd_cls":
            ref.floor_precision, ref.floor_recall = precision_recall(ref.reference[metric], held)
    log("[evaluate] floors (held-out vs train, n={}): {}".format(
        num_samples, ", ".join(f"{m} {v:.3f}" for m, v in ref.floors.items())))
    return ref


def evaluate_model(loaded, reference: Reference, settings: EvalSettings, *, text=None, batch_size: int = 128,
                   device: str = "cpu", log=print) -> Evaluation:
    """Sample ``reference.num_samples`` images from ``loaded`` (a ``ddpm.checkpoint.LoadedModel``) and score them.

    ``settings.num_samples`` must match the reference's n (the floor is only the floor at that n). A text model is
    prompted with the reference's held-out captions; with ``text`` (a ``text_eval.TextReference``) its alignment
    and CLIP score join the numbers.
    """
    from ddpm import from_labels, generate_images, image_seeds
    from ddpm.metrics import FeatureStats

    n = reference.num_samples
    if settings.num_samples != n:
        raise ValueError(f"settings ask for {settings.num_samples} samples but the reference holds {n}")
    if loaded.prompt_encoder is not None:
        if reference.captions is None:
            raise UserError("a text model is evaluated on captioned data (ddpm preprocess --captions): its samples "
                            "are prompted with the held-out images' captions")
        condition = loaded.condition(n, prompts=reference.captions)
    else:
        condition = from_labels(reference.labels if _check_labels(reference, loaded.config.num_classes) else None, n)
    loaded.model.to(device)
    start = time.perf_counter()
    # The core's one path: the same pixels as ddpm generate and POST /generate for these seeds and settings.
    images = generate_images(loaded, image_seeds(settings.seed, n), condition=condition, sampler=settings.sampler,
                             steps=settings.steps, guidance_scale=settings.guidance_scale, batch_size=batch_size)
    seconds = time.perf_counter() - start
    features = {metric: extract(images) for metric, extract in reference.extractors.items()}
    evaluation = scored(reference, settings, {m: FeatureStats.of(f) for m, f in features.items()},
                        features["fd_cls"], images, seconds, log)
    if text is not None:
        from pipelines.evaluate.text_eval import text_metrics

        metrics, _ = text_metrics(loaded, text, settings, batch_size=batch_size, log=log)
        evaluation.metrics |= metrics
        evaluation.identity |= text.identity()
    return evaluation


# ---------------------------------------------------------------------------------------------------------------
# At scale: Ray Data actors for the samples and the real images' features, the real side's statistics cached
# beside the data


def use_scale(num_samples: int, available: int, num_actors: int | None, use_gpu: bool) -> bool:
    """Whether ``ddpm evaluate`` runs on Ray Data actors: many samples, more than a half holds, or actors asked for."""
    return num_samples >= SCALE_FROM or num_samples > available or num_actors is not None or use_gpu


def prepare_reference_at_scale(real: RealData, *, num_samples: int, inception_weights: str | Path | None = None,
                               num_actors: int | None = None, cpus_per_actor: int = 1, use_gpu: bool = False,
                               log=print) -> ScaleReference:
    """The classifier (cached), then per set (reference, held-out) and extractor: {mean, cov, n} from the cache
    beside the data, or from feature actors that read the set's shards themselves, and then cached."""
    import numpy as np

    from ddpm.metrics import frechet_distance_stats, precision_recall
    from pipelines.evaluate import classifier as cls
    from pipelines.evaluate import features as ft

    if num_samples < 2:
        raise UserError(f"--num-samples must be at least 2, got {num_samples}")
    clf = cls.load_or_train_streamed(real, log=log)
    specs = {"fd_cls": ft.ExtractorSpec("fd_cls", "classifier", clf.to_bytes(), clf.weights_sha256()[:16])}
    if inception_weights:
        inception = InceptionFeatures(inception_weights)  # a bad file fails here, in one line, before any actor starts
        specs["fid"] = ft.ExtractorSpec("fid", "inception", Path(inception_weights).expanduser().read_bytes(),
                                        inception.key.split("-", 1)[1])
    n_ref, n_held = min(num_samples, len(clf.train_index)), min(num_samples, len(clf.held_out_index))
    n_pr = min(num_samples, n_ref, n_held, PR_SAMPLES)
    root = ft.cache_root(real.uri)
    sets = {}
    for role, rows in (("reference", clf.train_index[:n_ref]), ("held_out", clf.held_out_index[:n_held])):
        keys = {m: ft.cache_key(clf.fingerprint, cls.recipe_hash(), spec, role, len(rows)) for m, spec in specs.items()}
        found = {m: ft.read_cached(root, keys[m], log) for m in specs}
        missing = {m: specs[m] for m, c in found.items() if c is None or (m == "fd_cls" and len(c.kept) < n_pr)}
        if missing:
            log(f"[evaluate] {role} features of {len(rows):,} images on feature actors: {', '.join(missing)}")
            reduction = ft.real_stats(real, rows, missing, keep=PR_SAMPLES, num_actors=num_actors,
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
    held_labels = real.labels[clf.held_out_index]
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
    from pipelines.evaluate import features as ft
    from pipelines.generate.job import SHARD_IMAGES, Labels, Plan, Sampling, check_job
    from pipelines.generate.progress import ProgressLine
    from pipelines.generate.sampler_actor import run_shards

    n = reference.num_samples
    if settings.num_samples != n:
        raise ValueError(f"settings ask for {settings.num_samples} samples but the reference is for {n}")
    labels = Labels.per_image(reference.labels) if _check_labels(reference, source.num_classes) else Labels.none()
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
    return scored(reference, settings, reduction.stats, reduction.kept_features("fd_cls"), reduction.grid_images(),
                  seconds, log)


# ---------------------------------------------------------------------------------------------------------------
# The library entry point


def text_captions(data: str) -> list[str]:
    """A text model's evaluation data: its captions, row-aligned with the images (``ddpm preprocess --captions``)."""
    from pipelines.data.dataset import load_captions

    if data == "digits":
        raise UserError("a text model is evaluated on captioned data (e.g. ddpm data shapes, then ddpm preprocess "
                        "--captions), not digits")
    return load_captions(data)


def evaluate(model_uri: str, data: str, settings: EvalSettings, *, report: bool = False,
             inception_weights: str | Path | None = None, out: str | Path | None = None,
             tracking_uri: str | None = None, run_id: str | None = None, experiment: str = "evaluation",
             device: str = "cpu", num_actors: int | None = None, cpus_per_actor: int = 1, use_gpu: bool = False,
             clip: str | None = None, images_per_prompt: int | None = None,
             guidance_sweep: list[float] | None = None, log=print) -> tuple[list[Evaluation], Report | None]:
    """Resolve the model, prepare the real side, evaluate (one row, every report row, or every guidance scale of
    ``guidance_sweep``), write and log.

    In this process for small n; on Ray Data actors (:func:`evaluate_at_scale`) from ``SCALE_FROM`` samples, above
    the data's halves, or when ``num_actors`` / ``use_gpu`` ask for it. A text model (in this process only) also
    gets alignment and a CLIP score (``clip``: a registered CLIP's URI, default the one its text encoder came from;
    ``images_per_prompt``: N per evaluation prompt).
    """
    from ddpm import checkpoint
    from pipelines import tracking
    from pipelines.evaluate.classifier import split
    from pipelines.registry import resolve_model

    inception = InceptionFeatures(inception_weights) if inception_weights else None  # a bad path fails first
    resolved = resolve_model(model_uri, tracking_uri)
    loaded = checkpoint.load(resolved.path, device=device, weights=settings.weights)
    c, h, w = loaded.image_shape  # a latent model's decoded images
    text_model = loaded.prompt_encoder is not None
    if guidance_sweep and not text_model:
        raise UserError("--guidance-sweep plots alignment against FD-cls: it is for text models")
    captions = text_captions(data) if text_model else None
    real = RealData.open(data, h)  # the manifest and the labels: the images are read where they are needed
    if real.image_shape != (h, w, c):
        raise UserError(f"{data} holds {'x'.join(map(str, real.image_shape))} images but the model makes "
                        f"{h}x{w}x{c}")
    halves = min(len(part) for part in split(len(real)))
    if text_model and use_scale(settings.num_samples, halves, num_actors, use_gpu):
        raise UserError(f"a text model is evaluated in this process: --num-samples up to {halves} (the data's "
                        f"halves) and no --num-actors / --use-gpu")
    if use_scale(settings.num_samples, halves, num_actors, use_gpu):
        from pipelines.generate.model_source import ModelSource

        source = ModelSource.resolve(model_uri, tracking_uri)
        reference = prepare_reference_at_scale(real, num_samples=settings.num_samples,
                                               inception_weights=inception_weights, num_actors=num_actors,
                                               cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, log=log)

        def run(s: EvalSettings) -> Evaluation:
            return evaluate_at_scale(source, reference, s, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                                     use_gpu=use_gpu, log=log)
    else:
        reference = reference_from(real, num_samples=settings.num_samples, inception=inception, captions=captions,
                                   log=log)
        text = None
        if text_model:
            from pipelines.evaluate import alignment
            from pipelines.evaluate.text_eval import prepare_text

            text = prepare_text(real, captions, reference.fingerprint, split(len(real))[1][:settings.num_samples],
                                images_per_prompt=images_per_prompt or alignment.IMAGES_PER_PROMPT, clip_uri=clip,
                                checkpoint_path=resolved.path, tracking_uri=tracking_uri, log=log)

        def run(s: EvalSettings) -> Evaluation:
            return evaluate_model(loaded, reference, s, text=text, device=device, log=log)
    if guidance_sweep:
        rep = guidance_report(settings, run, guidance_sweep)
        evaluations = rep.evaluations
    elif report:
        rep = sampler_report(settings, run)
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
