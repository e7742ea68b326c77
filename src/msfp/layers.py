"""Quantized ``Conv2d``/``Linear`` layers (fake quantization) and the per-model context they share.

A :class:`QuantLayer` computes ``op(Q_a(x), Q_w(W_eff), b)`` where ``Q_a`` is a per-tensor activation quantizer
(optionally one scale/zero point per timestep group) and ``Q_w`` a per-output-channel weight quantizer.
``W_eff`` is the full-precision weight plus any registered weight delta (TALoRA merges its LoRA there, before
quantization, so the result stays a pure low-bit layer). Zero padding of convolutions pads the *quantized* input
with exact zeros, as a real low-bit kernel does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msfp.quantizers import ActivationQuantizer, WeightQuantizer


class QuantContext:
    """State shared by the quantized layers of one model: the timesteps of the current call, one per sample.

    :func:`msfp.quantize` installs a forward pre-hook on the model that fills it, so the timestep reaches every layer
    however the denoiser is called (directly or from inside a diffusers pipeline).
    """

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        self.timesteps: torch.Tensor | None = None
        #: (B, K) hard one-hot LoRA choice of the current call with straight-through gradients (TALoRA), or None
        self.route: torch.Tensor | None = None
        #: (B,) the chosen entry of each sample's ``route`` row: 1 in value, the router's gradient path
        self.route_gate: torch.Tensor | None = None
        #: the group sizes of the calls to come, when their caller knows them (a CUDA graph capture: msfp.cuda_graphs)
        self.known_route_counts: list[int] | None = None
        self._route_counts: list[int] = []
        self._route_order: torch.Tensor | None = None
        self._route_restore: torch.Tensor | None = None
        self._route_groups: dict[int, tuple[list[tuple[int, torch.Tensor | None]], torch.Tensor | None]] = {}

    def __deepcopy__(self, memo):
        # timesteps/route belong to the call in flight (route may even be a non-leaf tensor of a training step,
        # which cannot be deep-copied): a copy starts without them.
        copied = QuantContext(self.num_train_timesteps)
        memo[id(self)] = copied
        return copied

    def set_route(self, route: torch.Tensor | None) -> None:
        """Record the call's LoRA choice (TALoRA's router output). The samples are grouped by LoRA here, once per call,
        with the call's only host synchronisation (reading the group sizes back, unless ``known_route_counts`` gives
        them): split in each layer by data (unique, boolean masks), the batch stalled a GPU several times per layer, in
        forward and again in backward."""
        self.route, self._route_groups = route, {}
        if route is None:
            self.route_gate = self._route_order = self._route_restore = None
            return
        choice = route.detach().argmax(1)
        self.route_gate = route.gather(1, choice[:, None])[:, 0]
        known = self.known_route_counts
        if known is not None and (len(known) != route.shape[1] or sum(known) != route.shape[0]):
            raise ValueError(f"known_route_counts {known} do not split a batch of {route.shape[0]} among "
                             f"{route.shape[1]} LoRAs")
        self._route_counts = route_counts(choice, route.shape[1]) if known is None else list(known)
        # Stable: each group keeps its samples in batch order, as running them one LoRA at a time would.
        self._route_order = None if max(self._route_counts) == len(choice) else torch.argsort(choice, stable=True)
        self._route_restore = None if self._route_order is None else torch.argsort(self._route_order)

    def route_groups(self, layer: str, batch: int, rows: int = 1
                     ) -> tuple[list[tuple[int, torch.Tensor | None]], torch.Tensor | None]:
        """``(groups, restore)``: ``(k, index)`` for each LoRA ``k`` the current call uses, the indices of its rows in
        a batch of ``rows`` consecutive rows per sample (linear layers on token sequences), in order; and the
        permutation that puts the groups' rows, concatenated, back in batch order. ``index`` and ``restore`` are None
        when every sample uses one LoRA. ``layer`` and ``batch`` (its input's first dimension) are for the error when
        that is not the call's batch."""
        if batch != self.route.shape[0]:
            raise ValueError(f"{layer}: TALoRA routes each sample to its LoRA, but this layer's input has {batch} "
                             f"rows in its first dimension where the model was called with a batch of "
                             f"{self.route.shape[0]}")
        if rows not in self._route_groups:
            if self._route_order is None:
                groups, restore = [(self._route_counts.index(max(self._route_counts)), None)], None
            else:
                order, restore = self._route_order, self._route_restore
                if rows > 1:
                    within = torch.arange(rows, device=order.device)
                    order, restore = ((o[:, None] * rows + within).reshape(-1) for o in (order, restore))
                sizes = [n * rows for n in self._route_counts]
                groups = [(k, index) for k, index in enumerate(order.split(sizes)) if len(index)]
            self._route_groups[rows] = groups, restore
        return self._route_groups[rows]

    def set_timesteps(self, timestep, batch_size: int, device) -> None:
        if timestep is None:
            self.timesteps = None
            return
        t = torch.as_tensor(timestep, device=device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch_size)
        elif t.numel() != batch_size:
            raise ValueError(f"got {t.numel()} timesteps for a batch of {batch_size}")
        self.timesteps = t

    def groups(self, num_groups: int, rows: int, where: str) -> torch.Tensor | None:
        """Group index of each sample of the current call (None with a single group), for an input of ``rows`` rows
        (one per sample) of the layer ``where``."""
        if num_groups == 1:
            return None
        if self.timesteps is None:
            raise RuntimeError("per-timestep activation scales need the timestep: call the model as model(x, t, ...)")
        if rows != len(self.timesteps):
            raise ValueError(f"{where}: an input of {rows} rows for a batch of {len(self.timesteps)} samples: its "
                             "per-timestep activation scales need one row per sample (calibrate and call the model "
                             "the same way, e.g. one timestep per sample)")
        return self.groups_of(self.timesteps, num_groups)

    def groups_of(self, timesteps: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Index of each timestep among ``num_groups`` equal intervals of the training range."""
        t = timesteps.float().clamp(0, self.num_train_timesteps - 1)
        return (t * num_groups / self.num_train_timesteps).long().clamp(0, num_groups - 1)


def route_counts(choice: torch.Tensor, num_loras: int) -> list[int]:
    """How many samples each of ``num_loras`` LoRAs takes, given each sample's LoRA index (read back to the host)."""
    return torch.bincount(choice, minlength=num_loras).tolist()


def version_key(t: torch.Tensor):
    """``t``'s in-place version, for caches of values computed from it. Inference tensors (made inside
    ``torch.inference_mode``) count none, yet may be written in place there: for them a new object on every call, so
    a cache keyed on it is recomputed rather than possibly stale."""
    return object() if t.is_inference() else t._version


def conv_output_size(size, kernel, conv_args: dict) -> tuple[int, int]:
    """``(OH, OW)`` of a convolution with ``conv_args`` (nn.Conv2d's stride, padding, dilation) and a ``kernel``
    ``(KH, KW)`` on an input of spatial ``size`` ``(H, W)``; below 1 where the input is too small for any output."""
    (h, w), (kh, kw) = size, kernel
    (sh, sw), (dh, dw), pad = conv_args["stride"], conv_args["dilation"], conv_args["padding"]
    if pad == "same":
        return h, w
    ph, pw = (0, 0) if isinstance(pad, str) else pad  # "valid"
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv_input_too_small(name: str, shape, kernel, conv_args: dict) -> str | None:
    """Why an input of ``shape`` (…, H, W) is too small for layer ``name``'s convolution, or None. For after a
    convolution failed (torch's error names neither the layer nor the size it needs): the calls that work pay
    nothing for it."""
    if min(conv_output_size(shape[-2:], kernel, conv_args)) >= 1:
        return None
    pad, dilation = conv_args["padding"], tuple(conv_args["dilation"])
    pads = (0, 0) if isinstance(pad, str) else pad
    least = (1, 1) if pad == "same" else [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, pads)]
    return (f"{name}: expected an input of at least {least[0]}×{least[1]} pixels for its {kernel[0]}×{kernel[1]} "
            f"kernel (padding {pad!r}, dilation {dilation}), got {shape[-2]}×{shape[-1]}")


def take_rows(t: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """``t.index_select(0, index)``; a tensor expanded along dim 0 (a per-tensor value) stays an expanded view."""
    if t is None or index is None:
        return t
    if t.stride(0) == 0:
        return t[:1].expand(len(index), *t.shape[1:])
    return t.index_select(0, index)


def run_route_groups(groups, restore, run, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``run(k, *rows)`` on the rows of each ``(k, index)`` group of :meth:`QuantContext.route_groups`, put back in
    batch order by ``restore``. Index tensors, not masks: neither direction of autograd then reads data back to the
    host. Concatenated and gathered rather than index_copy'd into place, whose backward would keep every group's
    output alive (a fifth more memory in a TALoRA training step)."""
    outputs = [run(k, *(take_rows(t, index) for t in inputs)) for k, index in groups]
    return outputs[0] if restore is None else torch.cat(outputs).index_select(0, restore)


class _OtherLoras(torch.autograd.Function):
    """Zero in value; its backward gives the route's entries of the LoRAs each sample did not choose their
    straight-through gradient <dL/dy, y_j>, with y_j = op(x, Q_w(W_j)) computed there (no activation is kept for it)."""

    @staticmethod
    def forward(ctx, route, x, layer, shape):
        ctx.layer = layer
        ctx.save_for_backward(route, x)
        return torch.zeros(shape, dtype=route.dtype, device=x.device)  # added to the layer's output, on its device

    @staticmethod
    def backward(ctx, grad):
        route, x = ctx.saved_tensors
        layer = ctx.layer
        weights = layer.quantized_weights(list(range(route.shape[1])))
        grad_route = torch.stack([(grad * layer._op(x, weights[j]).to(grad)).flatten(1).sum(1)
                                  for j in range(route.shape[1])], dim=1).to(route.device)
        chosen = torch.zeros_like(route).scatter_(1, route.argmax(1, keepdim=True), 1.0)
        return (grad_route * (1 - chosen)).to(route), None, None, None


class QuantLayer(nn.Module):
    """Fake-quantized replacement of an ``nn.Conv2d`` or ``nn.Linear`` (shares its weight and bias parameters).

    ``info`` holds what calibration found (formats, AAL flag and reason, quantization MSEs, FLOPs); ``observer``,
    when set, is called as ``observer(layer, x)`` with every input (calibration hooks in there).
    """

    def __init__(self, module: nn.Module, name: str, weight_format: str, act_format: str, context: QuantContext,
                 act_groups: int = 1, precision: str = "4bit"):
        super().__init__()
        if isinstance(module, nn.Conv2d):
            self.kind = "conv2d"
            self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                                  groups=module.groups)
            self.padding_mode = module.padding_mode
            self._reversed_padding = module._reversed_padding_repeated_twice
        elif isinstance(module, nn.Linear):
            self.kind = "linear"
        else:
            raise TypeError(f"{name}: cannot quantize {type(module).__name__}; expected nn.Conv2d or nn.Linear")
        self.name = name
        self.precision = precision
        self.weight = module.weight
        self.bias = module.bias
        device = module.weight.device
        self.weight_quantizer = WeightQuantizer(weight_format, module.weight.shape[0]).to(device)
        self.act_quantizer = ActivationQuantizer(act_format, act_groups).to(device)
        self.context = context
        self.info: dict = {}
        self.observer = None
        self.lora = None  # a msfp.talora.LoRABank once TALoRA is added: W_k = W + B_k A_k, merged before Q_w
        # (K, *weight.shape) quantized weight sets of a loaded routed TALoRA checkpoint (no LoRA factors there)
        self.register_buffer("weight_sets", None, persistent=False)
        self._weight_cache: dict[int, tuple] | None = None  # k -> (params, key, Q_w(W_k)) once frozen

    def effective_weight(self, k: int = 0) -> torch.Tensor:
        """``W + B_k A_k``; float32 (the LoRA's dtype) when the layer is in half precision and has a LoRA."""
        return self.weight if self.lora is None else self.weight + self.lora.delta(k)

    def _quantize_weight(self, w: torch.Tensor, stacked: bool = False) -> torch.Tensor:
        """``Q_w(w)`` in the layer's dtype (``w`` with a float32 LoRA merged in is float32)."""
        return self.weight_quantizer(w, stacked=stacked).to(self.weight.dtype)

    @property
    def num_weight_sets(self) -> int:
        if self.weight_sets is not None:
            return self.weight_sets.shape[0]
        return 1 if self.lora is None else self.lora.num_loras

    def quantized_weight(self, k: int = 0) -> torch.Tensor:
        if self.weight_sets is not None:
            return self.weight_sets[k]
        if self._weight_cache is not None:
            cached = self._cached_weight(k)
            if cached is not None:
                return cached
        return self._quantize_weight(self.effective_weight(k))

    def quantized_weights(self, ks: list[int]) -> dict[int, torch.Tensor]:
        """``Q_w(W_k)`` for each ``k`` in ``ks``. While training, one quantizer call on the stacked weight sets: the
        same values as one call per set, with 1/len(ks) of the kernel launches (a small model's GPU step is bound
        by those)."""
        if len(ks) == 1 or self.weight_sets is not None or self._weight_cache is not None:
            return {k: self.quantized_weight(k) for k in ks}
        stacked = self._quantize_weight(self.weight + self.lora.deltas(ks), stacked=True)
        return dict(zip(ks, stacked.unbind(0)))

    def freeze_weights(self) -> None:
        """Inference: quantize the weights once and reuse them on later calls instead of re-running ``Q_w``.

        The cache is keyed on the weight's, the quantizer's and the LoRAs' parameters (identity, in-place version,
        storage) and the format, and recomputed when any changed (assignment, ``copy_``, ``load_state_dict``, an
        optimizer step, ``.to``); it is bypassed whenever autograd would need the weight's gradient (fine-tuning).
        Writes through ``.data`` (diffusers' ``EMAModel.copy_to``) bypass the version counter it reads: call
        ``freeze_weights()`` again after them. Inference tensors (a model built inside ``torch.inference_mode``) have
        no version counter: a layer whose parameters are such tensors re-quantizes its weight on every call. Where
        ``Q_w(W)`` is ``W`` itself (a loaded packed checkpoint) the cache is the weight tensor, so it costs no memory.
        The quantized weight is computed without autocast, so a first call under autocast does not leave a rounded
        weight for later full-precision calls.
        """
        self._weight_cache = {}
        with torch.no_grad():
            for k in range(1 if self.lora is None else self.lora.num_loras):
                if self.weight_sets is None:
                    self._cached_weight(k)

    def unfreeze_weights(self) -> None:
        self._weight_cache = None

    @property
    def weights_frozen(self) -> bool:
        return self._weight_cache is not None

    def _cache_params(self) -> tuple:
        lora = tuple(self.lora.parameters()) if self.lora is not None else ()
        return (self.weight, *self.weight_quantizer.parameters(), *lora)

    def _cached_weight(self, k: int) -> torch.Tensor | None:
        params = self._cache_params()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        q = self.weight_quantizer
        key = (q.fmt, q.enabled, tuple((version_key(p), p.data_ptr(), p.dtype, p.device) for p in params))
        entry = self._weight_cache.get(k)
        # Holding the parameters in the entry keeps their ids from being reused, so `is` identifies them.
        if (entry is not None and entry[1] == key and len(entry[0]) == len(params)
                and all(a is b for a, b in zip(entry[0], params))):
            return entry[2]
        with (torch.no_grad(), torch.inference_mode(False),  # a normal tensor, usable outside inference mode too
              torch.autocast(self.weight.device.type, enabled=False)):
            w = self._quantize_weight(self.effective_weight(k)).detach()
            if torch.equal(w, self.weight):
                w = self.weight.detach()
        self._weight_cache[k] = (params, key, w)
        return w

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        try:
            if self.padding_mode != "zeros":
                padded = F.pad(x, self._reversed_padding, mode=self.padding_mode)
                return F.conv2d(padded, w, self.bias, **{**self.conv_args, "padding": 0})
            return F.conv2d(x, w, self.bias, **self.conv_args)
        except RuntimeError as e:
            too_small = conv_input_too_small(self.name, x.shape, w.shape[-2:], self.conv_args)
            if too_small:
                raise ValueError(too_small) from e
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
        x = self.act_quantizer(x, self.context.groups(self.act_quantizer.num_groups, x.shape[0], self.name))
        if self.num_weight_sets == 1 or self.context.route is None:
            return self._op(x, self.quantized_weight())
        # Per-sample LoRA choice: run each chosen weight on its samples only. In value the output is the chosen
        # LoRA's y_k; for the router it is the straight-through mixture Σ_j r_j·y_j (r the one-hot route): the
        # chosen entry's gradient <dL/dy, y_k> comes through the gate (1 in value), the others' <dL/dy, y_j> from
        # _OtherLoras, which computes those outputs in the backward pass only.
        groups, restore = self.context.route_groups(self.name, x.shape[0])
        weights = self.quantized_weights([k for k, _ in groups])
        out = run_route_groups(groups, restore, lambda k, xs: self._op(xs, weights[k]), x)
        out = out * self.context.route_gate.view(-1, *([1] * (out.dim() - 1))).to(out)
        if torch.is_grad_enabled() and self.context.route.requires_grad:
            # The float32 router's zeros would promote a half-precision layer's output.
            out = out + _OtherLoras.apply(self.context.route, x.detach(), self, out.shape).to(out.dtype)
        return out

    def macs(self, input_shape) -> int:
        """Multiply-accumulates of a call on an input of this shape (batched, or one unbatched input)."""
        cout, cin_per_group = self.weight.shape[:2]
        if self.kind == "linear":
            return int(torch.Size(input_shape[:-1]).numel()) * cout * cin_per_group
        batch = input_shape[0] if len(input_shape) == 4 else 1  # Conv2d takes an unbatched (C, H, W) input too
        kh, kw = self.weight.shape[-2:]
        oh, ow = conv_output_size(input_shape[-2:], (kh, kw), self.conv_args)
        return batch * oh * ow * cout * cin_per_group * kh * kw

    def extra_repr(self) -> str:
        aal = ", AAL" if self.info.get("aal") else ""
        return f"{self.name}: {self.kind}, {self.precision}{aal}"
