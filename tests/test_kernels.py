import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import msfp
from msfp.formats import fake_quant, get_format
from msfp.kernels import compiled_fake_quant
from msfp.quantizers import ActivationQuantizer, WeightQuantizer
from msfp.surgery import quant_layers, set_fused_rounding
from msfp.talora import add_talora
from tiny_models import scheduler, tiny_plain


def test_compiled_fake_quant_equals_eager():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    x[0, 0, 0, 0] = float("inf")
    scale = torch.rand(1, 8, 1, 1) + 0.1
    assert torch.equal(compiled_fake_quant(x, "fp4_e2m1", scale), fake_quant(x, "fp4_e2m1", scale))
    zp = torch.tensor(-0.3)
    assert torch.equal(compiled_fake_quant(x, "ufp4_e3m1", scale, zp), fake_quant(x, "ufp4_e3m1", scale, zp))


def test_compiled_fake_quant_raises_the_recompile_limit_only_for_new_inputs(monkeypatch):
    patches = []
    config_module = type(torch._dynamo.config)  # its instances refuse unknown attributes; patch the method
    real_patch = config_module.patch

    def counting_patch(self, *args, **kwargs):
        if self is torch._dynamo.config:
            patches.append(kwargs)
        return real_patch(self, *args, **kwargs)

    monkeypatch.setattr(config_module, "patch", counting_patch)
    scale = torch.tensor(0.25)

    def call(x):
        out = compiled_fake_quant(x, "fp4_e1m2", scale)
        assert torch.equal(out, fake_quant(x, "fp4_e1m2", scale))
        return len(patches)

    x = torch.randn(3, 7)
    assert call(x) == 1 and patches[0]["recompile_limit"] > 8 and patches[0]["fail_on_recompile_limit_hit"]
    assert call(torch.randn(3, 7)) == 1  # same shapes, strides, dtypes, grad mode: nothing new to compile
    assert call(torch.randn(5, 7)) == 2  # a new shape may compile: under the raised limit again
    assert call(torch.randn(7, 3).t()) == 3  # new strides
    x.requires_grad_(True)
    assert call(x) == 4  # autograd graph


def test_compiled_fake_quant_recompiles_past_the_default_limit_when_dynamo_was_reset():
    # Calls dynamo has forgotten (torch._dynamo.reset()) compile again, unpatched: the ninth graph of the code object
    # met dynamo's default limit, which fullgraph=True makes an error, not the eager fallback it once was.
    scale = torch.tensor(0.3)
    inputs = [torch.randn(n) for n in range(3, 13)]
    for x in inputs:
        compiled_fake_quant(x, "fp4_e2m1", scale, dynamic=False)
    torch._dynamo.reset()
    for x in inputs:
        assert torch.equal(compiled_fake_quant(x, "fp4_e2m1", scale, dynamic=False), fake_quant(x, "fp4_e2m1", scale))


def test_fused_rounding_is_the_cuda_default_only_where_it_is_exact(monkeypatch):
    from msfp import kernels
    from msfp.finetune import default_fused_rounding

    assert kernels.fused_rounding_exact("cpu") == (True, "")
    assert default_fused_rounding(torch.device("cpu")) is False
    monkeypatch.setattr(kernels, "_exact_options", lambda: {"eager_numerics.division_rounding": True})
    assert kernels.fused_rounding_exact("cuda") == (True, "")
    assert default_fused_rounding(torch.device("cuda")) is True
    # A torch whose Inductor lacks the IEEE-division option (before 2.11): exact on CPU, not on CUDA.
    monkeypatch.setattr(kernels, "_exact_options", lambda: {"emulate_precision_casts": True})
    assert kernels.fused_rounding_exact("cpu") == (True, "")
    exact, why = kernels.fused_rounding_exact("cuda")
    assert not exact and "IEEE-division" in why
    with pytest.warns(UserWarning, match="finetune uses eager rounding: .*IEEE-division"):
        assert default_fused_rounding(torch.device("cuda")) is False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fused_rounding_gives_the_eager_model_outputs_and_gradients(device):
    # The tiny plain denoiser has 4-bit, 8-bit, signed and unsigned (zero-point) quantizers, convs and a linear.
    fp = tiny_plain().to(device)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=3, sample_shape=(1, 8, 8), disable=True)
    formats = {m.fmt.name for m in q.modules() if isinstance(m, (ActivationQuantizer, WeightQuantizer))}
    assert any(get_format(f).needs_zero_point for f in formats) and len(formats) >= 3
    add_talora(q, num_loras=4, rank=2)  # three of its LoRAs below: each layer quantizes a stack of weight sets
    for layer in quant_layers(q).values():
        torch.nn.init.normal_(layer.lora.B, std=0.02)
    x, t = torch.randn(3, 1, 8, 8, device=device), torch.tensor([10, 500, 990], device=device)

    def run(fused):
        set_fused_rounding(q, fused)
        q.zero_grad(set_to_none=True)
        out = q(x, t)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}
        return out.detach(), grads

    eager_out, eager_grads = run(False)
    fused_out, fused_grads = run(True)
    assert torch.equal(fused_out, eager_out)
    assert eager_grads.keys() == fused_grads.keys() and any("scale" in n for n in eager_grads)
    assert any("lora" in n for n in eager_grads) and any("router" in n for n in eager_grads)
    for name, g in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], g, msg=name)
    with torch.no_grad():  # inference graphs (no autograd) as well
        assert torch.equal(q(x, t), eager_out)


def test_a_compiled_model_with_fused_rounding_rounds_each_layer_on_its_own_grid():
    # Compiling the model traced through the per-format kernels and reused one format's graph for another: the
    # 8-bit output layer's activations were rounded on the FP4 grid (max |diff| 0.02, without a word).
    torch.manual_seed(0)
    q = msfp.quantize(tiny_plain(), "w4a4-msfp")  # inp/out at 8 bits (fp8_e4m3), mid/t_proj at 4 bits
    for layer in quant_layers(q).values():
        layer.act_quantizer.scale.data = torch.tensor([0.1])
        layer.weight_quantizer.initialize(layer.weight.detach())
    assert {quant_layers(q)[n].act_quantizer.fmt.name for n in ("out", "mid")} == {"fp8_e4m3", "fp4_e2m1"}
    set_fused_rounding(q, True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 999])
    with torch.no_grad():  # (the eager run first: it compiles and caches the per-format kernels dynamo then met)
        eager = q(x, t)
        assert torch.equal(torch.compile(q)(x, t), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "ufp4_e2m2", "ufp4_e1m3", "fp8_e4m3", "int4", "uint8"])
def test_compiled_fake_quant_equals_eager_on_cuda(fmt):
    # Millions of values with per-channel scales: approximate division or FMA contraction in the compiled kernel
    # would flip a few values near rounding boundaries (seen before the exact-numerics options).
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1280, 1280, 3, 3, device="cuda", generator=gen) * 0.05
    scale = torch.rand(1280, 1, 1, 1, device="cuda", generator=gen) * 0.02 + 1e-3
    zp = -torch.rand(1280, 1, 1, 1, device="cuda", generator=gen) * 0.1 if get_format(fmt).needs_zero_point else None
    assert torch.equal(compiled_fake_quant(x, fmt, scale, zp), fake_quant(x, fmt, scale, zp))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the test extras install it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the test above runs the real kernels")
def test_fused_rounding_for_cuda_compiles_to_ieee_division_and_equals_eager_in_the_interpreter(tmp_path):
    # Without a GPU: Inductor writes the CUDA path's Triton kernels here (tests/fused_rounding_triton.py); compiled
    # for sm_90 they must divide exactly and not contract to FMAs, and run in Triton's interpreter they must equal
    # eager fake_quant on every grid point, tie and neighbour. Two processes: the interpreter must be chosen before
    # Triton is imported.
    from msfp.kernels import fused_rounding_exact

    exact, why = fused_rounding_exact("cuda")
    if not exact:
        pytest.skip(why)
    script = os.path.join(os.path.dirname(__file__), "fused_rounding_triton.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(mode, **extra_env):
        done = subprocess.run([sys.executable, script, mode, str(tmp_path)], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    captured = run("capture")
    for case, result in captured.items():
        assert result["runs"] == len(result["kernels"]) >= 1, case
        for kernel in result["kernels"].values():
            assert kernel["div_rn_calls"] >= 1 and kernel["ieee_division"] >= kernel["div_rn_calls"], case
            assert kernel["approximate_division"] == 0 and kernel["fma"] == 0, case
            assert not kernel["enable_fp_fusion"] and kernel["round_to_nearest_even"] > 0, case
    interpreted = run("interpret", TRITON_INTERPRET="1")
    assert interpreted.keys() == captured.keys() and all(r["values"] > 500 for r in interpreted.values())
    assert {case: r["examples"] for case, r in interpreted.items() if r["differ"]} == {}
