"""Size of msfp's packed checkpoint against the fp16 and fp32 checkpoints of the same model, and its exactness.

    python benchmarks/checkpoint_size.py [--model default --preset w4a4-msfp --calib-samples 4 --calib-steps 2]
        [--out results.json]

The fp16 reference is ``model.half().state_dict()`` written with safetensors (what ``save_pretrained`` writes in
fp16). The packed checkpoint is what :func:`msfp.save_quantized` writes; its bytes are broken down by what they hold.
Exactness: the reloaded model's outputs equal the in-memory quantized model's bit for bit (CPU, a batch over several
timesteps). Prints one JSON document (also written atomically to --out).
"""

from __future__ import annotations

import argparse
import copy
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import msfp
from msfp.checkpoint import CODES_SUFFIX, CONFIG_NAME, WEIGHTS_NAME
from msfp.environment import HelpFormatter, command_line, machine_info, print_result
from msfp.surgery import quant_layers
from msfp.talora import add_talora


def breakdown(file: Path, qmodel) -> dict:
    """Bytes of the safetensors file by content: packed codes (by bit width), weight scales and zero points,
    activation quantizer parameters, biases of quantized layers, all other tensors, and the header."""
    layers = quant_layers(qmodel)
    header = 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]
    out = {"header": header}
    for key, tensor in load_file(file).items():
        layer, _, rest = key.rpartition(".")
        owner = key.split(".weight_quantizer.")[0].split(".act_quantizer.")[0]
        if key.endswith(CODES_SUFFIX):
            name = key[: -len(CODES_SUFFIX)]
            kind = f"weight_codes_{layers[name].weight_quantizer.fmt.bits}bit"
        elif ".weight_quantizer." in key and owner in layers:
            kind = "weight_scales_and_zero_points"
        elif ".act_quantizer." in key and owner in layers:
            kind = "activation_scales_and_zero_points"
        elif rest == "bias" and layer in layers:
            kind = "quantized_layer_biases"
        else:
            kind = "other_tensors"
        out[kind] = out.get(kind, 0) + tensor.numel() * tensor.element_size()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="default",
                        help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    parser.add_argument("--preset", default="w4a4-msfp", help="quantization preset (msfp.quantize)")
    parser.add_argument("--calib-samples", type=int, default=4, help="calibration trajectories (images)")
    parser.add_argument("--calib-steps", type=int, default=2, help="DDIM steps per calibration trajectory")
    parser.add_argument("--num-loras", type=int, default=4, help="TALoRA variant: LoRAs per layer")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    fp_model, scheduler = msfp.load_model(args.model)
    fp_model.eval()
    qmodel = msfp.quantize(copy.deepcopy(fp_model), args.preset)
    msfp.calibrate(qmodel, fp_model, scheduler, num_samples=args.calib_samples, num_steps=args.calib_steps,
                   disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp_state = {k: v.contiguous() for k, v in fp_model.state_dict().items()}
        save_file({k: v.half() for k, v in fp_state.items()}, tmp / "fp16.safetensors")
        save_file(fp_state, tmp / "fp32.safetensors")
        packed_dir = msfp.save_quantized(qmodel, tmp / "packed")
        sizes = dict(fp16_safetensors=(tmp / "fp16.safetensors").stat().st_size,
                     fp32_safetensors=(tmp / "fp32.safetensors").stat().st_size,
                     packed_safetensors=(packed_dir / WEIGHTS_NAME).stat().st_size,
                     packed_json=(packed_dir / CONFIG_NAME).stat().st_size)
        parts = breakdown(packed_dir / WEIGHTS_NAME, qmodel)
        loaded = msfp.load_quantized(packed_dir)
        # TALoRA's extra bytes: K pre-merged weight sets per layer and the router (LoRAs as if fine-tuned).
        routed = copy.deepcopy(qmodel)
        add_talora(routed, num_loras=args.num_loras, rank=4)
        with torch.no_grad():
            for layer in quant_layers(routed).values():
                layer.lora.B.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
        talora_dir = msfp.save_quantized(routed, tmp / "talora")
        talora = dict(num_loras=args.num_loras, packed_safetensors=(talora_dir / WEIGHTS_NAME).stat().st_size,
                      packed_json=(talora_dir / CONFIG_NAME).stat().st_size)
        talora["extra_bytes_vs_plain"] = talora["packed_safetensors"] - sizes["packed_safetensors"]
        talora["ratio_to_fp16"] = talora["packed_safetensors"] / sizes["fp16_safetensors"]

    c, s = fp_model.config.in_channels, fp_model.config.sample_size
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, c, s, s, generator=gen), torch.linspace(0, scheduler.config.num_train_timesteps - 1, 8).long()
    with torch.no_grad():
        exact = torch.equal(loaded(x, t).sample, qmodel(x, t).sample)
    result = dict(
        benchmark="checkpoint_size", model=args.model, preset=args.preset,
        parameters=sum(v.numel() for v in fp_state.values()), bytes=sizes, packed_breakdown=parts,
        ratio_packed_to_fp16=sizes["packed_safetensors"] / sizes["fp16_safetensors"],
        ratio_packed_with_json_to_fp16=(sizes["packed_safetensors"] + sizes["packed_json"]) / sizes["fp16_safetensors"],
        ratio_packed_to_fp32=sizes["packed_safetensors"] / sizes["fp32_safetensors"],
        target_ratio_to_fp16=0.27, loaded_outputs_bit_identical=exact, talora=talora,
        machine=machine_info(), command=command_line(__file__, argv),
    )
    print_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
