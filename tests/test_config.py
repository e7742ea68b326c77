import json

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
