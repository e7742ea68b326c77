import json
import re

import numpy as np
import pytest

from msfp import QuantConfig
from msfp.config import PRESETS


@pytest.mark.parametrize("name", ["w4a4-msfp", "w4a4-fp", "w4a4-int", "w4a8-msfp", "w6a6-msfp", "w8a8-fp"])
def test_presets_round_trip_json(name):
    config = QuantConfig.preset(name)
    assert config.name == name and name in PRESETS
    again = QuantConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(again.to_json()) == config.to_dict()


def test_preset_bits_and_mixup_sign():
    msfp, fp, int4 = (QuantConfig.preset(n) for n in ("w4a4-msfp", "w4a4-fp", "w4a4-int"))
    assert (msfp.weight_bits, msfp.act_bits) == (4, 4)
    assert all(name.startswith("ufp4") for name in msfp.aal_act_formats) and msfp.aal_act_formats
    assert fp.aal_act_formats == [] and fp.act_formats == msfp.act_formats
    assert int4.weight_formats == ["int4"] and int4.act_formats == ["uint4"]
    assert QuantConfig.preset("w6a6-msfp").act_bits == 6 and QuantConfig.preset("w4a8-msfp").act_bits == 8
    # Format names ignore case; preset names did not ("W4A4-MSFP" was unknown).
    assert QuantConfig.preset(" W4A4-Int ") == int4
    with pytest.raises(TypeError, match="preset name must be a string, got int"):
        QuantConfig.preset(4)


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'w3a3'.*w4a4-msfp"):
        QuantConfig.preset("w3a3")
    with pytest.raises(ValueError, match=r"unknown QuantConfig field\(s\) \['weight_format'\]"):
        QuantConfig.from_dict({"weight_format": ["fp4_e2m1"]})
    with pytest.raises(ValueError, match="QuantConfig.act_formats: .*fp4_e9m9"):
        QuantConfig(act_formats=["fp4_e9m9"])
    with pytest.raises(ValueError, match="weight_formats must list at least one"):
        QuantConfig(weight_formats=[])
    with pytest.raises(ValueError, match="weight_granularity"):
        QuantConfig(weight_granularity="group")
    with pytest.raises(ValueError, match="act_timestep_groups"):
        QuantConfig(act_timestep_groups=0)
    # Every validation has a case (dropping one passed before).
    with pytest.raises(ValueError, match="QuantConfig.aal_act_formats: .*ufp4_e9m9"):
        QuantConfig(aal_act_formats=["ufp4_e9m9"])
    with pytest.raises(ValueError, match="QuantConfig.eight_bit_weight_formats: .*fp8_e9m9"):
        QuantConfig(eight_bit_weight_formats=["fp8_e9m9"])
    with pytest.raises(ValueError, match="eight_bit_act_formats must list at least one"):
        QuantConfig(eight_bit_act_formats=[])
    for threshold in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"aal_threshold must be in \[0, 1\), got"):
            QuantConfig(aal_threshold=threshold)
    for field in ("search_clip_points", "search_zero_points", "act_samples_per_layer"):
        with pytest.raises(ValueError, match=f"QuantConfig.{field} must be >= 1"):
            QuantConfig(**{field: 0})


def test_json_values_of_the_wrong_type_are_refused():
    for field, value, expected in (("quantize_attention", "false", "true or false"),
                                   ("act_timestep_groups", 2.5, "an integer"),
                                   ("act_timestep_groups", True, "an integer"),
                                   ("full_precision_layers", None, "a list of strings"),
                                   ("eight_bit_layers", "@first", "a list of strings"),
                                   ("aal_threshold", "0.3", "a number")):
        with pytest.raises(ValueError, match=f"QuantConfig.{field} must be {expected}, got {value!r}"):
            QuantConfig.from_json(json.dumps({field: value}))
    assert QuantConfig(aal_threshold=0, weight_formats=("fp4_e2m1",)).weight_formats == ["fp4_e2m1"]
    # numpy's numbers were refused ("must be an integer, got np.int64(4)"), though msfp's other arguments take them
    config = QuantConfig(act_timestep_groups=np.int64(4), aal_threshold=np.float32(0.25), search_clip_points=np.int32(8))
    assert json.loads(config.to_json())["act_timestep_groups"] == 4 and type(config.aal_threshold) is float
    assert QuantConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="a QuantConfig is an object of fields, got list"):
        QuantConfig.from_json("[]")
    with pytest.raises(ValueError, match="not valid JSON: Expecting"):
        QuantConfig.from_json("{'single': 'quotes'}")


def test_format_names_are_stored_canonical_and_listed_once():
    # A checkpoint's config and the report name formats as stored; " FP4_E2M1 " must be the same format as "fp4_e2m1".
    config = QuantConfig(act_formats=[" FP4_E2M1 ", "fp04_e1m2"], aal_act_formats=["UFP4_E3M1"])
    assert config.act_formats == ["fp4_e2m1", "fp4_e1m2"] and config.aal_act_formats == ["ufp4_e3m1"]
    assert config == QuantConfig.from_json(config.to_json())
    with pytest.raises(ValueError, match="QuantConfig.weight_formats lists fp4_e2m1 more than once"):
        QuantConfig(weight_formats=["fp4_e2m1", "FP4_E2M1", "fp4_e1m2"])


def test_editing_a_preset_config_leaves_the_preset_alone():
    config = QuantConfig.preset("w4a4-int")
    config.weight_formats.append("fp4_e2m1")
    assert QuantConfig.preset("w4a4-int").weight_formats == ["int4"] and PRESETS["w4a4-int"]["weight_formats"] == [
        "int4"]


def test_cli_config_file_errors_name_the_file(tmp_path):
    from click.testing import CliRunner

    from msfp.cli import main

    path = tmp_path / "c.json"
    path.write_text('{"quantize_attention": "false"}')
    r = CliRunner().invoke(main, ["quantize", "--config", str(path), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and f"Error: {path}: QuantConfig.quantize_attention must be true or false" in r.output
    # Selectors were checked against the model, after the file was read: their errors named no file.
    for selectors, error in (('["conv_in["]', "invalid regex 'conv_in\\['"), ('["@middle"]', "unknown role '@middle'")):
        path.write_text(f'{{"eight_bit_layers": {selectors}}}')
        r = CliRunner().invoke(main, ["quantize", "--config", str(path), "--out", str(tmp_path / "q")])
        assert r.exit_code == 1 and re.search(f"Error: {re.escape(str(path))}: QuantConfig.eight_bit_layers: {error}",
                                              r.output), r.output
    r = CliRunner().invoke(main, ["quantize", "--config", str(path), "--preset", "w4a4-int", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "give --preset or --config, not both" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
