"""The DDP gradient layout fix (``pipelines.train.ddp.match_grad_layout``), measured side by side in one run.

Two processes, DDP over gloo on 127.0.0.1, one thread each (what two 1-CPU Ray Train workers get), the quickstart's
training step: the digits U-Net (conditional), batch 128 split across the ranks, v-prediction with min-SNR weights
and importance-sampled timesteps, bf16 autocast where the CPU has bf16 instructions (``precision: auto``). Each
rank holds the same model twice, wrapped in DDP twice from the same weights:

- ``as before``: the parameters as the U-Net makes them; under bf16 autocast the 1x1 convolutions' weight gradients
  come back channels-last, DDP warns "Grad strides do not match bucket view strides" and copies them at every step;
- ``layout fixed``: ``match_grad_layout`` first, so the buckets view every gradient in its own layout.

The variants alternate in rounds of ``--steps`` steps (``--rounds`` times), so that the machine's other load falls on
both alike; images/s is over all steps of a variant, after one warm-up round each. Ray-free: runs anywhere torch does.

    .venv/bin/python benchmarks/ddp_layout.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm import NoiseSchedule, UNet, UNetConfig  # noqa: E402
from ddpm.training import autocast_dtype, train_step  # noqa: E402
from pipelines.train.ddp import match_grad_layout  # noqa: E402  (torch only)

STRIDES_WARNING = "Grad strides do not match bucket view strides"


def run_rank(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device("cpu")
    dtype = autocast_dtype(device, args.precision)
    schedule = NoiseSchedule.linear(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    rows = args.batch_size // world

    variants = {}
    for name in ("as before", "layout fixed"):
        torch.manual_seed(0)
        net = UNet(UNetConfig.preset("digits", num_classes=10))
        changed = []
        if name == "layout fixed":
            def probe(net=net):
                x, t, y = torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
                with torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False):
                    out = net(x, t, y)
                out.float().square().mean().backward()
            changed = match_grad_layout(net, probe)
        model = DDP(net)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        variants[name] = {"model": model, "opt": optimizer, "steps": 0, "seconds": 0.0, "warned": False,
                          "changed": changed}

    generator = torch.Generator().manual_seed(rank)
    x_0 = torch.rand(rows, 1, 16, 16, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (rows,), generator=generator)

    def steps(v: dict, n: int, timed: bool) -> None:
        dist.barrier()
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                train_step(v["model"], v["opt"], schedule, x_0, lr=1e-4, condition=y,
                           prediction_type="v_prediction", min_snr_gamma=5.0, timestep_sampling="importance",
                           grad_clip=1.0, autocast_dtype=dtype)
        dist.barrier()
        v["warned"] |= any(STRIDES_WARNING in str(w.message) for w in caught)
        if timed:
            v["seconds"] += time.perf_counter() - started
            v["steps"] += n

    for v in variants.values():
        steps(v, args.steps, timed=False)  # warm-up
    for _ in range(args.rounds):
        for v in variants.values():
            steps(v, args.steps, timed=True)
    if rank == 0:
        results.update({name: {"images_per_sec": v["steps"] * args.batch_size / v["seconds"],
                               "ms_per_step": 1000 * v["seconds"] / v["steps"], "warned": v["warned"],
                               "restrided": len(v["changed"])} for name, v in variants.items()})
        results["autocast"] = str(dtype)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and variant [%(default)s]")
    parser.add_argument("--rounds", type=int, default=6, help="[%(default)s]")
    parser.add_argument("--batch-size", type=int, default=128, help="global, split across 2 ranks [%(default)s]")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="[%(default)s]")
    args = parser.parse_args()

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(run_rank, args=(2, port, args, results), nprocs=2, join=True)
        results = dict(results)
    print(f"DDP over gloo, 2 ranks x 1 thread, digits U-Net (conditional), batch {args.batch_size}, "
          f"autocast {results.pop('autocast')}; {args.rounds} alternating rounds of {args.steps} steps\n")
    print("| variant | images/s | ms/step | parameters restrided | DDP warned about grad strides |")
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {r['images_per_sec']:.0f} | {r['ms_per_step']:.0f} | {r['restrided']} | "
              f"{'yes' if r['warned'] else 'no'} |")
    before, after = results["as before"]["images_per_sec"], results["layout fixed"]["images_per_sec"]
    print(f"\nlayout fixed / as before: {after / before:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
