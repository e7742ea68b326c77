"""``msfp.quantize(model, config)``: replace a denoiser's ``Conv2d``/``Linear`` layers by quantized layers, in place.

With ``QuantConfig.quantize_attention`` the inputs of the attention matmuls get quantizers too (:mod:`msfp.attention`);
the layer policy's selectors also match their names (``<attention module>.attn_q`` etc.).

Works on any ``nn.Module`` called as ``model(x, t, **cond)`` or ``model(x, timestep=t, **cond)`` (diffusers
``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``,
``PixArtTransformer2DModel`` or a plain PyTorch denoiser). The quantizers start with placeholder scales: run
:func:`msfp.calibrate` before using the model.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import warnings
from contextlib import contextmanager

import torch
from diffusers import ModelMixin
from torch import nn
from torch.nn.utils import parametrize

from msfp.attention import (attention_inputs, check_attention_replaceable, check_quantized_attention,
                            check_unfused_projections, install_attention_quantizers, projecting_attention)
from msfp.config import ROLES, QuantConfig
from msfp.fp8 import require_fake_quant
from msfp.layers import QuantContext, QuantLayer
from msfp.models import SUPPORTED_CLASSES, check_denoiser_class, require_module, timestep_by_name
from msfp.quantizers import named_quantizers

# Known diffusers blocks whose child layers read the output of a SiLU/GELU (structural AAL detection).
_AAL_CHILDREN = {
    "ResnetBlock2D": ("conv1", "conv2", "time_emb_proj"),
    "ResnetBlockCondNorm2D": ("conv1", "conv2"),
    "TimestepEmbedding": ("linear_2",),
    "AdaLayerNormZero": ("linear",),
    "AdaLayerNormSingle": ("linear",),
    "AdaLayerNorm": ("linear",),
    "AdaGroupNorm": ("linear",),
    "DiTTransformer2DModel": ("proj_out_1",),
    "Transformer2DModel": ("proj_out_1",),  # patched inputs: DiT's output head, built by the older class
}
# Blocks among those whose activation is optional (act_fn=None): then the child reads the raw embedding.
_OPTIONAL_ACT = {"TimestepEmbedding": "linear_2", "AdaGroupNorm": "linear"}
# diffusers, guided-diffusion/LDM (time_embed, label_emb), lucidrains (time_mlp), facebookresearch DiT (t_embedder)
# and NVlabs EDM (map_layer0/1, map_label, map_augment) names.
_TIME_EMBEDDING = re.compile(r"(^|.*\.)(time_embedding|class_embedding|add_embedding|timestep_embedder|"
                             r"time_embed|label_emb|emb\.class_embedder|adaln_single|time_mlp|t_embedder|"
                             r"map_layer\d+|map_label|map_augment)(\..*|$)")
# diffusers' output layers: PixArtTransformer2DModel registers its conditioning embeddings after proj_out, so the last
# registered layer is not always the output.
_OUTPUT_LAYERS = ("conv_out", "proj_out_2", "proj_out")


def _output_layer(model: nn.Module, names: list[str]) -> list[str]:
    """``[name]`` of the output layer: the model's own ``conv_out``/``proj_out_2``/``proj_out``, else that of the
    outermost diffusers model it holds when that is a whole denoiser or holds every layer (so a wrapper module that
    adapts the call, with a conditioning projection of its own or none, changes nothing), else the last registered
    layer: a plain model with layers of its own around a diffusers block (a continuous-input Transformer2DModel as
    its middle) has its own output layer, not the block's ``proj_out``. Registration order cannot tell a wrapper's
    adapter from its head; calibration warns when the output it traces comes from another layer."""
    from diffusers import ModelMixin

    inner, module = next(((n, m) for n, m in model.named_modules() if isinstance(m, ModelMixin)), ("", None))
    # A supported denoiser class; Transformer2DModel is one with patched inputs (DiT, PixArt) and a block inside
    # UNets with continuous ones.
    kind = type(module).__name__
    whole = kind in SUPPORTED_CLASSES and (kind != "Transformer2DModel" or module.config.patch_size is not None)
    wraps = inner and (whole or all(n.startswith(f"{inner}.") for n in names))
    candidates = [*_OUTPUT_LAYERS, *(f"{inner}.{n}" for n in _OUTPUT_LAYERS if wraps)]
    return next(([n] for n in candidates if n in names), names[-1:])


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``Conv2d``/``Linear`` in registration order, quantized layers included."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, QuantLayer))]


class UnsupportedLayersWarning(UserWarning):
    """Weight layers :func:`quantize` leaves full precision because msfp has no quantized form of them."""


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Weight layers msfp has no quantized form of (Conv1d, Conv3d, transposed convs, Bilinear, and
    nn.MultiheadAttention's input projection, a bare weight): ``{name: type}``. They stay full precision, and their
    FLOPs count in the totals only."""
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Bilinear, nn.MultiheadAttention))
            and not isinstance(m, nn.Conv2d)}


def structural_aals(model: nn.Module) -> dict[str, str]:
    """Layers whose input is the output of a SiLU/GELU in known diffusers blocks: ``{name: reason}``."""
    found = {}
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        cls = type(parent).__name__
        for child in _AAL_CHILDREN.get(cls, ()):
            if isinstance(getattr(parent, child, None), (nn.Conv2d, nn.Linear, QuantLayer)):
                if cls == "ResnetBlock2D" and child == "time_emb_proj" and getattr(parent, "skip_time_act", False):
                    continue
                found[prefix + child] = f"input is SiLU output ({cls}.{child})"
        if cls in _OPTIONAL_ACT and getattr(parent, "act", None) is None:  # built without its activation
            found.pop(prefix + _OPTIONAL_ACT[cls], None)
        # UNet2DModel / UNet2DConditionModel: conv_out reads conv_act(conv_norm_out(x)).
        if getattr(parent, "conv_act", None) is not None and hasattr(parent, "conv_out"):
            found[prefix + "conv_out"] = f"input is {type(parent.conv_act).__name__} output ({cls}.conv_out)"
        # PixArt's caption projection: linear_2 reads act_1(linear_1(caption)), a GELU or SiLU.
        if cls == "PixArtAlphaTextProjection" and type(getattr(parent, "act_1", None)).__name__ in ("GELU", "SiLU",
                                                                                                      "FP32SiLU"):
            found[prefix + "linear_2"] = f"input is {type(parent.act_1).__name__} output ({cls}.linear_2)"
        # FeedForward with a GELU activation: net = [GELU(proj), Dropout, Linear, ...].
        if cls == "FeedForward":
            net = getattr(parent, "net", [])
            if len(net) > 2 and type(net[0]).__name__ in ("GELU", "ApproximateGELU"):
                found[f"{prefix}net.2"] = f"input is {type(net[0]).__name__} output (FeedForward)"
    return found


def _select(selectors, names, roles, field) -> set[str]:
    chosen = set()
    for sel in selectors:  # roles and regexes checked by QuantConfig.validate
        if sel in ROLES:
            matched = roles[sel]
        else:
            matched = [n for n in names if re.fullmatch(sel, n)]
        if not matched and not sel.startswith("@"):
            examples = ", ".join(names[:4])
            raise ValueError(f"QuantConfig.{field}: {sel!r} matches no Conv2d/Linear layer or attention input of the "
                             f"model (layer names look like: {examples}, ...)")
        chosen.update(matched)
    return chosen


def _timestep_hook(module, args, kwargs):
    # Looks the context up on the module at call time, so a deep copy of the model uses its own context.
    # The input is forward()'s first parameter and the timestep its `timestep` parameter (every diffusers denoiser;
    # Transformer2DModel takes encoder_hidden_states second) or else its second one, passed by position or by name
    # (forward(*args, **kwargs) names none: then by position, unless the call names a `timestep`, as pipelines do).
    router = getattr(module, "msfp_router", None)
    if getattr(module, "_is_replica", False) and (module.msfp_config.act_timestep_groups > 1
                                                 or (router is not None and router.num_loras > 1)):
        # DataParallel's replicas run in threads on one shared context: each call overwrote another's timesteps
        raise RuntimeError("a DataParallel replica of a model with per-timestep activation scales or TALoRA LoRAs: "
                           "its replicas share one timestep context and mix their calls' timesteps; use "
                           "DistributedDataParallel (torchrun, one process per GPU) or one GPU")
    signature = inspect.signature(module.forward)
    named = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bound = signature.bind_partial(*args, **kwargs).arguments
    x, t = (bound.get(named[i]) if i < len(named) else (args[i] if i < len(args) else None) for i in (0, 1))
    if timestep_by_name(signature):
        t = bound.get("timestep")
    elif "timestep" in kwargs:  # gathered by a **kwargs parameter
        t = kwargs["timestep"]
    if x is None and torch.is_tensor(t) and t.numel() > 1:  # forward(*args, **kwargs) called by keyword only
        x = t  # one timestep per sample
    elif x is None:  # else the batch size of the first batched tensor (a broadcast condition may come first)
        x = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v is not t and v.dim() > 0), None)
    if x is None:  # no batch size: no timesteps (an error where they are needed), never the last call's
        module.msfp_context.set_timesteps(None, 0, None)
    else:
        module.msfp_context.set_timesteps(t, x.shape[0], x.device)
    check_quantized_attention(module, module.msfp_quantized_attention)
    check_unfused_projections(module.msfp_projecting_attention)


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _why_not_replaceable(module: nn.Module, aliases: list[str], parent) -> tuple[str, bool] | None:
    """Why a QuantLayer cannot stand in for ``module``, and whether keeping it full precision is the fix."""
    if type(module).forward not in (nn.Conv2d.forward, nn.Linear.forward):
        return f"{type(module).__name__} has its own forward(), which a quantized layer would drop", True
    if isinstance(module, nn.Conv2d) and type(module)._conv_forward is not nn.Conv2d._conv_forward:
        return (f"{type(module).__name__} has its own _conv_forward() (its convolution), which a quantized layer "
                "would drop"), True
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return (f"{type(module).__name__} has no weight until its first forward; run the model once before quantizing "
                "it"), False
    if (parametrize.is_parametrized(module) or not isinstance(module.weight, nn.Parameter)
            or not isinstance(module.bias, (nn.Parameter, type(None)))):
        return ("its weight or bias is computed on every call (weight_norm, spectral_norm or another "
                "parametrization), which a quantized layer would freeze; remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations)"), True
    if "forward" in vars(module):  # diffusers' and accelerate's hooks wrap the instance's forward
        return ("its forward is wrapped on the instance (diffusers hooks such as enable_layerwise_casting or group "
                "offloading, accelerate's offloading), which a quantized layer would drop: quantize the model before "
                "enabling them"), False
    hooks = sum(len(getattr(module, kind, {})) for kind in _MODULE_HOOKS)
    if hooks:
        return (f"it has {hooks} forward/backward hook(s), which a quantized layer would not run: remove them before "
                "quantizing and register them on the quantized layer afterwards"), False
    if isinstance(parent, nn.MultiheadAttention):
        return ("nn.MultiheadAttention reads this layer's weight directly and never calls it, so it cannot be "
                "quantized"), True
    if aliases:
        return (f"it is also registered as {', '.join(aliases)}: replacing it under one name would leave the others "
                "full precision"), True
    return None


def _check_replaceable(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Layers a QuantLayer cannot stand in for, all of them with what to do instead; checked before any layer is
    replaced."""
    names, parents, slots = {}, {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        for attribute, child in module._modules.items():  # named_children() lists a module held twice once
            if child is None:
                continue
            parents.setdefault(id(child), module)
            slots.setdefault(id(child), set()).add((id(module), attribute))
    refused = {}
    for name, module in layers:
        # A layer reached by several names through one shared parent has one slot: replacing it there covers them all.
        aliases = [n for n in names[id(module)] if n != name] if len(slots[id(module)]) > 1 else []
        why = _why_not_replaceable(module, aliases, parents.get(id(module)))
        if why is not None:
            refused[name] = why
    if refused:
        keep = [name for name, (_, keepable) in refused.items() if keepable]
        fix = (f"; keep {'it' if len(keep) == 1 else 'them'} full precision with "
               f"QuantConfig.full_precision_layers={keep!r}") if keep else ""
        by_reason: dict[str, list[str]] = {}
        for name, (why, _) in refused.items():
            by_reason.setdefault(why, []).append(name)
        raise ValueError("; ".join(f"{_some(n)}: {why}" for why, n in by_reason.items()) + fix)


def refuse_sequence_first(model: nn.Module, names, what: str) -> None:
    """Refuse per-timestep ``what`` for layers ``names`` inside a transformer layer built with ``batch_first=False``:
    their inputs are (sequence, batch, features), so row i is token i, not sample i (silently, when the two counts
    are equal)."""
    names = set(names)
    for container, module in model.named_modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and \
                not module.self_attn.batch_first:
            inside = [f"{container}.{n}" for n, _ in module.named_modules() if f"{container}.{n}" in names]
            if inside:
                raise ValueError(f"{_some(inside)}: inside {container} ({type(module).__name__}, batch_first=False) "
                                 f"its inputs are (sequence, batch, features), so per-timestep {what} would be "
                                 "chosen per token, not per sample: build it with batch_first=True or keep those "
                                 "layers full precision (QuantConfig.full_precision_layers)")


def _no_fast_path(module, args):
    """A forward pre-hook that does nothing: its presence turns nn.TransformerEncoderLayer's inference fast path off,
    which reads linear1/linear2's weights directly and would run them in full precision."""


@torch.inference_mode(False)  # else the quantizers' parameters are inference tensors that calibration cannot set
def quantize(model: nn.Module, config: QuantConfig | str | dict) -> nn.Module:
    """Replace the model's ``Conv2d``/``Linear`` layers by :class:`~msfp.layers.QuantLayer` in place (and, with
    ``config.quantize_attention``, quantize the attention matmul inputs); return it. ``config``: a
    :class:`~msfp.config.QuantConfig`, a preset name, or a dict of QuantConfig fields (as in a JSON config file)."""
    if isinstance(config, str):
        config = QuantConfig.preset(config)
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    elif isinstance(config, QuantConfig):
        config = copy.deepcopy(config)  # the model's own: editing the caller's (a sweep) must not change this model
    else:
        raise TypeError(f"quantize: config must be a QuantConfig, a preset name or a dict of QuantConfig fields, got "
                        f"{type(config).__name__}")
    config.validate()
    require_module(model, "quantize")
    if isinstance(model, ModelMixin):
        check_denoiser_class(type(model), "quantize")
    if getattr(model, "msfp_config", None) is not None:
        raise ValueError(f"{type(model).__name__} is already quantized (preset {model.msfp_config.name!r})")
    if hasattr(model, "_orig_mod"):  # its layer names gain "_orig_mod." and its forward hides the timestep's name
        raise ValueError("the model is wrapped by torch.compile: quantize the model itself, then compile the result")
    layers = quantizable_layers(model)
    if not layers or isinstance(model, (nn.Conv2d, nn.Linear)):
        raise ValueError(f"{type(model).__name__} has nothing to quantize: it contains no nn.Conv2d or nn.Linear "
                         "(pass the whole denoiser, not one layer)")
    already = next((n for n, m in layers if isinstance(m, QuantLayer)), None)
    if already is not None:
        raise ValueError(f"{type(model).__name__} is already quantized (e.g. {already!r})")
    names = [n for n, _ in layers]
    attention = attention_inputs(model) if config.quantize_attention else []
    time_embedding = [n for n in names if _TIME_EMBEDDING.fullmatch(n)]
    # guided-diffusion/LDM UNets register their timestep MLP before the input conv
    roles = {"@first": [n for n in names if n not in time_embedding][:1], "@last": _output_layer(model, names),
             "@time_embedding": time_embedding}
    full = _select(config.full_precision_layers, names + attention, roles, "full_precision_layers")
    eight = _select(config.eight_bit_layers, names + attention, roles, "eight_bit_layers") - full
    if not set(names) - full:
        raise ValueError(f"QuantConfig.full_precision_layers keeps all {len(names)} Conv2d/Linear layers full "
                         "precision: nothing to quantize")
    _check_replaceable(model, [(n, m) for n, m in layers if n not in full])
    if config.act_timestep_groups > 1:
        refuse_sequence_first(model, [n for n in names if n not in full], "activation scales")
    check_attention_replaceable(model, [n for n in attention if n not in full])
    aals = structural_aals(model) if config.aal_structural else {}

    context = QuantContext()  # calibrate() sets the scheduler's num_train_timesteps
    for name, module in layers:
        if name in full:
            continue
        precision = "8bit" if name in eight else "4bit"
        wfmt = (config.eight_bit_weight_formats if name in eight else config.weight_formats)[0]
        afmt = (config.eight_bit_act_formats if name in eight else config.act_formats)[0]
        layer = QuantLayer(module, name, wfmt, afmt, context, config.act_timestep_groups, precision)
        layer.train(module.training)
        if name in aals:
            layer.info.update(aal=True, aal_reason="structural: " + aals[name])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    for module in model.modules():
        if not (isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder))
                and any(isinstance(m, QuantLayer) for m in module.modules())):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.register_forward_pre_hook(_no_fast_path)
        else:  # with a padding mask it would pass nested tensors down
            module.use_nested_tensor = False
    if attention:
        formats = {n: ((config.eight_bit_act_formats if n in eight else config.act_formats)[0],
                       "8bit" if n in eight else "4bit") for n in attention if n not in full}
        install_attention_quantizers(model, formats, context, config.act_timestep_groups)
    model.msfp_quantized_attention = sorted({name.rpartition(".")[0] for name in formats}) if attention else []
    model.msfp_projecting_attention = projecting_attention(model)
    model.msfp_output_layer = next(iter(roles["@last"]), None)  # calibration checks it against the traced output
    model.msfp_config = config
    model.msfp_context = context
    model.msfp_full_precision_layers = sorted(full)
    model.msfp_unsupported_layers = unsupported_layers(model)
    model.register_forward_pre_hook(_timestep_hook, with_kwargs=True)
    if isinstance(model, ModelMixin):  # also what a pipeline's save_pretrained calls for its denoiser
        model.save_pretrained = functools.partial(_refuse_save_pretrained, type(model).__name__)
    if model.msfp_unsupported_layers:  # last: raised as an error (-W error), it leaves a whole quantized model
        listed = [f"{n} ({kind})" for n, kind in model.msfp_unsupported_layers.items()]
        warnings.warn(f"{len(listed)} layer(s) msfp cannot quantize stay full precision: {_some(listed)}; only "
                      "nn.Conv2d and nn.Linear are quantized", UnsupportedLayersWarning, stacklevel=3)  # (the decorator)
    return model


def _refuse_save_pretrained(class_name: str, *args, **kwargs):
    # diffusers writes safetensors, which cannot hold the quantizers' formats: it failed with "'dict' object has no
    # attribute 'device'" deep in huggingface_hub.
    raise TypeError(f"this {class_name} is quantized by msfp: save it with msfp.save_quantized(model, directory) "
                    "(and read it back with msfp.load_quantized); save_pretrained writes only full-precision models")


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The model's quantized layers by name; an error for a model that :func:`quantize` did not process."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers; run msfp.quantize(model, config) first")
    return layers


def _quantizers(model: nn.Module):
    """Every weight and activation quantizer of a quantized model (layers and attention matmul inputs)."""
    quant_layers(model)  # a clear error for a model that was not quantized
    # Its FP8 layers have no quantizers to switch: "full precision" would leave them quantized.
    require_fake_quant(model, "switching quantizers", "use the fake-quant model (msfp.load_quantized(directory))")
    return list(named_quantizers(model).values())


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    for quantizer in _quantizers(model):
        quantizer.enabled = enabled


@contextmanager
def quantizers_disabled(model: nn.Module):
    """Run ``model`` in full precision inside the block; each quantizer gets back its own setting afterwards (a
    W4A16 model's disabled activation quantizers stay disabled)."""
    quantizers = list(_quantizers(model))
    before = [q.enabled for q in quantizers]
    set_quantizers_enabled(model, False)
    try:
        yield
    finally:
        for quantizer, enabled in zip(quantizers, before):
            quantizer.enabled = enabled


def set_fused_rounding(model: nn.Module, fused: bool) -> None:
    """Run every quantizer's rounding through the fused ``torch.compile`` kernel (:mod:`msfp.kernels`) or eagerly.

    Both compute the same values; fused is much faster on GPUs (one pass over memory instead of ~10) but compiles a
    graph per format and input rank on first use.
    """
    for quantizer in _quantizers(model):
        quantizer.fused = fused
