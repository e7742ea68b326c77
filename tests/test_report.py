import re

from msfp.report import _aal_lists, _cache_note, _layer_table, error_plot_svg


def test_error_plot_is_log_scaled_and_handles_no_data():
    svg = error_plot_svg({"a": {900: 1e-3, 0: 1e-1}, "b": {900: 2e-3, 0: 0.5}})
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and ">1e-3<" in svg and ">1e0<" in svg
    assert "No quantized method" in error_plot_svg({"fp": None})
    # Diverged values: plotted without them (a log axis has no NaN or inf), and named below.
    svg = error_plot_svg({"a": {900: 1e-3, 0: float("inf")}, "b": {900: float("nan"), 0: 0.5}})
    assert "nan" not in svg.replace("Not finite", "") and svg.count("<circle") == 2
    assert svg.endswith("<p>Not finite, so not plotted: a (t = 0); b (t = 900).</p>")
    # A resumed run reads them back from JSON as null: the report used to fail on math.isfinite(None).
    assert error_plot_svg({"a": {900: 1e-3, 0: None}}).endswith("<p>Not finite, so not plotted: a (t = 0).</p>")
    assert error_plot_svg({"a": {900: 0.0, 0: float("nan")}}) == (
        "<p>No noise-prediction error above zero to plot.</p><p>Not finite, so not plotted: a (t = 0).</p>")


def test_every_plotted_method_keeps_its_own_line_style():
    # Nine colours cycled with one solid style: the tenth method was drawn as the first.
    svg = error_plot_svg({f"m{i}": {900: 1e-3 * (i + 1), 0: 1e-2} for i in range(20)})
    styles = re.findall(r'<polyline points="[^"]*" fill="none" (stroke="[^"]*" stroke-width="2" '
                        r'stroke-dasharray="[^"]*")/>', svg)
    legend = re.findall(r'<line x1="\d+" x2="\d+" y1="\d+" y2="\d+" (stroke="[^"]*" stroke-width="2" '
                        r'stroke-dasharray="[^"]*")/>', svg)
    assert len(styles) == 20 and len(set(styles)) == 20 and legend == styles
    legend_y = [int(y) for y in re.findall(r'<line x1="\d+" x2="\d+" y1="(\d+)"', svg)]
    assert max(legend_y) < int(re.search(r'height="(\d+)"', svg).group(1))  # every entry is inside the picture


def layers(*rows):
    return [dict(name=n, kind=k, bits=b, weight=w, act=a, aal=aal) for n, k, b, w, a, aal in rows]


def test_the_layer_table_shows_each_methods_own_bits_and_aals_and_each_layer_once():
    result = dict(methods={
        "fp": dict(layers=[]),
        "w6a6-msfp": dict(layers=layers(("conv", "conv2d", "w6a6", "fp6_e2m3", "ufp6_e2m4", "yes (structural)"))),
        "w4a4-fp": dict(layers=layers(("conv", "conv2d", "w4a4", "fp4_e1m2", "fp4_e2m1", "no"),
                                      ("proj", "linear", "w4a4", "fp4_e2m1", "fp4_e2m1", "no"))),
        "w4a4-int": dict(layers=layers(("conv", "conv2d", "w4a4", "int4", "uint4", "no"),
                                       ("proj", "linear", "w4a4", "int4", "uint4", "no")))})
    rows = re.findall(r"<tr>(.*?)</tr>", _layer_table(result))
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row) for row in rows]
    assert cells == [
        ["layer", "kind", "w6a6-msfp<br>weight / act · bits", "w4a4-fp<br>weight / act · bits",
         "w4a4-int<br>weight / act · bits"],
        ["conv", "conv2d", "fp6_e2m3 / ufp6_e2m4 · w6a6 · AAL (structural)", "fp4_e1m2 / fp4_e2m1 · w4a4",
         "int4 / uint4 · w4a4"],
        ["proj", "linear", "—", "fp4_e2m1 / fp4_e2m1 · w4a4", "int4 / uint4 · w4a4"]]  # listed once, not twice


def test_aal_lists_tell_none_found_from_not_detected():
    # An msfp preset that found no AALs was said "not to detect them", as torchao's rows are.
    torchao_layers = layers(("conv", "conv2d", "w4a4", "mxfp4", "mxfp4", "no"))
    html = _aal_lists(dict(methods={"fp": dict(aals=None, layers=[]),
                                    "torchao-mxfp4": dict(aals=None, layers=torchao_layers), "w4a4-msfp": dict(aals=[]),
                                    "w6a6-msfp": dict(aals=[dict(name="conv", reason="reads a SiLU")])}))
    assert "<b>torchao-mxfp4</b>: does not detect AALs." in html
    assert "<b>w4a4-msfp</b>: no AALs found." in html and "<b>fp</b>" not in html
    assert "<b>w6a6-msfp</b>: 1 AALs" in html and "<code>conv</code>: reads a SiLU" in html


def test_the_cache_note_says_when_an_earlier_run_collected_the_calibration_data():
    def result(*cached):
        calib = [dict(points=6, trajectory_seconds=1.5, record_seconds=0.5, cached=c) for c in cached]
        return dict(methods={"fp": dict(calibration=None), "custom": dict(calibration=dict(seconds=2.0)),
                             **{f"m{i}": dict(calibration=c) for i, c in enumerate(calib)}})

    assert "collected once (2.0 s, paid by the first calibrated method)" in _cache_note(result(False, True))
    # A second run into the same OUT read everything from its cache: it credited "the first method" with 0.0 s.
    assert "were read from OUT/cache, collected by an earlier run" in _cache_note(result(True, True))
    assert _cache_note(result()) == ""
