"""The ``msfp compare`` report page: one self-contained HTML file (images as base64 PNG, the plot as inline SVG, no
scripts, fonts or styles from elsewhere), so it opens anywhere and can be mailed or archived as it is."""

from __future__ import annotations

import base64
import json
import math
from html import escape
from pathlib import Path

from msfp.compare import REFERENCE_METHOD, TABLE_COLUMNS, format_cell, skipped_metrics, table_rows
from msfp.fileio import atomic_path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
DASHES = ("none", "7 4", "2 3", "9 3 2 3")  # after every colour was used once: lines stay told apart up to 36
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: right; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
tr.ref td { background: #f6f9ff; }
.grids { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: 0; text-align: center; }
figure img { width: 300px; image-rendering: pixelated; border: 1px solid #ccc; }
figcaption { font-size: .9em; margin-top: .3em; }
.note { color: #555; font-size: .9em; max-width: 1000px; }
code, pre { background: #f6f6f6; padding: .1em .3em; } pre { padding: .6em; overflow-x: auto; }
.layers { max-height: 700px; overflow-y: auto; display: inline-block; }
.layers td { font-family: ui-monospace, monospace; font-size: .85em; white-space: nowrap; }
"""


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _metrics_table(result: dict) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in TABLE_COLUMNS)
    body = []
    for row in table_rows(result):
        cls = ' class="ref"' if row["method"] == REFERENCE_METHOD else ""
        cells = "".join(f"<td>{escape(format_cell(k, row[k]))}</td>" for k, _, _ in TABLE_COLUMNS)
        body.append(f'<tr{cls}><td class="name">{escape(row["method"])}</td>{cells}</tr>')
    return f'<table><tr><th class="name">method</th>{head}</tr>{"".join(body)}</table>'


def error_plot_svg(series: dict[str, dict[int, float]], width: int = 760, height: int = 380) -> str:
    """Inline SVG: per-timestep noise-prediction MSE (log scale) of each method, timesteps in sampling order."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return "<p>No quantized method was evaluated.</p>"
    # A log axis has no place for NaN or inf (a diverged method): name them below the plot instead.
    # (results.json stores them as null, so a resumed run reads None)
    finite = lambda e: e is not None and math.isfinite(e)  # noqa: E731
    not_finite = [f"{name} (t = {', '.join(str(t) for t, e in v.items() if not finite(e))})"
                  for name, v in series.items() if not all(map(finite, v.values()))]
    note = f"<p>Not finite, so not plotted: {escape('; '.join(not_finite))}.</p>" if not_finite else ""
    series = {k: kept for k, v in series.items() if (kept := {t: e for t, e in v.items() if finite(e)})}
    points = [e for v in series.values() for e in v.values() if e > 0]
    if not points:
        return f"<p>No noise-prediction error above zero to plot.</p>{note}"
    left, right, top, bottom = 70, 170, 20, 50
    height = max(height, top + 20 * len(series) + 10)  # room for every legend entry
    pw, ph = width - left - right, height - top - bottom
    t_max = max(t for v in series.values() for t in v) or 1
    lo, hi = math.floor(math.log10(min(points))), math.ceil(math.log10(max(points)))
    hi = hi if hi > lo else lo + 1
    x = lambda t: left + pw * (1 - t / t_max)  # noqa: E731  (largest timestep, the first step, on the left)
    y = lambda e: top + ph * (hi - math.log10(max(e, 10.0 ** lo))) / (hi - lo)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="white" stroke="#999"/>']
    for p in range(lo, hi + 1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(10.0 ** p):.1f}" y2="{y(10.0 ** p):.1f}" '
                     f'stroke="#e4e4e4"/><text x="{left - 6}" y="{y(10.0 ** p) + 4:.1f}" text-anchor="end">'
                     f'1e{p}</text>')
    for k in range(6):
        t = round(t_max * k / 5)
        parts.append(f'<text x="{x(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{t}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle">timestep t (sampling runs left '
                 'to right)</text>')
    parts.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 'noise-prediction MSE vs fp</text>')
    for i, (name, values) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        style = f'stroke="{color}" stroke-width="2" stroke-dasharray="{DASHES[i // len(COLORS) % len(DASHES)]}"'
        coords = " ".join(f"{x(t):.1f},{y(e):.1f}" for t, e in sorted(values.items()))
        parts.append(f'<polyline points="{coords}" fill="none" {style}/>')
        parts += [f'<circle cx="{x(t):.1f}" cy="{y(e):.1f}" r="2.5" fill="{color}"><title>{escape(name)}, t={t}: '
                  f'{e:.3g}</title></circle>' for t, e in values.items()]
        ly = top + 14 + 20 * i
        parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{ly}" y2="{ly}" {style}/>'
                     f'<text x="{left + pw + 42}" y="{ly + 4}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts) + note


def _layer_table(result: dict) -> str:
    methods = {n: r for n, r in result["methods"].items() if r["layers"]}
    if not methods:
        return "<p>No quantized method was evaluated.</p>"
    by_method = {n: {row["name"]: row for row in r["layers"]} for n, r in methods.items()}
    # Bits and AALs are each method's own (a w6a6 method beside a w4a4 one); a layer's kind is the same in all.
    names = list(dict.fromkeys(name for rows in by_method.values() for name in rows))
    head = "".join(f"<th>{escape(n)}<br>weight / act · bits</th>" for n in methods)
    body = []
    for name in names:
        kind = next(rows[name]["kind"] for rows in by_method.values() if name in rows)
        cells = "".join(f"<td>{escape(_layer_cell(rows[name])) if name in rows else '—'}</td>"
                        for rows in by_method.values())
        body.append(f'<tr><td class="name">{escape(name)}</td><td>{escape(kind)}</td>{cells}</tr>')
    return (f'<div class="layers"><table><tr><th class="name">layer</th><th>kind</th>{head}</tr>{"".join(body)}'
            "</table></div>")


def _layer_cell(row: dict) -> str:
    aal = f" · AAL {row['aal'][len('yes '):]}" if row["aal"].startswith("yes") else ""
    return f"{row['weight']} / {row['act']} · {row['bits']}{aal}"


def _aal_lists(result: dict) -> str:
    out = []
    for name, r in result["methods"].items():
        if r["aals"] is None:
            if r.get("layers"):  # a quantized row (torchao's) whose method detects no AALs
                out.append(f"<p><b>{escape(name)}</b>: does not detect AALs.</p>")
            continue
        if not r["aals"]:
            out.append(f"<p><b>{escape(name)}</b>: no AALs found.</p>")
            continue
        items = "".join(f"<li><code>{escape(a['name'])}</code>: {escape(a['reason'])}</li>" for a in r["aals"])
        out.append(f"<details><summary><b>{escape(name)}</b>: {len(r['aals'])} AALs</summary><ul>{items}</ul>"
                   "</details>")
    return "".join(out) or "<p>No quantized method was evaluated.</p>"


def _notes(result: dict) -> str:
    items = [f"<li><b>{escape(name)}</b>: {escape(note)}</li>"
             for name, r in result["methods"].items() for note in r["notes"]]
    items += [f"<li>{escape(keys)} not computed ({escape(who)}): {escape(why)}</li>"
              for keys, who, why in skipped_metrics(result)]
    items += [f"<li><b>{escape(name)}</b>: method skipped: {escape(why)}</li>"
              for name, why in result["skipped_methods"].items()]
    return f"<ul>{''.join(items)}</ul>" if items else ""


def _cache_note(result: dict) -> str:
    """Where the calibration's shared trajectories and layer inputs came from, for the metrics' note."""
    # A method from register_method may record its calibration in other terms: the note needs these.
    timed = [c for r in result["methods"].values()
             if (c := r["calibration"]) and {"points", "trajectory_seconds", "record_seconds"} <= c.keys()]
    if not timed:
        return ""
    if all(c.get("cached") for c in timed):  # an earlier run into this OUT collected them
        return (f" Calibration: {timed[0]['points']} trajectory points; trajectories and layer inputs were read from "
                "OUT/cache, collected by an earlier run, so calib. s leaves their collection out.")
    c = timed[0]
    return (f" Calibration: {c['points']} trajectory points; trajectories and layer inputs are collected once "
            f"({c['trajectory_seconds'] + c['record_seconds']:.1f} s, paid by the first calibrated method) and read "
            "from the cache by the others.")


def render_html(result: dict, out: Path) -> str:
    s = result["settings"]
    grids = "".join(
        f'<figure><img alt="{escape(n)} samples" src="{_png_data_uri(out / r["grid"])}"><figcaption><b>'
        f'{escape(n)}</b> — FD {escape(format_cell("fd", r["metrics"].get("fd")))}</figcaption></figure>'
        for n, r in result["methods"].items())
    cache_note = _cache_note(result)
    machine = result["machine"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>msfp compare: {escape(s['model'])}</title>
<style>{CSS}</style></head><body>
<h1>msfp compare — model <code>{escape(s['model'])}</code></h1>
<p>{len(result['methods'])} methods, {s['num_samples']} samples each, {s['steps']} DDIM steps, the same seeds for
every method; wall time {result['wall_seconds']:.0f} s on {escape(machine['cpu'])} ({machine['cores']} cores,
device {escape(result['device'])}{', ' + escape(machine['gpu']) if machine['gpu'] else ''}).</p>
<p>Command: <code>{escape(result['command'] or '(library call)')}</code></p>
<h2>Metrics</h2>
{_metrics_table(result)}
<p class="note">FD, KID (in this feature space's units), classifier score, precision and recall are computed in the
feature space of msfp's shipped Fashion-MNIST classifier against {escape(result['reference'])}; they are not FID/IS
and not comparable with published numbers. FD at {s['num_samples']} samples is strongly biased upwards: compare each
row with the <b>fp</b> row (same N, same seeds), not with FD values at other N. PSNR is against the full-precision
samples from the same seeds; eps MSE is the mean over timesteps of the noise-prediction MSE against the
full-precision model on {s['heldout_samples']} held-out trajectories, dominated by the last step (t = 0), whose
error hardly moves the sample; the γ²-weighted eps MSE weights each step by its squared denoising factor, i.e. counts
the error each step passes on to the next sample.{cache_note} "4-bit %": fraction of all weights
stored in 4 bits, and of one forward's FLOPs whose operands (weights and activations) are both 4-bit.</p>
{_notes(result)}
<h2>Samples</h2>
<p class="note">The first {min(64, s['num_samples'])} samples of every method; image i has seed {s['seed']} + i for
every method.</p>
<div class="grids">{grids}</div>
<h2>Noise-prediction error per timestep</h2>
{error_plot_svg({n: {int(t): e for t, e in (r['eps_mse_per_timestep'] or {}).items()}
                 for n, r in result['methods'].items()})}
<h2>Per-layer formats</h2>
<p class="note">weight / activation format each method chose per layer (u… = unsigned with a zero point:
mixup-sign), the layer's bits, and whether the method treats it as an AAL (and why).</p>
{_layer_table(result)}
<h2>AALs (anomalous-activation-distribution layers)</h2>
{_aal_lists(result)}
<h2>Settings and machine</h2>
<pre>{escape(json.dumps(dict(settings=s, seeds=result['seeds'], machine=machine), indent=2))}</pre>
</body></html>
"""


def write_report(result: dict, out) -> Path:
    """Write ``out/index.html`` for a :func:`msfp.compare.run_compare` result; returns its path."""
    out = Path(out)
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(render_html(result, out), encoding="utf-8")
    return path
