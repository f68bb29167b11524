import math

import pytest
import torch

from birdgen.diffusion import DiffusionConfig, DiffusionLoss, NoiseSchedule, heldout_loss


def test_linear_schedule_matches_closed_form():
    schedule = NoiseSchedule(DiffusionConfig(schedule="linear", num_steps=1000))
    assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)
    t = 500
    beta_t = 1e-4 + (0.02 - 1e-4) * t / 999
    assert schedule.betas64[t].item() == pytest.approx(beta_t, rel=1e-12)
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
    assert schedule.alpha_bar64[t].item() == pytest.approx(expected, rel=1e-10)


def test_cosine_schedule_matches_closed_form():
    s, T = 0.008, 1000
    schedule = NoiseSchedule(DiffusionConfig(schedule="cosine", num_steps=T, cosine_s=s))

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # alpha_bar(t) = f(t + 1) / f(0) for the step that ends at t + 1
        assert schedule.alpha_bar64[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert schedule.betas.max().item() == pytest.approx(0.999)
    assert torch.all(schedule.alpha_bar64[1:] < schedule.alpha_bar64[:-1])


def test_snr_and_forward_process_moments():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=100))
    t = torch.tensor([30])
    ab = schedule.alpha_bar64[30].item()
    assert schedule.snr(t).item() == pytest.approx(ab / (1 - ab), rel=1e-6)
    x0 = torch.full((20000, 1, 1, 1), 2.0)
    x_t = schedule.add_noise(x0, torch.randn_like(x0), t.expand(20000))
    assert x_t.mean().item() == pytest.approx(2 * math.sqrt(ab), abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.05)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_prediction_targets_invert_exactly(prediction):
    schedule = NoiseSchedule(DiffusionConfig(num_steps=50, prediction=prediction))
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 30, 49])
    x_t = schedule.add_noise(x0, eps, t)
    output = eps if prediction == "epsilon" else schedule.velocity(x0, eps, t)
    x0_hat, eps_hat = schedule.predict_x0_and_eps(output, x_t, t)
    assert torch.allclose(eps_hat, eps, atol=1e-4)
    assert torch.allclose(x0_hat[1:], x0[1:], atol=1e-3)


def test_min_snr_weights():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=1000))
    t = torch.tensor([0, 999])
    snr = schedule.snr(t)
    eps_weights = DiffusionLoss(schedule, 5.0).weights(t)
    assert eps_weights[0].item() == pytest.approx(5 / snr[0].item(), rel=1e-5)  # high SNR: down-weighted
    assert eps_weights[1].item() == pytest.approx(1.0)  # low SNR: untouched
    v_schedule = NoiseSchedule(DiffusionConfig(num_steps=1000, prediction="v"))
    v_weights = DiffusionLoss(v_schedule, 5.0).weights(t)
    assert v_weights[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1), rel=1e-5)
    assert torch.all(DiffusionLoss(schedule).weights(t) == 1)


def test_loss_is_zero_for_a_perfect_predictor():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=100))
    x0, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([5, 50, 95])
    perfect = lambda x_t, tt: noise  # noqa: E731
    assert DiffusionLoss(schedule)(perfect, x0, t, noise).item() == 0
    assert DiffusionLoss(schedule)(lambda x_t, tt: torch.zeros_like(x_t), x0, t, noise).item() > 0.5


def test_heldout_loss_checks_timesteps():
    schedule = NoiseSchedule(DiffusionConfig(num_steps=100))
    network = torch.nn.Conv2d(3, 3, 1)
    wrapped = lambda x, t: network(x)  # noqa: E731
    wrapped.parameters = network.parameters
    losses = heldout_loss(wrapped, schedule, torch.randn(8, 3, 4, 4), timesteps=(10, 90))
    assert set(losses) == {10, 90} and all(v > 0 for v in losses.values())
    with pytest.raises(ValueError, match="timestep 100 out of range"):
        heldout_loss(wrapped, schedule, torch.randn(2, 3, 4, 4), timesteps=(100,))


@pytest.mark.parametrize("kwargs, message", [({"schedule": "quadratic"}, "unknown schedule"),
                                             ({"prediction": "x0"}, "unknown prediction"),
                                             ({"num_steps": 1}, "num_steps 1 out of range")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**kwargs)
