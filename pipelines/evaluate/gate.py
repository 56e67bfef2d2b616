"""The promotion gate: a new model version takes the ``production`` alias only if it beats the one that holds it.

Two parts, so that the rule can be read and tested without a server:

- :func:`decide_promotion` is the rule, a pure function of two evaluations' numbers. First an absolute bar: the
  candidate's metric over its real-vs-real floor must be at most ``max_ratio`` and its recall at least
  ``min_recall`` (the presets set both from measured good runs), and for a text model, optionally, its alignment
  on seen compositions with every attribute read right (``align_seen_all``) at least ``min_alignment``, so that a
  first version is not promoted just for having no incumbent. Then promote when there is no incumbent, or when
  the candidate's metric (FD-cls, or FID when configured; lower is better) is strictly lower. A tie keeps the incumbent: a new version has to earn the switch.
- :func:`evaluate_and_gate` makes the comparison fair and leaves a trace: it evaluates the candidate and the
  incumbent *in the same call*, with one :class:`~pipelines.evaluate.quality.EvalSettings` (sample count, seeds, sampler,
  steps, guidance, EMA weights) and one prepared reference (same data, same classifier, same floor), logs the
  candidate's evaluation into its training run, and records the decision and both numbers as tags on the candidate
  version. Re-evaluating the incumbent rather than trusting a number stored earlier is what makes "same settings"
  true even after the data, the classifier recipe or the defaults changed.

Moving the alias is left to the caller (``ddpm pipeline``), which owns the order of its stages.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.errors import UserError
from pipelines.evaluate.quality import METRICS  # lower is better for both
TAG_PREFIX = "gate."
# The alignment bar's number: seen compositions, every attribute the prompt names read right (colour, shape, size or
# relation, and the object count), one number that fails if any attribute does.
ALIGNMENT = "align_seen_all"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_value: float | None
    incumbent_value: float | None
    metrics: dict = field(default_factory=dict)  # the candidate's full evaluation (empty if it was not evaluated)


def decide_promotion(candidate: dict, incumbent: dict | None, metric: str = "fd_cls", *,
                     max_ratio: float | None = None, min_recall: float | None = None,
                     min_alignment: float | None = None) -> Decision:
    """Promote ``candidate`` over ``incumbent`` (metric dicts, e.g. ``{"fd_cls": 2.9, "fd_cls_ratio": 1.2,
    "recall": 0.9, ...}``; None: no incumbent)?

    The bar: ``candidate[metric + "_ratio"] <= max_ratio``, ``candidate["recall"] >= min_recall`` and
    ``candidate[ALIGNMENT] >= min_alignment`` (None: not checked). Both dicts must come from evaluations with
    identical settings; :func:`evaluate_and_gate` guarantees that.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r}; expected one of {METRICS}")
    if metric not in candidate:
        raise ValueError(f"the candidate's evaluation has no {metric!r} (has: {sorted(candidate)})")
    value = float(candidate[metric])
    if not math.isfinite(value):
        return Decision(False, f"candidate {metric} is {value}", value, None, dict(candidate))
    below_bar = bar_failure(candidate, metric, max_ratio, min_recall, min_alignment)
    if below_bar:
        return Decision(False, below_bar, value, None, dict(candidate))
    if incumbent is None:
        return Decision(True, f"no incumbent; candidate {metric} {value:.4g}", value, None, dict(candidate))
    if metric not in incumbent:
        raise ValueError(f"the incumbent's evaluation has no {metric!r} (has: {sorted(incumbent)})")
    best = float(incumbent[metric])
    if value < best:
        return Decision(True, f"{metric} {value:.4g} < incumbent's {best:.4g}", value, best, dict(candidate))
    return Decision(False, f"{metric} {value:.4g} >= incumbent's {best:.4g}", value, best, dict(candidate))


def bar_failure(candidate: dict, metric: str, max_ratio: float | None, min_recall: float | None,
                min_alignment: float | None = None) -> str | None:
    """Why ``candidate`` fails the absolute bar, or None when it clears it."""
    ratio_key = f"{metric}_ratio"
    if max_ratio is not None:
        if ratio_key not in candidate:
            raise ValueError(f"the candidate's evaluation has no {ratio_key!r} to hold against the bar")
        ratio = float(candidate[ratio_key])
        if not ratio <= max_ratio:  # NaN fails too
            return f"below the bar: {metric} {float(candidate[metric]):.4g} is {ratio:.3g}x its floor (at most " \
                   f"{max_ratio:g}x)"
    if min_recall is not None:
        if "recall" not in candidate:
            raise ValueError("the candidate's evaluation has no 'recall' to hold against the bar")
        recall = float(candidate["recall"])
        if not recall >= min_recall:
            return f"below the bar: recall {recall:.3g} (at least {min_recall:g})"
    if min_alignment is not None:
        if ALIGNMENT not in candidate:
            raise ValueError(f"the candidate's evaluation has no {ALIGNMENT!r} to hold against the alignment bar "
                             f"(only a text model's evaluation has one)")
        aligned = float(candidate[ALIGNMENT])
        if not aligned >= min_alignment:
            return f"below the bar: {ALIGNMENT} {aligned:.3g} (at least {min_alignment:g})"
    return None


def evaluate_and_gate(name: str, version: str, *, data: str, alias: str = "production", metric: str = "fd_cls",
                      num_samples: int = 500, sampler: str = "ddim", steps: int = 50, seed: int = 0,
                      guidance_scale: float = 1.0, inception_weights: str | None = None,
                      max_ratio: float | None = None, min_recall: float | None = None,
                      min_alignment: float | None = None, images_per_prompt: int | None = None,
                      clip: str | None = None, tracking_uri: str | None = None, device: str = "cpu",
                      log=print) -> Decision:
    """Evaluate ``name`` version ``version`` and the version holding ``alias`` alike; decide; tag the candidate.

    Tags written on the candidate version: ``gate.decision`` (promote / keep), ``gate.reason``, ``gate.metric``,
    ``gate.candidate_value``, ``gate.incumbent_value`` and ``gate.incumbent_version`` ("none" without one),
    ``gate.alias``, ``gate.settings`` (JSON: the evaluation settings, dataset fingerprint and classifier) and the
    bar: ``gate.max_ratio``, ``gate.min_recall``, ``gate.min_alignment`` ("none" when unset), ``gate.alignment``
    (the candidate's align_seen_all, "none" for a model without one) and ``gate.bar`` (passed / failed).

    A text model is evaluated as ``ddpm evaluate`` evaluates one (:mod:`pipelines.evaluate.text_eval`): prompted
    with the held-out captions for FD-cls, plus alignment on the evaluation prompts (``images_per_prompt`` each)
    and the CLIP score (``clip``, default its text encoder's CLIP).
    """
    from ddpm import checkpoint
    from pipelines.evaluate import quality as ev
    from pipelines import tracking
    from pipelines.registry import resolve_model

    if metric == "fid" and not inception_weights:
        raise UserError("gate metric fid needs Inception-v3 weights: set pipeline.inception_weights "
                        "(--inception-weights PATH for ddpm evaluate)")
    uri = tracking_uri or tracking.tracking_uri()
    client = tracking.client(uri)
    version = str(version)
    incumbent_version = client.get_registered_model(name).aliases.get(alias)
    if incumbent_version is not None and str(incumbent_version) == version:
        decision = Decision(False, f"version {version} already holds {alias}", None, None)
        record_decision(client, name, version, decision, metric, alias, None, {}, max_ratio, min_recall,
                        min_alignment)
        return decision

    settings = ev.EvalSettings(num_samples=num_samples, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                               seed=seed)
    inception = ev.InceptionFeatures(inception_weights) if inception_weights else None
    candidate = checkpoint.load(resolve_model(f"models:/{name}/{version}", uri).path, device=device)
    incumbent = (checkpoint.load(resolve_model(f"models:/{name}/{incumbent_version}", uri).path, device=device)
                 if incumbent_version is not None else None)
    images, labels = ev.load_data(data, candidate.image_shape[1])  # a latent model's decoded side
    captions = ev.text_captions(data) if candidate.prompt_encoder is not None else None
    reference = ev.prepare_reference(images, labels, num_samples=num_samples, inception=inception,
                                     captions=captions, log=log)
    text = None
    if captions is not None:
        from pipelines.evaluate import alignment
        from pipelines.evaluate.classifier import split
        from pipelines.evaluate.real import RealData
        from pipelines.evaluate.text_eval import prepare_text

        text = prepare_text(RealData.in_memory(images, labels), captions, reference.fingerprint,
                            split(len(images))[1][:num_samples],
                            images_per_prompt=images_per_prompt or alignment.IMAGES_PER_PROMPT, clip_uri=clip,
                            checkpoint_path=resolve_model(f"models:/{name}/{version}", uri).path, tracking_uri=uri,
                            log=log)
    log(f"[gate] evaluating {name} version {version} ({settings.row}, guidance {guidance_scale:g}, n={num_samples})")
    evaluated = ev.evaluate_model(candidate, reference, settings, text=text, device=device, log=log)
    _log_evaluation(client, name, version, evaluated, uri)

    below_bar = bar_failure(evaluated.metrics, metric, max_ratio, min_recall, min_alignment)
    if below_bar:  # the incumbent need not be evaluated: the candidate is out whatever it scores
        decision = Decision(False, below_bar, evaluated.metrics.get(metric), None, evaluated.metrics)
    elif incumbent is not None and incumbent.image_shape != candidate.image_shape:
        decision = Decision(False, f"incumbent version {incumbent_version} makes {incumbent.image_shape} images, "
                                   f"the candidate {candidate.image_shape}: not comparable, promote by hand",
                            evaluated.metrics.get(metric), None, evaluated.metrics)
    else:
        incumbent_metrics = None
        if incumbent is not None:
            log(f"[gate] evaluating the incumbent, {name} version {incumbent_version} ({alias})")
            incumbent_metrics = ev.evaluate_model(incumbent, reference, settings, device=device, log=log).metrics
        decision = decide_promotion(evaluated.metrics, incumbent_metrics, metric, max_ratio=max_ratio,
                                    min_recall=min_recall, min_alignment=min_alignment)
    record_decision(client, name, version, decision, metric, alias, incumbent_version, evaluated.to_dict(),
                    max_ratio, min_recall, min_alignment)
    return decision


def _log_evaluation(client, name: str, version: str, evaluated, uri: str) -> None:
    """The candidate's numbers, settings and sample grid into the run that trained it (if the version names one)."""
    from pipelines.evaluate.quality import log_to_mlflow, write_outputs

    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-gate-") as tmp:
        files = write_outputs(Path(tmp), [evaluated])
        log_to_mlflow([evaluated], files, tracking_uri=uri, run_id=run_id,
                      tags={"eval.model": f"models:/{name}/{version}"})


def record_decision(client, name: str, version: str, decision: Decision, metric: str, alias: str,
                    incumbent_version: str | None, evaluation: dict, max_ratio: float | None = None,
                    min_recall: float | None = None, min_alignment: float | None = None) -> None:
    """The decision, both numbers, the evaluation settings and the bar, as ``gate.*`` tags on the version."""

    def number(x: float | None) -> str:
        return "none" if x is None else f"{x:.6g}"

    settings = {k: evaluation[k] for k in ("settings", "dataset_fingerprint", "classifier", "extractors",
                                           "alignment_reader", "alignment_prompts", "images_per_prompt", "clip")
                if k in evaluation}
    bar = "failed" if decision.reason.startswith("below the bar") else "passed" if evaluation else "unchecked"
    tags = {"decision": "promote" if decision.promote else "keep", "reason": decision.reason, "metric": metric,
            "alias": alias, "candidate_value": number(decision.candidate_value),
            "incumbent_value": number(decision.incumbent_value),
            "incumbent_version": str(incumbent_version) if incumbent_version is not None else "none",
            "settings": json.dumps(settings, sort_keys=True), "max_ratio": number(max_ratio),
            "min_recall": number(min_recall), "min_alignment": number(min_alignment),
            "alignment": number((evaluation.get("metrics") or {}).get(ALIGNMENT)), "bar": bar}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, TAG_PREFIX + key, value)

