import copy
import math

import pytest
import torch
from diffusers import Transformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

import msfp
from msfp.calibration import Trajectories, cached_trajectories, collect_trajectories, trajectory_key
from msfp.conditioning import (check_per_sample, concat, flatten, has, model_cond, required_conditioning, select,
                               unflatten)
from msfp.evaluation import per_timestep_eps_mse
from msfp.finetune import FinetuneConfig, finetune
from msfp.sampling import sample
from tiny_models import (pixart_1024_cond, scheduler, sdxl_cond, tiny_cond_unet, tiny_pixart, tiny_pixart_1024,
                         tiny_sdxl_unet)


def test_nested_conditioning_flattens_to_dotted_paths_and_back():
    cond = sdxl_cond(3)
    flat = flatten(cond)
    assert list(flat) == ["encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"]
    assert flat["added_cond_kwargs.time_ids"] is cond["added_cond_kwargs"]["time_ids"]
    assert unflatten(flat) == cond  # (the same tensor objects)
    assert has(cond, "added_cond_kwargs.time_ids") and has(cond, "encoder_hidden_states")
    assert not has(cond, "added_cond_kwargs.hint") and not has(cond, "encoder_hidden_states.x")


def test_rows_are_selected_and_concatenated_through_the_nesting():
    cond = sdxl_cond(5)
    parts = [select(cond, slice(0, 2)), select(cond, torch.tensor([2, 3])), select(cond, slice(4, 5))]
    assert parts[1]["added_cond_kwargs"]["text_embeds"].shape == (2, 6)
    joined = concat(parts)
    assert flatten(joined).keys() == flatten(cond).keys()
    assert all(torch.equal(a, b) for a, b in zip(flatten(joined).values(), flatten(cond).values()))
    moved = model_cond({"a": {"f": torch.ones(2), "i": torch.ones(2, dtype=torch.long)}}, "cpu", torch.bfloat16)
    assert moved["a"]["f"].dtype == torch.bfloat16 and moved["a"]["i"].dtype == torch.long


def test_names_files_cannot_hold_and_entries_without_one_row_per_sample_are_refused():
    with pytest.raises(ValueError, match=r"conditioning names must be non-empty strings without dots in "
                                         r"cond\['added'\], got 'a.b'"):
        flatten({"added": {"a.b": torch.ones(1)}})
    # An empty dict would vanish from a trajectory file, and the reloaded points would lack the argument.
    with pytest.raises(ValueError, match=r"cond\['added_cond_kwargs'\] is an empty dict"):
        check_per_sample({"added_cond_kwargs": {}}, 2)
    bad = sdxl_cond(2)
    bad["added_cond_kwargs"]["time_ids"] = bad["added_cond_kwargs"]["time_ids"][0]
    with pytest.raises(ValueError, match=r"cond\['added_cond_kwargs'\]\['time_ids'\] must be a tensor with first "
                                         r"dimension 2 \(one per sample\) or a dict of them, got shape \(6,\)"):
        check_per_sample(bad, 2)
    with pytest.raises(ValueError, match=r"cond\['scale'\] must be a tensor .* got a float"):
        check_per_sample({"scale": 0.5}, 2)


def test_the_inputs_a_model_reads_from_added_cond_kwargs_are_required():
    assert required_conditioning(tiny_cond_unet()) == ["encoder_hidden_states"]
    assert required_conditioning(tiny_pixart()) == ["encoder_hidden_states"]
    assert required_conditioning(tiny_sdxl_unet()) == ["encoder_hidden_states", "added_cond_kwargs.text_embeds",
                                                       "added_cond_kwargs.time_ids"]
    assert required_conditioning(tiny_pixart_1024()) == ["encoder_hidden_states", "added_cond_kwargs.resolution",
                                                         "added_cond_kwargs.aspect_ratio"]


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x, t):
        return self.conv(x)


class _ContextFirst(nn.Module):
    """Sana's, CogVideoX's… order: the text before the timestep, which msfp passes by name."""

    def forward(self, x, context, timestep):
        return 0.1 * x + 0.0 * context.mean()


class _BuildsItsOwnSizes(nn.Module):
    """A wrapper that exposes SDXL's config but builds ``added_cond_kwargs`` itself."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, timestep, encoder_hidden_states, text_embeds):
        sizes = torch.tensor([8.0, 8.0, 0.0, 0.0, 8.0, 8.0]).repeat(x.shape[0], 1)
        return self.unet(x, timestep, encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": sizes}).sample


def test_only_what_a_model_declares_is_required():
    # The timestep is a forward's `timestep` parameter wherever it comes, not always its second one.
    assert required_conditioning(_ContextFirst()) == ["context"]
    out = sample(_ContextFirst(), scheduler(), 2, num_inference_steps=2, sample_shape=(1, 4, 4),
                 cond={"context": torch.ones(2, 3)}, disable=True)
    assert out.shape == (2, 1, 4, 4)
    # added_cond_kwargs entries only for a forward that takes added_cond_kwargs.
    wrapper = _BuildsItsOwnSizes(tiny_sdxl_unet())
    assert required_conditioning(wrapper) == ["encoder_hidden_states", "text_embeds"]
    text = sdxl_cond(2)
    given = {"encoder_hidden_states": text["encoder_hidden_states"],
             "text_embeds": text["added_cond_kwargs"]["text_embeds"]}
    assert sample(wrapper, scheduler(), 2, num_inference_steps=2, cond=given, disable=True).shape == (2, 4, 8, 8)
    # Inside torch.compile's and DataParallel's wrappers, the model's own.
    for wrapped in (torch.compile(tiny_sdxl_unet()), nn.DataParallel(tiny_sdxl_unet())):
        assert required_conditioning(wrapped) == required_conditioning(tiny_sdxl_unet())
    # Only adaln_single (PixArt's) reads use_additional_conditions: a DiT-style Transformer2DModel given it runs
    # without them.
    torch.manual_seed(0)
    dit_style = Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
                                   num_layers=1, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                   num_embeds_ada_norm=10, use_additional_conditions=True).eval()
    assert required_conditioning(dit_style) == []
    # TorchScript gives no signature to read: nothing declared, as before.
    scripted = torch.jit.trace(_Plain(), (torch.randn(2, 1, 4, 4), torch.tensor([1, 2])))
    assert required_conditioning(scripted) == []
    assert sample(scripted, scheduler(), 2, num_inference_steps=2, sample_shape=(1, 4, 4), disable=True).shape == \
        (2, 1, 4, 4)


def test_sampling_without_the_nested_conditioning_says_what_is_missing():
    # diffusers' own error was "argument of type 'NoneType' is not iterable", raised in the first step.
    text = {"encoder_hidden_states": sdxl_cond(2)["encoder_hidden_states"]}
    with pytest.raises(ValueError, match=r"UNet2DConditionModel needs conditioning \['added_cond_kwargs.text_embeds', "
                                         r"'added_cond_kwargs.time_ids'\]: pass cond=\{name: tensor with one row per "
                                         r"sample\} \(a dotted name is a nested dict's entry: "
                                         r"cond=\{'added_cond_kwargs': \{'text_embeds': ...\}\}\)"):
        sample(tiny_sdxl_unet(), scheduler(), 2, num_inference_steps=2, cond=text, disable=True)


@pytest.mark.parametrize("build, make_cond", [(tiny_sdxl_unet, sdxl_cond), (tiny_pixart_1024, pixart_1024_cond)])
def test_sampling_slices_nested_conditioning_per_sample(build, make_cond):
    # Each image is drawn with its own row of every nested tensor, whatever the batch split.
    model, cond = build(), make_cond(3)
    whole = sample(model, scheduler(), 3, num_inference_steps=3, cond=cond, batch_size=3, disable=True)
    split = sample(model, scheduler(), 3, num_inference_steps=3, cond=cond, batch_size=2, disable=True)
    assert torch.allclose(whole, split, atol=1e-5)
    last = sample(model, scheduler(), 1, num_inference_steps=3, seed=2, cond=select(cond, slice(2, 3)), disable=True)
    assert torch.allclose(whole[2:], last, atol=1e-5)
    other = copy.deepcopy(cond)
    next(iter(other["added_cond_kwargs"].values()))[2] += 1.0  # only the third sample's nested entry
    changed = sample(model, scheduler(), 3, num_inference_steps=3, cond=other, disable=True)
    assert torch.allclose(whole[:2], changed[:2], atol=1e-5) and not torch.allclose(whole[2], changed[2], atol=1e-3)


def test_trajectories_keep_nested_conditioning_through_their_file(tmp_path):
    fp, cond = tiny_sdxl_unet(), sdxl_cond(2)
    points = collect_trajectories(fp, scheduler(), num_samples=2, num_steps=3, cond=cond, disable=True)
    assert points.cond["added_cond_kwargs"]["time_ids"].shape == (6, 6)
    save_file(points.to_tensors(), tmp_path / "points.safetensors")
    again = Trajectories.from_tensors(load_file(tmp_path / "points.safetensors"))
    assert again.digest() == points.digest()
    assert torch.equal(again.cond["added_cond_kwargs"]["text_embeds"], points.cond["added_cond_kwargs"]["text_embeds"])
    with torch.no_grad():  # each point's conditioning is the row its trajectory ran with
        out = fp(again.x, again.t, **again.cond).sample
    assert torch.allclose(out, again.eps, atol=1e-5)
    # The cache finds them again; other nested values are another request.
    cached, hit = cached_trajectories(fp, scheduler(), 2, 3, cond=cond, cache_dir=tmp_path, disable=True)
    assert not hit and cached.digest() == points.digest()
    assert cached_trajectories(fp, scheduler(), 2, 3, cond=cond, cache_dir=tmp_path, disable=True)[1]
    key = trajectory_key(fp, scheduler(), 2, 3, 0, cond, batch_size=64)
    other = copy.deepcopy(cond)
    other["added_cond_kwargs"]["time_ids"][1, 0] = 16.0  # only a nested entry
    assert key != trajectory_key(fp, scheduler(), 2, 3, 0, other, batch_size=64)


def test_a_model_with_nested_conditioning_fine_tunes_and_improves(tmp_path):
    fp, cond = tiny_sdxl_unet(), sdxl_cond(4)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=4, num_steps=4, cond=cond, disable=True)
    config = FinetuneConfig(iters=30, batch_size=4, traj_samples=4, traj_steps=4, rank=2, lora_lr=1e-3)
    points = collect_trajectories(fp, scheduler(), num_samples=4, num_steps=4, cond=cond, batch_size=32, disable=True)
    before = per_timestep_eps_mse(q, points, batch_size=5)  # (batches that cut through the nested rows too)
    # Its own teacher, through the work dir's trajectory file (the nested tensors stored flat, and read back).
    result = finetune(q, fp, scheduler(), config, cond=cond, work_dir=tmp_path, disable=True)
    assert list(tmp_path.glob("*.safetensors"))
    after = per_timestep_eps_mse(q, points, batch_size=5)
    assert result.iters_done == 30 and all(map(math.isfinite, result.losses))
    assert sum(after.values()) < 0.9 * sum(before.values()), (before, after)


def test_given_points_without_the_nested_conditioning_are_refused_by_name():
    # Trajectories built elsewhere (finetune's teacher=, per_timestep_eps_mse's points) failed inside the model with
    # diffusers' "argument of type 'NoneType' is not iterable", fine-tuning after its LoRAs were added.
    fp, cond = tiny_sdxl_unet(), sdxl_cond(2)
    q = msfp.quantize(copy.deepcopy(fp), "w4a4-msfp")
    msfp.calibrate(q, fp, scheduler(), num_samples=2, num_steps=2, cond=cond, disable=True)
    points = collect_trajectories(fp, scheduler(), num_samples=2, num_steps=2, cond=cond, disable=True)
    text_only = Trajectories(points.x, points.t, points.eps,
                             {"encoder_hidden_states": points.cond["encoder_hidden_states"]})
    missing = r"needs conditioning \['added_cond_kwargs.text_embeds', 'added_cond_kwargs.time_ids'\]"
    with pytest.raises(ValueError, match=missing):
        per_timestep_eps_mse(q, text_only)
    config = FinetuneConfig(iters=2, batch_size=2, traj_samples=2, traj_steps=2, rank=2)
    with pytest.raises(ValueError, match=missing):
        finetune(q, fp, scheduler(), config, teacher=text_only, disable=True)
    assert getattr(q, "msfp_router", None) is None  # (its LoRAs taken off again)
