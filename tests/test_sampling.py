import copy

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       HeunDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler, UNet2DModel)
from PIL import Image

from msfp.samples import get_scheduler
from msfp.sampling import NonFiniteSamplesWarning, sample, save_grid


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.mark.parametrize("scheduler, eta", [(DDIMScheduler(), 0.0), (DDIMScheduler(), 1.0),
                                            (EulerAncestralDiscreteScheduler(), 0.0)])
def test_batch_size_invariance(tiny_unet, scheduler, eta):
    a = sample(tiny_unet, scheduler, 5, num_inference_steps=4, seed=3, batch_size=5, eta=eta, disable=True)
    b = sample(tiny_unet, scheduler, 5, num_inference_steps=4, seed=3, batch_size=2, eta=eta, disable=True)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    # Batched convolutions round differently with the batch size (Euler's sigma_max ~157 amplifies it): 1e-4.
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Sample i depends on seed + i only: seed 4 starts where seed 3 left off by one.
    c = sample(tiny_unet, scheduler, 4, num_inference_steps=4, seed=4, batch_size=3, eta=eta, disable=True)
    torch.testing.assert_close(a[1:], c, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a[0], a[1])


def test_dpm_solver_sde_noise_is_each_samples_own(tiny_unet):
    # Its step takes no generator: the Brownian noise came from one tree per batch, seeded from the global RNG, so
    # neither the seed nor the batch split reproduced an image.
    pytest.importorskip("torchsde")
    from diffusers import DPMSolverSDEScheduler

    scheduler = DPMSolverSDEScheduler()
    a = sample(tiny_unet, scheduler, 4, num_inference_steps=4, seed=0, batch_size=4, disable=True)
    b = sample(tiny_unet, scheduler, 4, num_inference_steps=4, seed=0, batch_size=2, disable=True)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = sample(tiny_unet, scheduler, 3, num_inference_steps=4, seed=1, batch_size=3, disable=True)
    torch.testing.assert_close(a[1:], c, atol=1e-4, rtol=1e-4)
    # Any seed works, as for the other schedulers: its Brownian tree refused a negative one.
    d = sample(tiny_unet, scheduler, 2, num_inference_steps=4, seed=-1, batch_size=2, disable=True)
    torch.testing.assert_close(d[1:], a[:1], atol=1e-4, rtol=1e-4)  # image 1 of seed -1 is seed 0's image


def test_seeds_beyond_64_bits_wrap_as_torch_reads_them(tiny_unet):
    # torch takes seeds in [-2**63, 2**64) and reads them modulo 2**64; larger ones overflowed in manual_seed.
    base = sample(tiny_unet, DDIMScheduler(), 2, num_inference_steps=2, seed=-1, disable=True)
    for seed in (2**64 - 1, 2**65 - 1, -(2**64) - 1):
        assert torch.equal(sample(tiny_unet, DDIMScheduler(), 2, num_inference_steps=2, seed=seed, disable=True), base)


def test_a_model_on_the_meta_device_gets_a_clear_error(tiny_unet):
    # "Tensor.item() cannot be called on meta tensors" from inside the first step.
    with pytest.raises(ValueError, match="cannot sample on the meta device, which holds no values"):
        sample(copy.deepcopy(tiny_unet).to("meta"), DDIMScheduler(), 1, num_inference_steps=2, disable=True)
    with pytest.raises(ValueError, match="cannot sample on the meta device"):
        sample(tiny_unet, DDIMScheduler(), 1, num_inference_steps=2, device="meta", disable=True)


def test_a_config_without_a_sample_size_asks_for_the_sample_shape():
    from tiny_models import tiny_cond_unet

    model = tiny_cond_unet()
    model.register_to_config(sample_size=None)  # UNet2DConditionModel's default
    cond = dict(encoder_hidden_states=torch.randn(1, 3, 8))
    # It was Python's "Value after * must be an iterable, not NoneType".
    with pytest.raises(ValueError, match=r"pass sample_shape=\(C, H, W\): UNet2DConditionModel's config gives no "
                                         r"sample shape \(sample_size=None, in_channels=4\)"):
        sample(model, DDIMScheduler(), 1, num_inference_steps=2, cond=cond, disable=True)
    assert sample(model, DDIMScheduler(), 1, num_inference_steps=2, cond=cond, sample_shape=(4, 8, 8),
                  disable=True).shape == (1, 4, 8, 8)


def test_floating_conditioning_is_given_in_the_models_dtype():
    # A bfloat16 text UNet given float32 embeddings failed inside attention; diffusers' pipelines cast them.
    from tiny_models import tiny_cond_unet

    model = tiny_cond_unet().to(torch.bfloat16)
    embeddings = torch.randn(3, 5, model.config.cross_attention_dim)  # float32
    out = sample(model, DDIMScheduler(), 3, num_inference_steps=2, cond=dict(encoder_hidden_states=embeddings),
                 disable=True)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_stochastic_steps_use_the_generators(tiny_unet):
    s = DDPMScheduler()
    a = sample(tiny_unet, s, 3, num_inference_steps=5, seed=0, disable=True)
    b = sample(tiny_unet, s, 3, num_inference_steps=5, seed=0, batch_size=1, disable=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ddim = sample(tiny_unet, DDIMScheduler(), 3, num_inference_steps=5, seed=0, eta=1.0, disable=True)
    det = sample(tiny_unet, DDIMScheduler(), 3, num_inference_steps=5, seed=0, eta=0.0, disable=True)
    assert not torch.allclose(ddim, det)


def test_callback_and_scheduler_state_do_not_leak(tiny_unet):
    scheduler = DDIMScheduler()
    seen = []
    sample(tiny_unet, scheduler, 3, num_inference_steps=2, batch_size=2, disable=True, callback=seen.append)
    assert [(d["i"], d["start"], d["x"].shape[0]) for d in seen] == [(0, 0, 2), (1, 0, 2), (0, 2, 1), (1, 2, 1)]
    assert seen[0]["t"].shape == (2,) and seen[0]["eps"].shape == (2, 1, 8, 8)
    assert seen[0]["t"][0] > seen[1]["t"][0]
    assert scheduler.num_inference_steps is None  # the caller's scheduler was copied, never set


def test_class_labels_outside_the_model_classes_are_refused_before_it_runs():
    # They failed in the class embedding with a bare "index out of range in self".
    from tiny_models import tiny_class_unet, tiny_dit

    unet, dit = tiny_class_unet(), tiny_dit()  # 3 classes; 5 and a null label 5
    calls = []
    for model in (unet, dit):
        model.register_forward_hook(lambda *_: calls.append(1))
    for model, labels, match in ((unet, [1, 3], r"class label 3 is out of range: UNet2DModel has 3 classes, labels "
                                                r"0\.\.2$"),
                                 (unet, [-1, 0], "class label -1 is out of range"),
                                 (dit, [5, 6], r"class label 6 is out of range: DiTTransformer2DModel has 5 classes, "
                                               r"labels 0\.\.4, or 5 \(its null label\)$")):
        with pytest.raises(ValueError, match=match):
            sample(model, DDIMScheduler(), 2, num_inference_steps=1, class_labels=labels, disable=True)
    assert not calls
    sample(dit, DDIMScheduler(), 2, num_inference_steps=1, class_labels=[4, 5], disable=True)  # the null label runs
    # A class embedding that is no table takes any value (it was refused by the first version of the check).
    torch.manual_seed(0)
    embedded = type(unet).from_config(unet.config, class_embed_type="timestep", num_class_embeds=3)
    sample(embedded, DDIMScheduler(), 2, num_inference_steps=1, class_labels=[1, 500], disable=True)


def test_plain_module_with_conditioning_and_learned_variance():
    calls = []

    def model(x, t, class_labels):
        calls.append(class_labels.tolist())
        return torch.cat([0.1 * x, torch.ones_like(x)], dim=1)  # eps and a (discarded) variance channel

    net = torch.nn.Module()
    net.forward = model
    out = sample(net, DDIMScheduler(), 3, num_inference_steps=2, batch_size=2, class_labels=[7, 8, 9],
                 sample_shape=(2, 4, 4), disable=True)
    assert out.shape == (3, 2, 4, 4)
    assert calls == [[7, 8], [7, 8], [9], [9]]
    with pytest.raises(ValueError, match="sample_shape"):
        sample(net, DDIMScheduler(), 1, disable=True)
    with pytest.raises(ValueError, match=r"class_labels must have shape \(3,\)"):
        sample(net, DDIMScheduler(), 3, class_labels=[1], sample_shape=(2, 4, 4), disable=True)
    with pytest.raises(ValueError, match="takes no eta"):
        sample(net, EulerAncestralDiscreteScheduler(), 1, eta=0.5, sample_shape=(2, 4, 4), disable=True)
    ran = len(calls)
    for bad, match in ((dict(num_samples=0), "num_samples must be a whole number ≥ 1, got 0"),
                       (dict(num_inference_steps=0), "num_inference_steps must be a whole number ≥ 1, got 0"),
                       (dict(batch_size=-2), "batch_size must be a whole number ≥ 1, got -2"),
                       # these were Python's "'float' object cannot be interpreted as an integer" and the like
                       (dict(num_samples=2.5), "num_samples must be a whole number ≥ 1, got 2.5"),
                       (dict(num_inference_steps=2.0), "num_inference_steps must be a whole number ≥ 1, got 2.0"),
                       (dict(seed=1.5), "seed must be a whole number, got 1.5"),
                       (dict(num_samples=2, class_labels=[0.7, 1.9]), "class_labels must be integers, got "
                                                                       "torch.float32"),  # were read as 0 and 1
                       (dict(eta=1.5), r"eta must be in \[0, 1\].*got 1.5"), (dict(eta=-0.1), "got -0.1")):
        with pytest.raises(ValueError, match=match):
            sample(net, DDIMScheduler(), **dict(dict(num_samples=1, sample_shape=(2, 4, 4), disable=True), **bad))
    assert len(calls) == ran  # every bad argument was refused before the model ran

    # At 1000 of 1000 training steps DPM-Solver's rounded timesteps repeat one, which made NaN images ("the model
    # diverged"); Heun repeats them by design and still runs.
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler repeats timesteps at 1000 steps .*use fewer"):
        sample(net, DPMSolverMultistepScheduler(), 1, num_inference_steps=1000, sample_shape=(2, 4, 4),
               class_labels=[1], disable=True)
    # A required input left out is named before the model runs (it failed in the model's first call).
    with pytest.raises(ValueError, match=r"Module needs conditioning \['class_labels'\]"):
        sample(net, DDIMScheduler(), 1, sample_shape=(2, 4, 4), disable=True)
    assert len(calls) == ran
    heun = sample(lambda x, t: 0.1 * x, HeunDiscreteScheduler(), 1, num_inference_steps=4, sample_shape=(1, 4, 4),
                  disable=True)
    assert torch.isfinite(heun).all()
    # Karras sigmas round two of 50 steps onto timestep 1, but DPM-Solver steps between its sigmas, which stay
    # distinct: it was refused all the same.
    karras = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         use_karras_sigmas=True)
    out = sample(lambda x, t: 0.1 * x, karras, 1, num_inference_steps=50, sample_shape=(1, 4, 4), disable=True)
    assert torch.isfinite(out).all()

    # Deterministic multistep schedulers take no generator in step().
    for sched in (PNDMScheduler(), LMSDiscreteScheduler()):
        out = sample(lambda x, t: 0.1 * x, sched, 2, num_inference_steps=4, sample_shape=(1, 4, 4), disable=True)
        assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()


def test_save_grid(tmp_path):
    images = torch.linspace(-1, 1, 5 * 8 * 8).reshape(5, 1, 8, 8)
    path = tmp_path / "sub" / "grid.png"
    save_grid(images, path, nrow=3, padding=2)
    img = Image.open(path)
    assert img.mode == "L" and img.size == (3 * 10 + 2, 2 * 10 + 2)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind
    save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "rgb.png", nrow=2)
    assert Image.open(tmp_path / "rgb.png").mode == "RGB"
    with pytest.raises(ValueError, match="shape"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_a_learned_variance_scheduler_gets_the_variance_channels():
    def net(variance):
        def model(x, t):
            return torch.cat([0.1 * x, torch.full_like(x, variance)], dim=1)
        return model

    def draw(model, variance_type):
        return sample(model, DDPMScheduler(variance_type=variance_type), 2, num_inference_steps=3,
                      sample_shape=(1, 4, 4), disable=True)

    # DiT's DDPM reads the variance in step(): it used to get the noise channels only and fail with a TypeError.
    assert not torch.equal(draw(net(-1.0), "learned_range"), draw(net(1.0), "learned_range"))
    assert torch.equal(draw(net(-1.0), "fixed_small"), draw(net(1.0), "fixed_small"))  # dropped there
    with pytest.raises(ValueError, match="variance_type='learned_range', which needs the model to output 2 channels"):
        draw(lambda x, t: 0.1 * x, "learned_range")


def test_the_progress_bar_counts_every_model_call(capsys):
    calls = []
    sample(lambda x, t: calls.append(t) or 0.1 * x, HeunDiscreteScheduler(), 3, num_inference_steps=4, batch_size=2,
           sample_shape=(1, 2, 2))
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert len(calls) == 14 and "14/14" in bar  # Heun: 7 calls per batch for 4 steps (the bar used to end at 14/8)


def test_only_a_ddpm_reads_the_variance_channels():
    # DDIM (load_model's scheduler) built from a learned-variance config keeps variance_type in its config but never
    # reads it: it used to be handed the variance channels, and fail.
    ddim = DDIMScheduler.from_config(DDPMScheduler(variance_type="learned_range").config)
    images = sample(lambda x, t: torch.cat([0.1 * x, torch.ones_like(x)], 1), ddim, 2, num_inference_steps=2,
                    sample_shape=(1, 4, 4), disable=True)
    assert images.shape == (2, 1, 4, 4) and torch.isfinite(images).all()


@pytest.mark.parametrize("channels", [1, 4])
def test_dpm_solver_built_from_a_learned_variance_config_samples_the_noise_channels(channels):
    # DPM-Solver takes channels 0-2 as the noise under a learned variance (RGB's): with the variance channels it
    # failed for 1 channel and cut a latent channel for 4. It gets the noise channels, as without a learned variance.
    def with_variance(x, t):
        return torch.cat([0.1 * x, torch.ones_like(x)], 1)

    def draw(model, variance_type):
        return sample(model, DPMSolverMultistepScheduler(variance_type=variance_type), 2, num_inference_steps=3,
                      sample_shape=(channels, 4, 4), disable=True)

    assert torch.equal(draw(with_variance, "learned_range"), draw(lambda x, t: 0.1 * x, None))


def test_denoisers_whose_signature_cannot_be_read_or_whose_timestep_is_positional_only():
    from msfp.models import denoise

    x, t = torch.randn(2, 1, 4, 4), torch.tensor([5, 7])

    class PositionalOnly(torch.nn.Module):
        def forward(self, x, timestep, /):
            return x * timestep.view(-1, 1, 1, 1)

    traced = torch.jit.trace(PositionalOnly(), (x, t))  # a TorchScript method has no Python signature
    for model in (PositionalOnly(), traced):  # both used to fail: timestep= by name, or no signature
        assert torch.equal(denoise(model, x, t), x * t.view(-1, 1, 1, 1))


@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0), ("dpm", 0.0), ("euler", 0.0),
                                       ("euler-a", 0.0)])
def test_sample_is_the_diffusers_sampling_loop(tiny_unet, name, eta):
    # The loop diffusers' pipelines run, written out: per-sample generators, the initial sigma, scaled model inputs.
    scheduler = get_scheduler(name, DDPMScheduler())
    reference = type(scheduler).from_config(scheduler.config)
    reference.set_timesteps(5)
    generators = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in generators]) * reference.init_noise_sigma
    for t in reference.timesteps:
        eps = tiny_unet(reference.scale_model_input(x, t), t).sample
        x = reference.step(eps, t, x, generator=generators, **(dict(eta=eta) if name == "ddim" else {})).prev_sample
    ours = sample(tiny_unet, scheduler, 3, num_inference_steps=5, seed=7, batch_size=3, eta=eta, disable=True)
    torch.testing.assert_close(ours, x, atol=1e-6, rtol=1e-6)


def test_diverged_images_are_returned_with_a_warning():
    # They came back NaN without a word; msfp.samples.generate refuses to write them, the sampler says so.
    class NaNLate(torch.nn.Module):
        def forward(self, x, t):
            return torch.where(t.view(-1, 1, 1, 1) < 300, float("nan"), x)

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    with pytest.warns(NonFiniteSamplesWarning, match="3 of 3 images have NaN or inf values: the model or the sampler diverged"):
        images = sample(NaNLate(), scheduler, 3, 5, sample_shape=(1, 8, 8), batch_size=2, disable=True)
    assert images.isnan().all()
