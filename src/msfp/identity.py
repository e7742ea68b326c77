"""Digests that identify a model, its weights and tensors, and msfp's own code: cache keys, resume checks, and the
base model a checkpoint was quantized from."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch import nn

from msfp.models import unwrapped


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # A conjugate or negative view's bytes are not its values (and .view refuses it).
    t = t.detach().resolve_conj().resolve_neg()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # 0-dim tensors too


def tensor_digest(t: torch.Tensor) -> str:
    """A short digest of a tensor's dtype, shape and bytes (conditioning and labels in cache keys)."""
    return hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode() + _tensor_bytes(t)).hexdigest()[:16]


def weights_digest(model: nn.Module, exclude: Collection[str] = ()) -> str:
    """A digest of every tensor of ``model``'s state (names, dtypes, shapes, bytes) but those named in ``exclude``:
    equal digests, equal weights. A compiled or DataParallel model's are those of the model it wraps."""
    h = hashlib.sha256()
    for name, tensor in unwrapped(model).state_dict().items():  # compiling or DataParallel prefix every name
        if isinstance(tensor, torch.Tensor) and name not in exclude:
            h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            h.update(_tensor_bytes(tensor))
    return h.hexdigest()[:16]


def differences(there: Mapping, here: Mapping, keys: Iterable) -> list[str]:
    """``"key X there, Y here"`` for each of ``keys`` whose values differ (a missing key reads as None): what a refused
    resume or load names."""
    return [f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in keys if not _same(there.get(k), here.get(k))]


def _same(a, b) -> bool:
    """Equal, a NaN (at any depth) equal to a NaN too: a setting of NaN never equals itself."""
    if a == b:
        return True
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN is written as NaN
    except TypeError:  # not JSON: compared by == alone
        return False


def _plain_value(value):
    """``value`` as JSON encodes it faithfully: arrays and tensors (a scheduler's ``trained_betas``) by digest, as
    their printed form rounds and elides values."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"tensor {tensor_digest(torch.as_tensor(value))}"
    if isinstance(value, Mapping):
        return {str(k): _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, (set, frozenset)):  # in string-hash order otherwise, which differs between processes
        return sorted((_plain_value(v) for v in value), key=repr)
    if isinstance(value, np.generic):  # np.int64(5) is 5
        return value.item()
    return value


def plain_config(config) -> dict:
    """A diffusers config without its bookkeeping entries (``_name_or_path``, ``_diffusers_version``,
    ``_use_default_values``, whose order follows string hashing), which differ between equal models; a plain
    module's dataclass or namespace config by its fields."""
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif not isinstance(config, Mapping):
        config = vars(config) if hasattr(config, "__dict__") else {"repr": repr(config)}
    return {k: _plain_value(v) for k, v in config.items() if not str(k).startswith("_")}


def recorded_config(config: Mapping) -> dict:
    """A diffusers config as a checkpoint records it: without ``_use_default_values``, which lists keys in string-hash
    order and makes ``from_config`` replace their recorded values by the installed diffusers' defaults."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


def base_info(model: nn.Module) -> dict:
    """What a checkpoint records of the model it was quantized from: a diffusers model's class and config; a plain
    module's class, the diffusers models inside it (a wrapper's UNet), its submodules' plain settings and its own
    (``own``: a ``self.t_scale`` of its ``__init__``)."""
    config = getattr(model, "config", None)
    if isinstance(model, diffusers.ModelMixin) and config is not None:
        return dict(library="diffusers", class_name=type(model).__name__, config=recorded_config(config))
    inner = _inner_diffusers_models(model)
    return dict(library="torch", class_name=f"{type(model).__module__}.{type(model).__qualname__}", config=None,
                inner={name: dict(class_name=type(m).__name__, config=recorded_config(m.config))
                       for name, m in inner.items()},
                modules=module_settings(model, skip=inner), own=_plain_settings(model))


def _inner_diffusers_models(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if name and isinstance(m, diffusers.ModelMixin) and getattr(m, "config", None) is not None}


# Attributes msfp.quantize changes on the model's own modules (the saved model is the quantized one).
_CHANGED_BY_QUANTIZE = {"training", "use_nested_tensor"}


def module_settings(model: nn.Module, skip: Iterable[str], layers: bool = False) -> dict:
    """Per submodule of a plain module, its class and plain settings (a GroupNorm's groups, an activation's kind, an
    Upsample's mode): they change the output, not the weight shapes. msfp's own modules are not the base model's,
    inner diffusers models (``skip``) are described by their configs, and convs and linears only with ``layers``
    (a checkpoint checks them by shape and geometry)."""
    settings, skipped = {}, list(skip)
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in skipped):
            continue
        if type(module).__module__.startswith("msfp.") or (not layers and isinstance(module, (nn.Conv2d, nn.Linear))):
            skipped.append(name)
            continue
        settings[name] = dict(class_name=type(module).__qualname__, settings=_plain_settings(module))
    return settings


def _plain_settings(module: nn.Module) -> dict:
    """A module's own plain attributes as JSON values; msfp's (``msfp_config``, ...) are not the model's."""
    return json.loads(json.dumps({k: _setting(v) for k, v in vars(module).items() if not k.startswith(("_", "msfp_"))
                                  and k not in _CHANGED_BY_QUANTIZE and _is_plain(v)}))


def _setting(value):
    """A plain value as recorded: dicts without their ``_``-prefixed bookkeeping keys (a diffusers config's
    ``_use_default_values`` is in string-hash order, its ``_name_or_path`` a path), as :func:`plain_config` drops."""
    if isinstance(value, dict):
        return {k: _setting(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (tuple, list)):
        return [_setting(v) for v in value]
    return value


def _is_plain(value) -> bool:
    """A setting JSON holds as it is, lists and string-keyed dicts of them too (their ``_``-prefixed keys aside, see
    :func:`_setting`): not a function, whose text names its address in this process."""
    if isinstance(value, (tuple, list)):
        return all(map(_is_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and (k.startswith("_") or _is_plain(v)) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def model_key(model: nn.Module, settings: dict, weights: str | None = None) -> str:
    """A digest of ``settings``, ``model``'s class and config and its weights (``weights``: their digest, if the
    caller has it): equal keys, equal models and settings. The config counts (resolution or timestep-embedding
    options change the trajectories, not the weights); its bookkeeping entries do not (:func:`plain_config`). A
    plain module has no config that describes it: the configs of the diffusers models inside it and its submodules'
    plain settings (activation kinds, paddings) count instead. A compiled or DataParallel model is the model it
    wraps."""
    model = unwrapped(model)
    identity = dict(_plain_value(settings), model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                    model_config=plain_config(getattr(model, "config", None)), weights=weights or weights_digest(model))
    if not isinstance(model, diffusers.ModelMixin):
        inner = _inner_diffusers_models(model)
        identity["structure"] = dict(inner={name: plain_config(m.config) for name, m in inner.items()},
                                     modules=module_settings(model, skip=inner, layers=True),
                                     own=_plain_settings(model))
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """A digest of every file of the installed msfp package (code and shipped assets): a resumed run refuses to mix
    results of two versions, which ``msfp.__version__`` alone does not tell apart during development."""
    package = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(package).as_posix()}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
