"""FD-cls against the number of samples n, for one model: how far the 500-sample gate's number is from the
50,000-sample one (the bias of a Fréchet distance estimated from few samples).

It computes what ``ddpm evaluate --num-samples n`` computes for every n at once, from one run of the largest n: the
samples of seeds 0..n-1 are a prefix of the largest run's (image i depends on its seed and label only), with the
held-out labels repeated in order as their labels; the reference and held-out sets are the data's halves cut at
min(n, half); moments and Fréchet distances as in ``pipelines.evaluate.quality.evaluate_at_scale``; precision and
recall on the first min(n, half, 5,000) points. Ray-free, so that it runs on a GPU box that has only PyTorch:

    # on the CPU machine: the model, the data and its split, the cached FD-cls classifier (its very weights)
    .venv/bin/python benchmarks/eval_n.py prepare --model .ddpm/local/digits --data digits --out .ddpm/eval-n
    # anywhere (a GPU is used when there is one): the table
    python3 benchmarks/eval_n.py run --inputs .ddpm/eval-n --n 500 898 2000 10000 50000 --guidance 1.1

A stopped run resumes: each chunk's features and seconds are kept under INPUTS/samples/ (``--cache``), and a rerun
with the same sampler settings generates only the chunks that are missing.

``--precision fp32`` (the default) turns autocast off inside the network call, so that GPU samples come as close as
they can to the CPU's fp32 ones; ``bf16`` is what ``ddpm evaluate --use-gpu`` runs (the core's autocast on CUDA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(args: argparse.Namespace) -> None:
    from ddpm import checkpoint
    from pipelines.evaluate import classifier as cls
    from pipelines.evaluate.quality import load_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = checkpoint.load(args.model)
    images, labels = load_data(args.data, loaded.config.image_size)
    clf = cls.load_or_train(images, labels)
    np.savez(out / "data.npz", images=images, labels=labels, train=clf.train_index, held=clf.held_out_index)
    (out / "classifier.safetensors").write_bytes(clf.to_bytes())
    shutil.copytree(args.model, out / "model", dirs_exist_ok=True)
    shutil.rmtree(out / "samples", ignore_errors=True)  # chunks sampled from an earlier model are not this one's
    (out / "meta.json").write_text(json.dumps({"classifier": clf.key, "accuracy": clf.accuracy,
                                               "fingerprint": clf.fingerprint, "data": args.data}))
    print(f"wrote {out}: {len(images)} images, classifier {clf.key} (accuracy {clf.accuracy:.3f})")


def run(args: argparse.Namespace) -> None:
    from ddpm import checkpoint, fixed_size_forward, from_labels, generate_images, image_seeds
    from ddpm.metrics import FeatureStats, frechet_distance_stats, precision_recall
    from pipelines.evaluate.classifier import net_features, net_from_bytes

    inputs = Path(args.inputs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
        torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    data = np.load(inputs / "data.npz")
    images, labels, train, held = data["images"], data["labels"], data["train"], data["held"]
    net = net_from_bytes((inputs / "classifier.safetensors").read_bytes()).to(device)
    loaded = checkpoint.load(inputs / "model", device=device)
    n_max = max(args.n)
    sample_labels = labels[held][np.arange(n_max) % len(held)] if loaded.config.num_classes else None

    base = fixed_size_forward(loaded.model, args.rows)

    def forward(x, t, y=None):
        if args.precision == "fp32" and device.type == "cuda":
            with torch.autocast("cuda", enabled=False):
                return base(x.float(), t, y)
        return base(x, t, y)

    # Each chunk's features are kept on disk with the seconds it took, so that a run stopped part-way (a 50,000-sample
    # run is hours on a CPU) resumes where it stopped; the time reported is the sum of the chunks' own times.
    cache = Path(args.cache or inputs / "samples") / (f"{device.type}-{args.precision}-ddim{args.steps}-"
                                                      f"g{args.guidance:g}-seed{args.seed}-rows{args.rows}")
    cache.mkdir(parents=True, exist_ok=True)
    features, stats, seconds, resumed = [], [], 0.0, 0
    for a in range(0, n_max, args.chunk):
        b = min(a + args.chunk, n_max)
        part = cache / f"{a:06d}-{b:06d}.npz"
        if part.exists():
            with np.load(part) as saved:
                f, took = saved["features"], float(saved["seconds"])
            resumed += b - a
        else:
            start = time.perf_counter()
            x = generate_images(loaded, image_seeds(args.seed + a, b - a), steps=args.steps,
                                guidance_scale=args.guidance, forward=forward, batch_size=b - a,
                                condition=from_labels(None if sample_labels is None else sample_labels[a:b], b - a))
            f = net_features(net, x)
            took = time.perf_counter() - start
            partial = part.with_suffix(".tmp.npz")
            np.savez(partial, features=f, seconds=took)
            partial.rename(part)  # whole chunks only: a kill mid-write leaves no half file
        seconds += took
        features.append(f[: max(0, 5000 - a)])
        stats.append((b, FeatureStats.of(f)))
        print(f"  {b:,}/{n_max:,} samples, {b / seconds:.1f} images/s ({resumed:,} from {cache})", flush=True)
    kept = np.concatenate(features)

    def prefix_stats(n: int) -> FeatureStats:
        """The moments of the first n samples: whole chunks merged, then the rest of a part-chunk from the features
        kept (the first 5,000), or sampled again beyond them."""
        total, done = FeatureStats(0, np.zeros(0), np.zeros((0, 0))), 0
        for end, s in stats:
            if end <= n:
                total, done = total.merge(s), end
        if done < n <= len(kept):
            total = total.merge(FeatureStats.of(kept[done:n]))
        elif done < n:
            rest = generate_images(loaded, image_seeds(args.seed + done, n - done), steps=args.steps,
                                   guidance_scale=args.guidance, forward=forward, batch_size=n - done,
                                   condition=from_labels(None if sample_labels is None else sample_labels[done:n],
                                                         n - done))
            total = total.merge(FeatureStats.of(net_features(net, rest)))
        return total

    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, {args.precision}, DDIM-"
          f"{args.steps}, guidance {args.guidance:g}, forward rows {args.rows}: {n_max:,} samples in {seconds:.1f} s "
          f"({n_max / seconds:.1f} images/s, features included; the sum of the chunks' times, "
          f"{resumed:,} samples resumed from an earlier run)")
    print("| n samples | n reference = held-out | FD-cls | floor | ratio | precision | recall | FD-cls / FD-cls at "
          f"{n_max:,} |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for n in sorted(args.n):
        m = min(n, len(train), len(held))
        ref = net_features(net, images[train[:m]])
        hel = net_features(net, images[held[:m]])
        ref_stats, held_stats = FeatureStats.of(ref), FeatureStats.of(hel)
        fd = frechet_distance_stats(prefix_stats(n), ref_stats)
        floor = frechet_distance_stats(held_stats, ref_stats)
        k = min(n, m, 5000)
        precision, recall = precision_recall(ref[:k], kept[:k])
        rows.append((n, m, fd, floor, precision, recall))
    for n, m, fd, floor, precision, recall in rows:
        print(f"| {n:,} | {m:,} | {fd:.3f} | {floor:.3f} | {fd / floor:.2f} | {precision:.3f} | {recall:.3f} | "
              f"{fd / rows[-1][2]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="digits")
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--inputs", required=True)
    r.add_argument("--n", type=int, nargs="+", default=[500, 2000, 10000, 50000])
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--guidance", type=float, default=1.1, help="the gate's (configs/digits.yaml)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--rows", type=int, default=1024, help="forward rows (bits differ from 16's; the statistics not)")
    r.add_argument("--chunk", type=int, default=2000, help="samples per step and per file of the resumable cache")
    r.add_argument("--cache", help="where the chunks' features are kept (default: INPUTS/samples)")
    r.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    prepare(args) if args.what == "prepare" else run(args)


if __name__ == "__main__":
    main()
