"""The network call as a captured CUDA graph: one launch per forward pass instead of one per kernel.

At the batch sizes the sampler runs (tens of rows), a U-Net forward pass on a GPU is hundreds of small kernels, and
launching them from Python costs more than running them. :func:`graphed_forward` records the network's kernels once
at a fixed shape (``torch.cuda.CUDAGraph``) and replays the recording for every chunk of every step of every request.

It keeps the contract of :func:`ddpm.fixed_size_forward`: every call runs exactly ``rows`` rows at a time, the last
chunk padded (zeros, the chunk's timestep, the null class), and returns the first n rows. A replay runs the same
kernels on the same shape each time, so an image still depends only on its seed, never on its batch-mates. On the CPU
there is nothing to capture, and :func:`graphed_forward` returns :func:`ddpm.fixed_size_forward` itself.

Rules that come with a recording:

- It is made at the first call, inside whatever autocast is on then (the core samples CUDA under bf16 autocast), with
  autocast's weight cache off, so that the cast weights are made by kernels inside the graph rather than read from a
  cache that autocast frees at the end of its block. Calls under another autocast setting, dtype, image shape or
  train/eval mode get a recording of their own.
- It reads the parameters' memory: in-place changes (``load_state_dict``, ``copy_``) are seen by later replays;
  parameters replaced by new tensors (``module.to(...)``, ``param.data = ...``) are not, so get a new forward then.
- Inference only: no autograd graph is recorded. Calls are serialised by a lock (the static buffers are shared).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .conditioning import Condition
from .generation import fixed_size_forward
from .sampling import Model

# One forward per (model, rows, conditional, channels_last), kept while the model lives: the engine asks for the
# network call on every batch, and a recording is only worth making once.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphedForward]]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def graphed_forward(model: nn.Module, rows: int, *, conditional: bool | None = None,
                    channels_last: bool = False) -> Model:
    """``model`` as a callable ``(x, t, y=None) -> output`` that runs exactly ``rows`` rows per call, replayed from a
    CUDA graph on a GPU; :func:`ddpm.fixed_size_forward` on the CPU.

    conditional: whether the network takes class labels; None reads it from ``model.config.num_classes``. A
    conditional network always gets labels (None becomes -1, the null class, which is what the network does with
    None), so one recording serves calls with and without labels. channels_last: the recording's input buffer is
    channels-last (the parameters are not touched). The same model with the same settings gets the same callable
    back, recordings included, for as long as the model lives.
    """
    if rows < 1:
        raise ValueError(f"forward rows must be at least 1, got {rows}")
    if conditional is None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_classes"):
            raise ValueError("pass conditional=True/False: the model has no config.num_classes to read it from")
        conditional = config.num_classes > 0
    device = next(model.parameters()).device
    if device.type != "cuda" or getattr(getattr(model, "config", None), "text_dim", 0):  # text: not recorded yet
        return fixed_size_forward(model, rows)
    key = (rows, bool(conditional), bool(channels_last))
    with _CACHE_LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            per_model[key] = GraphedForward(model, rows, conditional=bool(conditional), channels_last=channels_last)
        return per_model[key]


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # (rows, C, H, W), static input
    t: torch.Tensor  # (rows,) int64
    y: torch.Tensor | None  # (rows,) int64, conditional networks only
    out: torch.Tensor  # (rows, C', H, W), static output


class GraphedForward:
    """The callable :func:`graphed_forward` returns on a GPU. It holds the module weakly (a recording needs only its
    parameters' memory, which it holds strongly), so the per-model cache does not keep a replaced model alive."""

    def __init__(self, model: nn.Module, rows: int, *, conditional: bool, channels_last: bool = False,
                 warmup: int = 2):
        self._model = weakref.ref(model)
        self._tensors = list(model.parameters()) + list(model.buffers())  # what the recordings read
        self.device = self._tensors[0].device
        self.rows, self.conditional, self.channels_last, self.warmup = rows, conditional, channels_last, warmup
        self._recordings: dict[tuple, _Recording] = {}
        self._lock = threading.Lock()

    @property
    def recordings(self) -> int:
        """How many graphs have been captured (one per autocast setting, dtype, image shape and mode)."""
        return len(self._recordings)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Condition | torch.Tensor | None = None) -> torch.Tensor:
        y = y.labels if isinstance(y, Condition) else y  # a class model's condition is its labels
        if y is not None and not self.conditional:
            if bool((y >= 0).any()):
                raise ValueError("this model is unconditional: class labels must be None or -1")
            y = None
        with self._lock, torch.inference_mode():
            rec = self._recording(x)
            outputs = []
            for start in range(0, x.shape[0], self.rows):
                n = min(self.rows, x.shape[0] - start)
                # Same padding as fixed_size_forward: zeros, the chunk's first timestep, the null class.
                rec.x[:n].copy_(x[start:start + n])
                rec.t[:n].copy_(t[start:start + n])
                if n < self.rows:
                    rec.x[n:].zero_()
                    rec.t[n:].copy_(t[start])  # a 0-d device tensor broadcast: no host sync
                if rec.y is not None:
                    if y is None:
                        rec.y.fill_(-1)
                    else:
                        rec.y[:n].copy_(y[start:start + n])
                        rec.y[n:].fill_(-1)
                rec.graph.replay()
                outputs.append(rec.out[:n].clone())  # the static output is overwritten by the next replay
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _recording(self, x: torch.Tensor) -> _Recording:
        autocast = torch.is_autocast_enabled("cuda")
        autocast_dtype = torch.get_autocast_dtype("cuda")
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this graphed forward has been freed")
        key = (x.dtype, tuple(x.shape[1:]), autocast, autocast_dtype if autocast else None, model.training)
        rec = self._recordings.get(key)
        if rec is None:
            rec = self._recordings[key] = self._capture(model, x.dtype, tuple(x.shape[1:]), autocast, autocast_dtype)
        return rec

    def _capture(self, model: nn.Module, dtype: torch.dtype, shape: tuple, autocast: bool,
                 autocast_dtype: torch.dtype) -> _Recording:
        fmt = torch.channels_last if self.channels_last and len(shape) == 3 else torch.contiguous_format
        x = torch.zeros((self.rows, *shape), dtype=dtype, device=self.device).contiguous(memory_format=fmt)
        t = torch.zeros((self.rows,), dtype=torch.long, device=self.device)
        y = torch.full((self.rows,), -1, dtype=torch.long, device=self.device) if self.conditional else None
        args = (x, t) if y is None else (x, t, y)
        # The call's autocast setting, with the weight cache off: cast weights must come from kernels in the graph.
        cast = torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast, cache_enabled=False)
        # Warm up on a side stream (cuDNN/cuBLAS pick and allocate their algorithms and workspaces), then record.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), cast:
            for _ in range(self.warmup):
                model(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), cast:
            out = model(*args)
        return _Recording(graph, x, t, y, out)
