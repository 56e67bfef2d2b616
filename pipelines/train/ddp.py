"""What the training workers agree on over torch.distributed: each rank's share of the gradient, sums over ranks,
values taken from rank 0, and every rank's RNG states for the checkpoint. Every function here is a collective: all
ranks call it at the same step; with one worker it returns at once."""

from __future__ import annotations

import torch
import torch.distributed as dist


class BatchShare:
    """State of :func:`weighted_allreduce`: this rank's share of the current global batch, rows_r / rows."""

    weight = 1.0


def weighted_allreduce(share: BatchShare, bucket):
    """DDP communication hook: sum over ranks of (rows_r / rows) * grad_r.

    grad_r is the gradient of rank r's mean loss, so the sum is the gradient of the mean loss over the global batch.
    DDP's default, the plain average of the ranks' gradients, equals it only when every rank has as many rows (not
    so for a short last batch, or a batch that does not divide by the number of workers).
    """
    tensor = bucket.buffer().mul_(share.weight)
    return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])


def match_grad_layout(net: torch.nn.Module, probe) -> list[str]:
    """Give every parameter the memory layout (strides) that the backward pass gives its gradient; returns the names
    of the parameters it changed. Call before wrapping ``net`` in DDP: not a collective, every rank runs it alike.

    DDP all-reduces gradients through flat buckets, each parameter's slice viewed with the *parameter's* strides. A
    gradient with other strides cannot be used in place: DDP copies it into the bucket at every step, and PyTorch warns
    ("Grad strides do not match bucket view strides"). Under bf16 autocast on the CPU, oneDNN returns the weight
    gradient of a 1x1 convolution, shape (O, I, 1, 1), in channels-last strides (I, 1, I, I) while the weight is
    contiguous (I, 1, 1, 1): the same numbers in memory, but not the same view. Restriding the weight to the
    gradient's layout (a copy of 1x1 kernels, once) makes the bucket view match, and the copy per step goes away.

    ``probe()`` runs one forward and backward pass the way training does (same autocast, a small batch). Gradients
    and the global RNG state are left as they were found: the probe changes no training result.
    """
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in params]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for _, p in params:
            p.grad = None
        probe()
        changed = []
        with torch.no_grad():
            for name, p in params:
                if p.grad is not None and p.grad.stride() != p.stride():
                    restrided = torch.empty_strided(p.shape, p.grad.stride(), dtype=p.dtype, device=p.device)
                    restrided.copy_(p)
                    p.data = restrided  # same values, the gradient's strides; optimizer state is created after this
                    changed.append(name)
        return changed
    finally:
        for (_, p), grad in zip(params, saved):
            p.grad = grad
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def sum_over_ranks(values: list[float], world: int, device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(value: float, world: int, device) -> float:
    """Rank 0's ``value`` on every rank (e.g. its clock, so that all ranks stop after the same step)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def object_from_rank0(value, world: int):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_strings(value: str, world: int) -> list[str]:
    """``value`` from every rank, in rank order (here: node ids, to record how many nodes the run spans)."""
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def gather_rng(world: int, device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states as uint8 tensors ``rng.<cpu|cuda>.<rank>`` (rank 0 keeps them for the checkpoint)."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {f"rng.{kind}.0": t for kind, t in mine.items()}
    states = {}
    for kind, t in mine.items():
        parts = [torch.empty_like(t, device=device) for _ in range(world)]
        dist.all_gather(parts, t.to(device))
        states |= {f"rng.{kind}.{r}": p.cpu() for r, p in enumerate(parts)}
    return states


def restore_rng(rng: dict[str, torch.Tensor], rank: int, device) -> None:
    """This rank's saved RNG states; a rank the checkpoint did not have (more workers now) seeds from its rank.

    Not a collective: each rank restores its own.
    """
    if f"rng.cpu.{rank}" not in rng:
        torch.manual_seed(int(rng["rng.cpu.0"].sum()) * 1_000_003 + rank)
        return
    torch.set_rng_state(rng[f"rng.cpu.{rank}"])
    if device.type == "cuda" and f"rng.cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"rng.cuda.{rank}"], device)
