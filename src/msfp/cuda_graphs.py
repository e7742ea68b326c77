"""Denoiser calls replayed from CUDA graphs: a whole step's kernels without the host launching each one.

Eager W4A4 inference on the FP8 path is host-bound: every layer's forward is tens of microseconds of Python and
kernel dispatch, more than its kernels take on a Hopper GPU (README, "Real W4A4 on FP8 tensor cores"). A CUDA graph
replays the recorded kernels with none of that work. :class:`GraphedDenoiser` records one graph per kind of call —
the input tensors' shapes, dtypes and devices, the other arguments, and for a routed TALoRA model how many samples
each LoRA takes — after warm-up calls that compile and autotune the kernels, and replays it for every later call of
that kind with the new inputs copied into the graph's own.

A capture may not read GPU data back to the host. A routed TALoRA forward reads back its route's group sizes once
per call (:meth:`msfp.layers.QuantContext.set_route`); the wrapper reads them itself before choosing the graph, and
gives them to the capture.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from msfp.conditioning import map_tensors
from msfp.models import denoise
from msfp.talora import is_routed, lora_counts


class GraphedDenoiser(nn.Module):
    """``GraphedDenoiser(model)(x, t, **kwargs)`` is ``model(x, t, **kwargs)``'s output tensor (a diffusers output's
    ``.sample``), computed by replaying a CUDA graph of the call.

    The first call of each kind runs the model ``warmup`` times eagerly on a side stream, then captures it; all
    graphs of one wrapper share one memory pool (calls run one after another). Each call returns a new tensor (the
    graph's output is copied out, as the next replay overwrites it). Tensors among the inputs must be on the model's
    GPU; other arguments must be hashable (they select the graph). The graphs read the model's weights where they
    were when captured: updating them in place shows in the results, moving the model does not (wrap it where it
    runs). A routed TALoRA model must be ``model`` itself, not a part of it: its route selects the graph.
    """

    def __init__(self, model: nn.Module, warmup: int = 2):
        super().__init__()
        if warmup < 1:
            raise ValueError(f"warmup must be ≥ 1 (the kernels compile and autotune before capture), got {warmup}")
        _check_on_cuda(model)
        for name, module in model.named_modules():
            if name and is_routed(module):
                raise ValueError(f"GraphedDenoiser: {name} routes its TALoRA LoRAs by timestep, which selects the "
                                 f"graph; wrap {name} itself")
        self.model, self.warmup = model, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self._pool = None

    @property
    def config(self):  # the sample shape and class count are the wrapped model's
        return self.model.config

    def forward(self, sample: torch.Tensor, timestep, **kwargs) -> torch.Tensor:
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"GraphedDenoiser: sample must be a tensor, got {type(sample).__name__}")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        per_sample = timestep.reshape(-1)
        if per_sample.numel() == 1:
            per_sample = per_sample.expand(sample.shape[0])
        counts = lora_counts(self.model, per_sample)
        inputs = dict(kwargs, sample=sample, timestep=timestep)
        key = (tuple((name, _signature((name,), value)) for name, value in sorted(inputs.items())),
               torch.is_grad_enabled(), torch.is_inference_mode_enabled(), None if counts is None else tuple(counts))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._record(inputs, counts)
        return graph(inputs)

    def _record(self, inputs: dict, counts: list[int] | None) -> _Graph:
        # Checked here: inside a capture, a tensor on another device fails with an error that names no argument.
        device = _model_device(self.model)
        for path, value in _tensors(inputs):
            if value.device != device:
                raise ValueError(f"GraphedDenoiser: argument {_named(path)} is on {value.device}, but the model is "
                                 f"on {device}; a graph reads its tensor inputs on the model's device")
        static = map_tensors(torch.Tensor.clone, inputs)

        def call():
            return denoise(self.model, static["sample"], static["timestep"],
                           **{k: v for k, v in static.items() if k not in ("sample", "timestep")})

        # One pool for all graphs, whatever order they replay in: a later capture may take an earlier graph's freed
        # intermediates, but every replay writes what it reads (from the static inputs and the weights, which are
        # outside the pool) and its output is copied out before another graph runs.
        if self._pool is None:
            self._pool = _new_pool()
        try:
            with _known_route_counts(self.model, counts):
                replay, output = capture(call, self.warmup, self._pool)
        except CaptureFailed as e:  # only the capture's: a warm-up's error is the model's own, as eager calls get it
            shapes = {".".join(map(str, path)): tuple(v.shape) for path, v in _tensors(static)}
            raise RuntimeError(f"GraphedDenoiser: capturing {type(self.model).__name__} called with {shapes} in a "
                               f"CUDA graph failed (sample without CUDA graphs to run it eagerly): {e}") from e
        return _Graph(static, replay, output)


class _Graph:
    def __init__(self, static: dict, replay, output: torch.Tensor):
        self.static, self.replay, self.output = static, replay, output
        self.static_tensors = dict(_tensors(static))

    def __call__(self, inputs: dict) -> torch.Tensor:
        for path, value in _tensors(inputs):  # by path: a later call may pass its keyword arguments in another order
            self.static_tensors[path].copy_(value)
        self.replay()
        return self.output.clone()


def _signature(path: tuple, value):
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device
    if isinstance(value, dict):  # nested conditioning (SDXL's added_cond_kwargs): the same, entry by entry, in the
        # given order (a graph replays the order it was captured with, and a model may read the entries in order)
        return dict, tuple((key, _signature((*path, key), v)) for key, v in value.items())
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in _leaves(value)):
        # Tensors hash by identity: a tuple of fresh tensors (ControlNet residuals) would capture a graph per call.
        raise TypeError(f"GraphedDenoiser: argument {_named(path)} holds tensors inside a {type(value).__name__}; "
                        "pass them as separate tensor arguments (a graph reads its inputs from fixed tensors)")
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"GraphedDenoiser: argument {_named(path)} is a {type(value).__name__}, which cannot select "
                        "a graph (tensors, dicts of them and hashable values only)") from None
    return value


def _tensors(inputs: dict, path: tuple = ()):
    """``(path, tensor)`` for every tensor among the arguments ``inputs``, dicts in them included."""
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            yield (*path, key), value
        elif isinstance(value, dict):
            yield from _tensors(value, (*path, key))


def _named(path: tuple) -> str:
    """An argument as a message names it: 'timestep', added_cond_kwargs['time_ids']."""
    return repr(path[0]) if len(path) == 1 else path[0] + "".join(f"[{key!r}]" for key in path[1:])


def _leaves(value):
    if isinstance(value, dict):
        value = value.values()
    for v in value:
        if isinstance(v, (tuple, list, dict)):
            yield from _leaves(v)
        else:
            yield v


@contextlib.contextmanager
def _known_route_counts(model: nn.Module, counts: list[int] | None):
    context = getattr(model, "msfp_context", None)
    if counts is None or context is None:
        yield
        return
    context.known_route_counts = counts
    try:
        yield
    finally:
        context.known_route_counts = None


def _model_device(model: nn.Module) -> torch.device:
    # An FP8-converted plain denoiser may hold buffers only (codes, scales).
    return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device


def _check_on_cuda(model: nn.Module) -> None:
    device = _model_device(model)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")


class CaptureFailed(RuntimeError):
    """A call that ran eagerly (the warm-up) failed inside the CUDA graph capture."""


def _new_pool():
    return torch.cuda.graph_pool_handle()


def capture(call, warmup: int = 2, pool=None) -> tuple:
    """``(replay, output)``: ``call()`` captured in a CUDA graph after ``warmup`` eager calls on a side stream (where
    compiling, autotuning and the layers' caches happen, and where PyTorch wants them: the caching allocator keeps
    their memory apart from the graph's); ``replay()`` reruns its kernels, writing ``output`` again. ``pool``: a
    memory pool shared with other graphs (``torch.cuda.graph_pool_handle()``), or None for the graph's own. An error
    of the warm-up calls comes through as raised, one of the capture as :class:`CaptureFailed`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = call()
    except RuntimeError as e:
        raise CaptureFailed(str(e)) from e
    return graph.replay, output
