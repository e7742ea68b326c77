"""Quantized attention matmuls: a diffusers attention processor whose ``QKᵀ`` and ``P·V`` read fake-quantized inputs.

With ``QuantConfig.quantize_attention``, :func:`msfp.quantize` gives every diffusers ``Attention`` module up to four
:class:`AttnInputQuantizer` children, one per matmul input, and installs :class:`QuantAttnProcessor`:

- ``<attention>.attn_q`` and ``<attention>.attn_k``: the query and key before ``QKᵀ`` (after ``norm_q``/``norm_k``);
- ``<attention>.attn_probs``: the softmax probabilities before ``P·V``. They lie in [0, 1], a one-sided tensor, so
  calibration searches them like an AAL (signed and unsigned-with-zero-point candidates);
- ``<attention>.attn_v``: the value before ``P·V``.

These names are module paths, like layer names: ``eight_bit_layers`` / ``full_precision_layers`` selectors match them
too (``up_blocks\\.0\\..*`` covers a block's linears and its attention matmuls, ``.*attn_probs`` every probability
tensor). A name left in full precision simply has no quantizer.

The processor computes what the processor diffusers gives the module by default computes (``AttnProcessor2_0``, or
``AttnProcessor`` with ``scale_qk=False``), softmax written out rather than a fused ``scaled_dot_product_attention``
(which never materialises the probabilities), so with the quantizers disabled the model's outputs equal the
full-precision model's up to float rounding. A module whose processor was set to the other one, where the two differ
(``norm_q``/``norm_k``, which ``AttnProcessor`` ignores; ``scale_qk=False``, which ``AttnProcessor2_0`` ignores), is
refused rather than silently computed another way: a reloaded checkpoint gets the default processor back.
"""

from __future__ import annotations

import contextlib
import re

import torch
from diffusers.models.attention_processor import (Attention, AttnAddedKVProcessor, AttnAddedKVProcessor2_0,
                                                  AttnProcessor, AttnProcessor2_0)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from msfp.layers import QuantLayer
from msfp.quantizers import ActivationQuantizer

TENSORS = ("q", "k", "probs", "v")
#: which matmul each quantized tensor feeds
MATMUL = {"q": "qk", "k": "qk", "probs": "pv", "v": "pv"}
# Processors whose computation QuantAttnProcessor reproduces; others (added KV projections, IP-Adapter, ...) differ.
_REPLACEABLE = (AttnProcessor, AttnProcessor2_0)
# Processors msfp does not replace, and diffusers' explicit-softmax versions of them (the same computation).
_EXPLICIT_TWINS = {AttnAddedKVProcessor2_0: AttnAddedKVProcessor}


class AttnInputQuantizer(nn.Module):
    """Per-tensor activation quantizer of one attention matmul input (optionally one scale per timestep group).

    It carries what :class:`~msfp.layers.QuantLayer` carries for calibration and reports: ``name``, ``kind``
    (``attn-q``, ``attn-k``, ``attn-probs``, ``attn-v``), ``precision``, ``info`` and ``observer``, called as
    ``observer(self, x, macs=...)`` with the input in per-sample layout (batch, heads, ...) and the multiply-accumulates
    per sample of the matmul it feeds.
    """

    def __init__(self, name: str, tensor: str, act_format: str, context, act_groups: int = 1,
                 precision: str = "4bit"):
        super().__init__()
        self.name = name
        self.tensor = tensor
        self.kind = f"attn-{tensor}"
        self.precision = precision
        self.act_quantizer = ActivationQuantizer(act_format, act_groups)
        self.context = context
        self.info: dict = {}
        self.observer = None

    def forward(self, x: torch.Tensor, heads: int, macs: int) -> torch.Tensor:
        """``x`` in diffusers' head-batched layout (batch·heads, ...); the timestep groups are per sample."""
        per_sample = x.unflatten(0, (-1, heads))
        if self.observer is not None:
            self.observer(self, per_sample, macs=macs)
        out = self.act_quantizer(per_sample, self.context.groups(self.act_quantizer.num_groups, per_sample.shape[0],
                                                                 self.name))
        return out.flatten(0, 1)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind}, {self.precision}"


class QuantAttnProcessor:
    """Attention with explicit softmax and fake-quantized matmul inputs (the ``attn_*`` children of the module).

    Same steps as diffusers' ``AttnProcessor``: spatial norm, group norm, cross-attention (``norm_cross``), attention
    mask, scores scaled by ``attn.scale``, output projection, residual connection and ``rescale_output_factor``; and,
    where ``AttnProcessor2_0`` is the module's default (``scale_qk``), ``norm_q``/``norm_k`` as it applies them.
    Without quantizers it is plain full-precision attention.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, H·W, C) tokens
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None and attention_mask.ndim == 2:  # (B, keys): AttnProcessor2_0's per-key mask
            attention_mask = attention_mask.unsqueeze(1)
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # SDPA's meaning: True takes part
            attention_mask = torch.zeros(attention_mask.shape, dtype=hidden_states.dtype, device=attention_mask.device
                                         ).masked_fill(~attention_mask, torch.finfo(hidden_states.dtype).min)
        attention_mask = attn.prepare_attention_mask(attention_mask, source.shape[1], source.shape[0])
        if attention_mask is not None and attn.upcast_attention:  # added to float32 scores (baddbmm takes one dtype)
            attention_mask = attention_mask.float()
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            source = hidden_states  # self-attention reads the group-normed tokens
        elif attn.norm_cross:
            source = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(source))
        value = attn.head_to_batch_dim(attn.to_v(source))
        if attn.scale_qk:  # AttnProcessor2_0 applies them; AttnProcessor (scale_qk=False's default) does not
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        heads = attn.heads
        # Multiply-accumulates per sample of QKᵀ and of P·V (equal: heads · L_q · L_k · head_dim).
        macs = heads * query.shape[1] * key.shape[1] * query.shape[2]
        query = _quantized(attn, "q", query, heads, macs)
        key = _quantized(attn, "k", key, heads, macs)
        probs = _quantized(attn, "probs", attn.get_attention_scores(query, key, attention_mask), heads, macs)
        value = _quantized(attn, "v", value, heads, macs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))

        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape[0], -1, *image_shape[2:])
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _quantized(attn: Attention, tensor: str, x: torch.Tensor, heads: int, macs: int) -> torch.Tensor:
    quantizer = getattr(attn, f"attn_{tensor}", None)
    return x if quantizer is None else quantizer(x, heads, macs)


def attention_modules(model: nn.Module) -> dict[str, Attention]:
    """The diffusers ``Attention`` modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def attention_inputs(model: nn.Module) -> list[str]:
    """Names of the attention matmul inputs, ``<attention>.attn_q`` etc., in module order (for the layer policy's
    selectors); a clear error for a model without diffusers attention."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"QuantConfig.quantize_attention: {type(model).__name__} has no diffusers Attention module "
                         "(msfp quantizes the matmuls of diffusers.models.attention_processor.Attention only)")
    return [f"{name}.attn_{t}" for name in modules for t in TENSORS]


def check_attention_replaceable(model: nn.Module, names) -> None:
    """Raise if an attention module that gets quantizers (``names``: from :func:`attention_inputs`) runs a processor
    msfp cannot reproduce; those whose inputs all stay full precision keep theirs."""
    quantized = {name.rpartition(".")[0] for name in names}
    for name, attn in attention_modules(model).items():
        if name not in quantized:
            continue
        processor = type(attn.processor).__name__
        selector = re.escape(name) + r"\.attn_.*"
        keep = f'keep its inputs full precision with QuantConfig.full_precision_layers=[r"{selector}"]'
        if type(attn.processor) not in _REPLACEABLE:
            raise ValueError(f"QuantConfig.quantize_attention: attention {name!r} uses {processor}, which msfp cannot "
                             f"replace (it reproduces {' and '.join(p.__name__ for p in _REPLACEABLE)} only); {keep}")
        default = AttnProcessor2_0 if attn.scale_qk else AttnProcessor
        differs = (attn.norm_q is not None or attn.norm_k is not None) if attn.scale_qk else True
        if type(attn.processor) is not default and differs:
            ignored = "its norm_q/norm_k" if attn.scale_qk else "scale_qk=False (it scales by head_dim^-0.5)"
            raise ValueError(f"QuantConfig.quantize_attention: attention {name!r} runs {processor}, which ignores "
                             f"{ignored}, where msfp computes what the module's default {default.__name__} computes; "
                             f"set that back with model.get_submodule({name!r}).set_processor({default.__name__}()), "
                             f"or {keep}")


def install_attention_quantizers(model: nn.Module, formats: dict[str, tuple[str, str]], context,
                                 act_groups: int) -> None:
    """Give the ``Attention`` modules the quantizers named in ``formats`` (name -> (initial activation format,
    precision); names from :func:`attention_inputs`) and those that get one the :class:`QuantAttnProcessor`; the
    others keep their processor (a fused kernel, or one msfp cannot reproduce)."""
    for name, attn in attention_modules(model).items():
        device = next(attn.parameters()).device
        installed = False
        for tensor in TENSORS:
            full = f"{name}.attn_{tensor}"
            if full in formats:
                fmt, precision = formats[full]
                quantizer = AttnInputQuantizer(full, tensor, fmt, context, act_groups, precision).to(device)
                quantizer.info.update(module=name, matmul=MATMUL[tensor])
                attn.add_module(f"attn_{tensor}", quantizer)
                installed = True
        if installed:
            attn.set_processor(QuantAttnProcessor())


def check_quantized_attention(model: nn.Module, names) -> None:
    """Raise if an attention module among ``names`` (those given quantizers) no longer runs
    :class:`QuantAttnProcessor`: another processor would skip its quantizers and silently run full precision."""
    for name in names:
        processor = model.get_submodule(name).processor
        if not isinstance(processor, QuantAttnProcessor):
            raise RuntimeError(
                f"attention {name!r} has quantized matmul inputs but runs {type(processor).__name__}, which skips "
                "them (was set_attn_processor called on the quantized model?); restore it with "
                f"model.get_submodule({name!r}).set_processor(msfp.attention.QuantAttnProcessor())")


def projecting_attention(model: nn.Module) -> dict[str, Attention]:
    """The attention modules with a quantized q/k/v projection, by name."""
    return {n: attn for n, attn in attention_modules(model).items()
            if any(isinstance(getattr(attn, p, None), QuantLayer) for p in ("to_q", "to_k", "to_v"))}


def check_unfused_projections(attentions: dict[str, Attention]) -> None:
    """Raise if one of ``attentions`` (those with quantized q/k/v projections) runs a fused-projection processor:
    ``fuse_qkv_projections()`` after quantizing builds new full-precision ``to_qkv``/``to_kv`` layers, and the fused
    processor would run those instead of the quantized ones, silently. The modules themselves, not names: a lookup by
    name cost more than the check, on every call."""
    for name, attn in attentions.items():
        processor = attn.processor
        if type(processor).__name__.startswith("Fused") and any(
                isinstance(getattr(attn, p, None), nn.Linear) for p in ("to_qkv", "to_kv")):
            raise RuntimeError(
                f"attention {name!r} has quantized q/k/v projections but runs {type(processor).__name__}, which uses "
                "full-precision fused copies of them (was fuse_qkv_projections called on the quantized model?); call "
                "unfuse_qkv_projections(), or fuse the projections before quantizing")


def attention_quantizers(model: nn.Module) -> dict[str, AttnInputQuantizer]:
    """The model's attention matmul input quantizers by name (empty without ``quantize_attention``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AttnInputQuantizer)}


@contextlib.contextmanager
def explicit_attention(model: nn.Module):
    """Run the model's replaceable attention processors as :class:`QuantAttnProcessor` (explicit ``bmm`` and
    softmax), and added-KV ones as diffusers' explicit version, inside the block, e.g. so that ``FlopCounterMode``
    counts the attention matmuls on every device (it does not see the CPU kernels of
    ``scaled_dot_product_attention``)."""
    swapped = {attn: attn.processor for attn in attention_modules(model).values()
               if type(attn.processor) in _REPLACEABLE or type(attn.processor) in _EXPLICIT_TWINS}
    try:
        for attn, processor in swapped.items():
            attn.set_processor(_EXPLICIT_TWINS.get(type(processor), QuantAttnProcessor)())
        yield model
    finally:
        for attn, processor in swapped.items():
            attn.set_processor(processor)


@contextlib.contextmanager
def counting_flops(model: nn.Module):
    """A ``FlopCounterMode`` over the block that counts attention on every device: replaceable processors run as
    explicit ``bmm`` (:func:`explicit_attention`, so their matmuls count under their module's name), and the fused CPU
    kernel of ``scaled_dot_product_attention`` that the others call gets torch's SDPA formula, which torch registers
    for the GPU kernels only."""
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value)}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path is one fused op that FlopCounterMode does not count.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter, explicit_attention(model):
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
