"""Fine-tuning step throughput and peak memory: the TALoRA step with quantizers on vs the same step with them off.

    python benchmarks/finetune_step.py [--model default --batch 16 --iters 10 --device cpu|cuda --threads N]

Each variant runs in its own process (so CPU peak RSS is its own) on the same calibrated W4A4-MSFP model with
TALoRA (K=4): ``quantized_eager`` fake-quantizes weights (after merging the LoRA) and activations with the eager
rounding; ``quantized_fused`` does the same through the fused compiled kernels (``--fused``; the default on CUDA);
``quantizers_off`` does the identical step, LoRA merge included, without rounding. Prints JSON with steps/s, the
ratios to ``quantizers_off`` (SPEC goal ≥ 0.6 on GPU with the fused path), peak memory (CUDA max allocated; on CPU
the process's peak RSS during the timed steps, which Linux lets it reset after the warm-up, with the RSS before them),
machine and command.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import queue as queue_errors
import resource
import sys
import time

import torch

import msfp
from msfp.environment import HelpFormatter, command_line, machine_info
from msfp.finetune import FinetuneConfig, _trainable_groups
from msfp.surgery import set_fused_rounding, set_quantizers_enabled
from msfp.talora import add_talora


def run_variant(args, quantized: bool, fused: bool, queue) -> None:
    began = time.perf_counter()

    def note(what: str) -> None:  # progress on stderr, so a run cut short shows where its time went
        print(f"finetune_step {'quantized' if quantized else 'quantizers off'}{', fused' if fused else ''}: {what} "
              f"after {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fp, scheduler = msfp.load_model(args.model)
    fp.to(device)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler, num_samples=8, num_steps=5, disable=True)
    add_talora(q, 4, 4)
    for layer in msfp.surgery.quant_layers(q).values():
        torch.nn.init.normal_(layer.lora.B, std=1e-3)  # non-zero LoRAs, as during training
    set_quantizers_enabled(q, quantized)
    set_fused_rounding(q, fused)
    optimizer = torch.optim.AdamW(_trainable_groups(q, FinetuneConfig()))
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, fp.config.in_channels, fp.config.sample_size, fp.config.sample_size)
    x = torch.randn(shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    target = torch.randn(shape, generator=gen).to(device)

    def step():
        loss = (q(x, t).sample - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    note("model calibrated, TALoRA added")
    for _ in range(2):  # warm-up (the fused path compiles its graphs here)
        step()
    note("warm-up steps done")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # On CPU the process's peak RSS would be calibration's (teacher, trajectories): Linux resets it to the current
    # RSS here, so the peak is that of the steps on top of what stays resident.
    rss_reset = device.type != "cuda" and _reset_peak_rss()
    rss_before = _rss_kib("VmRSS") * 1024 if rss_reset else None
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    elif rss_reset:
        peak, kind = _rss_kib("VmHWM") * 1024, "process_peak_rss_during_the_timed_steps"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss_calibration_included"
    queue.put(dict(step_seconds=seconds, steps_per_second=1 / seconds, peak_memory_bytes=peak,
                   peak_memory_kind=kind, rss_before_steps_bytes=rss_before))


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the system cannot (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def result_of(proc, queue, name: str) -> dict:
    """The variant's result, or a clear error as soon as its process dies without one (instead of waiting forever)."""
    while True:
        try:
            return queue.get(timeout=5)
        except queue_errors.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the {name} variant's process exited with code {proc.exitcode} "
                                   "before reporting a result (its error is printed above)") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    p.add_argument("--batch", type=int, default=16, help="images per fine-tuning step")
    p.add_argument("--iters", type=int, default=10, help="timed steps per variant, after two warm-up steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's choice)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the fused compiled rounding (unset: on CUDA only)")
    args = p.parse_args(argv)
    if args.fused is None:
        args.fused = args.device.startswith("cuda")
    ctx = mp.get_context("spawn")
    results = {}
    variants = {"quantizers_off": (False, False), "quantized_eager": (True, False)}
    if args.fused:
        variants["quantized_fused"] = (True, True)
    for name, (quantized, fused) in variants.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=run_variant, args=(args, quantized, fused, queue))
        proc.start()
        results[name] = result_of(proc, queue, name)
        proc.join()
    if args.threads:  # the variants ran with it; machine_info reads the thread count from this process
        torch.set_num_threads(args.threads)
    base = results["quantizers_off"]["steps_per_second"]
    results["throughput_ratio"] = {name: results[name]["steps_per_second"] / base for name in variants
                                   if name != "quantizers_off"}
    print(json.dumps(dict(benchmark="finetune_step", settings=vars(args), machine=machine_info(args.device),
                          command=command_line(__file__, argv),
                          results=results), indent=2))


if __name__ == "__main__":
    main()
