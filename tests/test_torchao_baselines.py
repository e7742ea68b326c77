import pytest
import torch

from msfp.torchao_baselines import TorchaoFakeQuant, unavailable_reason

pytest.importorskip("torchao")  # an optional dependency: CI has none; run these where it is installed
pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def test_torchao_mxfp4_conv_uses_mx_blocks_along_input_channels():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 8, 3, padding=1)
    layer = TorchaoFakeQuant(conv, "mxfp4")
    # Every block of 32 input channels (per output channel and kernel position) is E2M1 values times a power of 2.
    blocks = layer.qweight.permute(0, 2, 3, 1).reshape(-1, 32)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    scale = 2.0 ** torch.floor(torch.log2(blocks.abs().amax(1, keepdim=True) / 4))  # values up to 6 = 1.5 * 4
    assert torch.isin(blocks.abs() / scale, grid).all()
    x = torch.randn(2, 64, 5, 5)
    y, ref = layer(x), conv(x)
    assert y.shape == ref.shape and 0 < (y - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()
    with pytest.raises(ValueError, match="divisible by 32"):
        TorchaoFakeQuant(torch.nn.Conv2d(8, 8, 3), "mxfp4")


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
def test_torchao_recipes_take_zero_tensors_and_float16(recipe):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 4)
    # NVFP4's per-tensor scale of an all-zero tensor was 0, so 0/0 made the layer's output NaN.
    assert torch.equal(TorchaoFakeQuant(linear, recipe)(torch.zeros(2, 32)), linear(torch.zeros(2, 32)))
    conv = torch.nn.Conv2d(32, 4, 1)
    torch.nn.init.zeros_(conv.weight)  # zero-initialised, as adapters are
    assert torch.equal(TorchaoFakeQuant(conv, recipe).qweight, conv.weight)
    # torchao takes float32 and bfloat16 only: a float16 layer failed on its first call.
    x = torch.randn(3, 32)
    half = TorchaoFakeQuant(torch.nn.Linear(32, 4).half(), recipe)
    y = half(x.half())
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), TorchaoFakeQuant(half.module.float(), recipe)(x.half().float()), atol=1e-2)


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
def test_torchao_activation_scales_do_not_depend_on_the_batch(recipe):
    torch.manual_seed(0)
    # NVFP4's per-tensor scale was taken over the whole batch: a sample's output changed with a larger sample beside it.
    linear, conv = TorchaoFakeQuant(torch.nn.Linear(32, 8), recipe), TorchaoFakeQuant(torch.nn.Conv2d(32, 4, 3), recipe)
    for layer, x in ((linear, torch.randn(1, 5, 32)), (conv, torch.randn(1, 32, 6, 6))):
        # (within float rounding of a batched matmul: a different scale moved outputs by ~0.1)
        assert torch.allclose(layer(torch.cat([x, 50 * torch.randn_like(x)]))[:1], layer(x), rtol=0, atol=1e-5)
    assert torch.allclose(linear(x := torch.randn(32)), linear(x[None])[0], rtol=0, atol=1e-5)  # unbatched: 1 sample


def test_a_torchao_without_per_expert_nvfp4_scales_is_refused(monkeypatch):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    def two_d_only(data_hp, **kwargs):  # what a torchao before per-expert outer scales does with 3-D data
        assert len(data_hp.shape) == 2, "unsupported"

    monkeypatch.setattr(NVFP4Tensor, "to_nvfp4", staticmethod(two_d_only))
    assert "takes no per-expert scales" in unavailable_reason("nvfp4")
    assert unavailable_reason("mxfp4") is None  # needs no such scales: its row stays
    from msfp.compare import METHODS

    assert METHODS["torchao-mxfp4"].unavailable() is None and METHODS["torchao-nvfp4"].unavailable() is not None


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4"])
def test_an_unbatched_conv_input_is_one_sample_blocked_along_its_channels(recipe):
    # nn.Conv2d takes (C, H, W): its channels are dim 0, and the blocks ran along H instead.
    torch.manual_seed(0)
    layer = TorchaoFakeQuant(torch.nn.Conv2d(32, 4, 3, padding=1), recipe)
    x = torch.randn(32, 5, 6)
    assert torch.equal(layer(x), layer(x[None])[0])
