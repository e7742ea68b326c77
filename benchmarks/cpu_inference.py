"""CPU sampling speed and resident memory of a packed msfp checkpoint, with and without the weight cache, against
the full-precision model.

    python benchmarks/cpu_inference.py [--model default --preset w4a4-msfp --images 8 --steps 10 --repeats 3]
        [--threads 1] [--out results.json]

The packed checkpoint is made once (tiny calibration: sizes and speed do not depend on its quality); every variant
then runs in its own fresh process, so resident memory is not polluted by the others:

- ``full_precision``: the original model;
- ``packed_cached``: ``msfp.load_quantized(dir)`` (weights dequantized once; the cache is the weight tensor itself);
- ``packed_uncached``: the same with :func:`msfp.checkpoint.unfreeze_weights`: every call re-runs the weight
  quantizers (the fake-quant path used during fine-tuning);
- ``in_memory_cached``: the calibrated model straight from ``msfp.quantize`` (full-precision weights kept) with
  :func:`msfp.checkpoint.freeze_weights`, which holds a dequantized copy beside them;
- ``diagnostic_no_act_quant``: ``packed_cached`` with the activation quantizers off (not a W4A4 model): what is
  left of the gap to full precision once activations are no longer fake-quantized.

Each variant samples ``--images`` images with ``--steps`` DDIM steps (one batch) ``--repeats`` times after a warm-up.
Reported: the median ms per image-step; the bytes of the tensors the model holds; its resident memory (``VmRSS``
after loading minus before, both after ``malloc_trim`` so that freed loading temporaries do not count; at this model
size allocator effects of a few MiB show); the RSS after sampling and the peak RSS (``VmHWM``). Every quantized
variant's samples are compared bit for bit with ``packed_cached``'s. Prints one JSON document (also written
atomically to --out).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel  # noqa: F401  (diffusers imports model classes lazily)
from safetensors.torch import load_file

import msfp
from msfp.checkpoint import freeze_weights, read_quant_meta, unfreeze_weights
from msfp.environment import HelpFormatter, command_line, machine_info, print_result
from msfp.formats import get_format
from msfp.sampling import sample
from msfp.surgery import quant_layers

VARIANTS = ("full_precision", "packed_cached", "packed_uncached", "in_memory_cached", "diagnostic_no_act_quant")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _live_rss_kib() -> int:
    """VmRSS after glibc returns freed heap pages to the system (loading temporaries would otherwise linger)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_kib("VmRSS")


def _tensor_mib(model) -> float:
    """Bytes of the distinct storages the model holds: parameters, buffers and weight caches (a cache that is the
    weight tensor itself counts once)."""
    tensors = [t for t in model.state_dict(keep_vars=True).values() if torch.is_tensor(t)]
    for module in model.modules():
        cache = getattr(module, "_weight_cache", None) or {}
        tensors += [entry[2] for entry in cache.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def _in_memory(fp_model, preset: str, packed: Path):
    """The calibrated model as :func:`msfp.calibrate` leaves it (full-precision weights, calibrated quantizers),
    rebuilt from the checkpoint's quantizer state so this process does not hold calibration data."""
    meta = read_quant_meta(packed)
    qmodel = msfp.quantize(fp_model, preset)
    for name, layer in quant_layers(qmodel).items():
        layer.weight_quantizer.fmt = get_format(meta["layers"][name]["weight_format"])
        layer.act_quantizer.fmt = get_format(meta["layers"][name]["act_format"])
    state = load_file(packed / "model.safetensors")
    qmodel.load_state_dict({k: v for k, v in state.items() if "_quantizer." in k}, strict=False)
    qmodel.msfp_context.num_train_timesteps = meta["num_train_timesteps"]
    return qmodel.eval()


def _build(variant: str, args, packed: Path):
    scheduler = DDIMScheduler.from_pretrained(packed.parent / "scheduler")
    if variant == "full_precision":
        return msfp.load_model(args.model)[0].eval(), scheduler
    if variant == "in_memory_cached":
        return freeze_weights(_in_memory(msfp.load_model(args.model)[0].eval(), args.preset, packed)), scheduler
    loaded = msfp.load_quantized(packed)
    if variant == "diagnostic_no_act_quant":
        for layer in quant_layers(loaded).values():
            layer.act_quantizer.enabled = False
    return (unfreeze_weights(loaded) if variant == "packed_uncached" else loaded), scheduler


def run_variant(variant: str, args, packed: Path, images_out: Path) -> dict:
    """One variant, in this process: timings and memory."""
    torch.set_num_threads(args.threads)
    before = _live_rss_kib()
    model, scheduler = _build(variant, args, packed)
    loaded = _live_rss_kib()

    def draw():
        return sample(model, scheduler, args.images, args.steps, batch_size=args.images, disable=True)

    images = draw()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        draw()
        times.append(time.perf_counter() - start)
    torch.save(images, images_out)
    return dict(ms_per_image_step=1e3 * statistics.median(times) / (args.images * args.steps),
                seconds_per_run=[round(t, 4) for t in times],
                model_tensor_mib=_tensor_mib(model), rss_before_model_mib=before / 1024,
                model_rss_mib=(loaded - before) / 1024,
                rss_after_sampling_mib=_status_kib("VmRSS") / 1024, peak_rss_mib=_status_kib("VmHWM") / 1024)


def make_checkpoint(args, directory: Path) -> Path:
    fp_model, scheduler = msfp.load_model(args.model)
    qmodel = msfp.quantize(copy.deepcopy(fp_model.eval()), args.preset)
    msfp.calibrate(qmodel, fp_model, scheduler, num_samples=args.calib_samples, num_steps=args.calib_steps,
                   disable=True)
    scheduler.save_pretrained(directory / "scheduler")
    return msfp.save_quantized(qmodel, directory / "packed")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="default",
                        help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    parser.add_argument("--preset", default="w4a4-msfp", help="quantization preset of the packed checkpoint")
    parser.add_argument("--images", type=int, default=8, help="images per sampling run (one batch)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM sampling steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant after a warm-up (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration trajectories (images)")
    parser.add_argument("--calib-steps", type=int, default=2, help="DDIM steps per calibration trajectory")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--packed", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.variant:
        result = run_variant(args.variant, args, Path(args.packed), Path(args.result).with_suffix(".pt"))
        Path(args.result).write_text(json.dumps(result))
        return result

    torch.set_num_threads(args.threads)
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("model", "preset", "images", "steps", "repeats", "threads", "calib_samples", "calib_steps")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        packed = make_checkpoint(args, tmp)
        variants = {}
        for variant in VARIANTS:
            out = tmp / f"{variant}.json"
            subprocess.run([sys.executable, __file__, *common, f"--variant={variant}", f"--packed={packed}",
                            f"--result={out}"], check=True)
            variants[variant] = json.loads(out.read_text())
        reference = torch.load(tmp / "packed_cached.pt")
        for variant in VARIANTS[1:4]:
            variants[variant]["samples_equal_packed_cached"] = torch.equal(torch.load(tmp / f"{variant}.pt"), reference)
    fp_ms = variants["full_precision"]["ms_per_image_step"]
    for variant in VARIANTS:
        variants[variant]["time_vs_full_precision"] = variants[variant]["ms_per_image_step"] / fp_ms
    result = dict(benchmark="cpu_inference", model=args.model, preset=args.preset, images=args.images,
                  steps=args.steps, repeats=args.repeats, variants=variants, machine=machine_info(),
                  command=command_line(__file__, argv))
    print_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
