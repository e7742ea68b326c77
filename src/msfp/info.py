"""What a quantized model is made of: the per-layer table and the fractions of weights and FLOPs at 4 bits.

FLOPs are those of one forward as ``FlopCounterMode`` counts them with attention run as explicit matmuls: convs,
linears and the attention matmuls ``QKᵀ`` and ``P·V``. An attention matmul counts as 4-bit when both its inputs are
quantized at 4 bits (``quantize_attention``); otherwise it is in the total only.
"""

from __future__ import annotations

import re

from msfp.config import changed_from_preset
from msfp.formats import get_format


def _bits(format_name: str) -> int:
    return get_format(format_name).bits


def _is_4bit(info: dict) -> bool:
    """Weights and activations both at 4 bits or fewer (a w6a6 or w4a8 layer's main group is not)."""
    return _bits(info["weight_format"]) <= 4 and _bits(info["act_format"]) <= 4


def _aal_cell(info: dict) -> str:
    return f"yes ({info['aal_reason'].split(':', 1)[0]})" if info.get("aal") else "no"


def resolved_selectors(meta: dict) -> dict[str, list[str]]:
    """The layer selectors a checkpoint's saved layers amount to: each layer's escaped name, per selector field."""
    saved = {**meta["layers"], **meta.get("attention", {})}  # no attention in checkpoints written before it
    return dict(eight_bit_layers=[re.escape(n) for n, i in saved.items() if i["precision"] == "8bit"],
                full_precision_layers=[re.escape(n) for n in meta["quantization_config"]["modules_to_not_convert"]])


def layer_rows(meta: dict) -> list[dict]:
    """One row per quantized layer (``msfp_quant.json`` content as written by :func:`msfp.save_quantized`)."""
    return [dict(name=name, kind=i["kind"], bits=f"w{_bits(i['weight_format'])}a{_bits(i['act_format'])}",
                 weight=i["weight_format"], act=i["act_format"],
                 aal=_aal_cell(i), weight_mse=i["weight_mse"], act_mse=i["act_mse"])
            for name, i in meta["layers"].items()]


def attention_rows(meta: dict) -> list[dict]:
    """One row per attention matmul input quantizer (``quantize_attention``)."""
    return [dict(name=name, kind=i["kind"], bits=f"a{_bits(i['act_format'])}", act=i["act_format"], aal=_aal_cell(i),
                 act_mse=i["act_mse"]) for name, i in meta.get("attention", {}).items()]


def _attention_macs_4bit(meta: dict) -> tuple[int, int]:
    """Attention matmuls whose two inputs are both quantized at 4 bits: their count and MACs per sample."""
    inputs: dict[tuple, list[dict]] = {}
    for i in meta.get("attention", {}).values():
        inputs.setdefault((i["module"], i["matmul"]), []).append(i)
    four = [group[0]["macs"] for group in inputs.values()
            if len(group) == 2 and all(_bits(i["act_format"]) <= 4 for i in group)]
    return len(four), sum(four)


def low_bit_fractions(meta: dict) -> dict:
    """Fractions of all weights (stored in 4 bits or fewer) and of one forward's FLOPs (convs, linears, attention
    matmuls; both operands in 4 bits or fewer) at 4 bits, from the formats calibration chose."""
    layers = meta["layers"].values()
    four = [i for i in layers if _is_4bit(i)]
    matmuls_4bit, attention_macs = _attention_macs_4bit(meta)
    out = dict(layers=len(meta["layers"]), layers_4bit=len(four), attention_matmuls_4bit=matmuls_4bit,
               weights_4bit=sum(i["weights"] for i in layers if _bits(i["weight_format"]) <= 4)
               / meta["base_parameters"])
    total = (meta.get("flops") or {}).get("total")
    out["flops_4bit"] = 2 * (sum(i["macs"] for i in four) + attention_macs) / total if total else None
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def describe(meta: dict) -> str:
    """``msfp info``'s text for the metadata :func:`msfp.checkpoint.read_quant_meta` returns (which checks it)."""
    rows = layer_rows(meta)
    frac = low_bit_fractions(meta)
    config = meta["quantization_config"]
    flops = "unknown (not calibrated)" if frac["flops_4bit"] is None else f"{100 * frac['flops_4bit']:.1f} %"
    aals = sum(r["aal"] != "no" for r in rows)
    text = [format_table(rows, ["name", "kind", "bits", "weight", "act", "aal", "weight_mse", "act_mse"]), ""]
    attention = attention_rows(meta)
    if attention:
        text += [format_table(attention, ["name", "kind", "bits", "act", "aal", "act_mse"]), ""]
    if meta.get("finetune"):  # the search measured them; fine-tuning moved the weights (LoRAs) and scales since
        text += ["weight_mse and act_mse are calibration's, before fine-tuning", ""]
    matmuls = (f"quantized ({len(attention)} matmul inputs, {frac['attention_matmuls_4bit']} matmuls at 4 bits)"
               if config.get("quantize_attention") else "full precision")  # older checkpoints lack the key
    changed = changed_from_preset(config, resolved_selectors(meta))
    label = (f"preset {config['name']}" if changed == [] else f"config {config['name']!r}" if changed is None
             else f"config {config['name']!r} (preset {config['name']} with {', '.join(changed)} changed)")
    text += [f"{label}: {frac['layers']} quantized layers, {frac['layers_4bit']} with 4-bit weights "
             "and activations, "
             f"{aals} AALs; full precision: {', '.join(config['modules_to_not_convert']) or 'none'}; attention "
             f"matmuls: {matmuls}",
             f"weights at 4 bits: {100 * frac['weights_4bit']:.1f} % of {meta['base_parameters']:,} parameters; "
             f"FLOPs at 4 bits: {flops} of one forward (attention matmuls QKᵀ and P·V included in the count)"]
    unsupported = config.get("unsupported_layers")  # absent in checkpoints written before it was recorded
    if unsupported:
        text.append("full precision, as msfp quantizes only Conv2d and Linear: "
                    + ", ".join(f"{n} ({kind})" for n, kind in unsupported.items()))
    talora = meta.get("talora")
    if talora:
        runs = ", ".join(f"t {a}–{b} → LoRA {k}" for a, b, k in talora["assignment"])
        text.append(f"TALoRA: {talora['num_loras']} LoRA(s) of rank ≤ {talora['rank']} per layer, merged before "
                    f"weight quantization; router: {runs}")
    finetune = meta.get("finetune")
    if finetune:
        text.append("fine-tuned: " + ", then ".join(
            f"{run['iters_done']} iterations, lora={run['lora']}, loss={run['loss']}"
            + (f" ({run['dfa_weighting']})" if run["loss"] == "dfa" else "") for run in finetune_runs(finetune)))
    return "\n".join(text)


def finetune_runs(record: dict | None) -> list[dict]:
    """Every fine-tuning run a model's record (``meta["finetune"]``) tells of, oldest first."""
    if not record:
        return []
    return [*record.get("earlier", []), {k: v for k, v in record.items() if k != "earlier"}]
