"""The ``msfp`` command line."""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from msfp import __version__


@click.group(context_settings=dict(help_option_names=["-h", "--help"], show_default=True))
@click.version_option(__version__, prog_name="msfp")
def main() -> None:
    """msfp: 4-bit floating-point (W4A4) quantization of diffusion models."""


@contextmanager
def _user_errors():
    """Bad input is reported as one clear line (click prints it and exits 1), not as a traceback."""
    try:
        yield
    except (ValueError, OSError, ImportError) as e:
        raise click.ClickException(str(e)) from e


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@main.command()
@click.option("--model", "model_spec", default="default", help="'default', a save_pretrained directory or a Hub id")
@click.option("--preset", default="w4a4-msfp", help="QuantConfig preset (w4a4-msfp, w4a4-fp, w4a4-int, w4a8-msfp, "
              "w6a6-msfp, w8a8-fp)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="QuantConfig JSON file (instead of --preset)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--calib-samples", default=64, help="trajectories (images) sampled for calibration")
@click.option("--calib-steps", default=25, help="DDIM steps per calibration trajectory")
@click.option("--seed", default=0)
@click.option("--batch", default=64)
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="reuse calibration trajectories and layer inputs across runs")
@click.option("--device", default=_default_device())
def quantize(model_spec, preset, config_path, out, calib_samples, calib_steps, seed, batch, cache_dir, device):
    """Quantize and calibrate a model; write a directory that msfp.load_quantized reads."""
    from msfp.calibration import calibrate
    from msfp.checkpoint import read_quant_meta, save_quantized
    from msfp.config import QuantConfig
    from msfp.info import describe
    from msfp.models import load_model
    from msfp.surgery import quantize as quantize_model

    with _user_errors():
        config = QuantConfig.from_json(Path(config_path).read_text()) if config_path else QuantConfig.preset(preset)
        fp_model, scheduler = load_model(model_spec)
        fp_model.to(device)
        qmodel = quantize_model(copy.deepcopy(fp_model), config)
        report = calibrate(qmodel, fp_model, scheduler, num_samples=calib_samples, num_steps=calib_steps, seed=seed,
                           batch_size=batch, cache_dir=cache_dir)
        save_quantized(qmodel, out)
    click.echo(describe(read_quant_meta(out)))
    click.echo(f"calibration: {report.num_points} points, trajectories {report.trajectory_seconds:.1f} s, layer "
               f"inputs {report.record_seconds:.1f} s, search {report.search_seconds:.1f} s"
               f"{' (from cache)' if report.cached else ''}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the saved metadata as JSON")
def info(directory, as_json):
    """Per-layer formats, AALs and quantization MSE of a quantized model directory."""
    from msfp.checkpoint import read_quant_meta
    from msfp.info import describe

    with _user_errors():
        meta = read_quant_meta(directory)
    click.echo(json.dumps(meta, indent=2) if as_json else describe(meta))


if __name__ == "__main__":
    main()
