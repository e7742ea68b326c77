"""The MSFP ablation (SPEC §3, the paper's ablation table) on one model: same seeds and fine-tuning budget per row.

    python benchmarks/ablation.py --out runs/ablation [--num 256 --steps 20 --finetune-iters 160 --finetune-batch 8]

Runs ``msfp compare`` with the rows full precision; INT4 EfficientDM-style (INT4 + one LoRA + per-timestep activation
scales + MSE); signed FP4 + one LoRA + MSE; MSFP PTQ; MSFP + one LoRA + MSE; MSFP + TALoRA + MSE; MSFP + TALoRA + DFA
with |γ| and with γ². Writes the compare report (``index.html``, ``results.json``) and ``results.md`` (the markdown
table, then each row's FD difference from the row above with a paired-bootstrap interval) to --out; prints the JSON
results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from msfp.compare import (TABLE_COLUMNS, CompareSettings, format_cell, metrics_table, parse_methods,
                          run_compare, table_rows)
from msfp.environment import HelpFormatter, command_line
from msfp.fileio import atomic_path
from msfp.metrics import bootstrap_interval

ROWS = ("fp", "int4-efficientdm", "w4a4-fp+lora-mse", "w4a4-msfp", "w4a4-msfp+lora-mse", "w4a4-msfp+talora-mse",
        "w4a4-msfp+talora", "w4a4-msfp+talora-dfa2")


def paired_fd_differences(result: dict, level: float = 0.9) -> list[dict]:
    """FD of each quantized row minus FD of the row before it, with a paired-bootstrap ``level`` interval: every row
    draws its samples from the same seeds and is resampled with the same indices, so the difference's interval is
    much tighter than either FD's own spread."""
    rows = [(n, r) for n, r in result["methods"].items() if n != "fp" and r.get("fd_bootstrap")]
    out = []
    for (prev, a), (name, b) in zip(rows, rows[1:]):
        diffs = np.asarray(b["fd_bootstrap"]) - np.asarray(a["fd_bootstrap"])
        difference = b["metrics"]["fd"] - a["metrics"]["fd"]
        lo, hi = bootstrap_interval(diffs, estimate=difference, level=level)
        out.append(dict(method=name, versus=prev, fd_difference=difference, interval=[lo, hi], level=level))
    return out


def markdown(result: dict, differences: list[dict]) -> str:
    headers = ["method"] + [h for _, h, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table_rows(result):
        cells = [row["method"]] + [format_cell(k, row[k]) for k, _, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if differences:
        lines += ["", f"FD difference from the row above (paired bootstrap over samples, "
                      f"{differences[0]['level']:.0%} interval):", "", "| method | versus | ΔFD | interval |",
                  "|---|---|---|---|"]
        lines += [f"| {d['method']} | {d['versus']} | {d['fd_difference']:+.1f} | "
                  f"[{d['interval'][0]:+.1f}, {d['interval'][1]:+.1f}] |" for d in differences]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    defaults = CompareSettings()
    p.add_argument("--model", default="default",
                   help="'default', a save_pretrained directory or a Hub id (msfp.load_model)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated msfp compare method names (fp always runs)")
    p.add_argument("--num", type=int, default=256, help="samples (images) per row")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration trajectories (images), also the fine-tuning teacher's")
    p.add_argument("--calib-steps", type=int, default=20, help="DDIM steps per calibration (and held-out) trajectory")
    p.add_argument("--heldout-samples", type=int, default=defaults.heldout_samples,
                   help="held-out trajectories for the per-timestep noise MSE")
    p.add_argument("--finetune-iters", type=int, default=defaults.finetune_iters,
                   help="fine-tuning iterations of the LoRA/TALoRA rows")
    p.add_argument("--finetune-batch", type=int, default=defaults.finetune_batch,
                   help="fine-tuning batch size of the LoRA/TALoRA rows")
    p.add_argument("--num-loras", type=int, default=defaults.num_loras, help="TALoRA: LoRAs per layer")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    p.add_argument("--seed", type=int, default=0, help="image i of every row is drawn with seed + i")
    p.add_argument("--device", default=None, help="torch device (unset: cuda if available, else cpu)")
    p.add_argument("--out", default="runs/ablation",
                   help="report directory: index.html, results.json, results.md")
    args = p.parse_args(argv)
    settings = CompareSettings(model=args.model, num_samples=args.num, steps=args.steps,
                               calib_samples=args.calib_samples, calib_steps=args.calib_steps,
                               heldout_samples=args.heldout_samples, finetune_iters=args.finetune_iters,
                               finetune_batch=args.finetune_batch, num_loras=args.num_loras, rank=args.rank,
                               seed=args.seed, batch_size=64, device=args.device)
    command = command_line(__file__, argv)
    result = run_compare(settings, parse_methods(args.rows), args.out, command=command)
    differences = paired_fd_differences(result)
    with atomic_path(Path(args.out) / "results.md") as tmp:
        tmp.write_text(markdown(result, differences))
    print(metrics_table(result), file=sys.stderr)
    # FD's bootstrap replicates stay in: they pair this run's rows with another run's rows of the same seed and N.
    print(json.dumps({k: v for k, v in result.items() if k != "methods"} | {"methods": {
        n: {k: v for k, v in r.items() if k not in ("layers", "aals")}
        for n, r in result["methods"].items()}, "fd_differences": differences}, indent=2))


if __name__ == "__main__":
    main()
