"""Digests that identify a model, its weights and tensors, and msfp's own code: cache keys, resume checks, and the
base model a checkpoint was quantized from."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

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
    return [f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in keys if there.get(k) != here.get(k)]


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


def model_key(model: nn.Module, settings: dict, weights: str | None = None) -> str:
    """A digest of ``settings``, ``model``'s class and config and its weights (``weights``: their digest, if the
    caller has it): equal keys, equal models and settings. The config counts (resolution or timestep-embedding
    options change the trajectories, not the weights); its bookkeeping entries do not (:func:`plain_config`). A
    compiled or DataParallel model is the model it wraps."""
    model = unwrapped(model)
    identity = dict(_plain_value(settings), model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                    model_config=plain_config(getattr(model, "config", None)), weights=weights or weights_digest(model))
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
