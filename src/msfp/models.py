"""Load the diffusion model that msfp quantizes: ``load_model(spec) -> (denoiser, scheduler)``.

``spec`` is one of

- ``"default"``: msfp's shipped DDPM trained on Fashion-MNIST (32x32, 1 channel, range [-1, 1]); works offline.
- a local ``save_pretrained`` directory: a pipeline (``model_index.json`` + ``unet/`` or ``transformer/`` +
  ``scheduler/``) or a bare model directory (``config.json``, optionally a ``scheduler_config.json`` next to it).
- a Hugging Face Hub id ``"org/name"`` (needs network; only the denoiser and scheduler files are downloaded).

The scheduler is always a :class:`~diffusers.DDIMScheduler` built from the saved scheduler config: DDIM is msfp's
default sampler everywhere (calibration, fine-tuning, evaluation). Pass another scheduler class to
:func:`msfp.sampling.sample` via ``OtherScheduler.from_config(scheduler.config)`` if you need one.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, ModelMixin
from diffusers.utils import DummyObject, is_accelerate_available

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "fashion_ddpm"
DENOISER_COMPONENTS = ("unet", "transformer")
# How diffusers' denoisers name their timestep parameter (VAEs, adapters and vocoders have none).
_TIMESTEP_PARAMETERS = {"timestep", "timesteps", "t", "timestep_ratio"}
# The diffusers denoisers msfp samples, calibrates and tests: image models called as model(x, t, ...) on (B, C, H, W).
# Others (1-D, video, cascade stages) pass the class checks but fail deep inside sampling.
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
                     "PixArtTransformer2DModel")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CONFIGS = ["model_index.json", "config.json", "scheduler_config.json", "scheduler/*",
                *(f"{c}/config.json" for c in DENOISER_COMPONENTS)]


def _hub_weights(suffix: str) -> list[str]:
    """The denoiser's weights in one format, whole or sharded, without the variants (fp16, non_ema) a repo may hold
    beside them: from_pretrained reads none of those, and fetching them all is several times the download."""
    names = [f"diffusion_pytorch_model.{suffix}", f"diffusion_pytorch_model-*-of-*.{suffix}",
             f"diffusion_pytorch_model.{suffix}.index.json"]
    return [*names, *(f"{c}/{name}" for c in DENOISER_COMPONENTS for name in names)]


_PLAIN_WEIGHTS = {f"diffusion_pytorch_model.{name}" for suffix in ("safetensors", "bin")
                  for name in (suffix, f"{suffix}.index.json")}
_VARIANT_WEIGHTS = re.compile(r"diffusion_pytorch_model\.(?:(\w+)\.(?:safetensors|bin)"  # whole, or sharded's index
                              r"|(?:safetensors|bin)\.index\.(\w+)\.json)")


def _weights_variant(folder: Path) -> str | None:
    """The variant (``fp16`` for ``diffusion_pytorch_model.fp16.safetensors``) to read from a folder that holds only
    variant weights, else None: diffusers reads only the plain files unless told the variant, and then said "no file
    named diffusion_pytorch_model.bin"."""
    names = {p.name for p in folder.glob("diffusion_pytorch_model*")}
    if names & _PLAIN_WEIGHTS:
        return None
    variants = sorted({m.group(1) or m.group(2) for n in names if (m := _VARIANT_WEIGHTS.fullmatch(n))})
    if len(variants) > 1:
        raise ValueError(f"{folder}: holds the weights only as variants {', '.join(variants)} and msfp cannot tell "
                         "which to read; keep one variant there, or save the model without variant=")
    return variants[0] if variants else None


def _model_class(name: str, where: Path) -> type[ModelMixin]:
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"{where}: unknown model class {name!r}; expected a diffusers model class such as "
                         "'UNet2DModel' or 'DiTTransformer2DModel'")
    check_denoiser_class(cls, where)
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"{where}: msfp supports the diffusers image denoisers {', '.join(SUPPORTED_CLASSES)}, not "
                         f"{name}; from Python, a plain nn.Module called as model(x, t) can be quantized too")
    return cls


def require_module(model, caller: str) -> None:
    """A clear error for a ``model`` that is no nn.Module; a diffusers pipeline is told which of its parts to pass."""
    if not isinstance(model, torch.nn.Module):
        hint = ": pass its denoiser (pipe.unet or pipe.transformer)" if hasattr(model, "components") else ""
        raise TypeError(f"{caller}: expected the denoiser, an nn.Module, got {type(model).__name__}{hint}")


def check_denoiser_class(cls: type[ModelMixin], where) -> None:
    """An error for a diffusers model class whose forward takes no timestep (a VAE, an adapter): no denoiser."""
    if not _TIMESTEP_PARAMETERS & set(inspect.signature(cls.forward).parameters):
        raise ValueError(f"{where}: {cls.__name__} is not a denoiser: its forward takes no timestep; msfp quantizes "
                         "models called as model(x, timestep, ...), such as 'UNet2DModel' or 'DiTTransformer2DModel'")


def _from_pretrained(cls: type[ModelMixin], path: Path, **kwargs) -> ModelMixin:
    # diffusers defaults to low_cpu_mem_usage=True and, without accelerate, warns on every load that it falls back;
    # asking for what is available keeps accelerate's faster loading where it is installed and the output clean.
    where = path / kwargs.get("subfolder", "")
    variant = _weights_variant(where)  # read into the model's float32, as plain half-precision weights are
    try:
        model, info = cls.from_pretrained(path, low_cpu_mem_usage=is_accelerate_available(), output_loading_info=True,
                                          variant=variant, **kwargs)
    # Weights that do not fit the config, missing files, or config values the class cannot build from (an unknown
    # block type is a ValueError, a count given as a string a TypeError): each named by its folder.
    except (RuntimeError, EnvironmentError, ValueError, TypeError) as e:
        why = " ".join(str(e).split())[:400]
        raise ValueError(f"{where}: cannot load the {cls.__name__} from its config and weights ({why})") from e
    # Without accelerate, diffusers only logs weights the file lacks and leaves them as uninitialised memory.
    listed = []
    for what, key in (("missing", "missing_keys"), ("of another shape", "mismatched_keys"),
                      ("not in the model", "unexpected_keys")):
        names = [k[0] if isinstance(k, tuple) else k for k in info.get(key) or ()]  # mismatched: (name, shapes...)
        if names:
            listed.append(f"{what}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
    if listed:
        raise ValueError(f"{where}: its weights do not fit the {cls.__name__} its config describes "
                         f"({'; '.join(listed)})")
    return model


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON config ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(data).__name__}")
    return data


# What defines the noise schedule and the meaning of the model's output, whichever DDPM-family scheduler steps it.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")


def recorded_schedule(config) -> dict:
    """A scheduler config as a checkpoint keeps it, to rebuild a sampler from: diffusers' list of the keys it filled
    with defaults stays, so that another sampler built from it takes its own defaults for them (Euler's "linspace"
    spacing, not DDIM's "leading"), sorted (in string-hash order the file differed between processes), and without
    :data:`SCHEDULE_KEYS`: ``from_config`` replaces a listed key's value by the new class's default, and an LCM
    schedule's defaults (scaled_linear, 0.00085 to 0.012) are not DDIM's."""
    listed = config.get("_use_default_values")
    if listed is None:
        return dict(config)
    return {**config, "_use_default_values": sorted(k for k in listed if k not in SCHEDULE_KEYS)}


# DDIM's compatibles, and LCM, TCD, SA-Solver and the parallel DDPM/DDIM, share DDPM's schedule; EDM (among DDIM's
# compatibles) and flow matching have no betas, and others with betas reshape them (CogVideoX's snr_shift_scale),
# which DDIM would drop.
DDPM_FAMILY = (*(n for n in DDIMScheduler._compatibles if n != "EDMEulerScheduler"), "LCMScheduler", "TCDScheduler",
               "SASolverScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler")


def _ddim(config_dir: Path, config_name: str) -> DDIMScheduler:
    """DDIM on the model's noise schedule: only a DDPM-family schedule (betas) has one, so flow matching or EDM
    configs are refused instead of becoming a default linear-beta DDIM."""
    where = config_dir / config_name
    config = _read_json(where)
    kind = config.get("_class_name")
    scheduler_class = getattr(diffusers, kind, None) if isinstance(kind, str) else None
    # diffusers' stand-in for a class whose optional backend is missing (DPMSolverSDE without torchsde) takes any
    # argument: its signature tells nothing, the family list does.
    placeholder = isinstance(scheduler_class, DummyObject)
    takes_betas = scheduler_class is not None and (kind in DDPM_FAMILY if placeholder else
                                                   "beta_schedule" in inspect.signature(scheduler_class).parameters)
    supported = ("msfp calibrates, fine-tunes and samples with DDIM on the model's betas, so it supports DDPM-family "
                 f"schedulers only ({', '.join(DDPM_FAMILY)})")
    if kind is not None and not (takes_betas and kind in DDPM_FAMILY):
        why = (f"is no scheduler of diffusers {diffusers.__version__}" if scheduler_class is None
               else "has no DDPM noise schedule (betas)" if not takes_betas
               else "reshapes its betas or steps in ways DDIM would not")
        raise ValueError(f"{where}: {kind} {why}; {supported}")
    if placeholder and not {"beta_start", "beta_end", "beta_schedule"} <= config.keys():
        raise ValueError(f"{where}: {kind} needs {', '.join(scheduler_class._backends)} installed for the defaults of "
                         "the schedule settings the file leaves out (beta_start, beta_end, beta_schedule)")
    if takes_betas and not placeholder:  # a setting the file leaves out is the class's default (as diffusers reads it)
        defaults = inspect.signature(scheduler_class).parameters
        config = {**{k: defaults[k].default for k in SCHEDULE_KEYS if k in defaults}, **config}
    elif "beta_schedule" not in config and config.get("trained_betas") is None:
        raise ValueError(f"{where} names no scheduler class (_class_name) and no beta_schedule or trained_betas, so "
                         f"its noise schedule is unknown; {supported}")
    trained = config.get("trained_betas")
    if trained is not None and not len(trained):  # an IndexError, later
        raise ValueError(f"{where}: trained_betas is empty, so there is no noise schedule to sample with")
    steps = config.get("num_train_timesteps", 1000)
    if trained is not None and hasattr(trained, "__len__") and len(trained) != steps:  # else an IndexError mid-sampling
        raise ValueError(f"{where}: trained_betas holds {len(trained)} values for "
                         f"num_train_timesteps {steps}; they must be equal")
    try:
        return DDIMScheduler.from_config(config)
    except (NotImplementedError, ValueError, TypeError) as e:  # e.g. an unknown beta_schedule
        raise ValueError(f"{where}: cannot build its noise schedule ({e})") from e


def _load_pipeline_dir(path: Path):
    index = _read_json(path / "model_index.json")
    component = next((c for c in DENOISER_COMPONENTS if c in index), None)
    if component is None:
        raise ValueError(f"{path / 'model_index.json'} names no denoiser; expected one of {DENOISER_COMPONENTS}")
    entry = index[component]
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
        raise ValueError(f"{path / 'model_index.json'}: {component} should be [library, class name], got {entry!r}")
    library, class_name = entry
    if library != "diffusers":
        raise ValueError(f"{path}: {component} comes from library {library!r}; only 'diffusers' models are supported")
    if not (path / component / "config.json").is_file():
        raise FileNotFoundError(f"{path}: pipeline lists {component!r} but {path / component / 'config.json'} is missing")
    _read_json(path / component / "config.json")  # diffusers would look for anything else on the Hub
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{path}: pipeline has no scheduler/scheduler_config.json")
    denoiser = _from_pretrained(_model_class(class_name, path / component), path, subfolder=component)
    return denoiser, _ddim(path / "scheduler", "scheduler_config.json")


def _pipeline_component(path: Path) -> bool:
    """Whether ``path`` is the denoiser folder of a pipeline (``pipe/unet`` given instead of ``pipe``)."""
    index = path.parent / "model_index.json"
    try:
        return path.name in DENOISER_COMPONENTS and path.name in _read_json(index)
    except ValueError:  # no (readable) model_index.json: a bare model directory
        return False


def _load_model_dir(path: Path):
    config = _read_json(path / "config.json")
    denoiser = _from_pretrained(_model_class(config.get("_class_name"), path / "config.json"), path)
    if (path / "scheduler_config.json").is_file():
        return denoiser, _ddim(path, "scheduler_config.json")
    if _pipeline_component(path) and (path.parent / "scheduler" / "scheduler_config.json").is_file():
        return denoiser, _ddim(path.parent / "scheduler", "scheduler_config.json")  # the pipeline's own schedule
    warnings.warn(f"{path} has no scheduler_config.json; using DDIMScheduler() defaults (1000 linear-beta steps)")
    return denoiser, DDIMScheduler()


def _load_dir(path: Path):
    if (path / "model_index.json").is_file():
        model, scheduler = _load_pipeline_dir(path)
    elif (path / "config.json").is_file():
        model, scheduler = _load_model_dir(path)
    elif (path / "msfp_quant.json").is_file():
        raise ValueError(f"{path} is a quantized msfp checkpoint; this needs the full-precision model it was "
                         "quantized from (msfp.load_quantized reads the checkpoint)")
    else:
        raise FileNotFoundError(f"{path} is neither a diffusers pipeline directory (model_index.json) nor a model "
                                "directory (config.json)")
    return model.eval(), scheduler


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_CONFIGS, *_hub_weights("safetensors")]))
        whole, sharded = "**/diffusion_pytorch_model.safetensors", "**/diffusion_pytorch_model.safetensors.index.json"
        if not any(path.glob(whole)) and not any(path.glob(sharded)):  # an older repo: PyTorch pickles only
            path = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_CONFIGS, *_hub_weights("bin")]))
        return path
    except Exception as e:  # offline, unknown repo, gated, ...: all surface as one actionable error
        # "runs/q1" may be a mistyped local path as well as a Hub id: say both.
        raise OSError(f"{repo_id!r} is no directory here ({Path.cwd()}), and could not download model {repo_id!r} "
                      f"from the Hugging Face Hub ({type(e).__name__}: {e}). Offline, use spec 'default' or a local "
                      "save_pretrained directory.") from e


def timestep_by_name(signature: inspect.Signature) -> bool:
    """Whether a forward with this signature has a ``timestep`` parameter that can be passed by name: every diffusers
    denoiser does, and ``Transformer2DModel`` (PixArt) takes ``encoder_hidden_states`` second. Otherwise the timestep
    goes second."""
    parameter = signature.parameters.get("timestep")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _takes_timestep_by_name(forward) -> bool:
    """Whether msfp passes the timestep to ``forward`` by name (else by position); TypeError if it takes none."""
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # no signature to read (a TorchScript method): by position
        return False
    if timestep_by_name(signature):
        return True
    try:  # else Python's bare "forward() takes 2 positional arguments but 3 were given", from deep in calibration
        signature.bind_partial(None, None)
    except TypeError:
        owner = getattr(forward, "__self__", None)
        name = f"{type(owner).__name__}.forward" if owner is not None else getattr(forward, "__name__", "the denoiser")
        raise TypeError(f"{name}{signature} takes no timestep: msfp calls a denoiser as model(x, t, **cond) (or "
                        "model(x, timestep=t)); wrap a model that is not time-conditioned in a module whose "
                        "forward(x, t) ignores t") from None
    return False


def unwrapped(model):
    """The model inside torch.compile's, DataParallel's or DDP's wrappers (``model`` itself if none)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def model_config(model) -> Mapping:
    """A diffusers-style config of ``model`` (``sample_size``, ``in_channels``, ...), or {} for a model whose
    ``config`` is no mapping (a plain module's dataclass or namespace follows no such convention)."""
    config = getattr(model, "config", None)
    return config if isinstance(config, Mapping) else {}


def class_info(model) -> tuple[int | None, int | None]:
    """``(num_classes, null_label)`` of a class-conditional diffusers model, ``(None, None)`` if unconditional.

    DiT-style models reserve label ``num_classes`` for "no class" (classifier-free guidance); UNet2DModel has none.
    """
    config = model_config(model)
    if config.get("norm_type") == "ada_norm_zero" and config.get("num_embeds_ada_norm"):
        return config["num_embeds_ada_norm"], config["num_embeds_ada_norm"]
    return config.get("num_class_embeds"), None


def denoise(model, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """``model``'s prediction for ``x`` at timesteps ``t`` as a tensor (a diffusers output's ``.sample``): the one
    way msfp calls a denoiser, ``model(x, timestep=t, **cond)`` where forward has a ``timestep`` parameter, else
    ``model(x, t, **cond)``."""
    # Wrappers' forwards take (*args, **kwargs): the wrapped model's says how it takes the timestep.
    inner = unwrapped(model)
    by_name = _takes_timestep_by_name(getattr(inner, "forward", inner))  # a plain function is a denoiser too
    out = model(x, timestep=t, **cond) if by_name else model(x, t, **cond)
    out = getattr(out, "sample", out)
    return out[0] if isinstance(out, tuple) else out


def load_model(spec: str | os.PathLike = "default"):
    """Return ``(denoiser, scheduler)``: a diffusers model in eval mode and a :class:`~diffusers.DDIMScheduler`."""
    if not isinstance(spec, (str, os.PathLike)):
        hint = "; pass a loaded model to msfp.quantize itself" if isinstance(spec, torch.nn.Module) else ""
        raise TypeError(f"model spec must be 'default', a directory or a Hub id (a string or path), got "
                        f"{type(spec).__name__}{hint}")
    if str(spec) == "default":
        if not DEFAULT_MODEL_DIR.is_dir():
            raise FileNotFoundError(f"the default model is missing from {DEFAULT_MODEL_DIR}; reinstall msfp or "
                                    "run scripts/train_default_model.py")
        return _load_dir(DEFAULT_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_dir(path)
    if path.exists():
        raise ValueError(f"model spec {str(spec)!r} is a file; expected a save_pretrained directory")
    if isinstance(spec, str) and _HUB_ID.match(spec):
        return _load_dir(_download(spec))
    raise FileNotFoundError(f"model spec {str(spec)!r}: no such directory, and not a Hub id of the form 'org/name'; "
                            "use 'default', a local save_pretrained directory or a Hub id")


@contextmanager
def evaluating(*models: torch.nn.Module):
    """Run the block with ``models`` in eval mode (dropout off, batch norms on their running statistics), then give
    every submodule its own mode back: calibration must not sample dropout noise from a model left in training mode."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
