"""What text conditioning costs, each figure against a baseline measured in the same run, on this machine's CPU:

1. one U-Net row (inference): FLOPs and time of the text U-Net (cross-attention + pooled) against the
   class-conditional U-Net of the same widths, and of encoding one prompt with the text tower;
2. training: images/s and FLOPs per image of the step the Ray Train loop runs (``pipelines.train.worker``), in this
   process without Ray: text = the batch's captions through the frozen text tower (``encode_prompts``, each distinct
   caption once), caption dropout (``drop_condition``), ``train_step``, EMA update; class (baseline) = label
   dropout, ``train_step``, EMA update. Batch 64 of 32x32 RGB ``pipelines.data.shapes`` scenes, one warm-up step
   per model, then rounds that alternate the two models so that the machine's noise hits both alike;
   timed in CPU seconds of this process (its own work, what a shared machine's other processes barely move) and in
   wall seconds (what a quiet machine gives);
3. the serving engine at 32 clients, 32 distinct prompts against one shared prompt (``benchmarks/text_engine.py``).

Widths and training settings: configs/shapes-text.yaml (U-Net, train section); the text tower:
configs/clip-shapes.yaml's text widths, random weights, the tokenizer learned on the scenes' captions as
``ddpm train-clip`` learns it. FLOPs come from torch's FlopCounterMode (exact for the matmuls and convolutions, which
dominate). Random weights cost what trained ones do.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_cost.py [--rows 8] [--rounds 5] [--train-rounds 6]
        [--train-steps 1] [--engine-rounds 3] [--engine-steps 10] [--guidance 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.text_engine import engine_table  # noqa: E402
from ddpm import EMA, UNet, checkpoint, from_uint8, text  # noqa: E402
from ddpm.conditioning import Condition, encode_prompts  # noqa: E402
from ddpm.training import drop_condition, drop_labels, train_step  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from pipelines.data import shapes  # noqa: E402
from pipelines.train import clip_config  # noqa: E402

SCENES = 1024  # the training rows' pool: 16 batches of 64 before a row comes back
SEED = 0


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def best_cpu_time(fn, rounds: int) -> float:
    """The least CPU time (this process's) of ``rounds`` calls after a warm-up: on a shared machine the CPU time a
    call took is its own work, its wall time also the other processes' share of the cores."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclasses.dataclass
class Scenes:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]  # N
    labels: torch.Tensor  # (N,) int64: the subject's colour-shape pair, the folder ingest takes as the label


def shapes_scenes(count: int, size: int) -> Scenes:
    """``ddpm data shapes``' first ``count`` scenes for SEED, as ingest would hand them to training."""
    scenes = [shapes.scene(SEED, i, size) for i in range(count)]
    classes = sorted(f"{c}-{s}" for c, s in shapes.PAIRS)
    return Scenes(np.stack([shapes.render(s) for s in scenes]), [s.caption for s in scenes],
                  torch.tensor([classes.index(s.label) for s in scenes]))


def text_encoder(captions: list[str]) -> text.TextEncoder:
    """configs/clip-shapes.yaml's text tower, random weights, its tokenizer learned on ``captions``."""
    m = clip_config.load_config(ROOT / "configs/clip-shapes.yaml").model
    tokenizer = text.train_tokenizer(captions, vocab_size=m.vocab_size, context_length=m.context_length)
    torch.manual_seed(SEED)
    return text.TextEncoder(tokenizer, text.TextTransformer(m.clip_config(tokenizer).text_config()))


def configs(encoder: text.TextEncoder) -> tuple[Config, Config]:
    """configs/shapes-text.yaml as the text model (text_dim = the encoder's width) and as the class model."""
    config = load_config(ROOT / "configs/shapes-text.yaml")
    text_config = dataclasses.replace(config, model=dataclasses.replace(config.model, text_dim=encoder.width))
    return text_config, config.with_num_classes(len(shapes.PAIRS))


# -- 1. one U-Net row ------------------------------------------------------------------------------------------------
def forward_table(text_net: UNet, class_net: UNet, encoder: text.TextEncoder, captions: list[str], *, n: int,
                  rounds: int) -> list[str]:
    c = text_net.config
    x = torch.randn(n, c.in_channels, c.image_size, c.image_size)  # (n, C, H, W)
    t = torch.randint(0, 1000, (n,))
    ids = encoder.tokenize(captions[:n])  # (n, L)
    states, pooled = encoder.encode_ids(ids)  # (n, L, D), (n, D)
    labels, prompts = Condition(labels=torch.arange(n) % class_net.config.num_classes), Condition(text=states,
                                                                                                pooled=pooled)
    rows = [
        ("U-Net row, class-conditional (baseline)", lambda: class_net(x, t, labels)),
        ("U-Net row, text (cross-attention + pooled)", lambda: text_net(x, t, prompts)),
        ("text tower, one prompt", lambda: encoder.encode_ids(ids)),
    ]
    class_net.eval()
    text_net.eval()
    with torch.no_grad():
        measured = [(name, flops(fn) / n, best_cpu_time(fn, rounds) / n) for name, fn in rows]
    base_flops, base_s = measured[0][1], measured[0][2]
    lines = ["| | GFLOP / row | x baseline | CPU ms / row | x baseline |", "|---|---:|---:|---:|---:|"]
    for name, f, s in measured:
        lines.append(f"| {name} | {f / 1e9:.4f} | {f / base_flops:.3f} | {s * 1e3:.2f} | {s / base_s:.3f} |")
    lines.append(f"\n({n} rows a call, least CPU time of {rounds}; context {encoder.context_length} tokens)")
    return lines


# -- 2. training -----------------------------------------------------------------------------------------------------
class TrainingRun:
    """One model's training as ``pipelines.train.worker`` steps it, on the rows of ``scenes`` in order (each model
    its own cursor, so both see the same rows)."""

    def __init__(self, config: Config, scenes: Scenes, encoder: text.TextEncoder | None):
        tc = config.train
        torch.manual_seed(tc.seed)
        self.net, self.schedule = UNet(config.model).train(), config.schedule.build()
        self.optimizer = tc.build_optimizer(self.net.parameters())
        self.ema = EMA(self.net, decay=tc.ema_decay, warmup=tc.ema_warmup)
        self.options = tc.step_options(torch.device("cpu"))
        self.tc, self.scenes, self.encoder, self.cursor = tc, scenes, encoder, 0

    def rows(self) -> np.ndarray:
        b, n = self.tc.batch_size, len(self.scenes.captions)
        index = (self.cursor + np.arange(b)) % n
        self.cursor = (self.cursor + b) % n
        return index

    def condition(self, index: np.ndarray) -> Condition | torch.Tensor:
        """The step's condition: captions encoded (frozen tower) then some dropped to "", or labels some dropped."""
        if self.encoder is not None:
            captions = [self.scenes.captions[i] for i in index]
            return drop_condition(encode_prompts(self.encoder, captions), self.tc.caption_dropout)
        return drop_labels(self.scenes.labels[index], self.tc.label_dropout)

    def step(self) -> None:
        index = self.rows()
        x_0 = from_uint8(self.scenes.images[index])  # (B, 3, 32, 32) in [-1, 1]; shapes-text: no random flip
        train_step(self.net, self.optimizer, self.schedule, x_0, lr=self.tc.lr, condition=self.condition(index),
                   **self.options)
        self.ema.update(self.net)

    def encode_only(self) -> None:
        """The text step's caption encoding alone (what training pays for text beyond the U-Net)."""
        index = self.rows()
        encode_prompts(self.encoder, [self.scenes.captions[i] for i in index])


def training_table(text_config: Config, class_config: Config, scenes: Scenes, encoder: text.TextEncoder, *,
                   rounds: int, steps: int) -> list[str]:
    base, with_text = "class-conditional (baseline)", "text (captions encoded in the step)"
    runs = {base: TrainingRun(class_config, scenes, None), with_text: TrainingRun(text_config, scenes, encoder)}
    encoding = TrainingRun(text_config, scenes, encoder)  # the same rows, to time the encoding alone
    b = class_config.train.batch_size
    step_flops = {name: flops(run.step) / b for name, run in runs.items()}  # also each model's warm-up step
    encode_flops = flops(encoding.encode_only) / b
    loops = {**{name: run.step for name, run in runs.items()}, "encode": encoding.encode_only}
    wall: dict[str, list[float]] = {name: [] for name in loops}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(rounds):
        for name in list(loops)[::1 if r % 2 == 0 else -1]:  # A B C, then C B A: neither goes first every time
            for _ in range(steps):
                w, c = timed(loops[name])
                wall[name].append(w)
                cpu[name].append(c)

    med = statistics.median
    per_cpu_s = {name: b / med(cpu[name]) for name in loops}  # images per CPU second
    per_s = {name: b / med(wall[name]) for name in loops}  # images per second of wall time
    lines = ["| training step, batch 64 | GFLOP / image | x baseline | CPU ms / step | images / CPU s | x baseline "
             "| images/s (wall) | x baseline |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in runs:
        lines.append(f"| {name} | {step_flops[name] / 1e9:.4f} | {step_flops[name] / step_flops[base]:.3f} | "
                     f"{med(cpu[name]) * 1e3:.0f} | {per_cpu_s[name]:.1f} | {per_cpu_s[name] / per_cpu_s[base]:.3f} | "
                     f"{per_s[name]:.1f} | {per_s[name] / per_s[base]:.3f} |")
    lines.append(f"| of which: encoding the batch's captions | {encode_flops / 1e9:.4f} | "
                 f"{encode_flops / step_flops[base]:.3f} | {med(cpu['encode']) * 1e3:.1f} | "
                 f"{med(cpu['encode']) / med(cpu[with_text]):.3f} of the text step's CPU time | | | |")
    tc = text_config.train
    lines.append(f"\n(medians of {rounds * steps} steps per model, {rounds} rounds alternating the models after one "
                 f"warm-up step each; {tc.prediction_type}, min-SNR {tc.min_snr_gamma}, {tc.timestep_sampling} "
                 f"timesteps, {tc.optimizer} fused, EMA; caption dropout {tc.caption_dropout}, label dropout "
                 f"{class_config.train.label_dropout}; rows from {SCENES} scenes, "
                 f"{len(set(scenes.captions[:b]))} distinct captions in the first batch of {b})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rows of the forward table (default: 8)")
    parser.add_argument("--rounds", type=int, default=5, help="best of, for the forward table (default: 5)")
    parser.add_argument("--train-rounds", type=int, default=6, help="alternating training rounds (default: 6)")
    parser.add_argument("--train-steps", type=int, default=1, help="timed steps per model per round (default: 1)")
    parser.add_argument("--engine-rounds", type=int, default=3, help="alternating engine rounds (default: 3)")
    parser.add_argument("--engine-steps", type=int, default=10, help="DDIM steps per request (default: 10)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent one-image requests (default: 32)")
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="the requests' guidance scale (default: 3, the shapes-text recipe's evaluation)")
    args = parser.parse_args()

    started = time.perf_counter()
    scenes = shapes_scenes(SCENES, 32)
    encoder = text_encoder(scenes.captions)
    text_config, class_config = configs(encoder)
    m = text_config.model
    print(f"U-Net: configs/shapes-text.yaml {m.image_size}x{m.image_size}x{m.in_channels}, widths "
          f"{[m.base_channels * k for k in m.channel_mults]}, attention at {list(m.attention_resolutions)}; "
          f"text tower: configs/clip-shapes.yaml, width {encoder.width}, "
          f"{encoder.model.config.num_hidden_layers} layers, context {encoder.context_length}, "
          f"vocabulary {encoder.tokenizer.vocab_size} (learned on {SCENES} captions); "
          f"class model: {class_config.model.num_classes} classes; threads {torch.get_num_threads()}\n")

    torch.manual_seed(SEED)
    nets = UNet(text_config.model), UNet(class_config.model)
    print("## One U-Net row (inference)\n")
    print("\n".join(forward_table(*nets, encoder, scenes.captions, n=args.rows, rounds=args.rounds)) + "\n")

    print("## Training step (the Ray Train loop's, in one process)\n")
    print("\n".join(training_table(text_config, class_config, scenes, encoder, rounds=args.train_rounds,
                                   steps=args.train_steps)) + "\n")

    print(f"## The engine at {args.clients} clients\n")
    prompts = list(dict.fromkeys(scenes.captions))[:args.clients]
    loaded = checkpoint.LoadedModel(nets[0].eval(), text_config.schedule.build(), text_config.train.prediction_type,
                                    text_encoder=encoder)
    print("\n".join(engine_table(loaded, prompts, steps=args.engine_steps, rounds=args.engine_rounds,
                                 guidance=args.guidance)) + "\n")
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
