import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from msfp.losses import (
    ddim_denoising_factors,
    denoising_factors,
    dfa_weights,
    numeric_denoising_factors,
    weighted_mse,
)


def ddim(**kw):
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", **kw)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_closed_form_matches_spec_formula(eta):
    sched = ddim()
    timesteps, gammas = ddim_denoising_factors(sched, 10, eta)
    ac = sched.alphas_cumprod.double()
    for t, g in zip(timesteps.tolist(), gammas):
        a_t, a_prev = ac[t], (ac[t - 100] if t >= 100 else torch.tensor(1.0, dtype=torch.float64))
        sigma2 = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        expected = (1 - a_prev - sigma2).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
        assert g.item() == pytest.approx(expected.item(), rel=1e-12)
    assert (gammas < 0).all()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_numeric_agrees_with_closed_form_for_ddim(eta, clip_sample):
    sched = ddim(clip_sample=clip_sample)
    t1, closed = ddim_denoising_factors(sched, 25, eta)
    t2, numeric = numeric_denoising_factors(sched, 25, eta)
    assert torch.equal(t1, t2)
    assert torch.allclose(numeric, closed, rtol=1e-5, atol=1e-8)


def test_without_set_alpha_to_one_the_last_step_reads_no_noise_prediction():
    # SD-1.5's DDIM config: the step after t=0 goes to ᾱ_0 (final_alpha_cumprod), not to 1, so x_0 = x_t whatever ε̂
    # is: γ is exactly 0 there and DFA gives those points no weight (with steps_offset=1, SD's, it is -0.005).
    sched = ddim(set_alpha_to_one=False)
    timesteps, closed = ddim_denoising_factors(sched, 10)
    _, numeric = numeric_denoising_factors(sched, 10)
    assert timesteps[-1] == 0 and closed[-1] == 0 and numeric[-1] == 0
    assert torch.allclose(numeric, closed, rtol=1e-5, atol=1e-8)
    assert dfa_weights(closed)[-1] == 0 and dfa_weights(closed).mean().item() == pytest.approx(1.0)
    a_0 = sched.alphas_cumprod[0].double()  # γ at t=100, whose step lands on t=0
    a_100 = sched.alphas_cumprod[100].double()
    assert closed[-2].item() == pytest.approx(((1 - a_0).sqrt() - (a_0 * (1 - a_100) / a_100).sqrt()).item(), rel=1e-12)
    _, offset = ddim_denoising_factors(ddim(set_alpha_to_one=False, steps_offset=1), 10)
    assert -0.01 < offset[-1].item() < 0


@pytest.mark.parametrize("cls", [DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_numeric_factors_for_other_schedulers(cls):
    sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    timesteps, gammas = denoising_factors(sched, 20)
    assert len(timesteps) == len(gammas) == 20
    assert torch.isfinite(gammas).all() and (gammas.abs() > 0).any()


def test_ddpm_numeric_matches_its_own_formula():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False)
    timesteps, gammas = numeric_denoising_factors(sched, 1000)
    ac = sched.alphas_cumprod.double()
    # Posterior mean: coefficient of eps is -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)).
    for t in (999, 500, 10):
        i = timesteps.tolist().index(t)
        alpha = ac[t] / (ac[t - 1] if t > 0 else 1.0)
        expected = -(1 - alpha) / (alpha.sqrt() * (1 - ac[t]).sqrt())
        assert gammas[i].item() == pytest.approx(expected.item(), rel=1e-3)  # the scheduler forms 1 - alpha_t in float32


def test_dfa_weights_normalised():
    gammas = torch.tensor([-0.5, -1.0, -2.0, -0.5], dtype=torch.float64)
    w_abs = dfa_weights(gammas, "abs")
    w_sq = dfa_weights(gammas, "square")
    assert w_abs.mean().item() == pytest.approx(1.0) and w_sq.mean().item() == pytest.approx(1.0)
    assert w_abs.tolist() == pytest.approx([0.5, 1.0, 2.0, 0.5])
    assert w_sq.tolist() == pytest.approx([0.25 / 1.375, 1 / 1.375, 4 / 1.375, 0.25 / 1.375])
    assert torch.equal(dfa_weights(gammas, "none"), torch.ones(4))
    with pytest.raises(ValueError, match="unknown DFA weighting"):
        dfa_weights(gammas, "log")
    with pytest.raises(ValueError, match="finite"):
        dfa_weights(torch.tensor([float("nan"), 1.0]))


def test_weighted_mse():
    s, t = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert weighted_mse(s, t).item() == pytest.approx(2.5)
    assert weighted_mse(s, t, torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    # Each of these broadcast silently (a (B, 1) weight made a B×B product).
    with pytest.raises(ValueError, match=r"one entry per sample, shape \(2,\); got \(2, 1\)"):
        weighted_mse(s, t, torch.tensor([[2.0], [0.0]]))
    with pytest.raises(ValueError, match=r"got \(1,\)"):
        weighted_mse(s, t, torch.tensor([2.0]))
    with pytest.raises(ValueError, match=r"student output \(2, 1\) and teacher output \(2, 3\) differ"):
        weighted_mse(s[:, :1], t)


def test_numeric_factors_are_derivatives_even_where_a_probe_would_cross_the_clip_range():
    # At t=999 of a cosine schedule ᾱ is so small that the probe ε = ±1e-3 predicts |x₀| ≈ 20: with clip_sample (on
    # by default) the probe used to measure a clipped secant, −155 instead of −3150.
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    assert sched.config.clip_sample
    timesteps, gammas = numeric_denoising_factors(sched, 10)
    ac = sched.alphas_cumprod.double()
    for i, t in enumerate(timesteps.tolist()):
        alpha = ac[t] / (ac[t - 100] if t >= 100 else 1.0)
        expected = -(1 - alpha) / (alpha.sqrt() * (1 - ac[t]).sqrt())
        assert gammas[i].item() == pytest.approx(expected.item(), rel=1e-3), t


def test_numeric_factors_of_a_learned_variance_scheduler_are_those_of_its_mean():
    fixed = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    learned = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type="learned_range")
    t1, g1 = numeric_denoising_factors(fixed, 10)
    t2, g2 = numeric_denoising_factors(learned, 10)  # used to fail: step() found no variance channels
    assert torch.equal(t1, t2) and torch.allclose(g1, g2, rtol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_gets_the_weights_of_ddim_the_same_ode_step(spacing):
    # Euler keeps its latent scaled by 1/√ᾱ; γ read in that latent was DDIM's γ_t/√ᾱ_{t-1}, 26× more weight on the
    # first of 10 steps for the same deterministic sampler. Read in the denoiser's input space the two agree.
    config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  timestep_spacing=spacing)
    t_ddim, g_ddim = ddim_denoising_factors(ddim(timestep_spacing=spacing), 10)
    t_euler, g_euler = denoising_factors(EulerDiscreteScheduler(**config), 10)
    assert t_ddim.tolist() == t_euler.tolist()
    assert torch.allclose(g_euler, g_ddim, rtol=1e-5), (g_euler, g_ddim)
    assert torch.allclose(dfa_weights(g_euler), dfa_weights(g_ddim), rtol=1e-5)


def test_numeric_factors_call_scale_model_input_as_a_sampling_loop_does(capfd):
    from diffusers import LMSDiscreteScheduler

    for cls in (EulerDiscreteScheduler, LMSDiscreteScheduler):
        numeric_denoising_factors(cls(num_train_timesteps=1000), 10)
    # Each probe's step used to log "The `scale_model_input` function should be called before `step`" (~30 lines).
    assert "scale_model_input" not in capfd.readouterr().err
