"""Sampler correctness with an exact denoiser: for Gaussian data x0 ~ N(mu, s^2 I),
E[x0 | x_t] = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), so every sampler
must reproduce the data's mean and variance."""

import pytest
import torch

from birdgen.diffusion import DiffusionConfig, NoiseSchedule
from birdgen.networks import UNet, preset
from birdgen.samplers import (DDIMSampler, DDPMSampler, Denoiser, DPMSolverPlusPlusSampler, initial_noise,
                              make_sampler, run_to_end)

MU, STD = 0.5, 0.3


class GaussianOptimalEps(torch.nn.Module):
    def __init__(self, schedule: NoiseSchedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t, t):
        alpha, sigma = self.schedule.coefficients(t, x_t)
        x0 = MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MU)
        return (x_t - alpha * x0) / sigma


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule(DiffusionConfig(schedule=request.param, num_steps=1000))


@pytest.mark.parametrize("make", [
    lambda s: DDPMSampler(s, clip_x0=False),
    lambda s: DDPMSampler(s, 250, clip_x0=False),
    lambda s: DDIMSampler(s, 200, eta=0.0, clip_x0=False),
    lambda s: DDIMSampler(s, 250, eta=1.0, clip_x0=False),
    lambda s: DPMSolverPlusPlusSampler(s, 50, clip_x0=False),
], ids=["ddpm-1000", "ddpm-250", "ddim-200", "ddim-250-eta1", "dpmpp-50"])
def test_samplers_recover_gaussian_data(schedule, make):
    sampler = make(schedule)
    denoiser = Denoiser(GaussianOptimalEps(schedule), schedule)
    noise, generator = initial_noise(500, 8, seed=0, channels=1)
    samples = run_to_end(sampler, denoiser, noise, generator)
    assert samples.mean().item() == pytest.approx(MU, abs=0.01)
    # Few-step solvers shrink this narrow distribution a little (discretisation error that
    # vanishes as steps grow), hence the step counts above.
    assert samples.std().item() == pytest.approx(STD, rel=0.05)


def test_steps_yield_progress_and_predictions(schedule):
    sampler = DDIMSampler(schedule, 10)
    denoiser = Denoiser(GaussianOptimalEps(schedule), schedule)
    noise, generator = initial_noise(4, 8, seed=1)
    steps = list(sampler.steps(denoiser, noise, generator))
    assert [s.index for s in steps] == list(range(10)) and all(s.num_steps == 10 for s in steps)
    assert steps[0].t == 999 and steps[-1].t == sampler.timesteps[-1]
    assert [s.t for s in steps] == sorted((s.t for s in steps), reverse=True)
    assert torch.allclose(steps[-1].x, steps[-1].x0)  # the last step lands on the x0 prediction


def test_ddim_eta0_deterministic_and_seeds():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=100))
    torch.manual_seed(0)
    network = UNet(preset("keras", channels=(8, 16), image_size=16)).eval()
    torch.nn.init.normal_(network.out.weight, std=0.05)
    denoiser = Denoiser(network, schedule)

    def run(seed, eta=0.0):
        noise, generator = initial_noise(2, 16, seed)
        return run_to_end(DDIMSampler(schedule, 10, eta=eta), denoiser, noise, generator)

    assert torch.equal(run(3), run(3))
    assert torch.equal(run(3, eta=1.0), run(3, eta=1.0))  # same seed, same stochastic path
    assert not torch.equal(run(3), run(4))
    assert not torch.equal(run(3), run(3, eta=1.0))


def test_ddim_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(DiffusionConfig(schedule="cosine", num_steps=1000))
    torch.manual_seed(0)
    network = UNet(preset("keras", channels=(8, 16), image_size=16)).eval()
    torch.nn.init.normal_(network.out.weight, std=0.05)
    noise, generator = initial_noise(3, 16, seed=7)
    ours = run_to_end(DDIMSampler(schedule, 25, clip_x0=False), Denoiser(network, schedule), noise, generator)

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                        prediction_type="epsilon")
    scheduler.set_timesteps(25)
    assert torch.allclose(scheduler.alphas_cumprod.double(), schedule.alpha_bar64, rtol=1e-5)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = network(x, torch.full((3,), int(t)))
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_matches_diffusers_dpm_solver_multistep(steps):
    diffusers = pytest.importorskip("diffusers")
    schedule = NoiseSchedule(DiffusionConfig(schedule="linear", num_steps=1000))
    network = GaussianOptimalEps(schedule)
    noise, _ = initial_noise(16, 8, seed=2)
    ours = run_to_end(DPMSolverPlusPlusSampler(schedule, steps, clip_x0=False), Denoiser(network, schedule), noise)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing", final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(network(x, torch.full((16,), int(t))), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()


def test_dpmpp_beats_ddim_at_equal_steps():
    """Both integrate the same probability-flow ODE; the second-order solver lands closer to a
    1000-step solution."""
    schedule = NoiseSchedule(DiffusionConfig(num_steps=1000))
    denoiser = Denoiser(GaussianOptimalEps(schedule), schedule)
    noise, _ = initial_noise(64, 8, seed=2, channels=1)
    reference = run_to_end(DDIMSampler(schedule, 1000, clip_x0=False), denoiser, noise)
    dpm = run_to_end(DPMSolverPlusPlusSampler(schedule, 20, clip_x0=False), denoiser, noise)
    ddim = run_to_end(DDIMSampler(schedule, 20, clip_x0=False), denoiser, noise)
    assert (dpm - reference).abs().mean() < 0.5 * (ddim - reference).abs().mean()


@pytest.mark.parametrize("name, steps, message", [("ddim", 0, "steps 0 out of range"),
                                                   ("dpmpp", 1001, "steps 1001 out of range"),
                                                   ("euler", 10, "unknown sampler")])
def test_bad_sampler_arguments(name, steps, message):
    schedule = NoiseSchedule(DiffusionConfig())
    with pytest.raises(ValueError, match=message):
        make_sampler(name, schedule, steps)
    with pytest.raises(ValueError, match="eta 1.5 out of range"):
        make_sampler("ddim", schedule, 10, eta=1.5)


def test_leading_spacing_and_defaults():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=1000))
    assert DDIMSampler(schedule, 4, spacing="leading").timesteps == [750, 500, 250, 0]
    assert DDIMSampler(schedule, 4).timesteps == [999, 749, 499, 249]
    assert make_sampler("ddpm", schedule).num_steps == 1000
    assert make_sampler("dpmpp", schedule).num_steps == 20
