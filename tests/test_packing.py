import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from msfp.formats import fake_quant, get_format
from msfp.packing import decode, decode_table, pack, quantize_to_codes, unpack, values_to_codes

FORMATS = ["fp4_e2m1", "fp4_e3m0", "ufp4_e2m2", "ufp4_e4m0", "fp6_e3m2", "fp8_e4m3", "int4", "uint4", "int8"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_value_round_trips_through_its_code(name):
    fmt = get_format(name)
    values = fmt.values()
    codes = values_to_codes(values, fmt)
    assert len(torch.unique(codes)) == len(values)
    assert torch.equal(decode(codes, fmt), values)
    assert len(decode_table(fmt)) == 2**fmt.bits


def test_fp_codes_are_the_bit_fields():
    # E2M1: 1.5 = exponent field 1, mantissa 1 → 0b0011; -6 = sign, exponent 3, mantissa 1 → 0b1111.
    codes = values_to_codes(torch.tensor([0.0, 0.5, 1.5, 6.0, -6.0, -0.5]), "fp4_e2m1").tolist()
    assert codes == [0b0000, 0b0001, 0b0011, 0b0111, 0b1111, 0b1001]
    negative_zero = decode(torch.tensor([0b1000]), "fp4_e2m1")
    assert negative_zero.item() == 0.0 and not negative_zero.signbit().item()  # +0.0, as documented


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(FORMATS),
    x=arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e4, 1e4, width=32)),
    scale=st.floats(2.0**-10, 2.0**10, width=32),
    zero_point=st.floats(-8, 8, width=32),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    param_dtype=st.sampled_from([torch.float32, torch.float64]),
)
@example(name="fp4_e2m1", x=np.linspace(-3, 3, 2001, dtype=np.float32), scale=0.37, zero_point=0.0,
         dtype=torch.bfloat16, param_dtype=torch.float32)
def test_codes_reproduce_fake_quant_exactly(name, x, scale, zero_point, dtype, param_dtype):
    fmt = get_format(name)
    x = torch.from_numpy(x).to(dtype)  # half precision: both compute in float32 (codes used to differ)
    # float64 scales (those of a model cast .double()) are used in x's compute dtype, as fake_quant does
    s = torch.tensor(scale, dtype=param_dtype)
    z = torch.tensor(zero_point, dtype=param_dtype) if fmt.needs_zero_point else None
    codes = quantize_to_codes(x, fmt, s, z)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    restored = decode(codes, fmt).to(compute) * s.to(compute)
    if z is not None:
        restored = restored + z.to(compute)
    assert torch.equal(restored.to(dtype), fake_quant(x, fmt, s, z))


@pytest.mark.parametrize("name", ["int4", "fp4_e2m1"])
def test_codes_of_float32_inputs_with_float64_per_channel_scales_are_fake_quants(name):
    # fake_quant divides in x's compute dtype; the codes divided in float64 here (a 0-dim scale does not promote, a
    # per-channel one does), and inputs next to a rounding tie got the neighbouring code (40 % of these).
    torch.manual_seed(0)
    s = torch.rand(200, 1, dtype=torch.float64) + 0.01
    x = ((torch.arange(-7, 7, dtype=torch.float64) + 0.5) * s).float()
    assert torch.equal(decode(quantize_to_codes(x, name, s), name) * s.float(), fake_quant(x, name, s))


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    codes = torch.tensor(data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=99)), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == (len(codes) * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, len(codes)), codes)


def test_four_bit_codes_pair_up_in_bytes():
    assert pack(torch.tensor([0x1, 0xF, 0x3], dtype=torch.uint8), 4).tolist() == [0xF1, 0x03]


def test_packing_errors():
    with pytest.raises(ValueError, match="codes 16..16 do not fit in 4 bits"):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    # Wider integers are checked before the uint8 cast would wrap them (256 -> 0, -1 -> 255).
    for codes in ([256, 1], [-1, 3]):
        with pytest.raises(ValueError, match=f"codes {min(codes)}..{max(codes)} do not fit in 4 bits"):
            pack(torch.tensor(codes), 4)
    with pytest.raises(ValueError, match="codes must be integers, got torch.float32"):
        pack(torch.tensor([2.9, 1.0]), 4)
    assert pack(torch.tensor([15, 1]), 4).tolist() == [0x1F]
    with pytest.raises(ValueError, match="need 2 bytes, got 1"):
        unpack(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match="not representable"):
        values_to_codes(torch.tensor([0.7]), "fp4_e2m1")
    with pytest.raises(ValueError, match="NaN"):
        quantize_to_codes(torch.tensor([float("nan")]), "fp4_e2m1", 1.0)
    # An IndexError for 16; negative codes wrapped around to values silently (-1 -> -6).
    for codes in ([16], [-1, 3]):
        with pytest.raises(ValueError, match=f"codes {min(codes)}..{max(codes)} are not 4-bit fp4_e2m1 codes"):
            decode(torch.tensor(codes), "fp4_e2m1")
    # The parameters fake_quant refuses: a confusing "not representable", all-zero codes, or z = 0 before.
    for scale, zero, match in ((0.0, None, "scale must be positive and finite"),
                               (float("inf"), None, "scale must be positive and finite"),
                               (1.0, None, "ufp4_e2m2 needs a zero_point")):
        with pytest.raises(ValueError, match=match):
            quantize_to_codes(torch.tensor([0.5]), "ufp4_e2m2" if "zero_point" in match else "fp4_e2m1", scale, zero)


def test_unpack_and_decode_refuse_what_is_no_code():
    # Floats were truncated (1.7 read as code 1), a negative count returned nothing.
    with pytest.raises(ValueError, match="codes must be integers, got torch.float32"):
        decode(torch.tensor([1.7, 2.2]), "fp4_e2m1")
    with pytest.raises(ValueError, match="packed codes must be uint8 bytes, got torch.float32"):
        unpack(torch.tensor([241.9]), 4, 2)
    for count in (-1, -2, 2.0, True):
        with pytest.raises(ValueError, match=rf"count must be a whole number ≥ 0, got {count!r}"):
            unpack(torch.zeros(0, dtype=torch.uint8), 4, count)
    assert unpack(torch.tensor([0x21], dtype=torch.uint8), 4, np.int64(2)).tolist() == [1, 2]  # a numpy count
