"""The DDPM core: pure PyTorch (plus NumPy and safetensors). No Ray, MLflow, boto3, pyarrow or FastAPI here.

    from ddpm import NoiseSchedule, UNet, checkpoint, generate_images, sample
    images = generate_images(checkpoint.load(path), seeds=[0, 1, 2], sampler="ddim", steps=50)  # (3, H, W, C) uint8
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    x_0 = sample(model, schedule, x_T, sampler="ddim", steps=50, eta=0.0, spacing="trailing", generator=g)
    filled = inpaint(model, schedule, image, mask, sampler="ddpm", steps=250, resample_jumps=10, resample_times=10)
    ae = autoencoder.load(path)  # ours or a diffusers AutoencoderKL folder; ae.encode(x) -> scaled latents
    enc = text.load(path)  # a CLIP text encoder (ours or HF's); enc.encode(prompts) -> (states, pooled)
    cond = encode_prompts(enc, ["a red circle"], negative_prompts=[""])  # or from_labels([3], 1) for a class model
    images = generate_images(loaded, seeds=[0], condition=cond, guidance_scale=3.0)
    model, tokenizer = clip.load(path)  # a CLIP the platform trained; text.load(path) reads its text half
"""

from . import autoencoder, checkpoint, clip, conditioning, text
from .autoencoder import Autoencoder, AutoencoderConfig
from .conditioning import Condition, encode_prompts, from_labels
from .ema import EMA
from .generation import FORWARD_ROWS, fixed_size_forward, generate_images, image_seeds, inpaint_images
from .images import encode_png, from_uint8, make_grid, to_uint8
from .inpainting import inpaint, outpaint_canvas
from .losses import diffusion_loss
from .metrics import frechet_distance, frechet_distance_features, precision_recall
from .sampling import DEFAULT_STEPS, SAMPLERS, noise_from_seeds, sample, score, strength_steps, timesteps
from .schedule import NoiseSchedule
from .training import lr_at, train_step
from .unet import UNet, UNetConfig, count_parameters

__all__ = [
    "Autoencoder", "AutoencoderConfig", "Condition", "EMA", "FORWARD_ROWS", "NoiseSchedule", "UNet", "UNetConfig",
    "DEFAULT_STEPS", "SAMPLERS", "autoencoder", "checkpoint", "clip", "conditioning",
    "count_parameters", "diffusion_loss", "encode_png", "encode_prompts", "fixed_size_forward", "frechet_distance",
    "frechet_distance_features", "from_labels", "from_uint8", "generate_images", "image_seeds", "inpaint",
    "inpaint_images", "lr_at",
    "make_grid", "noise_from_seeds", "outpaint_canvas", "precision_recall", "sample", "score",
    "strength_steps", "text", "timesteps",
    "to_uint8", "train_step",
]
