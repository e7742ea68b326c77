"""Quantizer modules and the MSE search that initialises them.

A quantizer holds a :class:`~msfp.formats.Format`, a learnable scale and (for unsigned formats) a learnable zero
point. :func:`search_quant_params` picks, among candidate formats, the format, clipping value and zero point that
minimise the quantization MSE, vectorised over channels and over the candidate grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from msfp.formats import Format, _fake_quant, compute_dtype, get_format
from msfp.kernels import compiled_fake_quant

# A scale this small maps every finite input of a zero-range channel to exactly its zero point, without NaN.
MIN_SCALE = 1e-12
# Candidate levels evaluated at once during the search (bounds its memory).
_SEARCH_CHUNK = 1 << 25


@dataclass
class SearchResult:
    """The winning format and its parameters; ``mse_by_format`` holds every candidate's best MSE."""

    fmt: Format
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    mse: float
    mse_by_format: dict[str, float] = field(default_factory=dict)


def _clip_ratios(num: int) -> torch.Tensor:
    return torch.linspace(1.0 / num, 1.0, num)


def _candidate_params(rows: torch.Tensor, fmt: Format, num_clip: int, num_zero: int):
    """Scales and zero points to try, each (C, M): clipping ratios (× zero-point fractions for unsigned formats)."""
    ratios = _clip_ratios(num_clip).to(rows)
    if fmt.signed:
        absmax = rows.abs().amax(dim=1, keepdim=True)
        scale = absmax * ratios / fmt.max_value
        return scale.clamp_min(MIN_SCALE), None
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    # Zero points on a grid from 0 to the minimum (SPEC: z ∈ [min(x), 0] for one-sided data), upper clip below max.
    # A single candidate is the minimum, as a single clip ratio is the full range: nothing is clipped.
    fractions = torch.linspace(0.0, 1.0, num_zero) if num_zero > 1 else torch.ones(1)
    zero = (lo * fractions.to(rows))[:, :, None]  # (C, Z, 1)
    span = (hi[:, :, None] - zero).clamp_min(0)  # (C, Z, 1)
    scale = (span * ratios / fmt.max_value).clamp_min(MIN_SCALE)  # (C, Z, R)
    zero = zero.expand_as(scale)
    return scale.flatten(1), zero.flatten(1)


@torch.no_grad()
def _sorted_prefix_sums(rows: torch.Tensor):
    """Rows sorted in float64, each row's mean, and prefix sums of x - mean and (x - mean)² (a leading 0 column),
    shared by every candidate format. Centred, the sums do not cancel: for data far from 0 (100 + 1e-3·noise) the sums
    of x² rounded the MSE by up to 30 %."""
    rows64 = rows.double().sort(dim=1).values
    center = rows64.mean(dim=1, keepdim=True)
    centred = rows64 - center
    pad = rows64.new_zeros(rows64.shape[0], 1)
    return (rows64, center, torch.cat([pad, centred.cumsum(1)], dim=1),
            torch.cat([pad, centred.pow(2).cumsum(1)], dim=1))


@torch.no_grad()
def _best_per_row(sums, fmt: Format, scale: torch.Tensor, zero: torch.Tensor | None):
    """For every row (channel), the candidate column with the lowest MSE: (mse, scale, zero) each of shape (C,).

    Exact without fake-quantizing every candidate: with the row sorted, the elements that round to level ``v_k`` form
    a contiguous run between the midpoints of neighbouring levels (clipped elements join the end levels), so the
    squared error of the run is ``S2 - 2 v_k S1 + n v_k^2`` from prefix sums (of the centred row, with ``v_k``
    centred alike). Elements exactly on a midpoint have the same error on either side, so ties do not change the MSE.
    """
    rows64, center, s1, s2 = sums
    num_rows, k = rows64.shape
    grid = fmt.values().to(rows64)
    chunk = max(1, _SEARCH_CHUNK // (8 * num_rows * len(grid)))
    errors = []
    for start in range(0, scale.shape[1], chunk):
        s = scale[:, start:start + chunk, None].double()
        levels = s * grid if zero is None else zero[:, start:start + chunk, None].double() + s * grid  # (C, m, L)
        mids = (levels[..., 1:] + levels[..., :-1]) / 2
        idx = torch.searchsorted(rows64, mids.flatten(1)).view(mids.shape)
        bounds = torch.cat([idx.new_zeros(idx.shape[:-1] + (1,)), idx, idx.new_full(idx.shape[:-1] + (1,), k)], -1)
        lo, hi = bounds[..., :-1].flatten(1), bounds[..., 1:].flatten(1)
        run = lambda c: (c.gather(1, hi) - c.gather(1, lo)).view(levels.shape)  # noqa: E731
        n = (hi - lo).view(levels.shape).double()
        centred = levels - center[:, :, None]
        errors.append((run(s2) - 2 * centred * run(s1) + n * centred.pow(2)).sum(-1).clamp_min(0) / k)
    err = torch.cat(errors, dim=1)  # float64: in float32 the errors of data beyond ~1e19 are all inf, and argmin 0
    # A span beyond float32 (max - min of data near ±3e38) gives an inf scale and a NaN error, which argmin would
    # pick; such a grid cannot quantize anything. The zero-point-0 candidates always have a finite scale.
    err = err.masked_fill(err.isnan() | ~torch.isfinite(scale), float("inf"))
    best = err.argmin(dim=1, keepdim=True)
    pick = lambda t: None if t is None else t.gather(1, best).squeeze(1)  # noqa: E731
    return pick(err), pick(scale), pick(zero)


def search_quant_params(
    x: torch.Tensor,
    candidates,
    channel_axis: int | None = None,
    num_clip: int = 40,
    num_zero: int = 16,
    max_samples: int = 1 << 15,
    seed: int = 0,
) -> SearchResult:
    """Choose format, clipping and zero point that minimise the quantization MSE of ``x``.

    ``channel_axis=None`` searches one per-tensor scale (on at most ``max_samples`` randomly drawn elements);
    otherwise one scale per slice along ``channel_axis`` (all elements; formats are chosen for the whole tensor by
    the mean of the per-channel MSEs). Unsigned candidates also search a zero point in ``[min(x), 0]``.
    """
    candidates = [get_format(c) for c in ([candidates] if isinstance(candidates, (str, Format)) else candidates)]
    if not candidates:
        raise ValueError("search_quant_params needs at least one candidate format")
    if num_clip < 1 or num_zero < 1 or max_samples < 1:
        raise ValueError(f"num_clip, num_zero and max_samples must be >= 1, got {num_clip}, {num_zero}, {max_samples}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"search_quant_params expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.numel() == 0:
        raise ValueError("search_quant_params got an empty tensor (no calibration data)")
    x = x.detach() if x.dtype.itemsize > 1 else x.detach().float()  # isfinite has no float8 kernel
    if not torch.isfinite(x).all():
        raise ValueError(f"search_quant_params got {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
    x = x.float()
    if not torch.isfinite(x).all():  # the search works in float32, as the quantizers do
        raise ValueError(f"search_quant_params got {int((~torch.isfinite(x)).sum())} float64 values beyond float32's "
                         "range (±3.4e38)")
    if channel_axis is None:
        rows = x.reshape(1, -1)
        if rows.shape[1] > max_samples:
            gen = torch.Generator().manual_seed(seed)
            rows = rows[:, torch.randperm(rows.shape[1], generator=gen)[:max_samples].to(x.device)]
    else:
        rows = x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)

    sums = _sorted_prefix_sums(rows)
    best: SearchResult | None = None
    mse_by_format = {}
    for fmt in candidates:
        scale, zero = _candidate_params(rows, fmt, num_clip, num_zero)
        err, s, z = _best_per_row(sums, fmt, scale, zero)
        mse = err.mean().item()
        mse_by_format[fmt.name] = mse
        if best is None or mse < best.mse:
            squeeze = (lambda t: t.reshape(())) if channel_axis is None else (lambda t: t)  # noqa: E731
            best = SearchResult(fmt, squeeze(s), None if z is None else squeeze(z), mse)
    best.mse_by_format = mse_by_format
    return best


class KeepsFloat32(nn.Module):
    """A module whose floating-point tensors stay float32 (or wider) whatever the model is cast to: a cast below
    float32 only moves them (float64 ones back to float32); a cast to float64 widens them."""

    def _apply(self, fn, recurse=True):
        def keep_float32(t):
            out = fn(t)
            return t.to(out.device, torch.float32) if out.is_floating_point() and out.element_size() < 4 else out

        return super()._apply(keep_float32, recurse)


class _Quantizer(KeepsFloat32):
    """Shared state: the format (kept in ``extra_state`` so that ``load_state_dict`` restores it), scale, zero point.

    The scale and zero point define the grid and are used in float32 (or wider) whatever the model's dtype:
    model.to(torch.bfloat16) rounding them would move the grid (a 2^-9 scale change shifts the top 8-bit code by half
    a step)."""

    def __init__(self, fmt, size: int):
        super().__init__()
        self.fmt = get_format(fmt)
        self.scale = nn.Parameter(torch.ones(size))
        self.zero_point = nn.Parameter(torch.zeros(size))
        self.enabled = True
        #: run the rounding as one fused ``torch.compile`` kernel (same values; see msfp.kernels)
        self.fused = False

    def get_extra_state(self):
        return {"fmt": self.fmt.name, "enabled": self.enabled}

    def set_extra_state(self, state):
        self.fmt = get_format(state["fmt"])
        self.enabled = bool(state["enabled"])

    def _apply_params(self, x, scale, zero):
        # Half precision computes in float32, as fake_quant does: in float16 MIN_SCALE is 0 (0/0 = NaN on a
        # zero-range channel) and x/s rounds before it is rounded to the grid.
        compute = compute_dtype(x.dtype)
        scale = scale.to(compute).clamp_min(MIN_SCALE)
        zero = zero.to(compute) if self.fmt.needs_zero_point else None
        # Inside a compiled model, dynamo traced through the cached per-format kernels and reused one format's graph
        # for another (an 8-bit layer rounded on the FP4 grid): there the model's own compile fuses the rounding.
        fused = self.fused and not torch.compiler.is_compiling()
        out = (compiled_fake_quant if fused else _fake_quant)(x.to(compute), self.fmt, scale, zero)
        return out.to(x.dtype)

    @torch.no_grad()
    def _store(self, result: SearchResult, index=slice(None)):
        self.fmt = result.fmt
        self.scale[index] = result.scale.to(self.scale)
        self.zero_point[index] = 0.0 if result.zero_point is None else result.zero_point.to(self.zero_point)

    def extra_repr(self) -> str:
        fused = ", fused" if self.fused else ""
        return f"fmt={self.fmt.name}, size={self.scale.numel()}, enabled={self.enabled}{fused}"


class WeightQuantizer(_Quantizer):
    """Per-output-channel fake quantization of a weight tensor (channel axis 0)."""

    def __init__(self, fmt, out_channels: int):
        super().__init__(fmt, out_channels)

    def forward(self, w: torch.Tensor, stacked: bool = False) -> torch.Tensor:
        """``Q_w(w)``; ``stacked=True`` takes several weights of the layer stacked along a new first dimension
        (TALoRA's weight sets) and quantizes them all in one call."""
        if not self.enabled:
            return w
        channel_dim = 1 if stacked else 0
        self._check_channels(w, channel_dim)
        view = [1] * w.dim()
        view[channel_dim] = -1
        return self._apply_params(w, self.scale.view(view), self.zero_point.view(view))

    def _check_channels(self, w: torch.Tensor, channel_dim: int = 0) -> None:
        if w.dim() <= channel_dim or w.shape[channel_dim] != self.scale.numel():
            raise ValueError(f"weight of shape {tuple(w.shape)} has not the {self.scale.numel()} output channels the "
                             "quantizer was built for")

    def initialize(self, w: torch.Tensor, candidates=None, **search_kwargs) -> SearchResult:
        self._check_channels(w)
        result = search_quant_params(w, [self.fmt] if candidates is None else candidates, channel_axis=0,
                                     **search_kwargs)
        self._store(result)
        return result

    def initialize_per_tensor(self, w: torch.Tensor, candidates=None, **search_kwargs) -> SearchResult:
        """One scale for the whole tensor (stored in every channel's slot), searched on all its elements unless
        ``max_samples`` says otherwise."""
        self._check_channels(w)
        search_kwargs.setdefault("max_samples", w.numel())
        result = search_quant_params(w, [self.fmt] if candidates is None else candidates, **search_kwargs)
        self._store(result)
        return result


class ActivationQuantizer(_Quantizer):
    """Per-tensor fake quantization of activations, optionally with one scale/zero point per group (e.g. timestep).

    ``forward(x, group)`` takes ``group=None`` (group 0) or a LongTensor of per-sample group indices, shape (B,),
    matching ``x.shape[0]``; the format is shared by all groups.
    """

    def __init__(self, fmt, num_groups: int = 1):
        super().__init__(fmt, num_groups)

    @property
    def num_groups(self) -> int:
        return self.scale.numel()

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        if group is None:
            return self._apply_params(x, self.scale[0], self.zero_point[0])
        if group.dim() != 1 or group.shape[0] != x.shape[0]:
            raise ValueError(f"group indices of shape {tuple(group.shape)} do not match a batch of {x.shape[0]}")
        view = (-1,) + (1,) * (x.dim() - 1)
        return self._apply_params(x, self.scale[group].view(view), self.zero_point[group].view(view))

    def initialize(self, x: torch.Tensor, candidates=None, group: int | None = None, **search_kwargs) -> SearchResult:
        """Search on a sample ``x``. ``group=None`` chooses the format and sets every group; an integer ``group``
        keeps the current format and sets that group's scale and zero point only."""
        if group is None:
            result = search_quant_params(x, [self.fmt] if candidates is None else candidates, **search_kwargs)
            self._store(result)
        else:
            if not 0 <= group < self.num_groups:
                raise ValueError(f"group {group} out of range for {self.num_groups} groups")
            if candidates is not None:  # they would be ignored
                raise ValueError(f"group {group} keeps the format all groups share ({self.fmt.name}); candidate "
                                 "formats are searched with group=None")
            result = search_quant_params(x, [self.fmt], **search_kwargs)
            self._store(result, group)
        return result


def named_quantizers(model: nn.Module) -> dict[str, _Quantizer]:
    """Every weight and activation quantizer in ``model`` (its layers' and attention inputs'), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Quantizer)}


def quantizer_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of ``model``'s quantizers (found by type: a module of the model's own named
    "x_quantizer" is not one)."""
    return {f"{n}.{k}" for n, q in named_quantizers(model).items() for k in q.state_dict()}
