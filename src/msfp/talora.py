"""Timestep-aware LoRA (TALoRA, SPEC §2.3): several LoRAs per layer and one shared timestep router.

Denoising changes character over the trajectory (layout first, details last), so one low-rank correction fits the
quantized model poorly everywhere. Each quantized layer keeps K LoRA pairs; a router shared by the whole model maps
the timestep (sinusoidal embedding → MLP → K logits) to a hard one-hot choice, with a straight-through estimator so
the router still learns. The chosen pair is merged *before* weight quantization, ``Q_w(W + B_k A_k)``, so the
fine-tuned model stays a pure low-bit model.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from torch.nn.utils import skip_init

from msfp.checks import whole_number
from msfp.layers import route_counts
from msfp.quantizers import KeepsFloat32


class TimestepRouter(KeepsFloat32):
    """Timestep → one of ``num_loras`` LoRAs, per sample.

    ``forward(t)`` returns a (B, K) one-hot matrix whose gradient is the softmax's (straight-through), so a loss on
    the routed output trains the MLP. Call :meth:`init_contiguous` to start from K contiguous timestep intervals.
    It stays float32 in a half-precision model and runs without autocast: its choice then does not depend on the
    model's dtype or the caller's autocast, and its small optimizer steps are not rounded away.
    """

    def __init__(self, num_loras: int = 4, num_train_timesteps: int = 1000, embed_dim: int = 64,
                 hidden_dim: int = 128):
        super().__init__()
        self.num_loras = whole_number("num_loras", num_loras, 1)
        self.num_train_timesteps = num_train_timesteps
        self.embed_dim = embed_dim
        # skip_init, then a seeded init: building a router (also when a checkpoint is loaded) leaves the caller's
        # global RNG alone, and a single-LoRA model's unused router is the same on every run.
        self.mlp = nn.Sequential(skip_init(nn.Linear, embed_dim, hidden_dim), nn.SiLU(),
                                 skip_init(nn.Linear, hidden_dim, num_loras))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """nn.Linear's uniform(±1/√fan_in) initialisation, drawn from a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
                layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)

    def logits(self, t: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        t = torch.as_tensor(t, device=weight.device).reshape(-1)
        emb = get_timestep_embedding(t.float(), self.embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        # Not under the caller's autocast either: bfloat16 logits sent timesteps near a boundary to another LoRA.
        with torch.autocast(weight.device.type, enabled=False):
            return self.mlp(emb.to(weight.dtype))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        soft = self.logits(t).softmax(dim=-1)
        # scatter, not F.one_hot, which reads the indices back to the host to check them (a GPU stall per call)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
        # Parenthesised: (hard + soft) - soft is not exactly hard in floating point (0.99999994 for 1 in some rows),
        # and the route gate multiplies every routed layer's output.
        return hard + (soft - soft.detach())

    @torch.no_grad()
    def assignment(self, t: torch.Tensor) -> torch.Tensor:
        """The LoRA index each timestep is routed to (LongTensor, no gradient)."""
        return self.logits(t).argmax(dim=-1)

    def interval_labels(self, t: torch.Tensor) -> torch.Tensor:
        """LoRA k owns the k-th of K equal contiguous slices of ``[0, num_train_timesteps)``."""
        return (t.long() * self.num_loras // self.num_train_timesteps).clamp(max=self.num_loras - 1)

    @torch.enable_grad()  # a fit, also when add_talora is called under torch.no_grad()
    def init_contiguous(self, steps: int = 400, lr: float = 1e-2, seed: int = 0) -> float:
        """Fit the MLP to the contiguous-interval split (deterministic for a seed); returns the fraction of
        timesteps routed as intended (1.0 expected)."""
        self.reset_parameters(seed)
        t = torch.arange(self.num_train_timesteps, device=self.mlp[0].weight.device)
        labels = self.interval_labels(t)
        opt = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(self.logits(t), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (self.assignment(t) == labels).float().mean().item()


class LoRABank(KeepsFloat32):
    """K low-rank updates ``B_k A_k`` for one weight of shape (out, in, *kernel).

    ``A`` starts Kaiming-uniform and ``B`` at zero, so every update is exactly zero before fine-tuning and the
    quantized model is unchanged by adding the bank. The factors stay float32 in a half-precision model (the layer
    forms and rounds ``W + B_k A_k`` in float32): in bfloat16 most optimizer steps were below half an ulp of ``A``
    and were rounded away.
    """

    def __init__(self, weight_shape: torch.Size | tuple, num_loras: int = 4, rank: int = 8, seed: int | None = None):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        out_features, fan_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if rank < 1 or rank > min(out_features, fan_in):
            raise ValueError(f"LoRA rank {rank} must be in [1, {min(out_features, fan_in)}] for a weight "
                             f"of shape {self.weight_shape}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft initialise A
        self.A = nn.Parameter((torch.rand(num_loras, rank, fan_in, generator=gen) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(num_loras, out_features, rank))

    @property
    def num_loras(self) -> int:
        return self.A.shape[0]

    def delta(self, k: int) -> torch.Tensor:
        """``B_k A_k`` reshaped like the weight."""
        return (self.B[k] @ self.A[k]).view(self.weight_shape)

    def deltas(self, ks: list[int]) -> torch.Tensor:
        """``B_k A_k`` for each ``k`` of the increasing ``ks``, stacked: one batched product over the range they span,
        taken by slicing (an index tensor built from ``ks`` would be a host-to-device copy on a GPU)."""
        lo, hi = ks[0], ks[-1] + 1
        products = torch.bmm(self.B[lo:hi], self.A[lo:hi]).view(hi - lo, *self.weight_shape)
        return products if len(ks) == hi - lo else torch.stack([products[k - lo] for k in ks])


def _route_hook(module, args, kwargs):
    # Runs after msfp.quantize's timestep hook; looks everything up on the module so deep copies stay independent.
    context, router = module.msfp_context, module.msfp_router
    t = context.timesteps
    if t is None and router.num_loras > 1:  # LoRA 0 for every timestep would be a different model, silently
        raise RuntimeError(f"this TALoRA model picks one of its {router.num_loras} LoRAs by the timestep: call it as "
                           "model(x, t, ...)")
    context.set_route(None if router.num_loras == 1 else router(t))


def add_talora(qmodel: nn.Module, num_loras: int = 4, rank: int = 4, seed: int = 0) -> TimestepRouter:
    """Give every quantized layer of ``qmodel`` a bank of ``num_loras`` LoRAs (rank capped by the layer's shape) and
    the model one shared router, initialised to K contiguous timestep intervals. ``num_loras=1`` is plain
    (single-LoRA, QALoRA-style) fine-tuning. Returns the router (also ``qmodel.msfp_router``)."""
    from msfp.fp8 import require_fake_quant
    from msfp.surgery import quant_layers, refuse_sequence_first

    if getattr(qmodel, "msfp_router", None) is not None:
        raise ValueError("the model already has TALoRA LoRAs")
    require_fake_quant(qmodel, "add_talora", "fine-tune the fake-quant model, then convert it")
    # an int: it is recorded in the checkpoint's JSON, where a numpy integer would not serialise
    rank = whole_number("add_talora: rank", rank, 1)
    num_loras = whole_number("add_talora: num_loras", num_loras, 1)
    layers = quant_layers(qmodel)
    if num_loras > 1:
        refuse_sequence_first(qmodel, layers, "LoRAs")
    try:  # all or nothing: a half-built model refuses the next call ("already has TALoRA LoRAs")
        router = attach_router(qmodel, num_loras, rank)
        if num_loras > 1:
            router.init_contiguous(seed=seed)
        for i, layer in enumerate(layers.values()):
            shape = layer.weight.shape
            layer_rank = min(rank, shape[0], math.prod(shape[1:]))
            # Beside its weight: a model split across devices stays split.
            layer.lora = LoRABank(shape, num_loras, layer_rank, seed=seed + i).to(layer.weight.device)
    except BaseException:
        remove_talora(qmodel)
        raise
    return router


def remove_talora(qmodel: nn.Module) -> None:
    """Undo :func:`add_talora`: drop every layer's LoRAs, the router and its routing hook."""
    from msfp.surgery import quant_layers

    for key, hook in list(qmodel._forward_pre_hooks.items()):
        if hook is _route_hook:
            del qmodel._forward_pre_hooks[key]
            qmodel._forward_pre_hooks_with_kwargs.pop(key, None)
    for layer in quant_layers(qmodel).values():
        layer.lora = None
    for name in ("msfp_router", "msfp_talora"):  # both, or what an interrupted add_talora set
        if hasattr(qmodel, name):
            delattr(qmodel, name)


def is_routed(qmodel: nn.Module) -> bool:
    """Whether ``qmodel`` sends each sample to one of several TALoRA LoRAs by its timestep."""
    router = getattr(qmodel, "msfp_router", None)
    return router is not None and router.num_loras > 1


def lora_counts(qmodel: nn.Module, timesteps: torch.Tensor) -> list[int] | None:
    """How many of the samples at ``timesteps`` (one per sample) each LoRA takes, read back to the host: the route
    groups of a call; None for a model that is not routed."""
    if not is_routed(qmodel):
        return None
    with torch.no_grad():
        route = qmodel.msfp_router(timesteps)
    return route_counts(route.argmax(1), route.shape[1])  # the choice set_route makes from the same route


def attach_router(qmodel: nn.Module, num_loras: int, rank: int) -> TimestepRouter:
    """Give ``qmodel`` a (fresh) shared router and the hook that routes every call; ``rank`` is recorded only."""
    device = next(qmodel.parameters()).device
    router = TimestepRouter(num_loras, qmodel.msfp_context.num_train_timesteps).to(device)
    qmodel.msfp_router = router
    qmodel.msfp_talora = dict(num_loras=num_loras, rank=rank)
    qmodel.register_forward_pre_hook(_route_hook, with_kwargs=True)
    return router


def assignment_runs(qmodel: nn.Module) -> list[list[int]]:
    """The router's choice over every training timestep as runs ``[first_t, last_t, k]`` (for ``msfp info``)."""
    t = torch.arange(qmodel.msfp_context.num_train_timesteps)
    choice = lora_assignment(qmodel, t)
    runs = []
    for ti, k in zip(t.tolist(), choice):
        if runs and runs[-1][2] == k:
            runs[-1][1] = ti
        else:
            runs.append([ti, ti, k])
    return runs


def lora_assignment(qmodel: nn.Module, timesteps) -> list[int]:
    """Which LoRA the router picks for each timestep (all 0 for single-LoRA models)."""
    router = qmodel.msfp_router
    t = torch.as_tensor(timesteps).reshape(-1)  # a scalar timestep is one, as the router reads it
    return router.assignment(t).tolist() if router.num_loras > 1 else [0] * len(t)
