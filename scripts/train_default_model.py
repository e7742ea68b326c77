"""Train msfp's shipped default model: a small DDPM (diffusers UNet2DModel) on Fashion-MNIST padded to 32x32.

The defaults are the shipped model's settings (its ``train_log.json``: 5657 steps of batch 512, EMA decay 0.9995,
388 s on one H100). Retrain it in place with:

    python scripts/train_default_model.py --out src/msfp/assets/fashion_ddpm

which needs the Fashion-MNIST IDX files (``--data``). Uses a CUDA GPU when present, otherwise the CPU (hours); the
same settings give the same weights bit for bit only with the same torch version on the same kind of device (CUDA
and CPU generators draw different numbers, and kernels can round differently on another GPU model or CPU instruction
set). Seeded and resumable: a checkpoint is written atomically every ``--ckpt-every`` steps to ``--work-dir`` and
picked up automatically on the next start with the same settings on the same kind of device (``--no-resume`` to start
over); a run stopped by ``--max-minutes`` keeps its checkpoint and exports nothing, and the same command continues
it. The output is a diffusers ``DDPMPipeline.save_pretrained`` directory holding the EMA weights, plus
``train_log.json``; it replaces ``--out`` as a whole, atomically, so ``--out`` must be a new directory or such a
pipeline directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from msfp.data import DEFAULT_DATA_DIR, load_fashion_mnist, to_model_range
from msfp.environment import HelpFormatter, check_minimums, check_positive, command_line, machine_info
from msfp.fileio import atomic_directory, atomic_path

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=16,
    act_fn="silu",
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", clip_sample=True)


# What a resumed run must share with the checkpoint it continues (the time budget may change; the step count may
# not, as the learning-rate schedule is spread over it).
RECIPE = ("steps", "batch", "lr", "warmup", "ema_decay", "seed", "data")


def training_recipe(args) -> dict:
    # The data folder as a full path: the default and the same folder named explicitly are one recipe.
    return {k: str(Path(args.data or DEFAULT_DATA_DIR).resolve()) if k == "data" else getattr(args, k) for k in RECIPE}


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None,
                   help="directory with the Fashion-MNIST IDX files (unset: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs/fashion_ddpm",
                   help="output pipeline directory, replaced (the shipped one: src/msfp/assets/fashion_ddpm)")
    p.add_argument("--work-dir", default="runs/train_default_model", help="where the resumable checkpoint.pt goes")
    p.add_argument("--steps", type=int, default=5657, help="training steps")
    p.add_argument("--batch", type=int, default=512, help="images per training step")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak AdamW learning rate (cosine decay to 10%% of it after the warm-up)")
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=0.9995, help="decay of the exported EMA weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the batches and noise")
    p.add_argument("--ckpt-every", type=int, default=200, help="write a checkpoint every this many steps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes of this run, keeping the checkpoint and exporting nothing; the "
                   "same command continues")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (unset: torch's choice)")
    p.add_argument("--no-resume", action="store_true", help="start over, ignoring a checkpoint in --work-dir")
    args = p.parse_args(argv)
    check_minimums(p, args, steps=1, batch=1, warmup=0, ckpt_every=1, max_minutes=0)
    check_positive(p, args, "lr")
    if not 0 <= args.ema_decay < 1:  # 1 exports the initial weights, > 1 diverges
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")

    out, work = Path(args.out), Path(args.work_dir)
    # --out is replaced as a whole: a folder that is not a pipeline (src/msfp/assets, say) would be deleted with it.
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file()):
        p.error(f"--out {out} exists and is not a pipeline directory this script wrote; it would be replaced as a "
                "whole: choose a new directory")
    if out.resolve() in (work.resolve(), *work.resolve().parents):
        p.error(f"--work-dir {work} is inside --out {out}, which the export replaces")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, _ = load_fashion_mnist("train", args.data)
    data = to_model_range(images).to(device)

    unet = UNet2DModel(**UNET_CONFIG).to(device)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=2 / 3, foreach=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    ckpt_path = work / "checkpoint.pt"
    step, elapsed, losses = 0, 0.0, []
    if ckpt_path.exists() and not args.no_resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        # A CUDA generator's state is no CPU generator's (set_state failed with a size mismatch), and the other
        # device's numbers would not continue the run anyway. Checkpoints from before this field pass.
        if ckpt.get("device", device.type) != device.type:
            p.error(f"{ckpt_path} was written on {ckpt['device']}, this run is on {device.type}: its random state "
                    f"does not carry over; resume on {ckpt['device']}, or --no-resume to start over")
        recipe = training_recipe(args)
        changed = {k: (v, recipe[k]) for k, v in ckpt.get("recipe", {}).items() if recipe.get(k) != v}
        if "recipe" not in ckpt or changed:
            what = ", ".join(f"--{k.replace('_', '-')} {old} → {new}" for k, (old, new) in changed.items())
            p.error(f"{ckpt_path} was written with other settings ({what or 'not recorded'}); resuming would mix "
                    "them: pass the same ones, or --no-resume to start over")
        unet.load_state_dict(ckpt["unet"])
        opt.load_state_dict(ckpt["opt"])
        ema.load_state_dict(ckpt["ema"])
        gen.set_state(ckpt["gen"].cpu())  # generator states are CPU byte tensors, a CUDA generator's too
        step, elapsed, losses = ckpt["step"], ckpt["elapsed"], ckpt["losses"]
        print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)

    pending = []  # losses still on the device: reading each one would sync the GPU every step

    def flush_losses():
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    def save_checkpoint():
        flush_losses()
        atomic_torch_save(dict(unet=unet.state_dict(), opt=opt.state_dict(), ema=ema.state_dict(),
                               gen=gen.get_state(), step=step, elapsed=elapsed, losses=losses,
                               recipe=training_recipe(args), device=device.type), ckpt_path)

    n = len(data)
    began = time.time()
    start = began - elapsed  # the recorded wall time counts every run; the budget this one only
    stopped_early = False
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)
    unet.train()
    while step < args.steps:
        if args.max_minutes is not None and time.time() - began > 60 * args.max_minutes:
            stopped_early = True
            break
        idx = torch.randint(0, n, (args.batch,), generator=gen, device=device)
        x0 = data[idx]
        flip = torch.rand(args.batch, generator=gen, device=device) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        pending.append(loss.detach())
        elapsed = time.time() - start
        bar.update(1)
        if step % 50 == 0:
            flush_losses()
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
        if step % args.ckpt_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    if stopped_early:  # a half-trained model, its learning-rate schedule unfinished, is not exported
        print(f"time budget of {args.max_minutes} min reached at step {step}/{args.steps}; {ckpt_path} is kept and "
              f"{out} unchanged: run the same command again to continue", file=sys.stderr)
        return

    ema.copy_to(unet.parameters())
    unet.eval()
    log = dict(
        steps=step, batch=args.batch, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
        wall_time_s=round(elapsed, 1), final_loss_last100=sum(losses[-100:]) / max(1, len(losses[-100:])),
        parameters=sum(p.numel() for p in unet.parameters()), machine=machine_info(device),
        command=command_line(__file__, argv),
    )
    # The whole directory is this run's: a model card or evaluation of other weights must not be carried over.
    with atomic_directory(out, carry_over=False) as tmp:
        DDPMPipeline(unet=unet.cpu(), scheduler=scheduler).save_pretrained(tmp)
        (tmp / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
