"""Conditioning inputs: what a denoiser takes besides ``(x, t)``, as ``model(x, t, **cond)``.

``cond`` maps argument names to per-sample tensors (first dimension: one row per sample) or to dicts of them, nested
as the model takes them: SDXL's UNet reads ``added_cond_kwargs={"text_embeds": …, "time_ids": …}`` and PixArt at
1024 px ``added_cond_kwargs={"resolution": …, "aspect_ratio": …}``. Every function here keeps that nesting; files
hold the tensors flat under dotted paths (``added_cond_kwargs.time_ids``), which is why names may not contain dots.
"""

from __future__ import annotations

from collections.abc import Callable

import inspect

import torch

from msfp.models import model_config, timestep_by_name, unwrapped


def _described(path: str) -> str:
    return "cond" + "".join(f"[{part!r}]" for part in path.split("."))


def flatten(cond: dict, prefix: str = "") -> dict:
    """``cond``'s leaves (the values that are not dicts) by dotted path, in order."""
    flat = {}
    for name, value in cond.items():
        if not isinstance(name, str) or not name or "." in name:
            where = f" in {_described(prefix)}" if prefix else ""
            raise ValueError(f"conditioning names must be non-empty strings without dots{where}, got {name!r} (dots "
                             "separate the nested names in files)")
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict):
            if not value:  # it would vanish from files: a model called with it gets none after a reload
                raise ValueError(f"{_described(path)} is an empty dict: leave it out or give it tensors")
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: dict) -> dict:
    """The nested ``cond`` whose :func:`flatten` is ``flat``."""
    cond: dict = {}
    for path, value in flat.items():
        *parents, name = path.split(".")
        node = cond
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return cond


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], cond: dict) -> dict:
    """``cond`` with ``fn`` applied to every tensor, nesting kept (other values as they are)."""
    return {name: map_tensors(fn, value) if isinstance(value, dict) else fn(value) if isinstance(value, torch.Tensor)
            else value for name, value in cond.items()}


def select(cond: dict, index) -> dict:
    """The rows ``index`` (a slice or index tensor) of every tensor in ``cond``."""
    return map_tensors(lambda v: v[index], cond)


def concat(conds: list[dict]) -> dict:
    """Batches of the same conditioning (as :func:`select` gives them), concatenated along the rows."""
    flats = [flatten(c) for c in conds]
    return unflatten({path: torch.cat([f[path] for f in flats]) for path in flats[0]}) if flats else {}


def model_cond(cond: dict, device, dtype) -> dict:
    """``cond`` for a model on ``device`` whose parameters are ``dtype``: floating tensors in that dtype, as diffusers'
    pipelines give text embeddings (trajectory points keep their teacher's, which may differ)."""
    return map_tensors(lambda v: v.to(device, dtype if v.is_floating_point() else v.dtype), cond)


def check_per_sample(cond: dict, num_samples: int) -> None:
    """Raise unless every leaf of ``cond`` is a tensor with one row per sample, naming the first that is not."""
    for path, value in flatten(cond).items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != (num_samples,):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
            raise ValueError(f"{_described(path)} must be a tensor with first dimension {num_samples} (one per "
                             f"sample) or a dict of them, got {got}")


def has(cond: dict, path: str) -> bool:
    """Whether ``cond`` holds the dotted ``path`` (``added_cond_kwargs.time_ids``)."""
    node = cond
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# Conditioning that diffusers denoisers declare optional (default None) but cannot run without.
_REQUIRED_CONDITIONING = {"PixArtTransformer2DModel": ("encoder_hidden_states",)}
# The entries of added_cond_kwargs a diffusers UNet reads for its addition_embed_type (SDXL: "text_time") and its
# encoder_hid_dim_type (Kandinsky, IP-Adapter).
_ADDED_BY_EMBED_TYPE = {"text_image": ("image_embeds",), "text_time": ("text_embeds", "time_ids"),
                        "image": ("image_embeds",), "image_hint": ("image_embeds", "hint")}
_ADDED_BY_HIDDEN_TYPE = dict.fromkeys(("text_image_proj", "image_proj", "ip_image_proj"), ("image_embeds",))


def required_conditioning(model) -> list[str]:
    """The inputs besides ``(x, t)`` that ``model`` cannot run without (a text-conditioned model's
    ``encoder_hidden_states``; SDXL's ``added_cond_kwargs.text_embeds`` and ``added_cond_kwargs.time_ids``, dotted
    paths into nested dicts). Only what the model declares: a callable without a readable signature declares nothing."""
    model = unwrapped(model)
    try:
        signature = inspect.signature(getattr(model, "forward", model))
    except (TypeError, ValueError):  # (a TorchScript method)
        return []
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    # x is the first parameter, t the `timestep` one (Sana, CogVideoX… take encoder_hidden_states before it), else
    # the second (msfp.models.denoise).
    given = {p.name for p in params[:1]} | ({"timestep"} if timestep_by_name(signature) else
                                             {p.name for p in params[1:2]})
    required = [p.name for p in params if p.name not in given and p.default is inspect.Parameter.empty]
    added = []
    if "added_cond_kwargs" in signature.parameters:  # (a wrapper that builds them itself declares none)
        config = model_config(model)
        added += [*_ADDED_BY_EMBED_TYPE.get(config.get("addition_embed_type"), ()),
                  *_ADDED_BY_HIDDEN_TYPE.get(config.get("encoder_hid_dim_type"), ())]
        if getattr(model, "use_additional_conditions", False) is True and \
                getattr(model, "adaln_single", None) is not None:  # PixArt at 1024 px
            added += ["resolution", "aspect_ratio"]
    declared = [*_REQUIRED_CONDITIONING.get(type(model).__name__, ()),
                *(f"added_cond_kwargs.{name}" for name in added)]
    return required + [n for n in dict.fromkeys(declared) if n not in required]


def require_unconditional(model, spec: str) -> None:
    """Refuse, before any work, a model the command line cannot run: it gives no conditioning inputs."""
    needed = required_conditioning(model)
    if needed:
        raise ValueError(f"{spec}: {type(model).__name__} needs conditioning ({', '.join(needed)}), which the msfp "
                         "command line cannot give; use the Python API, whose calibrate, finetune and sample take "
                         "cond={name: tensor}")


def check_conditioning(model, cond: dict) -> None:
    """Refuse, before any work, a ``cond`` without an input ``model`` needs (diffusers' own errors for them name no
    input, or none that was left out: SDXL's is "argument of type 'NoneType' is not iterable")."""
    missing = [n for n in required_conditioning(model) if not has(cond, n)]
    if missing:
        nested = ""
        dotted = next((n.split(".") for n in missing if "." in n), None)
        if dotted is not None:
            example = "".join(f"{{{part!r}: " for part in dotted) + "..." + "}" * len(dotted)
            nested = f" (a dotted name is a nested dict's entry: cond={example})"
        raise ValueError(f"{type(model).__name__} needs conditioning {missing}: pass cond={{name: tensor with one "
                         f"row per sample}}{nested}")
