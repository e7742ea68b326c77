import copy
import warnings

import pytest
import torch
from diffusers import DDIMPipeline
from torch import nn

import msfp
from msfp import QuantConfig
from msfp.layers import QuantContext, QuantLayer
import msfp.talora
from msfp.surgery import quant_layers, structural_aals
from tiny_models import scheduler, tiny_cond_unet, tiny_dit, tiny_pixart, tiny_plain, tiny_unet


@pytest.mark.parametrize("build", [tiny_unet, tiny_cond_unet, tiny_dit, tiny_pixart, tiny_plain])
def test_every_conv_and_linear_is_replaced(build):
    fp = build()
    expected = [n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    assert list(quant_layers(q)) == expected
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in q.modules())


def test_quantizers_off_equals_full_precision():
    fp = tiny_unet()
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.surgery.set_quantizers_enabled(q, False)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(q(x, t).sample, fp(x, t).sample)


def test_roles_keep_edges_at_8_bits_and_policy_regexes():
    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    bits = {n: layer.precision for n, layer in quant_layers(q).items()}
    assert bits["conv_in"] == bits["conv_out"] == "8bit"
    assert bits["time_embedding.linear_1"] == bits["time_embedding.linear_2"] == "8bit"
    assert bits["down_blocks.0.resnets.0.time_emb_proj"] == "4bit"
    # DiT's edges and timestep MLP (inside each block's norm) too: only its transformer layers go to 4 bits.
    dit = {n: layer.precision for n, layer in quant_layers(msfp.quantize(tiny_dit(), "w4a4-msfp")).items()}
    assert {n for n, b in dit.items() if b == "8bit"} == {
        "pos_embed.proj", "proj_out_2", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"}
    config = QuantConfig(eight_bit_layers=["@first"], full_precision_layers=[r"up_blocks\.0\.attentions\..*"])
    q = msfp.quantize(tiny_unet(), config)
    assert q.up_blocks[0].attentions[0].to_q.__class__ is nn.Linear
    assert q.msfp_full_precision_layers and all(n.startswith("up_blocks.0.attentions") for n in
                                                  q.msfp_full_precision_layers)


def test_roles_find_the_output_layer_of_a_pixart_transformer():
    fp = tiny_pixart()
    names = [n for n, m in fp.named_modules() if isinstance(m, nn.Linear)]
    assert names[-1] == "caption_projection.linear_2"  # registered after proj_out: it used to be taken as @last
    bits = {n: layer.precision for n, layer in quant_layers(msfp.quantize(fp, "w4a4-msfp")).items()}
    eight = {n for n, b in bits.items() if b == "8bit"}
    assert eight == {"pos_embed.proj", "proj_out", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
                     "adaln_single.emb.timestep_embedder.linear_2"}
    assert bits["caption_projection.linear_2"] == "4bit"
    assert bits["transformer_blocks.0.ff.net.2"] == "4bit"
    # The same inside a plain module that adapts its call (SPEC: any PyTorch denoiser): the roles are the same layers.
    wrapper = nn.Module()
    wrapper.inner = tiny_pixart()
    wrapped = {n: layer.precision for n, layer in quant_layers(msfp.quantize(wrapper, "w4a4-msfp")).items()}
    assert wrapped == {f"inner.{n}": b for n, b in bits.items()}
    headed = nn.Module()  # but a wrapper's own output layer comes first
    headed.inner, headed.conv_out = tiny_pixart(), nn.Conv2d(8, 8, 1)
    bits = {n: layer.precision for n, layer in quant_layers(msfp.quantize(headed, "w4a4-msfp")).items()}
    assert bits["conv_out"] == "8bit" and bits["inner.proj_out"] == "4bit"
    # A plain denoiser with a diffusers block in its middle: its own head is the output layer, not the block's proj_out.
    from diffusers import Transformer2DModel
    middle = nn.Module()
    middle.stem = nn.Conv2d(4, 8, 3, padding=1)
    middle.mid = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=4)
    middle.head = nn.Conv2d(8, 4, 3, padding=1)
    bits = {n: layer.precision for n, layer in quant_layers(msfp.quantize(middle, "w4a4-msfp")).items()}
    assert bits["head"] == "8bit" and bits["mid.proj_out"] == "4bit"
    # A wrapper around a whole denoiser with a conditioning projection of its own (registered last): the denoiser's
    # output layer, not the projection.
    adapted = nn.Module()
    adapted.unet, adapted.cond_proj = tiny_unet(), nn.Linear(1, 1)
    bits = {n: layer.precision for n, layer in quant_layers(msfp.quantize(adapted, "w4a4-msfp")).items()}
    assert bits["unet.conv_out"] == "8bit" and bits["cond_proj"] == "4bit"


def test_structural_aals_mark_post_silu_layers_of_resnet_blocks():
    aals = structural_aals(tiny_unet())
    for name in ("conv1", "conv2", "time_emb_proj"):
        assert f"down_blocks.0.resnets.0.{name}" in aals
    assert "up_blocks.1.resnets.0.conv_shortcut" not in aals  # reads the raw skip concatenation
    assert "conv_out" in aals and "time_embedding.linear_2" in aals and "conv_in" not in aals
    assert {"transformer_blocks.0.norm1.linear", "proj_out_1"} <= set(structural_aals(tiny_dit()))
    # DiT built as the older Transformer2DModel: its output head reads F.silu(conditioning) too.
    from diffusers import Transformer2DModel

    dit = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=1,
                             sample_size=8, patch_size=2, num_embeds_ada_norm=5, norm_type="ada_norm_zero")
    assert {"transformer_blocks.0.norm1.linear", "proj_out_1"} <= set(structural_aals(dit))
    pixart = structural_aals(tiny_pixart())
    assert {"adaln_single.linear", "caption_projection.linear_2", "transformer_blocks.0.ff.net.2"} <= set(pixart)
    from diffusers.models.normalization import AdaGroupNorm

    # ResnetBlockCondNorm2D builds its AdaGroupNorm without an activation: the linear reads the raw embedding.
    assert structural_aals(nn.ModuleDict(dict(a=AdaGroupNorm(4, 8, 2, act_fn="silu"),
                                              b=AdaGroupNorm(4, 8, 2, act_fn=None)))) == {
        "a.linear": "input is SiLU output (AdaGroupNorm.linear)"}


def test_config_as_a_dict_of_fields():
    q = msfp.quantize(tiny_unet(), {"act_timestep_groups": 2})
    assert q.msfp_config == QuantConfig(act_timestep_groups=2)
    with pytest.raises(ValueError, match=r"unknown QuantConfig field\(s\) \['act_group'\]"):
        msfp.quantize(tiny_unet(), {"act_group": 2})
    with pytest.raises(TypeError, match="config must be a QuantConfig, a preset name or a dict .*got NoneType"):
        msfp.quantize(tiny_unet(), None)


def test_the_model_keeps_its_own_copy_of_the_config():
    # The model held the caller's object (and from_dict the caller's lists): a sweep editing its config after
    # quantizing changed how the first model calibrated and what its checkpoint recorded.
    config = QuantConfig.preset("w4a4-msfp")
    q = msfp.quantize(tiny_unet(), config)
    config.act_timestep_groups = 4
    config.aal_act_formats.clear()
    assert q.msfp_config == QuantConfig.preset("w4a4-msfp")
    fields = {"aal_act_formats": ["ufp4_e2m2"]}
    q = msfp.quantize(tiny_unet(), fields)
    fields["aal_act_formats"].append("ufp4_e1m3")
    assert q.msfp_config.aal_act_formats == ["ufp4_e2m2"]


def test_clear_errors():
    with pytest.raises(ValueError, match="nothing to quantize: it contains no nn.Conv2d or nn.Linear"):
        msfp.quantize(nn.Sequential(nn.SiLU()), "w4a4-msfp")
    with pytest.raises(ValueError, match="unknown preset"):
        msfp.quantize(tiny_unet(), "w4a4-nope")
    with pytest.raises(ValueError, match=r"eight_bit_layers: 'conv_inn' matches no Conv2d/Linear layer.*conv_in"):
        msfp.quantize(tiny_unet(), QuantConfig(eight_bit_layers=["conv_inn"]))
    with pytest.raises(ValueError, match="unknown role '@middle'"):
        msfp.quantize(tiny_unet(), QuantConfig(full_precision_layers=["@middle"]))
    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    with pytest.raises(ValueError, match="already quantized"):
        msfp.quantize(q, "w4a4-msfp")
    with pytest.raises(ValueError, match=r"already quantized \(e.g. '0.conv_in'\)"):
        msfp.quantize(nn.Sequential(q), "w4a4-msfp")
    with pytest.raises(ValueError, match="pass the whole denoiser, not one layer"):
        msfp.quantize(nn.Conv2d(1, 1, 1), "w4a4-msfp")
    with pytest.raises(ValueError, match="keeps all 4 Conv2d/Linear layers full precision: nothing to quantize"):
        msfp.quantize(tiny_plain(), QuantConfig(full_precision_layers=[".*"], eight_bit_layers=[]))


class WithAttention(nn.Module):
    """nn.MultiheadAttention reads its out_proj.weight without calling it, and its in_proj is a bare weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Conv2d(8, 1, 1)

    def forward(self, x, t):
        h = self.inp(x).flatten(2).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0].transpose(1, 2).reshape(x.shape[0], 8, *x.shape[2:])
        return self.out(h)


def test_quantize_is_whole_when_its_warning_is_an_error_and_under_inference_mode():
    # The unsupported-layers warning came before the timestep hook: raised as an error (-W error), it left a model
    # that called itself quantized and failed on "per-timestep activation scales need the timestep".
    model = tiny_plain()
    model.extra = nn.Conv1d(8, 8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(msfp.surgery.UnsupportedLayersWarning):
            msfp.quantize(model, QuantConfig(act_timestep_groups=2))
    assert len(model._forward_pre_hooks) == 1
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 900]))
    # Quantized under inference_mode, its quantizers' parameters were inference tensors: calibrate then failed with
    # "Inplace update to inference tensor outside InferenceMode".
    fp, q = tiny_plain(), tiny_plain()
    with torch.inference_mode():
        msfp.quantize(q, "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)


def test_layers_a_quantized_layer_cannot_replace_are_refused():
    """Each of these used to be replaced and reported as quantized while running in full precision or failing
    later with an error naming no layer."""
    class Scaled(nn.Linear):  # its own forward would be dropped
        def forward(self, x):
            return 0.1 * super().forward(x)

    model = tiny_plain()
    model.t_proj = Scaled(1, 8)
    with pytest.raises(ValueError, match="t_proj: Scaled has its own forward.*full_precision_layers"):
        msfp.quantize(model, "w4a4-msfp")
    assert msfp.quantize(model, QuantConfig(full_precision_layers=["t_proj"]))  # kept full precision: fine

    class CausalConv(nn.Conv2d):  # its own convolution would be dropped (the output was 4×4, not 6×6)
        def _conv_forward(self, x, weight, bias):
            return nn.functional.conv2d(nn.functional.pad(x, (2, 0, 2, 0)), weight, bias, self.stride, 0)

    model = tiny_plain()
    model.mid = CausalConv(8, 8, 3)
    with pytest.raises(ValueError, match=r"mid: CausalConv has its own _conv_forward\(\).*full_precision_layers"):
        msfp.quantize(model, "w4a4-msfp")

    model = tiny_plain()
    model.head = model.mid  # one layer, two names
    with pytest.raises(ValueError, match="mid: it is also registered as head: replacing it under one name"):
        msfp.quantize(model, "w4a4-msfp")
    half = msfp.quantize(tiny_plain().to(torch.bfloat16), "w4a4-msfp")  # the FP8 benchmarks start from bf16
    with pytest.raises(ValueError, match="inp: weights are torch.bfloat16; the fake-quant reference calibrates float32"):
        msfp.calibrate(half, tiny_plain(), scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8),
                       disable=True)

    with pytest.raises(ValueError, match=r"attn.out_proj: nn.MultiheadAttention reads this layer's weight directly "
                                         r"and never calls it.*full_precision_layers=\['attn.out_proj'\]"):
        msfp.quantize(WithAttention(), QuantConfig(eight_bit_layers=[]))
    assert msfp.quantize(WithAttention(), QuantConfig(eight_bit_layers=[], full_precision_layers=["attn.out_proj"]))

    torch.manual_seed(0)
    fp = tiny_plain().eval()
    fp.unused = nn.Linear(8, 8)  # never called by forward
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[]))
    with pytest.raises(ValueError, match=r"1 quantized layer\(s\) never ran during calibration \(e.g. "
                                         r"'unused'\).*full_precision_layers"):
        msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)


def test_every_layer_a_quantized_layer_cannot_replace_is_named_at_once():
    # They came one per run: three runs to learn which layers to keep full precision.
    class Scaled(nn.Linear):
        def forward(self, x):
            return 0.1 * super().forward(x)

    model = tiny_plain()
    model.t_proj = Scaled(1, 8)
    nn.utils.parametrizations.weight_norm(model.mid)
    model.inp = nn.LazyConv2d(8, 3, padding=1)
    with pytest.raises(ValueError, match=r"^inp: LazyConv2d has no weight .*; mid: its weight or bias is computed .*; "
                                         r"t_proj: Scaled has its own forward.*; keep them full precision with "
                                         r"QuantConfig.full_precision_layers=\['mid', 't_proj'\]$"):
        msfp.quantize(model, "w4a4-msfp")


@pytest.mark.parametrize("parametrize", [nn.utils.parametrizations.weight_norm,
                                         nn.utils.parametrizations.spectral_norm])
def test_layers_with_a_computed_weight_are_refused_before_any_layer_is_replaced(parametrize):
    # The quantized layer kept one computed copy of the weight: it left state_dict, and fine-tuning's second
    # backward failed ("Trying to backward through the graph a second time").
    model = tiny_plain()
    parametrize(model.mid)
    with pytest.raises(ValueError, match=r"mid: its weight or bias is computed on every call .*remove_parametrizations"):
        msfp.quantize(model, "w4a4-msfp")
    assert not any(isinstance(m, QuantLayer) for m in model.modules())  # all or nothing
    assert msfp.quantize(model, QuantConfig(full_precision_layers=["mid"]))


def test_lazy_and_compiled_models_get_clear_errors():
    model = tiny_plain()
    model.mid = nn.LazyConv2d(8, 3, padding=1)
    with pytest.raises(ValueError, match="mid: LazyConv2d has no weight until its first forward"):
        msfp.quantize(model, "w4a4-msfp")
    assert not any(isinstance(m, QuantLayer) for m in model.modules())  # inp, before it, used to be replaced
    # Through the wrapper, names gained "_orig_mod." (so @last missed the output layer) and the timestep its name.
    with pytest.raises(ValueError, match="wrapped by torch.compile: quantize the model itself, then compile"):
        msfp.quantize(torch.compile(tiny_unet()), "w4a4-msfp")


def test_a_duplicate_layer_error_names_the_selector_that_works():
    model = tiny_plain()
    model.head = model.mid
    with pytest.raises(ValueError, match=r"full_precision_layers=\['mid'\]"):
        msfp.quantize(model, "w4a4-msfp")
    assert msfp.quantize(model, QuantConfig(full_precision_layers=["mid"]))


@pytest.mark.parametrize("stack", [False, True])
def test_transformer_encoder_layers_run_their_quantized_linears_at_inference(stack):
    # nn.TransformerEncoderLayer's inference fast path (eval, no grad) reads linear1/linear2's weights directly:
    # the quantized model ran them in full precision there, and only there. nn.TransformerEncoder, given a padding
    # mask, passed nested tensors to them ("NestedTensorImpl doesn't support sizes").
    class Denoiser(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.block = nn.TransformerEncoder(layer, 1) if stack else layer
            self.out = nn.Linear(16, 4)

        def forward(self, x, t):
            padding = torch.tensor([False, False, False, True]).expand(x.shape[0], 4) if stack else None
            h = self.inp(x.view(x.shape[0], 4, 4))
            return self.out(self.block(h, src_key_padding_mask=padding)).view_as(x)

    torch.manual_seed(0)
    fp = Denoiser().eval()
    q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[], full_precision_layers=[".*out_proj"]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 4, 4), disable=True)
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([10, 900])
    with torch.no_grad():
        inference = q(x, t)
        with msfp.surgery.quantizers_disabled(q):
            unquantized = q(x, t)
    assert torch.equal(inference, q(x, t).detach())  # the same with autograd on, which never took the fast path
    assert not torch.allclose(inference, unquantized)


def test_timestep_reaches_layers_from_inside_a_pipeline():
    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    seen = []
    layer = quant_layers(q)["down_blocks.0.resnets.0.conv1"]
    layer.observer = lambda lyr, x: seen.append(lyr.context.timesteps.clone())
    pipe = DDIMPipeline(unet=q, scheduler=scheduler())
    pipe(batch_size=2, num_inference_steps=3, output_type="np")
    assert [s.tolist() for s in seen] == [[t, t] for t in pipe.scheduler.timesteps.tolist()] and len(seen) == 3
    assert isinstance(layer, QuantLayer)


class Forwarding(nn.Module):
    """A wrapper whose forward(*args, **kwargs) names no parameter of the model it calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_timesteps_reach_the_layers_when_passed_by_name():
    q = msfp.quantize(tiny_plain(), "w4a4-msfp")
    seen = []
    quant_layers(q)["mid"].observer = lambda lyr, x: seen.append(lyr.context.timesteps.tolist())
    x = torch.randn(2, 1, 8, 8)
    q(x, torch.tensor([5, 5]))
    q(x=x, t=torch.tensor([990, 990]))  # used to keep the previous call's timesteps
    q(x, t=torch.tensor([400, 400]))
    assert seen == [[5, 5], [990, 990], [400, 400]]

    q = msfp.quantize(Forwarding(tiny_plain()), "w4a4-msfp")  # its forward names no parameter: position it is
    quant_layers(q)["inner.mid"].observer = lambda lyr, x: seen.append(lyr.context.timesteps.tolist())
    q(x, torch.tensor([7, 7]))
    assert seen[-1] == [7, 7]


def test_the_timestep_of_a_transformer_that_takes_it_third_reaches_the_layers():
    # PixArtTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep): the hook used to read
    # encoder_hidden_states as the timesteps.
    q = msfp.quantize(tiny_pixart(), "w4a4-msfp")
    seen = []
    quant_layers(q)["transformer_blocks.0.ff.net.2"].observer = lambda lyr, x: seen.append(lyr.context.timesteps)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        q(x, encoder_hidden_states=text, timestep=torch.tensor([20, 30]))  # as PixArtAlphaPipeline calls it
        q(x, text, torch.tensor([40, 50]))
        msfp.models.denoise(q, x, torch.tensor([60, 70]), encoder_hidden_states=text)
    assert [s.tolist() for s in seen] == [[20, 30], [40, 50], [60, 70]]

    q = msfp.quantize(Forwarding(tiny_pixart()), "w4a4-msfp")  # the pipeline's timestep= arrives in **kwargs
    quant_layers(q)["inner.transformer_blocks.0.ff.net.2"].observer = lambda lyr, x: seen.append(lyr.context.timesteps)
    with torch.no_grad():
        q(x, encoder_hidden_states=text, timestep=torch.tensor([80, 90]))
    assert seen[-1].tolist() == [80, 90]


def test_a_keyword_only_timestep_reaches_the_layers():
    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_plain()

        def forward(self, x, *, timestep):
            return self.inner(x, timestep)

    q = msfp.quantize(KeywordOnly(), "w4a4-msfp")
    seen = []
    quant_layers(q)["inner.mid"].observer = lambda lyr, x: seen.append(lyr.context.timesteps.tolist())
    msfp.models.denoise(q, torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert seen == [[3, 4]]  # the hook read positional parameters only: None


def test_save_pretrained_of_a_quantized_model_points_to_save_quantized(tmp_path):
    # It failed deep in huggingface_hub with "'dict' object has no attribute 'device'", and a pipeline's save with it.
    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    with pytest.raises(TypeError, match="this UNet2DModel is quantized by msfp: save it with msfp.save_quantized"):
        q.save_pretrained(tmp_path / "unet")
    with pytest.raises(TypeError, match="msfp.save_quantized"):
        DDIMPipeline(unet=q, scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(TypeError, match="msfp.save_quantized"):
        copy.deepcopy(q).save_pretrained(tmp_path / "copy")
    tiny_unet().save_pretrained(tmp_path / "fp")  # the class's own method is untouched
    assert (tmp_path / "fp" / "config.json").is_file() and not (tmp_path / "unet").exists()


def test_deep_copies_of_a_quantized_model_are_independent():
    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    twin = copy.deepcopy(q)
    twin(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert twin.msfp_context.timesteps.tolist() == [1, 2, 3] and q.msfp_context.timesteps is None


@pytest.mark.parametrize("module", [nn.Linear(6, 4), nn.Conv2d(3, 4, 3, padding=1)])
def test_a_quant_layer_runs_its_op_on_quantized_input_and_weight(module):
    # Nothing else checked that the input is quantized: a forward skipping the activation quantizer passed.
    torch.manual_seed(0)
    layer = QuantLayer(module, "layer", "fp4_e2m1", "ufp4_e2m2", QuantContext())
    x = torch.randn(2, 5, 6) if isinstance(module, nn.Linear) else torch.randn(2, 3, 5, 5)
    layer.weight_quantizer.initialize(module.weight.detach())
    layer.act_quantizer.initialize(x)
    xq, wq = layer.act_quantizer(x), layer.weight_quantizer(module.weight)
    assert not torch.equal(xq, x) and not torch.equal(wq, module.weight)
    op = (torch.nn.functional.linear if isinstance(module, nn.Linear)
          else lambda a, w, b: torch.nn.functional.conv2d(a, w, b, padding=1))
    torch.testing.assert_close(layer(x), op(xq, wq, module.bias), atol=0, rtol=0)


@pytest.mark.parametrize("conv,least", [(dict(), "3×3"), (dict(padding=(1, 0), dilation=2), "3×5"),
                                        (dict(padding="valid"), "3×3")])
def test_a_quant_layer_names_itself_and_the_size_it_needs_for_too_small_an_input(conv, least):
    # torch's "Kernel size can't be greater than actual input size" named neither the layer nor the size it needs.
    layer = QuantLayer(nn.Conv2d(4, 6, 3, **conv), "down.conv", "fp4_e2m1", "ufp4_e2m2", QuantContext())
    for x in (torch.randn(2, 4, 2, 2), torch.randn(4, 2, 2)):
        with pytest.raises(ValueError, match=rf"down.conv: expected an input of at least {least} pixels for its 3×3 "
                                             r"kernel \(padding .*, dilation .*\), got 2×2"):
            layer(x)
    assert layer(torch.randn(2, 4, *map(int, least.split("×")))).shape[-2:] == (1, 1)


def test_layers_with_hooks_or_a_wrapped_forward_are_refused():
    # The quantized layer replaced them without their hooks: a debugging hook went silent, and diffusers' layerwise
    # casting (an upcast wrapped around forward) was dropped, so the layers computed in float8.
    model = tiny_plain()
    calls = []
    model.mid.register_forward_hook(lambda m, a, out: calls.append(1))
    with pytest.raises(ValueError, match=r"mid: it has 1 forward/backward hook\(s\), which a quantized layer would "
                                         "not run"):
        msfp.quantize(model, "w4a4-msfp")
    assert not any(isinstance(m, QuantLayer) for m in model.modules())
    unet = tiny_unet()
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^conv_in, time_embedding.linear_1, .* and \d+ more: its forward is "
                                         "wrapped on the instance .*quantize the model before enabling them$"):
        msfp.quantize(unet, "w4a4-msfp")


def test_a_parametrized_bias_is_refused():
    class Positive(nn.Module):
        def forward(self, b):
            return b.abs()

    model = tiny_plain()
    nn.utils.parametrize.register_parametrization(model.mid, "bias", Positive())
    with pytest.raises(ValueError, match="mid: its weight or bias is computed on every call"):
        msfp.quantize(model, "w4a4-msfp")


def test_a_layer_under_a_shared_parent_is_replaced_under_every_name():
    # One slot (the shared block's attribute) holds it: replacing it there covers both names. It was refused.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

    model = tiny_plain()
    model.block = Block()
    model.blocks = nn.ModuleList([model.block])
    q = msfp.quantize(model, "w4a4-msfp")
    assert isinstance(q.block.lin, QuantLayer) and q.blocks[0].lin is q.block.lin


def test_quantized_layers_keep_the_training_mode_of_the_layers_they_replace():
    q = msfp.quantize(tiny_unet().eval(), "w4a4-msfp")
    assert not any(m.training for m in q.modules())
    q = msfp.quantize(tiny_unet().train(), "w4a4-msfp")
    assert all(m.training for m in q.modules())


class GuidedDiffusionOrder(nn.Module):
    """guided-diffusion/LDM's UNetModel registers its timestep MLP before the input conv."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 8))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(1, 8, 3, padding=1))])
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(1, 8))  # lucidrains' name
        self.t_embedder = nn.Sequential(nn.Linear(1, 8))  # facebookresearch DiT's name
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        t = t.float().view(-1, 1) / 1000
        emb = self.time_embed(t) + self.time_mlp(t) + self.t_embedder(t)
        return self.out(self.mid(self.input_blocks[0](x) + emb[:, :, None, None]))


def test_first_is_the_input_conv_when_the_timestep_mlp_is_registered_before_it():
    q = msfp.quantize(GuidedDiffusionOrder(), "w4a4-msfp")
    assert {n: m.precision for n, m in quant_layers(q).items()} == {
        "time_embed.0": "8bit", "time_embed.2": "8bit", "input_blocks.0.0": "8bit", "mid": "4bit",
        "time_mlp.0": "8bit", "t_embedder.0": "8bit", "out": "8bit"}


def test_what_is_no_denoiser_gets_a_clear_error():
    from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    with pytest.raises(TypeError, match="expected the denoiser, an nn.Module, got DDIMPipeline: pass its denoiser "
                                        r"\(pipe.unet or pipe.transformer\)"):
        msfp.quantize(DDIMPipeline(unet=tiny_unet(), scheduler=scheduler()), "w4a4-msfp")
    with pytest.raises(TypeError, match="got str"):
        msfp.quantize("default", "w4a4-msfp")
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=2)
    with pytest.raises(ValueError, match="quantize: AutoencoderKL is not a denoiser: its forward takes no timestep"):
        msfp.quantize(vae, "w4a4-msfp")  # accepted, then calibrate read the timestep as sample_posterior

    class OwnDenoiser(ModelMixin, ConfigMixin):  # diffusers classes msfp does not load by name quantize from Python
        @register_to_config
        def __init__(self, channels: int = 1):
            super().__init__()
            self.inner = tiny_plain()

        def forward(self, sample, timestep):
            return self.inner(sample, timestep)

    assert msfp.quantize(OwnDenoiser(), "w4a4-msfp")


def test_a_call_whose_batch_size_is_unknown_does_not_reuse_the_last_timesteps():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_plain()

        def forward(self, sample, timestep, context=None):
            return self.inner(sample, timestep)

    # forward(*args, **kwargs) called by keyword: no x found, so the timesteps of the call before drove the
    # per-timestep scales (and TALoRA's routing).
    q = msfp.quantize(Forwarding(Named()), QuantConfig(act_timestep_groups=4))
    seen = []
    quant_layers(q)["inner.inner.mid"].observer = lambda lyr, x: seen.append(lyr.context.timesteps.tolist())
    x = torch.randn(2, 1, 8, 8)
    q(x, torch.tensor([900, 950]))
    q(sample=x, timestep=torch.tensor([10, 20]))
    q(context=torch.randn(1, 3), sample=x, timestep=torch.tensor([30, 40]))  # a broadcast condition first
    assert seen == [[900, 950], [10, 20], [30, 40]]
    with pytest.raises(ValueError, match="^inner.inner.t_proj: an input of 1 rows for a batch of 2 samples: its "
                                         "per-timestep activation scales need one row per sample"):
        q(sample=x, timestep=torch.tensor(30))  # t_proj reads the one timestep: the bare shape error of a quantizer
    q = msfp.quantize(Forwarding(tiny_plain()), QuantConfig(act_timestep_groups=4))
    q(x, torch.tensor([900, 950]))
    with pytest.raises(RuntimeError, match="per-timestep activation scales need the timestep"):
        q(x=x, t=torch.tensor([10, 20]))  # no parameter named: neither is found


def test_multihead_attention_is_reported_full_precision_and_its_flops_counted():
    fp = WithAttention().eval()
    with pytest.warns(msfp.surgery.UnsupportedLayersWarning, match=r"attn \(MultiheadAttention\)"):
        q = msfp.quantize(copy.deepcopy(fp), QuantConfig(eight_bit_layers=[], full_precision_layers=["attn.out_proj"]))
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, sample_shape=(1, 8, 8), disable=True)
    # 64 tokens: inp and out 2·64·8 each; in_proj 2·64·8·24, QKᵀ and PV 2·2·64·64·4 each, out_proj 2·64·8·8
    assert q.msfp_flops["total"] == 2 * 64 * 8 * 2 + 2 * 64 * 8 * 24 + 2 * 2 * 2 * 64 * 64 * 4 + 2 * 64 * 8 * 8


class SequenceFirst(nn.Module):
    """A transformer layer in torch's default layout: (sequence, batch, features)."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(4, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.out = nn.Linear(8, 4)

    def forward(self, x, t):  # x: (batch, tokens, 4)
        h = self.inp(x)
        return self.out(self.enc(h) if self.batch_first else self.enc(h.transpose(0, 1)).transpose(0, 1))


def test_per_timestep_scales_and_loras_are_refused_where_rows_are_tokens():
    # Rows were taken for samples: with as many tokens as samples, token i got sample i's timestep scale (and LoRA).
    keep = [r"enc\.self_attn\.out_proj"]  # MultiheadAttention reads it directly: stays full precision
    with pytest.raises(ValueError, match=r"enc\.linear1, enc\.linear2: inside enc \(TransformerEncoderLayer, "
                                         r"batch_first=False\) its inputs are \(sequence, batch, features\), so "
                                         r"per-timestep activation scales would be chosen per token"):
        msfp.quantize(SequenceFirst(), QuantConfig(act_timestep_groups=2, full_precision_layers=keep))
    q = msfp.quantize(SequenceFirst(), QuantConfig(full_precision_layers=keep))
    with pytest.raises(ValueError, match=r"per-timestep LoRAs would be chosen per token"):
        msfp.talora.add_talora(q, num_loras=4)
    assert getattr(q, "msfp_router", None) is None
    msfp.talora.add_talora(q, num_loras=1)  # one LoRA for every timestep: rows do not matter
    for model in (SequenceFirst(batch_first=True), SequenceFirst()):  # batch first, or the layers kept out
        full = keep + ([] if model.batch_first else [r"enc\..*"])
        msfp.quantize(model, QuantConfig(act_timestep_groups=2, full_precision_layers=full))


def test_data_parallel_replicas_of_a_timestep_dependent_model_are_refused():
    # DataParallel runs its replicas in threads, and they share the model's timestep context: 15 of 50 two-thread
    # runs gave wrong outputs in a reviewer's simulation. Replicas of a model without per-timestep state still run.
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 900])
    grouped = msfp.quantize(tiny_plain(), QuantConfig(act_timestep_groups=2))
    talora = msfp.quantize(tiny_plain(), "w4a4-msfp")
    msfp.talora.add_talora(talora, num_loras=2)
    for model in (grouped, talora):
        with pytest.raises(RuntimeError, match="a DataParallel replica of a model with per-timestep activation "
                                               "scales or TALoRA LoRAs"):
            model._replicate_for_data_parallel()(x, t)
    with torch.no_grad():
        msfp.quantize(tiny_plain(), "w4a4-msfp")._replicate_for_data_parallel()(x, t)
