"""Packed low-bit checkpoints: ``msfp.save_quantized(model, dir)`` / ``msfp.load_quantized(dir)``.

A directory holds

- ``model.safetensors``: for every quantized layer ``<layer>``

  - ``<layer>.weight_codes``: uint8, shape ``(K, nbytes)``: the codes of the quantized weight (the format's own bit
    fields, :mod:`msfp.packing`) of the output-channel-major flattened weight, packed densely (4-bit codes two per
    byte, 6- and 8-bit codes back to back). Row ``k`` is weight set ``k``: TALoRA merges LoRA ``k`` before
    quantization, ``Q_w(W + B_k A_k)``, so a model with K LoRAs is stored as K pre-merged packed weight sets that
    share the layer's scales (no LoRA factors, no full-precision base weight). Plain and single-LoRA models have
    ``K = 1``;
  - ``<layer>.weight_quantizer.scale`` (float32, per output channel) and ``<layer>.weight_quantizer.zero_point`` only
    where the weight format is unsigned; ``<layer>.act_quantizer.scale`` / ``.zero_point`` likewise (one per timestep
    group). Zero points of signed formats are never used, so they are not stored;
  - ``<layer>.bias`` as it is;

  for every attention matmul input quantizer ``<attention>.attn_q|attn_k|attn_probs|attn_v`` (``quantize_attention``,
  :mod:`msfp.attention`) its ``.act_quantizer.scale`` (and ``.zero_point`` for unsigned formats);

  and every other tensor of the model (norms, embeddings, full-precision layers) as it is, in its own dtype.
  Nothing is rounded beyond what the quantizers do: biases and scales stay float32 because float16 would change the
  outputs.
- ``msfp_quant.json``: ``format_version``, ``quantization_config`` shaped like diffusers' (``quant_method: "msfp"``,
  the :class:`~msfp.config.QuantConfig` fields, ``modules_to_not_convert``, ``unsupported_layers`` (weight layers
  msfp has no quantized form of), versions, weight storage), the base
  model's class and config (for a plain module: its class and the configs of the diffusers models inside it),
  every quantized layer's ``info`` (formats, AAL flag and reason, MSEs, FLOPs), every convolution's ``geometry``
  (full-precision ones too; older checkpoints have the quantized ones' only), every attention quantizer's ``info``
  under ``attention``, the dtypes of tensors not stored as they are (``weight_dtypes``, ``buffer_dtypes``), the
  SHA-256 of ``model.safetensors`` and of the metadata itself (``meta_sha256``, required from format version 3);
  written last, so a directory without it is not a finished msfp output.

Loading rebuilds the architecture from its config (re-installing the quantized attention processors) and gives
every quantized layer the dequantized weight
``decode(codes) · s (+ z)``, which is exactly the weight the saved model computed with. Those values lie on the
quantization grid, so the layer's weight quantizer maps them to themselves bit for bit (checked for every layer when
saving), and the reloaded model's outputs equal the saved model's.

Writes go to a temporary sibling directory that replaces ``dir`` only when complete: a crash never leaves a
half-written directory that looks valid, and an earlier result at ``dir`` survives a failed save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Collection
from pathlib import Path

import diffusers
import torch
from diffusers.models.modeling_utils import no_init_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from msfp import __version__
from msfp.attention import attention_quantizers
from msfp.config import SELECTOR_FIELDS, QuantConfig
from msfp.fileio import (atomic_directory, check_replaceable, check_writable, interrupted_save, resolved_parent,
                         unfinished_save)
from msfp.formats import compute_dtype, get_format
from msfp.fp8 import convert_to_fp8, require_fake_quant
from msfp.identity import base_info, differences, recorded_config, weights_digest
from msfp.info import resolved_selectors
from msfp.layers import QuantLayer
from msfp.models import require_module, unwrapped
from msfp.packing import decode, pack, quantize_to_codes, unpack
from msfp.quantizers import MIN_SCALE, quantizer_keys
from msfp.surgery import UnsupportedLayersWarning, quant_layers, quantizable_layers, quantize
from msfp.talora import LoRABank, TimestepRouter, assignment_runs, attach_router

# 3: the metadata's checksum is required (version 2 files written before it was recorded load without it).
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
CONFIG_NAME = "msfp_quant.json"
WEIGHTS_NAME = "model.safetensors"
CODES_SUFFIX = ".weight_codes"


def _conv_geometry(module: nn.Module) -> dict | None:
    """A convolution's stride, padding, dilation, groups and padding mode as JSON values (None for other layers):
    the weight shapes do not show them, and a model built with others would load and compute something else."""
    if isinstance(module, QuantLayer):
        if module.kind != "conv2d":
            return None
        args, mode = module.conv_args, module.padding_mode
    elif isinstance(module, nn.Conv2d):
        args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        mode = module.padding_mode
    else:
        return None
    return json.loads(json.dumps(dict(args, padding_mode=mode), default=_json_default))


def _architecture(config) -> dict:
    """A diffusers config as plain JSON values, without bookkeeping keys (``_name_or_path``, versions, ...)."""
    plain = json.loads(json.dumps(dict(config), default=_json_default))
    return {k: v for k, v in plain.items() if not k.startswith("_")}


def _described(info: dict | None, absent: str) -> str:
    return absent if info is None else f"a {info['class_name']}"


def require_base_model(meta: dict, model: nn.Module, where, what: str) -> None:
    """Raise unless ``model`` (described as ``what``) is the architecture the checkpoint ``where`` with metadata
    ``meta`` was quantized from: same class and, for diffusers models, the same config. Tensor shapes alone miss
    differences such as ``act_fn`` or ``attention_head_dim``."""
    saved, given = meta["base_model"], base_info(model)
    if saved["library"] == "diffusers" or given["library"] == "diffusers":
        same_class = saved["class_name"] == given["class_name"]
    else:  # the same class may be imported from another module (a script's __main__ or a package)
        same_class = saved["class_name"].endswith("." + type(model).__qualname__)
    if not same_class:
        raise ValueError(f"{where} was quantized from a {saved['class_name']}, not from {what} "
                         f"({given['class_name']})")
    configs = [("", saved["config"], given["config"])] if saved["config"] is not None else []
    # Checkpoints written before the inner models were recorded have no "inner": nothing to compare with.
    inner, given_inner = saved.get("inner"), given.get("inner", {})
    for name in sorted(inner.keys() | given_inner.keys()) if inner is not None else ():
        a, b = inner.get(name), given_inner.get(name)
        if a is None or b is None or a["class_name"] != b["class_name"]:
            raise ValueError(f"{where} was quantized from a {saved['class_name']} whose {name} is "
                             f"{_described(a, 'no diffusers model')}; in {what} it is "
                             f"{_described(b, 'no diffusers model')}")
        configs.append((f"{name}: ", a["config"], b["config"]))
    modules, given_modules = saved.get("modules"), given.get("modules", {})  # none in checkpoints before it was kept
    for name in sorted(modules.keys() | given_modules.keys()) if modules is not None else ():
        a, b = modules.get(name), given_modules.get(name)
        differ = None if a is None or b is None or a["class_name"] != b["class_name"] else differences(
            a["settings"], b["settings"], sorted(a["settings"].keys() & b["settings"].keys()))
        if differ is None or differ:
            why = ", ".join(differ) if differ else f"{_described(a, 'missing')} there, {_described(b, 'missing')} here"
            raise ValueError(f"{where} was quantized from another {saved['class_name']} than {what}: its module "
                             f"{name!r} differs ({why})")
    own, given_own = saved.get("own"), given.get("own", {})  # none in checkpoints before it was kept
    differ = differences(own, given_own, sorted(own.keys() & given_own.keys())) if own is not None else []
    if differ:
        raise ValueError(f"{where} was quantized from another {saved['class_name']} than {what}: its own settings "
                         f"differ ({', '.join(differ)})")
    for prefix, there, here in configs:
        a, b = _architecture(there), _architecture(here)
        differ = differences(a, b, sorted(a.keys() & b.keys()))  # keys one diffusers version lacks: defaults
        if differ:
            raise ValueError(f"{where} was quantized from another {saved['class_name']} than {what}: {prefix}"
                             + ", ".join(differ[:4])
                             + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""))


def require_base_weights(meta: dict, model: nn.Module, where, what: str) -> None:
    """Raise unless ``model`` (described as ``what``) has the weights the checkpoint ``where`` was calibrated from
    (when it recorded them; :func:`msfp.calibrate` records its ``fp_model``'s): fine-tuning restores the
    full-precision weights from it, and ε errors are measured against it."""
    require_base_model(meta, model, where, what)
    recorded = meta.get("base_weights")
    given = None if recorded is None else weights_digest(model)
    if given != recorded:
        raise ValueError(f"{where} was calibrated from other full-precision weights than those of {what} (weights "
                         f"digest {recorded} there, {given} here); pass the model it was calibrated from")


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _weight_params(layer):
    """Scale (clamped as the quantizer uses it) and zero point (None for signed formats), shaped to broadcast; in
    float32 for a half-precision layer, as its quantizer computes."""
    q = layer.weight_quantizer
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    dtype = compute_dtype(q.scale.dtype)
    zero = q.zero_point.detach().to(dtype).view(view) if q.fmt.needs_zero_point else None
    return q.scale.detach().to(dtype).clamp_min(MIN_SCALE).view(view), zero


def _dequantize(codes: torch.Tensor, layer) -> torch.Tensor:
    """The weight a quantizer with this layer's format and scales produces from ``codes`` (same operations as
    :func:`msfp.formats.fake_quant`, so the same float32 results)."""
    scale, zero = _weight_params(layer)
    # Codes come from the file (CPU); a plain model passed to load_quantized may already be on a GPU. Half-precision
    # layers compute in float32 and round once, as their quantizers do.
    w = decode(codes.to(scale.device), layer.weight_quantizer.fmt).view(layer.weight.shape).to(scale.dtype) * scale
    return (w if zero is None else w + zero).to(layer.weight.dtype)


@torch.no_grad()
def _packed_weights(layer) -> torch.Tensor:
    """(K, nbytes) packed codes of the layer's K quantized weight sets, checked to reproduce them exactly."""
    fmt = layer.weight_quantizer.fmt
    scale, zero = _weight_params(layer)
    rows = []
    # K counts LoRAs, or the pre-merged sets of a loaded TALoRA checkpoint (which has no LoRA factors to merge).
    for k in range(layer.num_weight_sets):
        # Q_w(W_k) is on the grid, so its codes are W_k's (the fixed-point check below guards that).
        expected = layer.quantized_weight(k).detach()
        if torch.isnan(expected).any():
            raise ValueError(f"{layer.name}: quantized weight set {k} has NaN values (from NaN in its weight, LoRA, "
                             "scale or zero point: a diverged model?); a packed checkpoint cannot hold them")
        codes = quantize_to_codes(expected, fmt, scale, zero)
        dequantized = _dequantize(codes, layer)
        if not torch.equal(dequantized, expected):
            raise RuntimeError(f"{layer.name}: packed codes do not reproduce the quantized weight set {k} exactly "
                               "(a bug in msfp; please report it)")
        if not torch.equal(layer.weight_quantizer(dequantized), dequantized):
            raise ValueError(f"{layer.name}: the dequantized weights are not fixed points of the {fmt.name} weight "
                             "quantizer (a zero point too large for float32 to resolve the scale); the reloaded "
                             "model would differ, so it cannot be saved as a packed checkpoint")
        rows.append(pack(codes, fmt.bits))
    return torch.stack(rows)


def _unused_keys(layers: dict, attention: dict) -> set[str]:
    """State-dict keys a packed checkpoint does not store: weights (stored as codes), zero points of signed formats,
    and the LoRA factors already merged into the packed weight sets."""
    keys = set()
    for name, layer in layers.items():
        keys.add(f"{name}.weight")
        if layer.lora is not None:  # by module, not by name: a model's own submodule called "lora" is stored
            keys.update(f"{name}.lora.{k}" for k in layer.lora.state_dict())
        for q in ("weight_quantizer", "act_quantizer"):
            if not getattr(layer, q).fmt.needs_zero_point:
                keys.add(f"{name}.{q}.zero_point")
    keys.update(f"{name}.act_quantizer.zero_point" for name, q in attention.items()
                if not q.act_quantizer.fmt.needs_zero_point)
    return keys


def _msfp_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the modules msfp adds (quantizers, LoRA banks, the TALoRA router), found by module type:
    a model's own submodule named "lora" or "x_quantizer" is part of the base model."""
    keys = quantizer_keys(model)
    for prefix, module in model.named_modules():
        if isinstance(module, (LoRABank, TimestepRouter)):
            keys.update(f"{prefix}.{k}" for k in module.state_dict())
    return keys


def _unsaved_buffer_dtypes(model: nn.Module, saved: Collection[str]) -> dict[str, str]:
    """Dtypes of the base model's floating buffers that its state dict (keys ``saved``) leaves out (non-persistent
    ones, e.g. DiT's positional embedding): a model rebuilt from its config has them in float32, and
    model.to(bfloat16) had cast them. A quantized layer's own (its TALoRA weight sets) are rebuilt from the codes."""
    own = {f"{n}.weight_sets" for n in quant_layers(model)}
    return {k: str(v.dtype).removeprefix("torch.") for k, v in model.named_buffers()
            if k not in saved and k not in own and v.is_floating_point()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` block of ``msfp_quant.json`` (the keys diffusers uses, plus msfp's own)."""
    # A loaded model's config selects its layers by their saved names: the selectors it was quantized with are kept,
    # and marked as such (older versions saved the names, which msfp info cannot compare with a preset's roles).
    config = {**model.msfp_config.to_dict(), "selectors_as_given": True, **getattr(model, "msfp_layer_selectors", {})}
    return dict(quant_method="msfp", format_version=FORMAT_VERSION, **config,
                modules_to_not_convert=list(model.msfp_full_precision_layers),
                unsupported_layers=dict(getattr(model, "msfp_unsupported_layers", {})),
                weight_storage=dict(codes="sign-magnitude format bit fields, dense LSB-first bit packing",
                                    weight_sets=max(layer.num_weight_sets for layer in quant_layers(model).values())),
                versions=dict(msfp=__version__, torch=torch.__version__, diffusers=diffusers.__version__))


def _check_calibrated(layers: dict, attention: dict) -> None:
    uncalibrated = [n for n, layer in layers.items() if "weight_format" not in layer.info]
    uncalibrated += [n for n, q in attention.items() if "act_format" not in q.info]
    if uncalibrated:
        raise ValueError(f"{len(uncalibrated)} layer(s) were never calibrated (e.g. {uncalibrated[0]!r}); run "
                         "msfp.calibrate before saving")


def _check_savable(layers: dict, attention: dict) -> None:
    disabled = [n for n, layer in layers.items()
                if not (layer.weight_quantizer.enabled and layer.act_quantizer.enabled)]
    disabled += [n for n, q in attention.items() if not q.act_quantizer.enabled]
    if disabled:
        raise ValueError(f"{len(disabled)} layer(s) have a quantizer disabled (e.g. {disabled[0]!r}); a packed "
                         "checkpoint stores quantized layers only: enable the quantizers before saving")


def _talora_meta(model: nn.Module) -> dict | None:
    """LoRA count, rank and the router's timestep → weight-set assignment (``msfp info`` prints it)."""
    if getattr(model, "msfp_router", None) is None:
        return None
    return dict(model.msfp_talora, assignment=assignment_runs(model))


def quant_meta(model: nn.Module) -> dict:
    """What ``msfp_quant.json`` holds for a calibrated model (less the checksums), without writing anything:
    formats, layer policy, per-layer calibration report, FLOPs. Works for models a packed checkpoint cannot hold yet
    (quantizers switched off, several TALoRA LoRAs)."""
    require_module(model, "quant_meta")
    model = unwrapped(model)  # torch.compile's wrapper would prefix every name and record its own class
    layers = quant_layers(model)
    attention = attention_quantizers(model)
    _check_calibrated(layers, attention)
    fp_state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    msfp_keys = _msfp_keys(model)
    meta = dict(
        format_version=FORMAT_VERSION, msfp_version=__version__, quantization_config=quantization_config(model),
        base_model=base_info(model), base_weights=getattr(model, "msfp_base_weights", None),
        flops=getattr(model, "msfp_flops", None),
        # Parameters, once each: not buffers (BatchNorm's running statistics), not a tied weight's second name. A
        # loaded model keeps its checkpoint's count: loading unties a quantized layer's weight from an embedding.
        base_parameters=getattr(model, "msfp_base_parameters", None)
        or sum(p.numel() for k, p in model.named_parameters() if k not in msfp_keys),
        talora=_talora_meta(model), finetune=getattr(model, "msfp_finetune", None),
        scheduler_config=getattr(model, "msfp_scheduler_config", None),
        num_train_timesteps=model.msfp_context.num_train_timesteps,
        # The formats the quantizers use (the packed codes are in them), should they differ from calibration's.
        layers={n: dict(layer.info, weight_format=layer.weight_quantizer.fmt.name,
                        act_format=layer.act_quantizer.fmt.name) for n, layer in layers.items()},
        # The quantized weights are stored as codes: the dtype they are decoded to, where not float32.
        weight_dtypes={n: str(layer.weight.dtype).removeprefix("torch.") for n, layer in layers.items()
                       if layer.weight.dtype != torch.float32},
        buffer_dtypes=_unsaved_buffer_dtypes(model, fp_state.keys()),
        attention={n: dict(q.info, act_format=q.act_quantizer.fmt.name) for n, q in attention.items()},
        # Full-precision convs too: their stored weights show their shapes, not their stride or padding.
        geometry={n: g for n, layer in quantizable_layers(model) if (g := _conv_geometry(layer)) is not None},
        # Stored as packed codes, the weights' shapes are not in the weights file (a 3×3 kernel's codes fit a 1×9).
        weight_shapes={n: list(layer.weight.shape) for n, layer in layers.items()},
    )
    return json.loads(json.dumps(meta, default=_json_default))  # plain JSON values, as read_quant_meta returns


def check_output_directory(directory: str | os.PathLike, finetuned: bool = False) -> Path:
    """``directory`` as an absolute path (its folder resolved), unless :func:`save_quantized` may not write a model
    (``finetuned`` or post-training) there: it holds something other than a msfp checkpoint, a fine-tuned checkpoint
    that a post-training model would replace (the fine-tuning may have taken hours), or the current directory is
    inside it. Commands call it before quantizing."""
    out = resolved_parent(directory)  # "missing/../ckpt" does not exist until the save makes "missing"
    check_replaceable(out)
    # After a save killed between its renames, its last complete version (which the save puts back) is replaced.
    held = interrupted_save(out) or out
    where = "" if held == out else f" (its last complete version, {held}, left by an interrupted save)"
    if held.exists() and not (held / CONFIG_NAME).is_file() and not (held.is_dir() and not any(held.iterdir())):
        raise FileExistsError(f"{out}{where} exists and is not a msfp output directory; refusing to replace it")
    if not finetuned and (held / CONFIG_NAME).is_file():
        # The file as it is, not through read_quant_meta: a checkpoint of another msfp version says so as well.
        try:
            meta = json.loads((held / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # damaged: nothing worth keeping is lost
            meta = None
        if isinstance(meta, dict) and meta.get("finetune"):
            raise FileExistsError(f"{out}{where} holds a fine-tuned model, which a post-training one saved there "
                                  "would replace: choose another directory, or delete it first")
    check_writable(out)
    return out


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the calibrated (or fine-tuned) quantized model to ``directory`` as a packed checkpoint; returns the
    directory's absolute path. A fine-tuned checkpoint there is replaced only by a fine-tuned model."""
    require_module(model, "save_quantized")
    # Saved, FP8 layers would be missing from the checkpoint, which could replace a good one at `directory`.
    require_fake_quant(model, "save_quantized", "a packed checkpoint stores the fake-quant model (msfp.load_quantized("
                       "directory), backend 'fake'), which load_quantized(…, backend='fp8') converts when loading")
    model = unwrapped(model)
    meta = quant_meta(model)
    layers = quant_layers(model)
    attention = attention_quantizers(model)
    _check_savable(layers, attention)
    unused = _unused_keys(layers, attention)
    state, storages = {}, set()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor) and k not in unused:
            v = v.detach().cpu().contiguous()
            # safetensors refuses tensors that share memory (a module registered under two names): store copies;
            # loading fills both names of the one module again.
            storage = v.untyped_storage().data_ptr()
            state[k] = v.clone() if storage in storages else v
            storages.add(storage)
    for name, layer in layers.items():
        state[name + CODES_SUFFIX] = _packed_weights(layer)
    out = check_output_directory(directory, finetuned=bool(meta.get("finetune")))
    with atomic_directory(out) as tmp:
        # One metadata entry: safetensors writes them in hash order, which differs between runs, so a second entry
        # made the bytes (and weights_sha256) of identical checkpoints differ. The version is in CONFIG_NAME.
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        meta["weights_sha256"] = _sha256(tmp / WEIGHTS_NAME)
        meta["meta_sha256"] = _meta_sha256(meta)
        (tmp / CONFIG_NAME).write_text(_readable_json(meta))
    return out


def read_quant_meta(directory: str | os.PathLike) -> dict:
    """The ``msfp_quant.json`` of a msfp output directory, with clear errors for anything else."""
    path = Path(directory)
    if not path.is_dir():
        hint, earlier = "", interrupted_save(path)
        if earlier is not None:
            hint = (f"; {earlier} holds its previous version, left by an interrupted save: rename it back (the next "
                    f"save to {path} does)")
        elif (unfinished := unfinished_save(path)) is not None:
            hint = (f"; {unfinished[0]} holds its previous version, moved aside by a save that has not finished: if "
                    f"none is running, rename it back")
        raise FileNotFoundError(f"{path} is not a directory{hint}")
    meta_path = path / CONFIG_NAME
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a msfp output directory: {CONFIG_NAME} is missing (a save that did not "
                         "finish, or another kind of directory)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: holds a JSON {type(meta).__name__}, not the object msfp writes; the file was "
                         "edited or not written by msfp")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        hint = " (unpacked float32 weights, written by msfp before packed checkpoints; re-run msfp quantize)" \
            if version == 1 else ""
        raise ValueError(f"{meta_path}: checkpoint format version {version!r}{hint}; this msfp ({__version__}) reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    _check_meta(meta, meta_path)
    return meta


# What loading reads from msfp_quant.json: {key: (type, keys it must hold)}.
_META_FIELDS = {"quantization_config": (dict, ("modules_to_not_convert",)),
                "base_model": (dict, ("library", "class_name", "config")),
                "layers": (dict, ()), "num_train_timesteps": (int, ()), "base_parameters": (int, ())}


def _check_meta(meta: dict, meta_path: Path) -> None:
    """Clear errors for a hand-edited or damaged ``msfp_quant.json``: what is missing, and where."""
    for key, (kind, inner) in _META_FIELDS.items():
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{meta_path}: {key!r} is missing or not a {kind.__name__}; the file was edited or not "
                             "written by msfp")
        absent = [k for k in inner if k not in meta[key]]
        if absent:
            raise ValueError(f"{meta_path}: {key!r} has no {', '.join(map(repr, absent))}")
    for group, formats in (("layers", ("weight_format", "act_format")), ("attention", ("act_format",))):
        for name, info in (meta.get(group) or {}).items():
            absent = [k for k in (*formats, "precision") if not isinstance(info, dict) or k not in info]
            if absent:
                raise ValueError(f"{meta_path}: {group} entry {name!r} has no {', '.join(map(repr, absent))}")
            for key in formats:
                try:
                    get_format(info[key])
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{meta_path}: {group} entry {name!r}: {key} {info[key]!r}: {e}") from e


def _build_base(meta: dict, model: nn.Module | None, where: Path) -> nn.Module:
    base = meta["base_model"]
    if model is not None:
        if getattr(model, "msfp_config", None) is not None:  # its quantizers read as tensors the file "lacks"
            raise ValueError(f"{where}: the model passed is already quantized by msfp; pass a fresh full-precision "
                             f"instance of its architecture (load_quantized replaces its weights)")
        require_base_model(meta, model, where, "the model passed")
        return model
    if base["library"] != "diffusers":
        raise ValueError(f"{where}: the base model is a plain PyTorch module ({base['class_name']}); pass an "
                         "instance of it: load_quantized(dir, model=YourModel(...))")
    cls = getattr(diffusers, base["class_name"], None)
    if cls is None:
        raise ValueError(f"{where}: diffusers {diffusers.__version__} has no model class {base['class_name']!r}; if "
                         "it is your own subclass, pass an instance: load_quantized(dir, model=YourModel(...))")
    # Every parameter is overwritten from the checkpoint (a missing one is an error), so skip the random
    # initialisation as diffusers' from_pretrained does: faster, and its temporaries never inflate resident memory.
    with no_init_weights():
        return cls.from_config(recorded_config(base["config"]))  # older checkpoints recorded _use_default_values


# A list of numbers as json.dumps(indent=1) lays it out, one number a line (a string holds no raw newline).
_NUMBER_LIST = re.compile(r"\[\n\s*(-?[\d.eE+-]+(?:,\n\s*-?[\d.eE+-]+)*)\n\s*\]")


def _readable_json(meta: dict) -> str:
    """``meta`` indented, with each list of numbers (weight shapes, strides, router runs) on one line."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\n\s*", m.group(1))) + "]",
                            json.dumps(meta, indent=1)) + "\n"


def _meta_sha256(meta: dict) -> str:
    """A checksum of the metadata but itself: the per-layer formats decode the packed codes, so an edited format
    would load other weights without any other check noticing."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_files(directory: str | os.PathLike, meta: dict) -> Path:
    """Raise unless the checkpoint ``directory``'s files are the ones msfp wrote: ``meta`` (its
    :func:`read_quant_meta`) unedited, and the weights file present and matching its checksum. Returns the weights
    file's path."""
    path = Path(directory)
    if meta["format_version"] >= 3 and "meta_sha256" not in meta:
        raise ValueError(f"{path / CONFIG_NAME}: its checksum (meta_sha256) was removed: the file was edited after "
                         "msfp saved it; save the model again with msfp instead of editing the file")
    if "meta_sha256" in meta and _meta_sha256(meta) != meta["meta_sha256"]:  # version 2 may have none
        raise ValueError(f"{path / CONFIG_NAME}: checksum mismatch: the file was edited after msfp saved it (its "
                         "per-layer formats decode the packed weights, so the model would load other weights); save "
                         "the model again with msfp instead of editing the file")
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{file} is missing")
    if _sha256(file) != meta.get("weights_sha256"):
        raise ValueError(f"{file}: checksum mismatch with {CONFIG_NAME}; the file is truncated, corrupted or from "
                         "another save")
    return file


def _read_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    file = verify_files(path, meta)
    try:
        return load_file(file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{file}: cannot read the weights ({e}); the file is truncated or corrupted") from e


def _expected_entries(qmodel: nn.Module, layers: dict, attention: dict,
                      weight_sets: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shape and dtype of every tensor a packed checkpoint of ``qmodel`` holds."""
    unused = _unused_keys(layers, attention)
    expected = {k: (tuple(v.shape), None) for k, v in qmodel.state_dict().items()
                if isinstance(v, torch.Tensor) and k not in unused}
    for name, layer in layers.items():
        nbytes = (layer.weight.numel() * layer.weight_quantizer.fmt.bits + 7) // 8
        expected[name + CODES_SUFFIX] = ((weight_sets, nbytes), torch.uint8)
    return expected


def freeze_weights(model: nn.Module) -> nn.Module:
    """Quantize every layer's weights once and reuse them (see :meth:`~msfp.layers.QuantLayer.freeze_weights`):
    inference runs at close to full-precision speed. Safe during fine-tuning: the cache is bypassed whenever a
    gradient is needed and refreshed whenever a parameter changes. Returns ``model``."""
    for layer in quant_layers(model).values():
        layer.freeze_weights()
    return model


def unfreeze_weights(model: nn.Module) -> nn.Module:
    """Drop the weight caches of :func:`freeze_weights`: every call re-runs the weight quantizers."""
    for layer in quant_layers(model).values():
        layer.unfreeze_weights()
    return model


def _raise_mismatch(path: Path, meta: dict, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{path / WEIGHTS_NAME} does not match {meta['base_model']['class_name']}: "
                         + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def _check_same_layers(built: set[str], saved: set[str], path: Path) -> None:
    if built != saved:
        extra, missing = sorted(built - saved), sorted(saved - built)
        raise ValueError(f"{path}: mismatched checkpoint: layers missing from it {extra[:3]}, layers it has that the "
                         f"model lacks {missing[:3]}")


def _check_fits(base: nn.Module, meta: dict, state: dict, path: Path) -> None:
    """The checks of the checkpoint against the full-precision ``base`` that can run before quantizing it: the same
    quantized layers, their weights' shapes and packed codes' sizes, the same full-precision tensors, and the shapes
    of the tensors stored as they are."""
    full = set(meta["quantization_config"]["modules_to_not_convert"])
    modules = dict(quantizable_layers(base))
    _check_same_layers({n for n in modules if n not in full}, set(meta["layers"]), path)
    fp_state = {k: v for k, v in base.state_dict().items() if isinstance(v, torch.Tensor)}
    # The tensors msfp adds (quantizers, router) and the packed codes are checked after quantizing; the others are the
    # base model's, less the quantized weights (stored as codes).
    added = tuple([f"{n}.{q}." for n in meta["layers"] for q in ("weight_quantizer", "act_quantizer")]
                  + [f"{n}." for n in meta.get("attention", {})] + ["msfp_router."])
    stored = {k for k in state if not k.endswith(CODES_SUFFIX) and not k.startswith(added)}
    wanted = fp_state.keys() - {f"{n}.weight" for n in meta["layers"]}
    problems = [f"missing {k}" for k in sorted(wanted - stored)] + [f"unexpected {k}" for k in sorted(stored - wanted)]
    problems += [f"{k}: shape {tuple(v.shape)}, model expects {tuple(fp_state[k].shape)}"
                 for k, v in state.items() if k in fp_state and tuple(v.shape) != tuple(fp_state[k].shape)]
    for name, there in meta.get("weight_shapes", {}).items():  # checkpoints before it have none
        here = list(modules[name].weight.shape) if name in modules else there
        if here != there:
            problems.append(f"{name}.weight: shape {tuple(there)} when quantized, model has {tuple(here)}")
    for name, there in meta.get("geometry", {}).items():  # checkpoints before it have none
        here = _conv_geometry(modules[name]) if name in modules else None
        if here is not None and here != there:
            problems.append(f"{name}: " + ", ".join(differences(there, here, sorted(there))))
    for name, info in meta["layers"].items():
        codes = state.get(name + CODES_SUFFIX)
        nbytes = (modules[name].weight.numel() * get_format(info["weight_format"]).bits + 7) // 8
        if codes is None or codes.ndim != 2 or codes.shape[1] != nbytes:
            found = "missing" if codes is None else f"shape {tuple(codes.shape)}"
            problems.append(f"{name}{CODES_SUFFIX}: {found}, model expects (weight sets, {nbytes})")
    _raise_mismatch(path, meta, problems)


def _restore_dtypes(model: nn.Module, state: dict, recorded_dtypes: dict[str, str | None]) -> None:
    """Give the model's floating tensors the dtypes they were saved in (a model built from its config is float32):
    the stored ones' own, and the recorded ones of the tensors stored otherwise (quantized weights) or not at all
    (non-persistent buffers)."""
    wanted = {k: v.dtype for k, v in state.items()}
    for key, name in recorded_dtypes.items():
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{key}: unknown dtype {name!r} in {CONFIG_NAME}")
        wanted[key] = dtype
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, dtype in wanted.items():
        tensor = tensors.get(key)
        if tensor is not None and tensor.is_floating_point() and dtype.is_floating_point and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)


def _tied_layers(model: nn.Module, layers: dict) -> set[str]:
    """Quantized layers whose weight tensor another module uses too (tied embeddings)."""
    owners: dict[int, set[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            owners.setdefault(tensor.untyped_storage().data_ptr(), set()).add(key)
    return {name for name, layer in layers.items()
            if owners.get(layer.weight.untyped_storage().data_ptr(), set()) - {f"{name}.weight"}}


BACKENDS = ("fake", "fp8")


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None, freeze: bool = True,
                   backend: str = "fake") -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, in eval mode.

    Diffusers models are rebuilt from their saved config (no full-precision weights needed); for a plain PyTorch
    denoiser pass ``model``, an instance of the same architecture (its weights are replaced). With ``freeze`` the
    layers reuse their dequantized weights instead of re-quantizing them every call (:func:`freeze_weights`; it
    costs no memory here, the dequantized weights are the layers' weights).

    ``backend="fake"`` is the fake-quant reference; ``"fp8"`` runs every W4A4 layer on FP8 E4M3 codes
    (:func:`msfp.fp8.convert_to_fp8`): Triton FP8 tensor-core kernels once the model is on a GPU that has them,
    the same arithmetic emulated elsewhere. Its outputs equal the reference up to fp32 summation order; the layers it
    cannot run exactly stay fake-quant and are listed in ``model.msfp_backend``. An ``"fp8"`` model is for inference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if model is not None:
        require_module(model, "load_quantized")
    # Normal tensors even when called inside torch.inference_mode: inference tensors count no in-place versions, so
    # frozen weights would be re-quantized on every call, and they could not be fine-tuned later. Only a given model
    # built inside inference mode is loaded in it: its inference tensors cannot be written outside.
    built_in_inference = model is not None and any(t.is_inference() for t in [*model.parameters(), *model.buffers()])
    with torch.inference_mode(built_in_inference):
        return _load_quantized(directory, model, freeze, backend)


def _load_quantized(directory, model: nn.Module | None, freeze: bool, backend: str) -> nn.Module:
    path = Path(directory)
    meta = read_quant_meta(path)
    qc = meta["quantization_config"]
    base = _build_base(meta, model, path)
    state = _read_weights(path, meta)
    _check_fits(base, meta, state, path)  # before quantize changes the model: a caller's model stays as it was
    config = QuantConfig.from_dict({k: v for k, v in qc.items() if k in QuantConfig.__dataclass_fields__})
    # The saved layer names, not the original selectors: the same layers whatever the roles resolve to.
    for field, names in resolved_selectors(meta).items():
        setattr(config, field, names)
    saved_attention = meta.get("attention", {})  # absent in checkpoints written before quantized attention
    try:
        with warnings.catch_warnings():  # the layers it cannot quantize were named when it was quantized (msfp info)
            warnings.simplefilter("ignore", UnsupportedLayersWarning)
            qmodel = quantize(base, config)
    except ValueError as e:
        raise ValueError(f"{path}: the checkpoint does not fit this architecture ({e})") from e
    qmodel.msfp_layer_selectors = dict({f: qc[f] for f in SELECTOR_FIELDS if f in qc},
                                       selectors_as_given=qc.get("selectors_as_given", False))
    layers, attention = quant_layers(qmodel), attention_quantizers(qmodel)
    built, saved = {*layers, *attention}, {*meta["layers"], *saved_attention}
    _check_same_layers(built, saved, path)
    for name, layer in layers.items():
        info = meta["layers"][name]
        layer.info = dict(info)
        layer.weight_quantizer.fmt = get_format(info["weight_format"])
        layer.act_quantizer.fmt = get_format(info["act_format"])
    for name, quantizer in attention.items():
        quantizer.info = dict(saved_attention[name])
        quantizer.act_quantizer.fmt = get_format(quantizer.info["act_format"])

    qmodel.msfp_context.num_train_timesteps = meta["num_train_timesteps"]  # before the router, which reads it
    talora = meta.get("talora")
    if talora:
        attach_router(qmodel, talora["num_loras"], talora["rank"])  # its weights come with the state below
    expected = _expected_entries(qmodel, layers, attention, talora["num_loras"] if talora else 1)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, model expects {shape}"
                 for k, (shape, _) in expected.items() if k in state and tuple(state[k].shape) != shape]
    problems += [f"{k}: dtype {state[k].dtype}, expected {dtype}"
                 for k, (_, dtype) in expected.items() if dtype is not None and k in state and state[k].dtype != dtype]
    _raise_mismatch(path, meta, problems)
    codes = {k[: -len(CODES_SUFFIX)]: state.pop(k) for k in list(state) if k.endswith(CODES_SUFFIX)}
    if "weight_dtypes" in meta:  # checkpoints written before it was recorded load in float32, as they always did
        _restore_dtypes(qmodel, state, {f"{n}.weight": meta["weight_dtypes"].get(n, "float32") for n in layers}
                        | meta.get("buffer_dtypes", {}))
    qmodel.load_state_dict(state, strict=False)
    tied = _tied_layers(qmodel, layers)
    with torch.no_grad():
        quantizers = [q for layer in layers.values() for q in (layer.weight_quantizer, layer.act_quantizer)]
        for q in quantizers + [quantizer.act_quantizer for quantizer in attention.values()]:
            if not q.fmt.needs_zero_point:  # not stored: unused, zero as in a freshly quantized model
                q.zero_point.zero_()
        for name, layer in layers.items():
            count = layer.weight.numel()
            sets = [_dequantize(unpack(row, layer.weight_quantizer.fmt.bits, count), layer) for row in codes[name]]
            if name in tied:  # the other user of the tensor (an embedding) read it in full precision: untie
                layer.weight = nn.Parameter(sets[0], requires_grad=layer.weight.requires_grad)
            else:
                layer.weight.copy_(sets[0])
            if len(sets) > 1:  # routed TALoRA: the router picks one of the K pre-merged sets per sample
                layer.weight_sets = torch.stack(sets)
    qmodel.msfp_flops = meta.get("flops")
    qmodel.msfp_base_parameters = meta["base_parameters"]  # tied weights counted once: untied above, they count twice
    qmodel.msfp_base_weights = meta.get("base_weights")  # checkpoints written before msfp recorded it: None
    qmodel.msfp_scheduler_config = meta.get("scheduler_config")
    qmodel.msfp_finetune = meta.get("finetune")  # so that saving the loaded model again keeps the record
    if freeze:
        freeze_weights(qmodel)
    if backend == "fp8":
        convert_to_fp8(qmodel)
    return qmodel.eval()
