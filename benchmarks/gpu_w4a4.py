"""Real W4A4 on FP8 tensor cores (msfp.fp8 + msfp.triton_kernels) against the same layers and models in BF16.

    python benchmarks/gpu_w4a4.py [--batch 8 --large-batch 32 --iters 30] [--smoke]

Needs a GPU with FP8 tensor cores (compute capability ≥ 8.9; Hopper for the SPEC targets) and triton; elsewhere it
prints a JSON document that says why it was skipped. ``--smoke`` instead runs the whole flow with tiny shapes on the
emulated FP8 path (any device, timings meaningless, the large UNet narrowed): a check that the script works, not a
measurement; the test suite runs it.

Reported, per layer shape (SD-1.5's 3×3 convolutions at 320–1280 channels and its linears, and DiT-XL/2's MLP linears;
each row's ``shapes_of``) — the BF16 time (cuBLAS/cuDNN, channels_last, ``cudnn.benchmark``), the FP8 GEMM/convolution
alone on ready codes, and the whole FP8 layer (activation-quantize kernel + GEMM, BF16 in and out), the GEMM alone
with fast (reduced-precision) FP8 accumulation; TFLOP/s and % of the dense peak of the GPU; the GEMM's error against
float64 with both accumulations (``accumulation_error``: what fast accumulation costs in accuracy); for 3×3
convolutions also the activation-quantize kernel alone (``act_codes``) on channels_last and on NCHW input
(GroupNorm's output on CUDA), with its GB/s. Per denoiser (a random-weight UNet2DConditionModel with Stable Diffusion
1.5's shapes, at ``--batch`` and, with fewer variants, at ``--large-batch``; the shipped default model at
``--batch``): one step's time in BF16 and with every 4-bit layer on the FP8 path, the speed-up, the peak memory, the
bytes of the weights, and the output's relative L2 distance from the same model's emulated FP8 path
(``output_rel_l2_vs_emulated``: torch computing the same codes in fp32; end-to-end equivalence at these shapes, and
for BF16 the quantization's effect). For BF16 and the FP8 path, each step's time by kernel (``time_by_kernel``: GPU
time per call of each kernel, from the profiler, the largest 12 by name): where the FP8 step loses or gains.
Linear layers are timed twice on the FP8 path: with the Triton GEMM and through ``torch._scaled_mm`` (``scaled_mm_*``
fields; for the denoisers ``fp8_w4a4_scaled_mm``). The Triton GEMM is also timed with TMA loads (stride-1 layers):
3×3 convolutions with both tilings, ``*_tma_boxes`` and ``*_tma_rows`` (codes inside a zero border), linears as flat
rows (``*_tma_rows``); for the denoisers ``fp8_w4a4_tma_boxes`` and ``fp8_w4a4_tma_rows`` (``convert_to_fp8(tma=…)``),
``fp8_w4a4_split_k_auto`` (pointer loads, ``split_k="auto"``) and ``fp8_w4a4_fast_accum`` (every GEMM with fast FP8
accumulation: its step time and its distance from the emulation beside the 4-bit quantization's own). Linears' GEMMs
are also timed warp-specialized
(``*_tma_ws``, ``*_tma_ws_fast_accum``: a producer warp group issuing the TMA copies, two consumers; Triton 3.6 only,
else ``fp8_gemm_only_tma_ws_error`` says why).
Every time is taken twice on both sides, with the same settings: eagerly (one call per timing, so the host's launch
work counts) and replayed from a CUDA graph (``--no-cuda-graphs`` skips this), which leaves the GPU's time alone; no
torch.compile. Before a call is timed, the Triton kernels it launches are compiled in parallel processes
(``--compile-workers``, :func:`msfp.triton_kernels.precompile`; totals under ``precompiled``). The models' 8-bit
edge layers (first/last conv, timestep MLP) are kept in BF16 here, so only the W4A4 layers differ.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

import msfp
from msfp import triton_kernels
from msfp.cuda_graphs import capture
from msfp.environment import HelpFormatter, command_line, machine_info
from msfp.formats import get_format
from msfp.fp8 import Fp8Layer, act_codes, convert_to_fp8, e4m3_shift, fp8_kernels_available
from msfp.surgery import quant_layers

# Dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, by a substring of torch.cuda.get_device_name().
PEAKS = {"H100 PCIe": dict(bf16=756.0, fp8=1513.0), "H100": dict(bf16=989.4, fp8=1978.9),
         "H200": dict(bf16=989.4, fp8=1978.9)}

CONVS = [  # (batch-independent) C_in, C_out, H=W, stride — SD-1.5 UNet at 512×512 (64×64 latents)
    (320, 320, 64, 1), (640, 640, 32, 1), (1280, 1280, 16, 1), (1280, 1280, 8, 1), (320, 320, 64, 2),
]
LINEARS = [  # tokens per sample, K, N — SD-1.5 UNet at 512×512
    (4096, 320, 320), (1024, 640, 5120), (256, 1280, 1280), (256, 5120, 1280), (64, 1280, 10240),
]
# Larger linears than a UNet has: the MLP of DiT-XL/2 at 512×512 (1024 tokens, width 1152, MLP 4608), the issue's
# "large linear layers": both GEMM dimensions and K in the thousands, where FP8's doubled peak can show.
DIT_LINEARS = [(1024, 1152, 4608), (1024, 4608, 1152)]
ACT_FORMAT, WEIGHT_FORMAT = get_format("ufp4_e2m2"), get_format("fp4_e2m1")
# The warp-specialized GEMM's launch options: TMA loads, one 128×128×64 tile for two consumer warp groups
# (num_warps=4 becomes 12 warps with the producer), 3 stages.
WARP_SPECIALIZED = dict(tma=True, warp_specialize=True, block_m=128, block_n=128, block_k=64, num_warps=4,
                        num_stages=3)


def sd15_unet(sample_size: int = 64, channels=(320, 640, 1280, 1280), cross_attention_dim: int = 768):
    """Stable Diffusion 1.5's UNet architecture with random weights (smaller ``channels`` for the smoke run)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=channels, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8).eval()


def w4a4_config() -> msfp.QuantConfig:
    """The MSFP W4A4 preset with the 8-bit edge layers (first/last conv, timestep MLP) kept in full precision, so that
    only the W4A4 layers differ from BF16."""
    config = msfp.QuantConfig.preset("w4a4-msfp")
    config.eight_bit_layers, config.full_precision_layers = [], ["@first", "@last", "@time_embedding"]
    return config


def w4a4_quantized(fp: torch.nn.Module, max_samples: int = 1 << 14) -> torch.nn.Module:
    """``fp`` quantized with :func:`w4a4_config`, its weight quantizers initialized (realistic weight codes; the
    activation scales stay at their placeholder, uncalibrated)."""
    q = msfp.quantize(fp, w4a4_config())
    for layer in quant_layers(q).values():
        layer.weight_quantizer.initialize(layer.weight.detach().float(), max_samples=max_samples)
    return q


def timed_ms(fn, iters: int, device) -> float:
    """Median of ``iters`` timed calls (CUDA events on a GPU), after warm-up calls (autotuning happens there)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@dataclasses.dataclass
class Timer:
    """Times calls eagerly and, if ``cuda_graphs`` (on a GPU), replayed from a CUDA graph. A capture that fails is
    recorded in ``graph_error`` and turns graphs off for the rest of the run, rather than ending it. With
    ``compile_arch``, the Triton kernels a call launches are first compiled for that architecture by
    ``compile_workers`` processes (:func:`msfp.triton_kernels.precompile`; totals in ``precompiled``), rather than
    one by one in its warm-up calls."""

    device: torch.device
    iters: int
    cuda_graphs: bool
    graph_error: str | None = None
    compile_arch: int | None = None
    compile_workers: int = 0
    precompiled: dict = dataclasses.field(default_factory=lambda: dict(kernels=0, seconds=0.0, errors=[]))

    def __call__(self, fn) -> dict:
        tuners = _gemm_autotuners()
        tuned_before = [set(tuner.cache) for tuner in tuners]
        if self.compile_arch is not None:
            done = triton_kernels.precompile(fn, arch=self.compile_arch, workers=self.compile_workers)
            self.precompiled["kernels"] += done["kernels"]
            self.precompiled["seconds"] = round(self.precompiled["seconds"] + done["seconds"], 1)
            self.precompiled["errors"] = sorted(set(self.precompiled["errors"]) | set(done["errors"]))
        cuda = self.device.type == "cuda"
        if cuda:  # peak memory after a first call: autotuning allocates a 256 MiB buffer that is not the layer's
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        result = dict(ms=timed_ms(fn, self.iters, self.device))
        # What the autotuner picked for the launches it had not seen before (registers and blocks per SM of each
        # configuration: benchmarks/kernel_compile.py).
        chosen = [{k: v for k, v in tuner.cache[key].all_kwargs().items() if v is not None}
                  for tuner, before in zip(tuners, tuned_before) for key in tuner.cache if key not in before]
        if chosen:
            result["autotuned"] = chosen
        # Peak memory of the eager calls (a CUDA graph's private pool would add to it).
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        if self.cuda_graphs and cuda:
            try:
                result["graph_ms"] = timed_ms(capture(fn, warmup=3)[0], self.iters, self.device)
            except RuntimeError as e:
                self.cuda_graphs, self.graph_error = False, str(e).strip().splitlines()[0]
                print(f"CUDA graph capture failed, graphs off from here: {self.graph_error}", file=sys.stderr,
                      flush=True)
        return result


def _gemm_autotuners() -> list:
    if not triton_kernels.HAS_TRITON:
        return []
    return [*triton_kernels._conv_fp8_tuned.values(), triton_kernels._conv_fp8_tma_tuned]


def rates(flops: float, timing: dict, peak: float | None) -> dict:
    def at(ms):
        tflops = flops / ms / 1e9
        return dict(tflops=tflops, pct_of_peak=None if peak is None else 100 * tflops / peak)

    result = dict(ms=timing["ms"], **at(timing["ms"]), peak_memory_bytes=timing["peak_memory_bytes"])
    if "graph_ms" in timing:
        result["graph"] = dict(ms=timing["graph_ms"], **at(timing["graph_ms"]))
    if "autotuned" in timing:
        result["autotuned"] = timing["autotuned"]
    return result


def speedups(reference: dict, other: dict) -> dict:
    """How many times faster ``other`` runs than ``reference``, eagerly and (where both have one) from CUDA graphs."""
    result = dict(eager=reference["ms"] / other["ms"])
    if "graph_ms" in reference and "graph_ms" in other:
        result["graph"] = reference["graph_ms"] / other["graph_ms"]
    return result


def progress(row: dict) -> dict:
    """Each row also goes to stderr as soon as it is measured, so a run cut short keeps what it measured."""
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def quantized_layer(module: torch.nn.Module, x: torch.Tensor):
    """A W4A4 QuantLayer of ``module`` with its weight quantizer initialised by the MSE search and its activation
    scale fitted to ``x`` (values do not change the speed, but the codes should be realistic)."""
    model = torch.nn.Sequential(module.float())
    msfp.quantize(model, msfp.QuantConfig(weight_formats=[WEIGHT_FORMAT.name], act_formats=[ACT_FORMAT.name],
                                          aal_act_formats=[], eight_bit_layers=[]))
    layer = quant_layers(model)["0"]
    layer.act_quantizer.fmt = ACT_FORMAT
    layer.weight_quantizer.initialize(layer.weight.detach())
    layer.act_quantizer.initialize(x.float().flatten()[: 1 << 16])
    return layer


def layer_act_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """The activation codes of ``x`` (NCHW or (M, K)) with per-row scale ``s`` and zero point ``z``: from the kernel
    (NHWC or (M, K)) or, emulated, in ``x``'s own layout."""
    if use_kernels:
        return triton_kernels.act_codes(x, ACT_FORMAT, s, z, e4m3_shift(ACT_FORMAT))
    view = (-1,) + (1,) * (x.dim() - 1)
    return act_codes(x, ACT_FORMAT, s.view(view), z.view(view), e4m3_shift(ACT_FORMAT))


def act_codes_rows(xb: torch.Tensor, s: torch.Tensor, z: torch.Tensor, use_kernels: bool, timer: Timer) -> dict:
    """The activation-quantization pass alone, from channels_last bf16 (our convolutions' outputs) and from NCHW bf16
    (what GroupNorm returns on CUDA, before a ResNet block's convolutions), with its bandwidth: bf16 in, codes out."""
    moved = xb.numel() * (xb.element_size() + 1)
    result = {}
    for layout, x in (("channels_last", xb), ("nchw", xb.contiguous())):
        timing = timer(lambda x=x: layer_act_codes(x, s, z, use_kernels))
        result[layout] = dict(ms=timing["ms"], gb_per_s=moved / timing["ms"] / 1e6)
        if "graph_ms" in timing:
            result[layout]["graph"] = dict(ms=timing["graph_ms"], gb_per_s=moved / timing["graph_ms"] / 1e6)
    return result


def accumulation_errors(fp8: Fp8Layer, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spatial: tuple,
                        use_kernels: bool) -> dict:
    """The layer's GEMM on ``codes`` (float32 out) with fp32 accumulation (``precise_acc``) and with Hopper's fast
    FP8 accumulation, against float64 (:func:`msfp.triton_kernels.conv2d_fp8_reference`): the largest error over
    Σ|terms| (the GPU tests allow 2⁻¹⁰ of it, a guess this checks) and over the fp32 summation bound
    ``(K + 8 + 2·taps)·2⁻²⁴·Σ|terms|``, and the relative L2 error. Whether fast accumulation, 7–22% faster on the
    H200, stays within what 4-bit inputs can tell apart. On the emulated path both are the same fp32 convolution."""
    w = fp8.weight_codes[0]
    sums = None if z is None else fp8.weight_tap_sums[0]
    if fp8.kind == "linear":  # the convolution of a 1×1 image
        x, w, geometry, taps = codes[:, None, None], w[:, None, None], {}, 1
        sums = None if sums is None else sums[:, None, None]
    else:
        x, taps = codes.permute(0, 2, 3, 1), w.shape[1] * w.shape[2]  # NHWC, as the kernel reads them
        geometry = {k: fp8.conv_args[k] for k in ("stride", "padding", "dilation")}
    ref, magnitude = triton_kernels.conv2d_fp8_reference(x, w, s, fp8.code_scale, fp8.bias, z, sums, **geometry)
    bound = (w[0].numel() + 8 + 2 * taps) * 2.0**-24 * magnitude
    was_precise, errors = fp8.precise_acc, {}
    for precise, label in ((True, "fp32"), (False, "fast")):
        fp8.precise_acc = precise
        with torch.no_grad():
            y = fp8._gemm(codes, 0, s, z, spatial, torch.float32, use_kernels)
        y = y.reshape(ref.shape) if fp8.kind == "linear" else y.permute(0, 2, 3, 1)
        diff = y.double() - ref
        err, tiny = diff.abs(), torch.finfo(torch.float64).tiny  # a zero Σ|terms| has a zero error too
        errors[label] = dict(max_over_sum_abs_terms=(err / magnitude.clamp_min(tiny)).max().item(),
                             max_over_fp32_bound=(err / bound.clamp_min(tiny)).max().item(),
                             rel_l2=(diff.norm() / ref.norm()).item())
    fp8.precise_acc = was_precise
    return errors


def layer_rows(args, timer: Timer, peak) -> list[dict]:
    device = timer.device
    use_kernels = not args.smoke
    rows = []
    for kind, source, shapes in (("conv3x3", "sd15", CONVS), ("linear", "sd15", LINEARS),
                                 ("linear", "dit-xl/2", DIT_LINEARS)):
        for shape in shapes:
            if kind == "conv3x3":
                cin, cout, size, stride = shape
                size = 8 if args.smoke else size
                x = torch.randn(args.batch, cin, size, size, device=device)
                module = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(device)
                out_size = (size + 2 - 3) // stride + 1
                flops = 2 * args.batch * out_size**2 * cout * cin * 9
                desc = dict(c_in=cin, c_out=cout, hw=size, stride=stride)
            else:
                tokens, k, n = shape
                tokens = 16 if args.smoke else tokens
                x = torch.randn(args.batch, tokens, k, device=device)
                module = torch.nn.Linear(k, n).to(device)
                flops = 2 * args.batch * tokens * k * n
                desc = dict(tokens=tokens, k=k, n=n)
            layer = quantized_layer(copy.deepcopy(module), x)
            fp8 = Fp8Layer(layer, use_kernels).to(device)
            # Linears also through torch._scaled_mm (cuBLAS/CUTLASS), the alternative to the Triton GEMM.
            fp8_scaled_mm = Fp8Layer(layer, use_kernels, "scaled_mm").to(device) if kind == "linear" else None
            bf16 = module.to(torch.bfloat16)
            xb = x.to(torch.bfloat16)
            if kind == "conv3x3":
                bf16, xb = bf16.to(memory_format=torch.channels_last), xb.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                x2 = xb if kind == "conv3x3" else xb.reshape(-1, xb.shape[-1])
                s, z = fp8._act_params(x.shape[0], 1 if kind == "conv3x3" else x.shape[1])
                codes = layer_act_codes(x2, s, z, use_kernels)
                if use_kernels and kind == "conv3x3":
                    codes = codes.permute(0, 3, 1, 2)  # the kernel's NHWC codes as the logical NCHW view _gemm takes
                spatial = tuple(x.shape[-2:]) if kind == "conv3x3" else ()
                bf16_t = timer(lambda: bf16(xb))
                gemm_t = timer(lambda: fp8._gemm(codes, 0, s, z, spatial, torch.bfloat16, use_kernels))
                layer_t = timer(lambda: fp8(xb))
                fp8.precise_acc = False  # what fp32 accumulation costs: the same GEMM with Hopper's fast FP8 sums
                fast_t = timer(lambda: fp8._gemm(codes, 0, s, z, spatial, torch.bfloat16, use_kernels))
                fp8.precise_acc = True
                row = dict(kind=kind, shapes_of=source, batch=args.batch, **desc, flops=flops,
                           bf16=rates(flops, bf16_t, peak and peak["bf16"]),
                           fp8_gemm_only=rates(flops, gemm_t, peak and peak["fp8"]),
                           fp8_layer=rates(flops, layer_t, peak and peak["fp8"]),
                           fp8_gemm_only_fast_accum=rates(flops, fast_t, peak and peak["fp8"]),
                           speedup_gemm_only=speedups(bf16_t, gemm_t), speedup_layer=speedups(bf16_t, layer_t))
                row["accumulation_error"] = accumulation_errors(fp8, codes, s, z, spatial, use_kernels)
                if kind == "conv3x3":
                    row["act_codes"] = act_codes_rows(xb, s, z, use_kernels, timer)
                gemm_codes = codes if kind == "linear" else codes.permute(0, 2, 3, 1).contiguous()  # as _gemm has it
                if triton_kernels.tma_unsupported(gemm_codes, fp8.weight_codes[0], desc.get("stride", 1)) is None:
                    # TMA loads; a linear's tiles are flat rows whichever tiling is asked for.
                    for tiling in ("boxes", "rows") if kind == "conv3x3" else ("rows",):
                        fp8.tma, bordered = tiling, tiling == "rows" and kind == "conv3x3" and use_kernels
                        tma_codes = codes
                        if bordered:  # the rows tiling reads codes written inside a zero border
                            tma_codes = triton_kernels.act_codes(x2, ACT_FORMAT, s, z, e4m3_shift(ACT_FORMAT),
                                                                 pad=1).permute(0, 3, 1, 2)
                        gemm_t = timer(lambda: fp8._gemm(tma_codes, 0, s, z, spatial, torch.bfloat16, use_kernels,
                                                         bordered=bordered))
                        layer_t = timer(lambda: fp8(xb))
                        row.update({f"fp8_gemm_only_tma_{tiling}": rates(flops, gemm_t, peak and peak["fp8"]),
                                    f"fp8_layer_tma_{tiling}": rates(flops, layer_t, peak and peak["fp8"]),
                                    f"speedup_gemm_only_tma_{tiling}": speedups(bf16_t, gemm_t),
                                    f"speedup_layer_tma_{tiling}": speedups(bf16_t, layer_t)})
                    fp8.tma = None
                    if kind == "linear" and use_kernels:
                        row.update(warp_specialized_rows(timer, flops, bf16_t, peak, fp8, codes, s, z))
                if fp8_scaled_mm is not None:
                    gemm_t = timer(lambda: fp8_scaled_mm._gemm(codes, 0, s, z, spatial, torch.bfloat16, use_kernels))
                    layer_t = timer(lambda: fp8_scaled_mm(xb))
                    row.update(scaled_mm_gemm_only=rates(flops, gemm_t, peak and peak["fp8"]),
                               scaled_mm_layer=rates(flops, layer_t, peak and peak["fp8"]),
                               speedup_scaled_mm_gemm_only=speedups(bf16_t, gemm_t),
                               speedup_scaled_mm_layer=speedups(bf16_t, layer_t))
            rows.append(progress(row))
    return rows


def warp_specialized_rows(timer: Timer, flops: int, bf16_t: dict, peak, fp8: Fp8Layer, codes, s, z) -> dict:
    """A linear's GEMM warp-specialized (``linear_fp8(…, **WARP_SPECIALIZED)``), with fp32 and fast accumulation;
    or why the launcher refused it."""
    sums = None if z is None else fp8.weight_tap_sums[0]
    fields = {}
    for precise, suffix in ((True, ""), (False, "_fast_accum")):
        try:
            t = timer(lambda: triton_kernels.linear_fp8(
                codes, fp8.weight_codes[0], s, fp8.code_scale, fp8.bias, z, sums, out_dtype=torch.bfloat16,
                precise_acc=precise, **WARP_SPECIALIZED))
        except ValueError as e:  # Triton other than 3.6
            return {"fp8_gemm_only_tma_ws_error": str(e)}
        fields.update({f"fp8_gemm_only_tma_ws{suffix}": rates(flops, t, peak and peak["fp8"]),
                       f"speedup_gemm_only_tma_ws{suffix}": speedups(bf16_t, t)})
    return fields


def kernel_times(fn, device: torch.device, calls: int = 3, top: int = 12) -> dict:
    """Where a call's time goes: each kernel's GPU time per call (on CPU, each operator's own CPU time), from
    ``calls`` profiled eager calls after one unprofiled (compiling, autotuning) call; the ``top`` largest by name,
    the rest summed in ``other_ms``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    own = "self_device_time_total" if cuda else "self_cpu_time_total"  # µs over all calls
    spent = sorted(((getattr(e, own) / 1e3 / calls, e.count / calls, e.key) for e in prof.key_averages()
                    if getattr(e, own) > 0), reverse=True)
    total = sum(ms for ms, _, _ in spent)
    return dict(total_ms=total, other_ms=sum(ms for ms, _, _ in spent[top:]),
                kernels=[dict(name=name[:120], ms=ms, calls=count, share=ms / total) for ms, count, name in spent[:top]])


def denoised(output) -> torch.Tensor:
    """A denoiser's output tensor (diffusers models return it in a dataclass), in float32."""
    return getattr(output, "sample", output).float()


def tensor_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# Each FP8 variant of a denoiser step, by convert_to_fp8's options: fp32 and Hopper's fast FP8 accumulation in every
# GEMM, linears' GEMMs through torch._scaled_mm, TMA loads in the Triton GEMMs with either tiling, and split-K where a
# layer has fewer output tiles than the GPU has SMs.
STEP_VARIANTS = {"fp8_w4a4": {}, "fp8_w4a4_fast_accum": dict(precise_acc=False),
                 "fp8_w4a4_scaled_mm": dict(linear_gemm="scaled_mm"), "fp8_w4a4_tma_boxes": dict(tma="boxes"),
                 "fp8_w4a4_tma_rows": dict(tma="rows"), "fp8_w4a4_split_k_auto": dict(split_k="auto")}
# At the large batch only these: each variant is one more copy of the model, compiled and autotuned anew.
LARGE_BATCH_VARIANTS = ("fp8_w4a4", "fp8_w4a4_fast_accum")


def denoiser_row(name: str, fp: torch.nn.Module, cond: dict, batch: int, variants, use_kernels: bool,
                 timer: Timer) -> dict:
    """One step of ``fp`` at ``batch`` in BF16 and with its 4-bit layers on the FP8 path in each of ``variants``
    (labels of STEP_VARIANTS, "fp8_w4a4" first): times, memory, speed-ups, and the distance from the emulation."""
    device = timer.device
    bf16 = copy.deepcopy(fp).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
    q = w4a4_quantized(copy.deepcopy(fp).to(device, torch.bfloat16).to(memory_format=torch.channels_last))
    models, kept = {"bf16": bf16}, {}
    for label in variants:
        models[label] = copy.deepcopy(q)
        kept[label] = convert_to_fp8(models[label], use_kernels=use_kernels, **STEP_VARIANTS[label])
    emulated = q  # the reference: the same codes computed by torch in fp32
    convert_to_fp8(emulated, use_kernels=False)
    shape = (batch, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)
    x = torch.randn(shape, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 500, device=device)
    cond = {k: v.to(device, torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in cond.items()}
    result = dict(model=name, batch=batch, fake_quant_layers=kept["fp8_w4a4"],
                  fp8_layers=sum(isinstance(m, Fp8Layer) for m in models["fp8_w4a4"].modules()))
    with torch.no_grad():
        reference = denoised(emulated(x, t, **cond))
    del emulated, q
    steps = {}
    for label, model in models.items():
        with torch.no_grad():
            steps[label] = timer(lambda: model(x, t, **cond))
            deviation = denoised(model(x, t, **cond)) - reference
        # Each FP8 variant against the emulation of the same codes: whole-step equivalence at these shapes (bf16
        # activations between layers bound it from below); for BF16 it is the 4-bit quantization's own error.
        result[label] = dict(step_ms=steps[label]["ms"], peak_memory_bytes=steps[label]["peak_memory_bytes"],
                             model_tensor_bytes=tensor_bytes(model),
                             output_rel_l2_vs_emulated=(deviation.norm() / reference.norm()).item())
        if "graph_ms" in steps[label]:
            result[label]["graph_step_ms"] = steps[label]["graph_ms"]
        if label in ("bf16", "fp8_w4a4"):
            with torch.no_grad():
                result[label]["time_by_kernel"] = kernel_times(lambda: model(x, t, **cond), device)
        progress({"model": name, "batch": batch, label: result[label]})  # kept if the run is cut short
    for label in variants:  # speedup, speedup_fast_accum, speedup_scaled_mm, …
        result["speedup" + label.removeprefix("fp8_w4a4")] = speedups(steps["bf16"], steps[label])
    return progress(result)


def start_report(script: str, args, argv) -> tuple[dict, torch.device, dict | None] | None:
    """The JSON report's header (settings, machine, command, the GPU's dense peaks), the device and those peaks; or
    None, after printing a report that says why, where FP8 kernels cannot run and this is not a ``--smoke`` run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    command = command_line(f"benchmarks/{script}.py", argv)
    report = dict(benchmark=script, settings=vars(args), machine=machine_info(device), command=command)
    available, why = fp8_kernels_available(device)
    if not available and not args.smoke:
        print(json.dumps(dict(report, skipped=f"needs a GPU with FP8 tensor cores and triton: {why}"), indent=2))
        return None
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    report["dense_peak_tflops"] = peak = next((v for k, v in PEAKS.items() if k in name), None)
    return report, device, peak


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="batch size (images) of the layer shapes and denoiser steps")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement, after warm-up (median)")
    p.add_argument("--large-batch", type=int, default=32,
                   help="also time the large UNet's step at this batch, BF16 against the FP8 path with fp32 and with "
                        "fast accumulation (0: not)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time every call replayed from a CUDA graph, both sides (no host launch work)")
    p.add_argument("--compile-workers", type=int, default=os.cpu_count() or 1,
                   help="processes compiling the kernels of each timed call before it runs (0: in this process; "
                        "-1: no precompiling, the warm-up calls compile)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the emulated path (checks the script only)")
    args = p.parse_args(argv)
    started = start_report("gpu_w4a4", args, argv)
    if started is None:
        return
    report, device, peak = started
    if args.smoke:
        args.batch, args.iters, args.large_batch = 1, 1, 2 if args.large_batch else 0
        report["note"] = "smoke run on the emulated path: timings are meaningless"
    timer = Timer(device, args.iters, args.cuda_graphs)
    if device.type == "cuda" and not args.smoke and args.compile_workers >= 0:
        major, minor = torch.cuda.get_device_capability(device)
        timer.compile_arch, timer.compile_workers = 10 * major + minor, args.compile_workers
        report["precompiled"] = timer.precompiled  # filled in as the run goes
    report["layers"] = layer_rows(args, timer, peak)
    # The large UNet first: its step is the target, and a run cut short keeps what it measured.
    # The smoke run keeps the architecture but not the width: building 860M random weights on a CPU takes minutes.
    large = sd15_unet(16, (32, 64, 64, 64), 32) if args.smoke else sd15_unet()
    use_kernels = not args.smoke
    report["denoisers"] = []
    for batch, variants in ((args.batch, tuple(STEP_VARIANTS)), (args.large_batch, LARGE_BATCH_VARIANTS)):
        if batch:
            hidden = torch.randn(batch, 77, large.config.cross_attention_dim)
            report["denoisers"].append(denoiser_row("sd15-like UNet2DConditionModel (random weights)", large,
                                                    {"encoder_hidden_states": hidden}, batch, variants, use_kernels,
                                                    timer))
    default, _ = msfp.load_model("default")
    report["denoisers"].append(denoiser_row("default", default, {}, args.batch, tuple(STEP_VARIANTS), use_kernels,
                                            timer))
    report["cuda_graph_error"] = timer.graph_error
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
