from msfp.report import error_plot_svg


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
