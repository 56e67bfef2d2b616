"""Run configuration: YAML presets in ``configs/`` loaded into typed, frozen dataclasses.

A file has four sections, each mapped onto one dataclass; an unknown key anywhere is an error that names it::

    model:    {preset: digits, base_channels: 32, ...}     # -> ddpm.UNetConfig (preset first, then the fields)
    schedule: {kind: linear, num_timesteps: 1000, ...}     # -> ScheduleConfig
    train:    {batch_size: 128, lr: 2.0e-4, ...}           # -> TrainConfig
    pipeline: {processed: s3://bucket/digits, ...}         # -> PipelineConfig (used by ddpm pipeline)

Overrides use dotted keys, ``--set train.lr=1e-3 model.base_channels=64``, values parsed as YAML scalars.
Lengths carry their unit in the name: ``total_images``, ``warmup_images``, ``checkpoint_every_images``.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from ddpm import SAMPLERS, NoiseSchedule, UNetConfig
from ddpm.losses import TIMESTEP_SAMPLING
from ddpm.training import PRECISIONS, autocast_dtype

from .errors import UserError


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False

    def build(self) -> NoiseSchedule:
        if self.kind == "linear":
            return NoiseSchedule.linear(self.num_timesteps, self.beta_start, self.beta_end, self.zero_terminal_snr)
        if self.kind == "cosine":
            return NoiseSchedule.cosine(self.num_timesteps, zero_terminal_snr=self.zero_terminal_snr)
        raise UserError(f"schedule.kind must be 'linear' or 'cosine', got {self.kind!r}")


@dataclass(frozen=True)
class TrainConfig:
    total_images: int = 200_000           # the run ends after exactly this many training images ...
    max_minutes: float | None = None      # ... or this many minutes of training, if sooner (the LR decays over both)
    batch_size: int = 128                 # global batch, split evenly across workers
    lr: float = 2e-4
    lr_decay: str = "constant"            # "constant" (DDPM) or "cosine"
    warmup_images: int = 640_000          # DDPM: 5,000 steps x 128
    optimizer: str = "adam"               # "adam" or "adamw"
    weight_decay: float = 0.0
    adam_beta2: float = 0.999             # Adam's second-moment decay: it averages squared gradients over ~1/(1-b2) steps
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    prediction_type: str = "epsilon"      # "epsilon", "sample" or "v_prediction"
    min_snr_gamma: float | None = None
    timestep_sampling: str = "uniform"    # or "importance": t drawn in proportion to its loss weight (ddpm.losses)
    class_conditional: bool = False       # use the dataset's labels (with label dropout for guidance)
    label_dropout: float = 0.1
    # A text-conditioned model (Stable Diffusion's conditioning): the frozen CLIP text encoder, a registered CLIP
    # (models:/NAME/VERSION or models:/NAME@ALIAS, from ddpm train-clip) or a folder ddpm.text.load reads (a Stable
    # Diffusion folder's text_encoder/ + tokenizer/); model.text_dim is set from its width. null: no text.
    text_encoder: str | None = None
    caption_dropout: float = 0.1          # a caption replaced by "" this often: the unconditional branch of guidance
    # unCLIP's decoder: the frozen CLIP (a registered one, models:/NAME/VERSION, or a folder ddpm.clip.load reads)
    # whose image embedding of each training image the U-Net is conditioned on; model.image_dim is set from its
    # width. With train.text_encoder as well, the decoder reads the caption too (unCLIP's does). null: no image.
    image_encoder: str | None = None
    image_dropout: float = 0.1            # an image embedding replaced by zeros this often (unCLIP: 10%)
    random_flip: bool = True
    seed: int = 0
    precision: str = "auto"               # "auto" (bf16 on CUDA and bf16 CPUs, else fp32), "fp32" or "bf16"
    log_every_steps: int = 50
    checkpoint_every_images: int = 50_000
    sample_every_images: int = 100_000
    num_checkpoints_to_keep: int = 2
    max_failures: int = 2
    elastic_check_s: float = 60.0  # an elastic run (--num-workers MIN-MAX) looks for room to grow this often

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise UserError(f"train.prediction_type must be epsilon, sample or v_prediction, "
                            f"got {self.prediction_type!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise UserError(f"train.optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"train.timestep_sampling must be uniform or importance, got {self.timestep_sampling!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.lr_decay not in ("constant", "cosine"):
            raise UserError(f"train.lr_decay must be constant or cosine, got {self.lr_decay!r}")
        for name in ("total_images", "batch_size", "checkpoint_every_images", "sample_every_images"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.adam_beta2 < 1:
            raise UserError(f"train.adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        if not self.elastic_check_s >= 0:
            raise UserError(f"train.elastic_check_s must be at least 0, got {self.elastic_check_s}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UserError(f"train.max_minutes must be positive (or null for no time limit), got {self.max_minutes}")
        for name in ("label_dropout", "caption_dropout", "image_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"train.{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.text_encoder is not None and (not isinstance(self.text_encoder, str) or not self.text_encoder.strip()):
            raise UserError(f"train.text_encoder must be a models:/ URI or a folder (or null), got {self.text_encoder!r}")
        if self.image_encoder is not None and (not isinstance(self.image_encoder, str)
                                               or not self.image_encoder.strip()):
            raise UserError(f"train.image_encoder must be a models:/ URI or a folder (or null), "
                            f"got {self.image_encoder!r}")

    def build_optimizer(self, params):
        """Adam or AdamW over ``params`` with this config's lr, weight decay and beta2 (beta1 stays 0.9).

        The fused implementation where torch has one (CPU, CUDA): one kernel for all parameters instead of torch's
        CPU default, a Python loop of small ops per tensor (with foreach clipping and the foreach EMA update:
        benchmarks/step.py, figures in benchmarks/RESULTS.md).
        """
        import torch

        params = list(params)
        fused = all(p.device.type in ("cpu", "cuda") for p in params) or None
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=(0.9, self.adam_beta2), weight_decay=self.weight_decay, fused=fused)

    def time_spent(self, seconds: float) -> float:
        """The fraction of ``max_minutes`` that ``seconds`` of training used; 0 without a time limit."""
        return seconds / (self.max_minutes * 60) if self.max_minutes is not None else 0.0

    def finished(self, images_seen: int, seconds: float) -> bool:
        """Whether a run that trained ``images_seen`` images in ``seconds`` of training is done."""
        return images_seen >= self.total_images or self.time_spent(seconds) >= 1

    def step_options(self, device) -> dict:
        """The keyword arguments of ``ddpm.training.train_step`` this config sets (all but lr and the labels)."""
        return {"prediction_type": self.prediction_type, "min_snr_gamma": self.min_snr_gamma,
                "timestep_sampling": self.timestep_sampling, "grad_clip": self.grad_clip,
                "autocast_dtype": autocast_dtype(device, self.precision)}


@dataclass(frozen=True)
class PipelineConfig:
    """Where ``ddpm pipeline`` reads and writes (URIs: ``s3://bucket/prefix`` or local folders) and how it decides.

    Relative local paths are taken from the current directory. ``raw`` may be ``digits``, ``photos`` or ``shapes``:
    the built-in dataset (scikit-learn's digits, ``photos_count`` crops of scikit-image's photographs, or
    ``shapes_count`` captioned scenes of ``ddpm data shapes``, at ``resolution``) is written to ``raw_output`` first
    (what the quickstarts do). ``captions`` ("keep" or "required", as ``ddpm preprocess --captions``) reads captions.

    Latent diffusion: with ``latents`` set, the pipeline trains an autoencoder (``autoencoder_config``, registered as
    ``autoencoder_name``) unless ``autoencoder`` names one already (a ``models:/`` URI or a folder, e.g. a downloaded
    Stable Diffusion VAE), encodes the processed images into ``latents`` and trains the DDPM on those.

    Text: with ``clip_config`` set, the pipeline first trains a CLIP on the captioned data (``ddpm train-clip`` with
    that preset and ``clip_set``, registered as ``clip_name``) and the DDPM's ``train.text_encoder`` becomes it;
    without it, ``train.text_encoder`` is used as configured (a registered CLIP, or a downloaded text encoder).

    unCLIP: with ``prior_config`` set as well, the CLIP becomes ``train.image_encoder`` instead (the DDPM is unCLIP's
    decoder), a prior is trained on it (``ddpm train-prior``), and the two are registered as one model.
    """

    raw: str = "digits"
    raw_output: str = ".ddpm/data/digits-raw"
    processed: str = ".ddpm/data/digits"
    storage: str = ".ddpm/runs"
    run_name: str = "digits"
    register_as: str = "digits"
    resolution: int = 16
    channels: int = 1
    small: str = "upscale"                # images below the resolution: "skip" or "upscale"
    num_workers: int | str = "2"          # N, or an elastic range "MIN-MAX" (pipelines.train.resources.Workers)
    use_gpu: bool = False
    experiment: str = "ddpm"
    promote_to: str = "production"
    gate_metric: str = "fd_cls"           # "fd_cls", or "fid" with inception_weights
    inception_weights: str | None = None
    eval_samples: int = 500
    eval_sampler: str = "ddim"
    eval_steps: int = 50
    eval_guidance_scale: float = 1.0      # classifier-free guidance w for class-conditional models (1: none)
    eval_seed: int = 0
    # The gate's absolute bar (pipelines.evaluate.gate): the gate metric at most this many times its real-vs-real
    # floor, recall at least this, or the version is registered but not promoted; null: not checked. The presets set
    # both from measured good runs; these defaults only stop the hopeless (a 248x, recall 0.004 first version).
    gate_max_ratio: float | None = 50.0
    gate_min_recall: float | None = 0.05
    # A text model's bar: the share of its images on seen compositions whose every attribute the alignment reader
    # reads as prompted (align_seen_all, pipelines.evaluate.gate) at least this; null: not checked.
    gate_min_alignment: float | None = None
    eval_images_per_prompt: int | None = None  # a text model's alignment: images per evaluation prompt (null: default)
    photos_count: int = 2000              # raw: photos: how many crops
    latents: str | None = None            # latent diffusion: where ddpm encode writes the latents (None: pixels)
    autoencoder: str | None = None        # an autoencoder to use as it is; None: train one
    autoencoder_config: str = "configs/autoencoder-f4.yaml"  # ddpm train-autoencoder's preset, from the project root
    autoencoder_set: tuple[str, ...] = ()  # its --set overrides, e.g. ["train.total_images=20000"]
    autoencoder_name: str = "autoencoder"  # registered as; its training run is named <run_name>-autoencoder
    encode_flip: bool = False             # ddpm encode --flip: the mirrored images' latents as well
    shapes_count: int = 4000              # raw: shapes: how many scenes
    captions: str | None = None           # ddpm preprocess --captions: "keep" or "required"; null: no captions
    clip_config: str | None = None        # train a CLIP first (ddpm train-clip's preset, from the project root)
    clip_set: tuple[str, ...] = ()        # its --set overrides
    clip_name: str = "clip"               # registered as; its training run is named <run_name>-clip
    # unCLIP (DALL-E 2): with prior_config set, the CLIP becomes the decoder's train.image_encoder, a prior is trained
    # on it (ddpm train-prior's preset, registered as prior_name), the DDPM is the decoder (registered as
    # <register_as>-decoder), and prior + decoder are registered together as register_as (ddpm unclip)
    prior_config: str | None = None
    prior_set: tuple[str, ...] = ()       # its --set overrides
    prior_name: str = "prior"             # registered as; its training run is named <run_name>-prior

    def __post_init__(self):
        from pipelines.train.resources import Workers

        Workers.parse(self.num_workers, "pipeline.num_workers")
        if self.photos_count < 1 or self.shapes_count < 1:
            raise UserError(f"pipeline.photos_count and pipeline.shapes_count must be at least 1, "
                            f"got {self.photos_count} and {self.shapes_count}")
        if self.captions not in (None, "keep", "required"):
            raise UserError(f"pipeline.captions must be keep, required or null, got {self.captions!r}")
        if self.resolution < 1 or self.channels not in (1, 3):
            raise UserError(f"pipeline.resolution must be positive and pipeline.channels 1 or 3, "
                            f"got {self.resolution} and {self.channels}")
        if self.small not in ("skip", "upscale"):
            raise UserError(f"pipeline.small must be skip or upscale, got {self.small!r}")
        if self.gate_metric not in ("fd_cls", "fid"):
            raise UserError(f"pipeline.gate_metric must be fd_cls or fid, got {self.gate_metric!r}")
        if self.gate_metric == "fid" and not self.inception_weights:
            raise UserError("pipeline.gate_metric fid needs pipeline.inception_weights (a TorchScript Inception file)")
        if self.eval_sampler not in SAMPLERS:
            raise UserError(f"pipeline.eval_sampler must be one of {', '.join(SAMPLERS)}, got {self.eval_sampler!r}")
        if self.eval_samples <= 0 or self.eval_steps <= 0:
            raise UserError(f"pipeline.eval_samples and pipeline.eval_steps must be positive, "
                            f"got {self.eval_samples} and {self.eval_steps}")
        if self.gate_max_ratio is not None and not (math.isfinite(self.gate_max_ratio) and self.gate_max_ratio > 0):
            raise UserError(f"pipeline.gate_max_ratio must be a positive number or null, got {self.gate_max_ratio}")
        if self.gate_min_recall is not None and not 0 <= self.gate_min_recall <= 1:
            raise UserError(f"pipeline.gate_min_recall must be between 0 and 1 or null, got {self.gate_min_recall}")
        if self.gate_min_alignment is not None and not 0 <= self.gate_min_alignment <= 1:
            raise UserError(f"pipeline.gate_min_alignment must be between 0 and 1 or null, "
                            f"got {self.gate_min_alignment}")
        if self.eval_images_per_prompt is not None and self.eval_images_per_prompt < 1:
            raise UserError(f"pipeline.eval_images_per_prompt must be at least 1 or null, "
                            f"got {self.eval_images_per_prompt}")
        if not math.isfinite(self.eval_guidance_scale) or self.eval_guidance_scale < 0:
            raise UserError(f"pipeline.eval_guidance_scale must be a finite number >= 0, "
                            f"got {self.eval_guidance_scale}")


@dataclass(frozen=True)
class Config:
    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "schedule": asdict(self.schedule), "train": asdict(self.train),
                "pipeline": asdict(self.pipeline)}

    def hash(self) -> str:
        """A short, stable hash of what defines the model (model, schedule, train), for registry tags.

        The pipeline section (where data and runs live) is left out: the same recipe on a copy of the data in
        another bucket is the same model.
        """
        recipe = {k: v for k, v in self.to_dict().items() if k != "pipeline"}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    def with_num_classes(self, num_classes: int) -> "Config":
        return replace(self, model=replace(self.model, num_classes=num_classes))


def _coerce(value, default, key: str, optional: bool = False):
    """Check ``value`` against the type of the field's default; YAML's "1e-3" (a string in YAML 1.1) -> 1e-3.

    null is accepted only where the field is optional (``float | None``); a tuple field takes a list whose items
    have the type of the default's items (``channel_mults: [1, 2, 2]``)."""
    if value is None:
        if optional or default is None:
            return None
        raise UserError(f"{key} must be {_kind_name(default)}, got an empty value (null)")
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list like {list(default)}, got {value!r}")
        if default:
            return type(default)(_coerce(v, default[0], f"{key}[{i}]") for i, v in enumerate(value))
        return type(default)(value)
    if default is None or isinstance(default, str):
        return value
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} must be true or false, got {value!r}")
        return value
    try:
        if isinstance(value, bool):
            raise ValueError
        converted = kind(value)
        if kind is int and isinstance(value, float) and converted != value:
            raise ValueError
        return converted
    except (TypeError, ValueError):
        raise UserError(f"{key} must be {_kind_name(default)}, got {value!r}") from None


def _kind_name(default) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        type(default), f"a {type(default).__name__}")


def set_by(overrides: list[str] | None) -> dict[str, str]:
    """``["train.lr=1e-3"]`` -> ``{"train.lr": "--set train.lr=1e-3"}``: which keys a ``--set`` gave, so that an
    error about one of them names the ``--set`` rather than the config file (the last one wins, as in
    :func:`apply_overrides`)."""
    return {item.partition("=")[0]: f"--set {item}" for item in overrides or []}


def _strict(cls, values: dict, where: str, given: dict[str, str] | None = None):
    """``cls(**values)`` with every key known and every value of its field's type; ``where`` is "SOURCE: SECTION",
    ``given`` the keys that came from ``--set`` (:func:`set_by`), whose errors name the ``--set`` instead."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {values!r}")
    source, _, section = where.rpartition(": ")
    given = given or {}

    def label(key: str) -> str:  # how an error names the key: its --set, or the file and section it came from
        full = f"{section}.{key}"
        return f"{given[full]}: {full}" if full in given else f"{where}.{key}"

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)}
    optional = set()
    for name, hint in typing.get_type_hints(cls).items():
        kinds = [t for t in typing.get_args(hint) if t is not type(None)]
        if type(None) in typing.get_args(hint):
            optional.add(name)
        if defaults.get(name) is None and len(kinds) == 1:  # "float | None": check a value against float
            defaults[name] = kinds[0]()
    unknown = sorted(set(values) - set(defaults), key=lambda k: (f"{section}.{k}" not in given, k))
    if unknown:
        full = f"{section}.{unknown[0]}"
        valid = f"valid keys: {', '.join(sorted(defaults))}"
        if full in given:
            raise UserError(f"{given[full]}: unknown key {full}; {valid}")
        raise UserError(f"unknown key {where}.{unknown[0]}; {valid}")
    values = {k: _coerce(v, defaults[k], label(k), k in optional) for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid {where} config: {exc}") from None


def from_dict(raw: dict, source: str = "config", given: dict[str, str] | None = None) -> Config:
    """A :class:`Config` from nested sections; ``given``: the keys ``--set`` gave (:func:`set_by`)."""
    given = given or {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model, schedule, train, "
                        f"pipeline), got {type(raw).__name__}")
    raw = dict(raw)
    unknown = sorted(set(raw) - {"model", "schedule", "train", "pipeline"})
    if unknown:
        raise UserError(f"{unknown_section_source(unknown[0], source, given)}: unknown section {unknown[0]!r}; "
                        f"expected model, schedule, train, pipeline")
    for section in ("model", "schedule", "train", "pipeline"):
        if not isinstance(raw.get(section) or {}, dict):
            raise UserError(f"{source}: section {section} must be a mapping of keys to values, got {raw[section]!r}")
    model = dict(raw.get("model") or {})
    preset = model.pop("preset", None)
    base = UNetConfig.preset(preset).to_dict() if preset else {}
    return Config(
        model=_strict(UNetConfig, {**base, **model}, f"{source}: model", given),
        schedule=_strict(ScheduleConfig, dict(raw.get("schedule") or {}), f"{source}: schedule", given),
        train=_strict(TrainConfig, dict(raw.get("train") or {}), f"{source}: train", given),
        pipeline=_strict(PipelineConfig, dict(raw.get("pipeline") or {}), f"{source}: pipeline", given),
    )


def unknown_section_source(section: str, source: str, given: dict[str, str]) -> str:
    """Who wrote an unknown section: the first ``--set`` into it, else the config file."""
    return next((item for key, item in given.items() if key.split(".", 1)[0] == section), source)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["train.lr=1e-3", ...]`` applied to the nested dict ``raw`` (a copy)."""
    raw = json.loads(json.dumps(raw or {}))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        if not value.strip():
            raise UserError(f"--set {item}: no value after '='; write null to clear an optional key")
        try:
            raw.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item}: not a YAML value ({str(exc).splitlines()[0]})") from None
    return raw


def readable(values: dict, title: str = "config") -> str:
    """A resolved config for the terminal: ``config:`` then one key a line, indented YAML, lists in flow style
    (``channel_mults: [1, 2]``), so that a screen of it reads like the preset it came from."""
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", items, flow_style=True))
    plain = json.loads(json.dumps(values))  # tuples -> lists: a safe dump writes no Python tags
    body = yaml.dump(plain, Dumper=Dumper, default_flow_style=False, sort_keys=True, width=100)
    return f"{title}:\n" + "\n".join(f"  {line}" for line in body.rstrip().splitlines())


def read_yaml(path: str | Path | None, example: str = "configs/digits.yaml") -> dict:
    """A YAML preset's contents ({} when ``path`` is None); a missing, invalid or empty file is a UserError."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty; start from a preset such as {example}")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or start from defaults when ``path`` is None) and apply ``overrides``."""
    return from_dict(apply_overrides(read_yaml(path), overrides or []), str(path or "config"), set_by(overrides))
