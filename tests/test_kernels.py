import torch

from msfp.formats import fake_quant
from msfp.kernels import compiled_fake_quant


def test_compiled_fake_quant_equals_eager():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    x[0, 0, 0, 0] = float("inf")
    scale = torch.rand(1, 8, 1, 1) + 0.1
    assert torch.equal(compiled_fake_quant(x, "fp4_e2m1", scale), fake_quant(x, "fp4_e2m1", scale))
    zp = torch.tensor(-0.3)
    assert torch.equal(compiled_fake_quant(x, "ufp4_e3m1", scale, zp), fake_quant(x, "ufp4_e3m1", scale, zp))
