"""Save and reload quantized models: ``msfp.save_quantized(model, dir)`` / ``msfp.load_quantized(dir)``.

A directory holds

- ``msfp_quant.json``: format version, msfp version, the :class:`~msfp.config.QuantConfig`, the base model's class
  and diffusers config, every quantized layer's ``info`` (formats, AAL flag and reason, MSEs, FLOPs) and the model's
  FLOPs; written last, so a directory without it is not a finished msfp output;
- ``model.safetensors``: the model's state (weights, quantizer scales and zero points) in float32, so the reloaded
  model computes exactly what the saved one did.

Writes go to a temporary sibling directory that replaces ``dir`` only when complete: a crash never leaves a
half-written directory that looks valid, and an earlier result at ``dir`` survives a failed save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from msfp import __version__
from msfp.config import QuantConfig
from msfp.formats import get_format
from msfp.surgery import quant_layers, quantize

FORMAT_VERSION = 1
CONFIG_NAME = "msfp_quant.json"
WEIGHTS_NAME = "model.safetensors"


def _base_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if isinstance(model, diffusers.ModelMixin) and config is not None:
        return dict(library="diffusers", class_name=type(model).__name__, config=dict(config))
    return dict(library="torch", class_name=f"{type(model).__module__}.{type(model).__qualname__}", config=None)


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the calibrated (or fine-tuned) quantized model to ``directory``; returns its path."""
    layers = quant_layers(model)
    uncalibrated = [n for n, layer in layers.items() if "weight_format" not in layer.info]
    if uncalibrated:
        raise ValueError(f"{len(uncalibrated)} layer(s) were never calibrated (e.g. {uncalibrated[0]!r}); run "
                         "msfp.calibrate before saving")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    meta = dict(
        format_version=FORMAT_VERSION, msfp_version=__version__, quant_config=model.msfp_config.to_dict(),
        base_model=_base_info(model), full_precision_layers=model.msfp_full_precision_layers,
        flops=getattr(model, "msfp_flops", None),
        base_parameters=sum(v.numel() for k, v in state.items() if "_quantizer." not in k),
        num_train_timesteps=model.msfp_context.num_train_timesteps,
        layers={n: layer.info for n, layer in layers.items()},
    )
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / CONFIG_NAME).is_file():
        raise FileExistsError(f"{out} exists and is not a msfp output directory; refusing to replace it")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "msfp_format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        for f in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quant_meta(directory: str | os.PathLike) -> dict:
    """The ``msfp_quant.json`` of a msfp output directory, with clear errors for anything else."""
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    meta_path = path / CONFIG_NAME
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a msfp output directory: {CONFIG_NAME} is missing (a save that did not "
                         "finish, or another kind of directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: unreadable ({e})") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: checkpoint format version {version!r}, this msfp ({__version__}) reads "
                         f"version {FORMAT_VERSION}")
    return meta


def _build_base(meta: dict, model: nn.Module | None, where: Path) -> nn.Module:
    base = meta["base_model"]
    if model is not None:
        return model
    if base["library"] != "diffusers":
        raise ValueError(f"{where}: the base model is a plain PyTorch module ({base['class_name']}); pass an "
                         "instance of it: load_quantized(dir, model=YourModel(...))")
    cls = getattr(diffusers, base["class_name"], None)
    if cls is None:
        raise ValueError(f"{where}: unknown diffusers model class {base['class_name']!r}")
    return cls.from_config(base["config"])


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, in eval mode.

    Diffusers models are rebuilt from their saved config (no full-precision weights needed); for a plain PyTorch
    denoiser pass ``model``, an instance of the same architecture (its weights are replaced).
    """
    path = Path(directory)
    meta = read_quant_meta(path)
    base = _build_base(meta, model, path)
    config = QuantConfig.from_dict(meta["quant_config"])
    # The saved layer names, not the original selectors: the same layers whatever the roles resolve to.
    config.eight_bit_layers = [re.escape(n) for n, i in meta["layers"].items() if i["precision"] == "8bit"]
    config.full_precision_layers = [re.escape(n) for n in meta["full_precision_layers"]]
    try:
        qmodel = quantize(base, config)
    except ValueError as e:
        raise ValueError(f"{path}: the checkpoint does not fit this architecture ({e})") from e
    layers = quant_layers(qmodel)
    if set(layers) != set(meta["layers"]):
        extra, missing = sorted(set(layers) - set(meta["layers"])), sorted(set(meta["layers"]) - set(layers))
        raise ValueError(f"{path}: mismatched checkpoint: layers missing from it {extra[:3]}, layers it has that the "
                         f"model lacks {missing[:3]}")
    for name, layer in layers.items():
        info = meta["layers"][name]
        layer.info = dict(info)
        layer.weight_quantizer.fmt = get_format(info["weight_format"])
        layer.act_quantizer.fmt = get_format(info["act_format"])
    try:
        state = load_file(path / WEIGHTS_NAME)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path / WEIGHTS_NAME}: cannot read the weights ({e}); the file is missing, truncated or "
                         "corrupted") from e
    expected = {k: v for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor)}
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise ValueError(f"{path / WEIGHTS_NAME} does not match {meta['base_model']['class_name']}: "
                         + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    qmodel.load_state_dict(state, strict=False)
    qmodel.msfp_flops = meta.get("flops")
    qmodel.msfp_context.num_train_timesteps = meta["num_train_timesteps"]
    return qmodel.eval()
