"""Denoising-factor loss alignment (DFA, SPEC §2.4).

At each sampling step the sampler uses the model output with a coefficient, the *denoising factor* γ_t; an error ε̂−ε
in the noise prediction moves ``x_{t-1}`` by γ_t·(ε̂−ε). DFA weights the distillation loss of timestep t by |γ_t|
or γ_t², normalised to mean 1 over the sampling trajectory, so the loss counts errors the way sampling feels them.

For DDIM the factor has a closed form; for any other diffusers scheduler it is read off ``scheduler.step``
numerically (the update is affine in the model output, so a central difference in float64 is exact up to rounding).
``x_{t-1}`` is measured as the denoiser's next input (``scheduler.scale_model_input``): Euler-type schedulers keep
their latent scaled by √(σ²+1) = 1/√ᾱ, and reading γ in that latent would weight the same ODE step differently
from DDIM (26× more at the first of 10 steps). In the input space every parametrisation of one sampler gets the
same weights, and DDIM's are the closed form above.

With ``set_alpha_to_one=False`` (Stable Diffusion's DDIM config) the step from t = 0 goes to ᾱ_0 itself, so it leaves
the sample unchanged whatever the model predicts: γ is 0 there and DFA gives those training points no weight.
"""

from __future__ import annotations

import copy
import inspect

import torch
from diffusers import DDIMScheduler

from msfp.sampling import reads_learned_variance

WEIGHTINGS = ("abs", "square", "none")


def _alpha_prev(scheduler, prev_t: int) -> torch.Tensor:
    if prev_t >= 0:
        return scheduler.alphas_cumprod[prev_t].double()
    return torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)


def ddim_denoising_factors(scheduler, num_inference_steps: int, eta: float = 0.0):
    """Closed-form γ_t of a ``DDIMScheduler`` along its ``num_inference_steps`` trajectory: (timesteps, gammas)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    step = sched.config.num_train_timesteps // sched.num_inference_steps
    gammas = []
    for t in sched.timesteps.tolist():
        a_t = sched.alphas_cumprod[t].double()
        a_prev = _alpha_prev(sched, t - step)
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        gammas.append((1 - a_prev - sigma**2).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt())
    return sched.timesteps.clone(), torch.stack(gammas)


def numeric_denoising_factors(scheduler, num_inference_steps: int, eta: float = 0.0, delta: float = 1e-3):
    """γ_t of any diffusers scheduler: d (next model input) / d model_output at each step of its trajectory.

    The next model input is the step's output through ``scale_model_input`` (schedulers without it feed their latent
    as it is); at the last step it is the final sample. Multistep schedulers keep earlier outputs as state, so the
    trajectory is walked in order and every probe runs on a copy of the scheduler's state at that step. The probes
    run without sample clipping or thresholding: at the operating point (x = 0, ε = 0) the predicted x₀ is 0, far
    inside the clip range, but a probe ε = ±δ can cross it where ᾱ_t is tiny (x₀ = ∓δ·√(1−ᾱ)/√ᾱ) and would measure
    a clipped secant instead of the derivative.
    """
    sched = copy.deepcopy(scheduler)
    sched.register_to_config(**{k: False for k in ("clip_sample", "thresholding") if k in sched.config})
    sched.set_timesteps(num_inference_steps)
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    # A learned-variance scheduler reads a second (variance) channel; γ_t is the derivative along the first.
    channels = 2 if reads_learned_variance(sched) else 1
    zero = torch.zeros(1, channels, 1, 1, dtype=torch.float64)
    probe_delta = torch.zeros_like(zero)
    probe_delta[:, 0] = delta
    accepts = inspect.signature(sched.step).parameters
    kwargs = {"eta": eta} if "eta" in accepts else {}
    # Same noise for both probes of a stochastic sampler (deterministic ones, e.g. PNDM, take no generator).
    seeded = (lambda: {"generator": torch.Generator().manual_seed(0)}) if "generator" in accepts else dict
    timesteps = sched.timesteps.tolist()
    gammas = []
    for i, t in enumerate(sched.timesteps):
        _model_input(sched, x, t)  # as a sampling loop does: Euler-type steps warn when it was not called
        outs = []
        for eps in (zero - probe_delta, zero + probe_delta):
            probe = copy.deepcopy(sched)
            prev = probe.step(eps, t, x, **seeded(), **kwargs).prev_sample
            if i + 1 < len(timesteps):  # the last step's output is the sample itself, which no denoiser reads
                prev = _model_input(probe, prev, timesteps[i + 1])
            outs.append(prev.double())
        gammas.append(((outs[1] - outs[0]) / (2 * delta)).reshape(()))
        sched.step(zero, t, x, **seeded(), **kwargs)
    return sched.timesteps.clone(), torch.stack(gammas)


def _model_input(scheduler, sample: torch.Tensor, timestep) -> torch.Tensor:
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, timestep)


def factor_per_timestep(scheduler, num_inference_steps: int, weighted: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`denoising_factors`, refused for schedulers that visit a timestep more than once (Heun, PNDM): a point
    at such a timestep has no single γ_t for ``weighted`` (what is weighted by it, and the way out) to use."""
    timesteps, gammas = denoising_factors(scheduler, num_inference_steps)
    if len(set(timesteps.tolist())) < len(timesteps):
        raise ValueError(f"{type(scheduler).__name__} visits timesteps more than once, so a timestep has no single "
                         f"denoising factor to weight {weighted}")
    return timesteps, gammas


def denoising_factors(scheduler, num_inference_steps: int, eta: float = 0.0):
    """(timesteps, γ_t) for the scheduler's sampling trajectory: closed form for DDIM, numeric otherwise."""
    if type(scheduler) is DDIMScheduler and scheduler.config.prediction_type == "epsilon":
        return ddim_denoising_factors(scheduler, num_inference_steps, eta)
    return numeric_denoising_factors(scheduler, num_inference_steps, eta)


def dfa_weights(gammas: torch.Tensor, weighting: str = "abs") -> torch.Tensor:
    """Loss weights from denoising factors: |γ| or γ², normalised to mean 1 (``"none"``: all ones)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown DFA weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if weighting == "none":
        return torch.ones_like(gammas, dtype=torch.float32)
    w = gammas.abs() if weighting == "abs" else gammas.pow(2)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"denoising factors must be finite and not all zero, got {gammas.tolist()}")
    return (w / w.mean()).float()


def weighted_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples of ``weights[i] · mean((student_i − teacher_i)²)``; plain MSE when ``weights`` is None."""
    if student.shape != teacher.shape:  # broadcasting would silently compare the wrong elements
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    if weights is not None and weights.shape != student.shape[:1]:
        raise ValueError(f"weights must have one entry per sample, shape ({student.shape[0]},); got "
                         f"{tuple(weights.shape)}")
    per_sample = (student - teacher).pow(2).flatten(1).mean(1)
    return per_sample.mean() if weights is None else (weights.to(per_sample) * per_sample).mean()
