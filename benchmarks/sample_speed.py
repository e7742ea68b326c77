"""Sampling time per denoiser step, eager and replayed from CUDA graphs (``msfp sample --cuda-graphs``).

    python benchmarks/sample_speed.py [--model default|sd15] [--num 16 --batch 8 --steps 10 --loras 4] [--smoke]

The model is quantized with the w4a4-msfp preset (edge layers kept in BF16, as in gpu_w4a4.py) and given a routed
TALoRA of ``--loras`` distinct random LoRAs (speed does not depend on the weights; uncalibrated), then draws the same
seeded images with :func:`msfp.sampling.sample` on the fake-quant path and on the FP8 path (the Triton kernels on a
GPU with FP8 tensor cores, emulated elsewhere), each eagerly and through one :class:`msfp.cuda_graphs.GraphedDenoiser`.
Every variant runs twice: the first run compiles, autotunes and captures (``first_run_s``), the second is timed
(``ms_per_step``: wall clock over all denoiser calls, scheduler steps included). Also reported: the graphs captured,
and the largest difference of the graphed run's images from the eager run's (the same kernels replayed: expected
0). Needs a CUDA GPU; ``--smoke`` runs the eager flow on the CPU with tiny shapes (timings meaningless), as the tests
do. Prints JSON with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from diffusers import DDIMScheduler

import msfp
from gpu_w4a4 import sd15_unet, w4a4_config  # the script's own directory is on sys.path
from msfp.cuda_graphs import GraphedDenoiser
from msfp.environment import HelpFormatter, command_line, machine_info
from msfp.fp8 import convert_to_fp8
from msfp.sampling import sample
from msfp.talora import add_talora


def routed_w4a4(fp: torch.nn.Module, loras: int, device, dtype) -> torch.nn.Module:
    q = msfp.quantize(copy.deepcopy(fp).to(device, dtype), w4a4_config())
    add_talora(q, num_loras=loras, rank=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in q.modules():
            if getattr(m, "lora", None) is not None:  # distinct LoRAs, so that routing matters
                m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=gen).to(m.lora.B) * 0.01)
    return q.eval()


def timed_runs(model, scheduler, args, cond, device) -> tuple[torch.Tensor, dict]:
    common = dict(num_samples=args.num, num_inference_steps=args.steps, batch_size=args.batch, disable=True,
                  device=device, cond=cond)
    runs = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        with torch.no_grad():
            images = sample(model, scheduler, **common)  # returned on the CPU: synchronized
        runs.append(time.perf_counter() - began)
    calls = -(-args.num // args.batch) * args.steps
    return images, dict(first_run_s=runs[0], ms_per_step=1e3 * runs[1] / calls)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["default", "sd15"], default="default",
                   help="msfp's shipped DDPM, or a random-weight UNet with Stable Diffusion 1.5's shapes")
    p.add_argument("--num", type=int, default=16, help="images per run")
    p.add_argument("--batch", type=int, default=8, help="images per denoiser call")
    p.add_argument("--steps", type=int, default=10, help="DDIM sampling steps")
    p.add_argument("--loras", type=int, default=4, help="TALoRA: distinct random LoRAs per layer")
    p.add_argument("--smoke", action="store_true", help="eager only, tiny shapes, on the CPU (checks the script)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    command = command_line(__file__, argv)
    report = dict(benchmark="sample_speed", settings=vars(args), machine=machine_info(device), command=command)
    if device.type != "cuda" and not args.smoke:
        print(json.dumps(dict(report, skipped="needs a CUDA GPU (CUDA graphs)"), indent=2))
        return
    if args.smoke:
        args.num, args.batch, args.steps = 2, 2, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cond = {}
    if args.model == "sd15":
        fp, scheduler = sd15_unet(16, (32, 64, 64, 64), 32) if args.smoke else sd15_unet(), DDIMScheduler()
        cond["encoder_hidden_states"] = torch.randn(args.num, 77, fp.config.cross_attention_dim, dtype=dtype)
    else:
        fp, scheduler = msfp.load_model("default")
    fake = routed_w4a4(fp, args.loras, device, dtype)
    fp8 = copy.deepcopy(fake)
    report["kept_fake_quant"] = convert_to_fp8(fp8)
    rows = {}
    for backend, model in (("fake", fake), ("fp8", fp8)):
        eager_images, rows[f"{backend}_eager"] = timed_runs(model, scheduler, args, cond, device)
        if device.type == "cuda":
            graphed = GraphedDenoiser(model)
            images, rows[f"{backend}_cuda_graphs"] = timed_runs(graphed, scheduler, args, cond, device)
            rows[f"{backend}_cuda_graphs"].update(graphs=len(graphed.graphs),
                                                  max_abs_diff_vs_eager=(images - eager_images).abs().max().item())
    report["runs"] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
