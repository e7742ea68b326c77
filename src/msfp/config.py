"""``QuantConfig``: what :func:`msfp.quantize` does to a model, as a JSON-serialisable dataclass with named presets.

Layer selectors (``eight_bit_layers``, ``full_precision_layers``) are regular expressions matched with
``re.fullmatch`` against module names (``down_blocks.0.resnets.1.conv1``), or one of the roles

- ``@first``: the first ``Conv2d``/``Linear`` registered in the model outside the ``@time_embedding`` layers
  (diffusers: ``conv_in`` / ``pos_embed.proj``; guided-diffusion: ``input_blocks.0.0``),
- ``@last``: the output layer: the model's own ``conv_out``, ``proj_out_2`` or ``proj_out`` (diffusers UNets, DiT,
  Transformer2DModel, PixArt; or those of the diffusers model a wrapper module holds, when that is a whole denoiser
  or holds all its layers) if it has one, else the last one registered; calibration warns when the output it traces
  comes from another layer, at 4 bits,
- ``@time_embedding``: layers of the timestep/class embedding MLPs (not the per-block ``time_emb_proj``; PixArt's
  shared ``adaln_single`` is one).

With ``quantize_attention`` they also match the attention matmul inputs (``mid_block.attentions.0.attn_probs``).

A selector that matches no layer of the model is an error, so a typo never silently quantizes a layer to 4 bits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import re
from dataclasses import dataclass, field

from msfp.formats import get_format

ROLES = ("@first", "@last", "@time_embedding")

SIGNED_FP4 = ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
UNSIGNED_FP4 = ["ufp4_e1m3", "ufp4_e2m2", "ufp4_e3m1", "ufp4_e4m0"]
SIGNED_FP6 = ["fp6_e2m3", "fp6_e3m2"]
UNSIGNED_FP6 = ["ufp6_e2m4", "ufp6_e3m3", "ufp6_e4m2"]
SIGNED_FP8 = ["fp8_e4m3", "fp8_e5m2"]
UNSIGNED_FP8 = ["ufp8_e4m4", "ufp8_e5m3"]
# The 8-bit edge layers (first conv, last conv, timestep MLP) search FP8 *and* INT8: the first conv's input x_t needs
# a fine uniform grid at small t (its noise is ~0.05), where E4M3's 1/8 relative step is too coarse. Every 4-bit
# preset uses the same edge candidates, so presets differ only in their 4-bit layers.
EIGHT_BIT_WEIGHTS = ["fp8_e4m3", "int8"]
EIGHT_BIT_ACTS = ["fp8_e4m3", "uint8"]


_TYPE_NAMES = {"list[str]": "a list of strings", "bool": "true or false", "int": "an integer", "float": "a number",
               "str": "a string"}


def _has_type(value, annotation: str) -> bool:
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return annotation == "bool"
    # numpy's numbers too, as msfp.checks.whole_number takes them
    return isinstance(value, {"int": numbers.Integral, "float": numbers.Real, "str": str}.get(annotation, ()))


@dataclass
class QuantConfig:
    """Formats and policy of a quantized model. Every format field lists *candidates*: the calibration search
    (:func:`msfp.calibrate`) keeps the one with the lowest quantization MSE per layer."""

    weight_formats: list[str] = field(default_factory=lambda: list(SIGNED_FP4))
    #: candidates for every layer's input activations
    act_formats: list[str] = field(default_factory=lambda: list(SIGNED_FP4))
    #: extra candidates searched only for AALs (layers with one-sided, post-SiLU/GELU inputs): mixup-sign FP
    aal_act_formats: list[str] = field(default_factory=lambda: list(UNSIGNED_FP4))
    #: "channel" (one scale per output channel) or "tensor"
    weight_granularity: str = "channel"
    #: activation scales per layer; > 1 gives each of this many equal timestep intervals its own scale/zero point
    act_timestep_groups: int = 1
    #: layers kept at 8 bits with the formats below (regexes or roles, see the module docstring)
    eight_bit_layers: list[str] = field(default_factory=lambda: ["@first", "@last", "@time_embedding"])
    eight_bit_weight_formats: list[str] = field(default_factory=lambda: list(EIGHT_BIT_WEIGHTS))
    eight_bit_act_formats: list[str] = field(default_factory=lambda: list(EIGHT_BIT_ACTS))
    #: layers left in full precision (not replaced)
    full_precision_layers: list[str] = field(default_factory=list)
    #: also fake-quantize the inputs of the attention matmuls QKᵀ and P·V of every diffusers ``Attention`` (Q, K, V
    #: with the activation formats, the softmax probabilities as an AAL: signed plus unsigned candidates). Their
    #: quantizers are named ``<attention module>.attn_q|attn_k|attn_probs|attn_v`` and the layer selectors below
    #: match those names too (see :mod:`msfp.attention`). Off in every preset: the SPEC keeps them full precision.
    quantize_attention: bool = False
    #: structural AAL detection (known diffusers blocks, and inputs traced to SiLU/GELU modules during calibration)
    aal_structural: bool = True
    #: statistical AAL detection: a layer whose calibration inputs satisfy min >= -threshold * max|x| is an AAL
    aal_statistical: bool = True
    aal_threshold: float = 0.3
    #: MSE search grid: clipping ratios, zero points, and the per-layer activation sample size
    search_clip_points: int = 40
    search_zero_points: int = 16
    act_samples_per_layer: int = 1 << 16
    name: str = "custom"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # JSON configs: "false" is a truthy string, 2.5 no count of groups
            value = getattr(self, f.name)
            if isinstance(value, tuple) and f.type == "list[str]":
                value = list(value)
                setattr(self, f.name, value)
            if not _has_type(value, f.type):
                raise ValueError(f"QuantConfig.{f.name} must be {_TYPE_NAMES[f.type]}, got {value!r}")
            # numpy's numbers as Python's, which to_json can write
            if f.type == "int":
                setattr(self, f.name, int(value))
            elif f.type == "float" and not isinstance(value, (int, float)):
                setattr(self, f.name, float(value))
        for f in ("weight_formats", "act_formats", "eight_bit_weight_formats", "eight_bit_act_formats"):
            if not getattr(self, f):
                raise ValueError(f"QuantConfig.{f} must list at least one format")
        for f in ("weight_formats", "act_formats", "aal_act_formats", "eight_bit_weight_formats",
                  "eight_bit_act_formats"):
            # Canonical names, so that " FP4_E2M1 " and "fp4_e2m1" are one format in checkpoints and comparisons.
            canonical = []
            for name in getattr(self, f):
                try:
                    canonical.append(get_format(name).name)
                except ValueError as e:
                    raise ValueError(f"QuantConfig.{f}: {e}") from None
            if len(set(canonical)) < len(canonical):
                duplicates = sorted({n for n in canonical if canonical.count(n) > 1})
                raise ValueError(f"QuantConfig.{f} lists {', '.join(duplicates)} more than once")
            setattr(self, f, canonical)
        if self.weight_granularity not in ("channel", "tensor"):
            raise ValueError(f"QuantConfig.weight_granularity must be 'channel' or 'tensor', "
                             f"got {self.weight_granularity!r}")
        if self.act_timestep_groups < 1:
            raise ValueError(f"QuantConfig.act_timestep_groups must be >= 1, got {self.act_timestep_groups}")
        if not 0 <= self.aal_threshold < 1:
            raise ValueError(f"QuantConfig.aal_threshold must be in [0, 1), got {self.aal_threshold}")
        for f in ("search_clip_points", "search_zero_points", "act_samples_per_layer"):
            if getattr(self, f) < 1:
                raise ValueError(f"QuantConfig.{f} must be >= 1")
        for f in ("eight_bit_layers", "full_precision_layers"):  # here, so a config file's error names the file
            for selector in getattr(self, f):
                if selector.startswith("@") and selector not in ROLES:
                    raise ValueError(f"QuantConfig.{f}: unknown role {selector!r}; roles are {list(ROLES)}")
                try:
                    re.compile(selector)
                except re.error as e:
                    raise ValueError(f"QuantConfig.{f}: invalid regex {selector!r} ({e})") from None

    @property
    def weight_bits(self) -> int:
        return max(get_format(f).bits for f in self.weight_formats)

    @property
    def act_bits(self) -> int:
        return max(get_format(f).bits for f in self.act_formats + self.aal_act_formats)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> QuantConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a QuantConfig is an object of fields, got {type(data).__name__} {data!r:.60}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**copy.deepcopy(data))  # the caller's lists stay the caller's

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        if not isinstance(name, str):
            raise TypeError(f"preset name must be a string, got {type(name).__name__}")
        key = name.strip().lower()  # as format names: "W4A4-MSFP" is the same preset
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(name=key, **copy.deepcopy(PRESETS[key]))  # editing the config must not edit the preset


PRESETS: dict[str, dict] = {
    # MSFP: signed FP4 weights; activations signed FP4, and AALs may pick unsigned FP4 with a zero point.
    "w4a4-msfp": dict(),
    # Signed FP4 everywhere: the no-mixup-sign baseline.
    "w4a4-fp": dict(aal_act_formats=[]),
    # INT4 baseline: symmetric per-channel weights, asymmetric per-tensor activations (zero point).
    "w4a4-int": dict(weight_formats=["int4"], act_formats=["uint4"], aal_act_formats=[]),
    "w4a8-msfp": dict(act_formats=list(SIGNED_FP8), aal_act_formats=list(UNSIGNED_FP8)),
    "w6a6-msfp": dict(weight_formats=list(SIGNED_FP6), act_formats=list(SIGNED_FP6),
                      aal_act_formats=list(UNSIGNED_FP6)),
    # FP8 everywhere, edges included.
    "w8a8-fp": dict(weight_formats=list(SIGNED_FP8), act_formats=list(SIGNED_FP8), aal_act_formats=[],
                    eight_bit_weight_formats=list(SIGNED_FP8), eight_bit_act_formats=list(SIGNED_FP8)),
}


#: the fields that select layers by name or role (a loaded model's config holds the names they resolved to)
SELECTOR_FIELDS = ("eight_bit_layers", "full_precision_layers")


def changed_from_preset(fields: dict, resolved: dict[str, list[str]] | None = None) -> list[str] | None:
    """The fields of a config (as saved: a dict) that differ from the preset it is named after, or None when its name
    is no preset. A config can keep a preset's name after an edit, or name one in a JSON file without its fields.
    ``resolved``: per selector field, the (escaped) layer names it selected; in a checkpoint whose selectors are not
    marked ``selectors_as_given``, a field that holds just those (re-saved after loading, before the selectors were
    kept) cannot be compared and is left out."""
    name = fields.get("name")
    if name not in PRESETS:
        return None
    preset = dataclasses.asdict(QuantConfig.preset(name))
    resolved = None if fields.get("selectors_as_given") else resolved
    # (Empty is no resolved form: a preset's selectors always select layers, or quantize refuses them.)
    as_names = {k for k, names in (resolved or {}).items()
                if names and k in fields and sorted(fields[k]) == sorted(names)}
    return sorted(k for k, v in preset.items() if k in fields and k not in as_names and fields[k] != v)
