"""Real low-bit execution of W4A4 layers through FP8 E4M3 tensor cores (Hopper), emulated elsewhere.

Every value of a 4-bit grid — signed E2M1/E1M2/E3M0, unsigned E1M3/E2M2/E3M1/E4M0, INT4/UINT4 — times a power of
two ``2^k`` is exactly an FP8 E4M3 value (:func:`e4m3_shift` finds ``k``). So a fake-quantized layer's operands can
be held as E4M3 *codes* ``c``::

    Q_a(x) = s_a·2^-k_a · c_a + z_a           (per tensor or per timestep group; z_a = 0 for signed formats)
    Q_w(W)[o] = s_w[o]·2^-k_w · c_w[o]        (per output channel, signed formats)

and the layer ``y = Q_a(x) ⊛ Q_w(W) + b`` becomes one FP8 GEMM/convolution on the codes with an epilogue::

    y = (s_a 2^-k_a)(s_w[o] 2^-k_w) · (c_a ⊛ c_w) + b[o] + z_a · corr[o, position]

The zero-point term ``corr = 1_valid ⊛ Q_w(W)`` is the weight's sum over the taps that see real input: a constant
per output channel for linears (folded into the bias) and, for zero-padded convolutions, smaller at the borders
because the fake-quant layer pads its *quantized* input with exact zeros, not with ``z_a``. The kernels build it per
output position from the weight's per-tap channel sums; the emulation convolves those sums with ones.

Every product ``c_a·c_w`` is exact in fp32, so the result equals the fake-quant layer up to fp32 accumulation
order. On a CUDA GPU with FP8 tensor cores (compute capability ≥ 8.9) and Triton, :class:`Fp8Layer` runs the Triton
kernels of :mod:`msfp.triton_kernels`; elsewhere it computes the same codes and the same epilogue with float32
convolutions (the emulated path, which tests compare against the fake-quant reference on CPU). Linear layers can
instead run their GEMM through ``torch._scaled_mm`` (``linear_gemm="scaled_mm"``: cuBLAS/CUTLASS with row-wise
scales), where the activations are bfloat16 and both GEMM dimensions are multiples of 16.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from msfp.formats import Format, _grid_units, compute_dtype, round_to_grid
from msfp.layers import QuantLayer, conv_input_too_small, run_route_groups, version_key
from msfp.quantizers import MIN_SCALE

E4M3 = torch.float8_e4m3fn
LINEAR_GEMMS = ("triton", "scaled_mm")
TMA_TILINGS = (None, "boxes", "rows")
MIN_TRITON = (3, 6)


@functools.lru_cache(maxsize=None)
def e4m3_shift(fmt: Format) -> int | None:
    """The power-of-two exponent ``k`` (smallest ``|k|``) that makes every value of ``fmt`` times ``2^k`` an exact
    E4M3 value, or None when there is none (INT8, UINT8 and most 8-bit grids)."""
    values = fmt.values().double()
    for k in sorted(range(-12, 13), key=abs):
        shifted = values * 2.0**k
        if torch.equal(shifted.float().to(E4M3).double(), shifted):
            return k
    return None


def act_codes(x: torch.Tensor, fmt: Format, scale: torch.Tensor, zero_point: torch.Tensor | None,
              shift: int) -> torch.Tensor:
    """E4M3 codes ``R(clamp((x - z) / s)) · 2^shift`` of ``x`` (the reference that the Triton kernel matches),
    computed in the dtype fake quantization uses for ``x``: a float64 input rounded in fp32 could cross a tie."""
    compute = compute_dtype(x.dtype)
    v = _grid_units(x.to(compute), fmt, scale.to(compute), None if zero_point is None else zero_point.to(compute))
    if not fmt.signed:
        # torch.clamp(-0.0, 0.0, …) keeps -0.0 on CPU but gives +0.0 on CUDA; + 0.0 makes an unsigned grid's zero
        # code +0.0 on every device (and changes no other value).
        v = v + 0.0
    # A Python power of two, not a tensor of the shift: exact, and nothing to upload (which a CUDA graph cannot).
    return (round_to_grid(v, fmt) * 2.0**shift).to(E4M3)


@functools.lru_cache(maxsize=None)
def _kernels_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"{device.type} device (FP8 tensor cores need a CUDA GPU)"
    if torch.version.hip:  # a ROCm torch calls AMD GPUs "cuda", with capabilities such as 9.4 that pass the check below
        from msfp.triton_kernels import HIP_UNSUPPORTED

        return False, HIP_UNSUPPORTED
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"compute capability {major}.{minor} has no FP8 tensor cores (needs ≥ 8.9: Ada, Hopper)"
    from msfp import triton_kernels

    if not triton_kernels.HAS_TRITON:
        return False, "triton is not installed"
    too_old = _triton_too_old(triton_kernels.triton.__version__)
    return (False, too_old) if too_old else (True, "Triton FP8 kernels")


def _triton_too_old(version: str) -> str | None:
    # Triton 3.6 (torch 2.11's) is the oldest release the kernels have run on a GPU with; older ones get the
    # emulated path rather than compiled code nobody has checked (3.6 itself first gave wrong -0.0 codes there).
    from msfp.triton_kernels import major_minor

    if major_minor(version) < MIN_TRITON:
        oldest = ".".join(map(str, MIN_TRITON))
        return f"Triton {version} is older than {oldest}, the oldest the FP8 kernels are tested with"
    return None


def fp8_kernels_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether :class:`Fp8Layer` can run the Triton FP8 kernels on ``device``, and why not."""
    return _kernels_available(torch.device(device))


class Fp8Unsupported(ValueError):
    """A quantized layer that the FP8 path cannot run exactly (it stays on the fake-quant path)."""


def _check_use_kernels(use_kernels, where: str = "") -> None:
    if not (use_kernels is None or isinstance(use_kernels, bool)):  # "false" would count as True
        raise ValueError(f"{where}use_kernels must be True, False or None, got {use_kernels!r}")


class Fp8Layer(nn.Module):
    """A :class:`~msfp.layers.QuantLayer` executed on E4M3 codes (see the module docstring).

    Holds the weight as codes (1 byte per weight, layout ``(K, O, KH, KW, C)`` for ``K`` TALoRA weight sets), the
    per-output-channel code scale (the weight scale with both E4M3 shifts undone), the bias and the activation
    format, scales and zero points of the source layer.
    ``use_kernels``: True (Triton kernels), False (emulated) or None (kernels wherever the input's device has them,
    so a model converted on the CPU and moved to a Hopper GPU runs them there).
    """

    def __init__(self, layer: QuantLayer, use_kernels: bool | None = None, linear_gemm: str = "triton",
                 tma: str | None = None, split_k: int | str = 1, precise_acc: bool = True):
        super().__init__()
        if linear_gemm not in LINEAR_GEMMS:
            raise ValueError(f"{layer.name}: unknown linear_gemm {linear_gemm!r}; expected one of {LINEAR_GEMMS}")
        if tma not in TMA_TILINGS:
            raise ValueError(f"{layer.name}: unknown tma tiling {tma!r}; expected one of {TMA_TILINGS}")
        if split_k != "auto" and not (isinstance(split_k, int) and split_k >= 1):
            raise ValueError(f"{layer.name}: split_k must be a positive int or 'auto', got {split_k!r}")
        if not isinstance(precise_acc, bool):
            raise ValueError(f"{layer.name}: precise_acc must be True or False, got {precise_acc!r}")
        _check_use_kernels(use_kernels, f"{layer.name}: ")
        aq, wq = layer.act_quantizer, layer.weight_quantizer
        if not wq.enabled and not aq.enabled:
            raise Fp8Unsupported(f"{layer.name}: quantizers are disabled (a full-precision layer)")
        for what, off, on, other in (("activation", aq, wq, "weights"), ("weight", wq, aq, "activations")):
            if not off.enabled:  # W4A16 (or its mirror): the FP8 GEMM needs both operands as codes
                raise Fp8Unsupported(f"{layer.name}: its {what} quantizer is disabled ({other} {on.fmt.name}, "
                                     f"{what}s full precision); the FP8 path needs both quantized")
        if not wq.fmt.signed:
            raise Fp8Unsupported(f"{layer.name}: weight format {wq.fmt.name} has a zero point; the FP8 path needs a "
                                 f"signed weight format")
        self.act_shift, weight_shift = e4m3_shift(aq.fmt), e4m3_shift(wq.fmt)
        for what, fmt, shift in (("activation", aq.fmt, self.act_shift), ("weight", wq.fmt, weight_shift)):
            if shift is None:
                raise Fp8Unsupported(f"{layer.name}: {what} format {fmt.name} is not exactly representable in FP8 "
                                     f"E4M3 at any power-of-two scale")
        if layer.kind == "conv2d" and (layer.conv_args["groups"] != 1 or layer.padding_mode != "zeros"
                                       or isinstance(layer.conv_args["padding"], str)):
            raise Fp8Unsupported(f"{layer.name}: only groups=1 convolutions with numeric zero padding run in FP8 "
                                 f"(got groups={layer.conv_args['groups']}, padding={layer.conv_args['padding']!r}, "
                                 f"padding_mode={layer.padding_mode!r})")
        self.name, self.kind, self.context = layer.name, layer.kind, layer.context
        self.conv_args = dict(layer.conv_args) if layer.kind == "conv2d" else {}
        self.act_fmt, self.use_kernels, self.linear_gemm = aq.fmt, use_kernels, linear_gemm
        # False lets Hopper's FP8 MMA keep partial sums in its reduced-precision accumulator (faster, less exact;
        # the kernels only, like torch._scaled_mm's use_fast_accum).
        self.precise_acc = precise_acc
        # How the Triton GEMM loads its tiles where the shapes allow TMA copies, and how many programs share each
        # output tile's K loop (convert_to_fp8's tma and split_k).
        self.tma, self.split_k = tma, split_k
        with torch.no_grad():
            w_scale = wq.scale.detach().float().clamp_min(MIN_SCALE)
            view = (-1,) + (1,) * (layer.weight.dim() - 1)
            codes, tap_sums = [], []
            for k in range(layer.num_weight_sets):
                qw = layer.quantized_weight(k).detach().float()
                # Q_w(W) is already on the grid: re-quantizing it recovers its grid values exactly.
                grid = round_to_grid(_grid_units(qw, wq.fmt, w_scale.view(view)), wq.fmt)
                codes.append((grid * 2.0**weight_shift).to(E4M3))  # a power of two: exact; a Python scalar: any device
                tap_sums.append(qw.sum(1))  # (O,) for linears, (O, KH, KW) for convolutions
            codes = torch.stack(codes)
            if layer.kind == "conv2d":
                # (K, O, KH, KW, C): channels innermost, as NHWC inputs. Copied with every stride set: contiguous()
                # would leave a 1×1 kernel's size-1 dims at stride 1, which TMA refuses (16-byte multiples only).
                codes = codes.permute(0, 1, 3, 4, 2).clone(memory_format=torch.contiguous_format)
            self.register_buffer("weight_codes", codes)
            # Both codes are their grid values times 2^shift; undoing both shifts here (exact: powers of two) leaves
            # the GEMM epilogue one product, activation scale × code_scale, per output.
            self.register_buffer("code_scale", w_scale * 2.0 ** -(weight_shift + self.act_shift))
            self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
            # In the quantizer's dtype (float64 in a float64 model): a scale rounded to float32 moves the grid, and an
            # input next to a rounding tie would get the neighbouring code.
            self.register_buffer("act_scale", aq.scale.detach().clamp_min(MIN_SCALE).clone())
            zero = aq.zero_point.detach().clone() if aq.fmt.needs_zero_point else None
            self.register_buffer("act_zero_point", zero)
            # The zero-point correction needs only the dequantized weight's sums over input channels, per tap.
            self.register_buffer("weight_tap_sums", torch.stack(tap_sums) if zero is not None else None)
        self._corr_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    @property
    def num_weight_sets(self) -> int:
        return self.weight_codes.shape[0]

    def _kernels_for(self, x: torch.Tensor) -> bool:
        if x.dtype == torch.float64:  # rounded to float32 for the kernels, an input next to a tie could cross it
            if self.use_kernels:
                raise ValueError(f"{self.name}: the FP8 kernels read float32, bfloat16 or float16 inputs, not "
                                 "float64; convert with use_kernels=None to emulate them exactly for float64")
            return False
        return fp8_kernels_available(x.device)[0] if self.use_kernels is None else self.use_kernels

    def _zero_point_correction(self, k: int, spatial: tuple[int, ...], kernels: bool) -> torch.Tensor:
        """``1_valid ⊛ Q_w(W_k)``: (O,) for linears; for convolutions of an input of size ``spatial`` (O, OH, OW),
        or for the kernels, which sum it themselves, the per-tap channel sums it is built from (O, KH, KW)."""
        sums = self.weight_tap_sums[k]
        if kernels or self.kind == "linear":
            return sums
        key = (k, spatial, sums.device)
        # The buffer's address and version: after load_state_dict or a swapped buffer, another layer's sums.
        source = (sums.data_ptr(), version_key(sums))
        cached = self._corr_cache.get(key)
        if cached is None or cached[0] != source:
            # float64: cuDNN runs float32 convolutions in TF32 by default, which would round the sums to 11 bits.
            wide = sums.double()
            ones = wide.new_ones((1, 1, *spatial))
            cached = self._corr_cache[key] = (source, F.conv2d(ones, wide[:, None], None, **self.conv_args)[0]
                                              .to(sums.dtype))
        return cached[1]

    def _scaled_mm_applies(self, codes: torch.Tensor, w_codes: torch.Tensor, out_dtype: torch.dtype) -> bool:
        # torch._scaled_mm's row-wise scaling writes bfloat16 only and needs 16-aligned K and N; no rows (an empty
        # token sequence) go to the Triton GEMM, which takes them.
        return (self.linear_gemm == "scaled_mm" and out_dtype == torch.bfloat16 and codes.shape[0] > 0
                and w_codes.shape[0] % 16 == 0 and w_codes.shape[1] % 16 == 0)

    def _gemm(self, codes: torch.Tensor, k: int, a_scale: torch.Tensor, zero: torch.Tensor | None,
              spatial: tuple[int, ...], out_dtype: torch.dtype, kernels: bool, bordered: bool = False) -> torch.Tensor:
        """The layer on activation codes of the samples that use weight set ``k`` (``bordered``: the interior view of
        zero-bordered convolution codes, from ``act_codes(…, pad=…)``)."""
        w_codes = self.weight_codes[k]
        corr = None if zero is None else self._zero_point_correction(k, spatial, kernels)
        if kernels:
            from msfp import triton_kernels

            if self.kind == "linear" and self._scaled_mm_applies(codes, w_codes, out_dtype):
                return _scaled_mm_linear(codes, w_codes, a_scale, self.code_scale, self.bias, zero, corr,
                                         fast_accum=not self.precise_acc)
            if self.kind == "linear":
                return triton_kernels.linear_fp8(codes, w_codes, a_scale, self.code_scale, self.bias, zero, corr,
                                                 out_dtype=out_dtype, precise_acc=self.precise_acc,
                                                 tma=self._tma_applies(codes, w_codes),
                                                 split_k=self._split_k(codes.shape[0], codes.device))
            # NHWC; a zero-bordered view keeps its border (a copy would drop it).
            codes = codes.permute(0, 2, 3, 1)
            sh, sw = self.conv_args["stride"]  # nn.Conv2d's pairs
            rows = codes.shape[:3].numel() // (sh * sw)
            codes = codes if bordered else codes.contiguous()
            out = triton_kernels.conv2d_fp8(codes, w_codes, a_scale, self.code_scale, self.bias, zero, corr,
                                            self.conv_args["stride"], self.conv_args["padding"],
                                            self.conv_args["dilation"], out_dtype=out_dtype,
                                            precise_acc=self.precise_acc, tma=self._tma_applies(codes, w_codes),
                                            zero_bordered=bordered, split_k=self._split_k(rows, codes.device))
            return out.permute(0, 3, 1, 2)  # NCHW view of the NHWC result (channels_last memory)
        # Emulated: the products of two codes are exact in fp32, so only the summation order differs from a kernel.
        if self.kind == "linear":
            acc = F.linear(codes.float(), w_codes.float())
            y = acc * (a_scale[:, None] * self.code_scale)
            shape = (-1,)
        else:
            acc = F.conv2d(codes.float(), w_codes.permute(0, 3, 1, 2).float(), None, **self.conv_args)
            y = acc * (a_scale.view(-1, 1, 1, 1) * self.code_scale.view(1, -1, 1, 1))
            shape = (-1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        if zero is not None:
            y = y + zero.view(-1, *([1] * (y.dim() - 1))) * corr
        return y

    def _split_k(self, rows: int, device: torch.device) -> int:
        """``split_k``, with ``"auto"`` resolved for a GEMM of ``rows`` output rows (about, for strided convolutions):
        enough shares of the K loop to give every SM of the GPU a program when the 128×128 output tiles are fewer than
        the SMs, at most 4; 1 off CUDA."""
        if self.split_k != "auto":
            return self.split_k
        if device.type != "cuda":
            return 1
        from msfp.triton_kernels import _cdiv

        tiles = _cdiv(rows, 128) * _cdiv(self.weight_codes.shape[1], 128)
        return min(4, max(1, torch.cuda.get_device_properties(device).multi_processor_count // tiles))

    def _tma_applies(self, codes: torch.Tensor, w_codes: torch.Tensor) -> bool:
        from msfp import triton_kernels

        # Where TMA cannot load the tiles (stride 2, channels not a multiple of 16), the pointer loads serve.
        return (self.tma is not None
                and triton_kernels.tma_unsupported(codes, w_codes, self.conv_args.get("stride", 1)) is None)

    def _border(self, channels: int, routed: bool) -> tuple[int, int]:
        """The zero border to write the activation codes into: the padding, for TMA's flat-row tiling of a
        stride-1 convolution whose channels TMA can load; (0, 0) otherwise. Routed TALoRA batches are regrouped by
        copying, which would drop a border."""
        padding = tuple(self.conv_args["padding"])  # nn.Conv2d's pair (string paddings never reach Fp8Layer)
        if self.tma != "rows" or routed or channels % 16 or padding == (0, 0) or self.conv_args["stride"] != (1, 1):
            return 0, 0
        return padding

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would make the E4M3 codes (a floating dtype to torch) 2-byte bfloat16 and round
        # the fp32 scales, zero points and tap sums: a cast only moves the tensors.
        def keep_dtype(t):
            # The conv codes are 5-D (K, O, KH, KW, C): a memory format such as channels_last does not apply to them.
            out = fn(t) if t.dim() < 5 else fn(t.flatten()).view(t.shape)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def _act_params(self, batch: int, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The activation scale and zero point of each of the ``batch * rows`` GEMM rows (``rows`` per sample)."""
        zero = self.act_zero_point
        groups = self.context.groups(self.act_scale.numel(), batch, self.name)
        if groups is None:  # one scale for all: stride-0 views, no copy and no kernel launch
            return self.act_scale.expand(batch * rows), None if zero is None else zero.expand(batch * rows)
        a_scale, zero = self.act_scale[groups], None if zero is None else zero[groups]
        if rows != 1:  # 0 too: an empty token sequence has no rows
            a_scale, zero = a_scale.repeat_interleave(rows), None if zero is None else zero.repeat_interleave(rows)
        return a_scale, zero

    def _check_input(self, x: torch.Tensor) -> None:
        # Here, not deep in the kernels or the emulation: their messages name neither the layer nor the input, and an
        # integer input made the emulation compute in int64 (scales truncated to 0, a meaningless output).
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point input, got {x.dtype}")
        channels = self.weight_codes.shape[-1]  # (K, O, C) or (K, O, KH, KW, C)
        if self.kind == "linear":
            if x.dim() == 0 or x.shape[-1] != channels:
                raise ValueError(f"{self.name}: expected an input of {channels} features in its last dimension, got "
                                 f"shape {tuple(x.shape)}")
        elif x.dim() not in (3, 4) or x.shape[-3] != channels:
            raise ValueError(f"{self.name}: expected a (N, {channels}, H, W) or ({channels}, H, W) input, got shape "
                             f"{tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # rounding to codes has no gradient: it would be zero
            raise RuntimeError(f"{self.name}: the FP8 backend is for inference and passes no gradient; use the "
                               "fake-quant model (load_quantized(..., backend='fake')) where gradients are needed")
        self._check_input(x)
        unbatched = x.dim() == (1 if self.kind == "linear" else 3)  # as nn.Linear/nn.Conv2d accept it
        try:
            y = self._batched_forward(x.unsqueeze(0) if unbatched else x)
        except (RuntimeError, ValueError) as e:  # torch's error names no layer, nor do the kernels'
            kernel = self.weight_codes.shape[2:4]
            too_small = self.kind == "conv2d" and conv_input_too_small(self.name, x.shape, kernel, self.conv_args)
            if too_small:
                raise ValueError(too_small) from e
            raise
        return y.squeeze(0) if unbatched else y

    def _batched_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":  # (B, ..., C): one scale per row of the flattened GEMM
            rows = x.shape[1:-1].numel()
            x2, view = x.reshape(-1, x.shape[-1]), (-1, 1)
        else:
            rows, x2, view = 1, x, (-1, 1, 1, 1)
        a_scale, zero = self._act_params(x.shape[0], rows)
        compute = compute_dtype(x.dtype)  # as fake quantization takes the scales
        if a_scale.dtype != compute:  # (the compare: a no-op .to() costs host time every call)
            a_scale, zero = a_scale.to(compute), None if zero is None else zero.to(compute)
        kernels, pad = self._kernels_for(x), (0, 0)
        if kernels:
            from msfp import triton_kernels

            # NHWC codes for convolutions (the kernel's layout); permuted back to a logical NCHW view here.
            routed = self.num_weight_sets > 1 and self.context.route is not None
            pad = self._border(x.shape[1], routed) if self.kind == "conv2d" else (0, 0)
            try:
                codes = triton_kernels.act_codes(x2, self.act_fmt, a_scale, zero, self.act_shift, pad=pad)
            except triton_kernels.KernelsUnavailable as e:  # e.g. converted on a GPU, then moved to the CPU
                raise triton_kernels.KernelsUnavailable(
                    f"{self.name}: converted with use_kernels=True, but {e}; convert with use_kernels=None to "
                    "emulate the kernels where they cannot run") from e
            codes = codes if self.kind == "linear" else codes.permute(0, 3, 1, 2)
        else:
            codes = act_codes(x2, self.act_fmt, a_scale.view(view), None if zero is None else zero.view(view),
                              self.act_shift)
        spatial = tuple(x.shape[-2:]) if self.kind == "conv2d" else ()
        # The kernels write half-precision models' outputs directly; the emulation computes in fp32.
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        # No rows (an empty token sequence) to route: any weight set gives the empty output.
        if self.num_weight_sets == 1 or self.context.route is None or rows == 0:
            y = self._gemm(codes, 0, a_scale, zero, spatial, out_dtype, kernels, bordered=pad != (0, 0))
        else:
            y = run_route_groups(*self.context.route_groups(self.name, x.shape[0], rows),
                                 lambda k, c, s, z: self._gemm(c, k, s, z, spatial, out_dtype, kernels),
                                 codes, a_scale, zero)
        if self.kind == "linear":
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        path = {True: "triton", False: "emulated", None: "triton where available"}[self.use_kernels]
        if self.kind == "linear" and self.linear_gemm == "scaled_mm" and self.use_kernels is not False:
            path += " (GEMM: torch._scaled_mm for bfloat16 inputs)"
        if self.tma is not None and self.use_kernels is not False:
            path += f", TMA loads ({self.tma}) where the shapes allow"
        return f"{self.name}: {self.kind}, fp8 {path}, act {self.act_fmt.name}, {self.num_weight_sets} weight set(s)"


def _scaled_mm_linear(codes, w_codes, a_scale, code_scale, bias, zero, corr, fast_accum: bool) -> torch.Tensor:
    """The linear GEMM of :meth:`Fp8Layer._gemm` through ``torch._scaled_mm`` with row-wise scales (bfloat16 out).

    Its bias operand is bfloat16, so ``bias + z_a·corr`` is summed in fp32 and rounded once when the zero point is
    one for all rows (stride 0, the per-tensor case), and added to the bfloat16 result otherwise: either way within
    one more bfloat16 rounding of the Triton kernel's fp32 epilogue. Accumulation is fp32 unless ``fast_accum``.
    """
    rows = codes.shape[0]
    extra, per_row = bias, None
    if zero is not None:
        if zero.stride(0) == 0:
            extra = zero[:1] * corr if bias is None else bias + zero[:1] * corr
        else:
            per_row = zero[:, None] * corr[None, :]
    y = torch._scaled_mm(codes, w_codes.t(), scale_a=a_scale.reshape(rows, 1).contiguous(),
                         scale_b=code_scale.reshape(1, -1), bias=None if extra is None else extra.to(torch.bfloat16),
                         out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return y if per_row is None else (y.float() + per_row).to(torch.bfloat16)


def _fp8_layer_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Fp8Layer)]


ATTENTION_KEPT = "attention matmul input (fake-quant on every backend)"


def require_fake_quant(model: nn.Module, action: str, instead: str) -> None:
    """Raise if layers of ``model`` run on the FP8 backend, which is for inference only: they hold E4M3 codes, not the
    quantizers that calibration, fine-tuning, checkpoints and this conversion work on."""
    names = _fp8_layer_names(model)
    if names:
        raise ValueError(f"{action} needs the fake-quant model, but {len(names)} layer(s) run on the FP8 backend "
                         f"(e.g. {names[0]!r}): {instead}")


def backend_summary(model: nn.Module, device: torch.device | str) -> str:
    """One line on what a :func:`convert_to_fp8` model runs on ``device``: how many layers on E4M3 codes, kernels or
    emulation (and why), and which layers stay fake-quant (and why)."""
    backend = model.msfp_backend
    on_codes, kept = len(_fp8_layer_names(model)), backend["fake_quant_layers"]
    available, why = (False, "use_kernels=False") if backend["kernels"] is False else fp8_kernels_available(device)
    how = "with the Triton FP8 kernels" if available else f"emulated ({why})"
    if backend["kernels"] and not available:  # use_kernels=True: the kernels or nothing
        from msfp.triton_kernels import interpreted

        how = ("with the Triton FP8 kernels, interpreted (TRITON_INTERPRET=1)"
               if torch.device(device).type == "cpu" and interpreted()
               else f"not runnable here: converted with use_kernels=True, but {why}")
    layers = on_codes + sum(reason != ATTENTION_KEPT for reason in kept.values())
    line = f"backend fp8: {on_codes} of {layers} quantized layers on E4M3 codes, {how}"
    by_reason: dict[str, list[str]] = {}
    for name, reason in kept.items():
        by_reason.setdefault(reason, []).append(name)
    stay = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return f"{line}; {len(kept)} stay fake-quant ({stay})" if kept else line


# Normal buffers even when called inside torch.inference_mode: inference tensors count no in-place versions, so the
# zero-point border correction would be recomputed on every call.
@torch.inference_mode(False)
def convert_to_fp8(model: nn.Module, use_kernels: bool | None = None, linear_gemm: str = "triton",
                   tma: str | None = None, split_k: int | str = 1, precise_acc: bool = True) -> dict[str, str]:
    """Replace every quantized layer that the FP8 path runs exactly by an :class:`Fp8Layer`, in place.

    ``use_kernels=None`` runs the Triton kernels wherever the input's device has them and the emulated path
    elsewhere; True insists on the kernels (an error here if the model's device lacks them), False always emulates.
    ``linear_gemm="scaled_mm"`` runs linear layers' GEMMs through ``torch._scaled_mm`` where it applies (see
    :class:`Fp8Layer`), with the kernels. ``tma`` has the Triton GEMMs load their tiles with Hopper's TMA copies
    wherever a layer's shapes allow (stride 1, channels a multiple of 16; per-thread address arithmetic elsewhere):
    a padded convolution's input in boxes of output rows (``"boxes"``), or written inside a zero border and read as
    flat rows (``"rows"``; see :func:`msfp.triton_kernels.conv2d_fp8`). ``split_k`` shares each output tile's K loop
    among that many programs (``"auto"``: where a layer has fewer 128×128 output tiles than the GPU has SMs).
    ``precise_acc=False`` lets the FP8 GEMMs (Triton's and ``torch._scaled_mm``) keep their sums in Hopper's
    reduced-precision accumulator instead of fp32: faster, less exact (``benchmarks/gpu_w4a4.py`` measures both).
    Returns ``{layer name: reason}`` for the layers left on the fake-quant path (8-bit INT layers, layers with
    disabled quantizers, grouped convolutions…); attention matmuls, when quantized, stay fake-quant too.
    """
    from msfp.attention import attention_quantizers
    from msfp.surgery import quant_layers

    # Converted layers keep the options they were made with: converting again would only relabel msfp_backend.
    options = {k: v for k, v in getattr(model, "msfp_backend", {}).items() if k not in ("kind", "fake_quant_layers")}
    require_fake_quant(model, "convert_to_fp8", f"they were converted with {options}; convert "
                       "msfp.load_quantized(directory) (backend 'fake') with other options instead")
    layers = quant_layers(model)
    _check_use_kernels(use_kernels)
    if use_kernels:
        for device in {layer.weight.device for layer in layers.values()}:
            available, why = fp8_kernels_available(device)
            if not available:
                raise RuntimeError(f"the FP8 kernels cannot run here: {why}")
    kept = {}
    for name, layer in layers.items():
        try:
            # Each on its layer's device: a model split across GPUs stays split.
            replacement = Fp8Layer(layer, use_kernels, linear_gemm, tma, split_k, precise_acc).to(layer.weight.device)
        except Fp8Unsupported as e:
            kept[name] = str(e).split(": ", 1)[1]
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    for name in attention_quantizers(model):
        kept[name] = ATTENTION_KEPT
    # Inference only: without parameters that want gradients, a forward outside torch.no_grad() builds no graph
    # (an FP8 layer refuses inputs that need a gradient).
    model.requires_grad_(False)
    model.msfp_backend = dict(kind="fp8", kernels=use_kernels, linear_gemm=linear_gemm, tma=tma, split_k=split_k,
                              precise_acc=precise_acc, fake_quant_layers=kept)
    return kept
