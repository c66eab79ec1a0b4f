import math

import pytest
import torch

from flowalign.functional import flow, sde

RULES = ["flow-sde", "dance-sde", "cps"]


def test_flow_conversions_round_trip():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    s = torch.tensor([0.2, 0.5, 0.9])
    x = flow.interpolate(x0, eps, s)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.x0_from_velocity(x, v, s), x0)
    torch.testing.assert_close(flow.eps_from_velocity(x, v, s), eps)
    torch.testing.assert_close(flow.velocity_from_x0(x, x0, s), v)


@pytest.mark.parametrize("rule", RULES)
def test_one_step_log_prob_is_the_gaussian_density(rule):
    torch.manual_seed(0)
    x, v, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = sde.step(rule, x, v, 0.6, 0.45, eta=0.5, noise=noise)
    mean, std = sde.get_rule(rule)(x, v, 0.6, 0.45, eta=0.5)
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(out.x_next)
    torch.testing.assert_close(out.log_prob, expected.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    full = sde.step(rule, x, v, 0.6, 0.45, eta=0.5, x_next=out.x_next, reduction="sum").log_prob
    torch.testing.assert_close(full, expected.sum(dim=(1, 2, 3)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.x_next, mean + std * noise)


@pytest.mark.parametrize("rule", RULES)
def test_eta_zero_is_the_euler_ode_step(rule):
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    ode = sde.step("ode", x, v, 0.7, 0.4).x_next
    out = sde.step(rule, x, v, 0.7, 0.4, eta=0.0, noise=torch.randn(2, 8))
    torch.testing.assert_close(out.x_next, ode, atol=1e-6, rtol=0)
    assert torch.all(out.log_prob == 0)


def test_flow_sde_at_sigma_one_needs_sigma_max():
    x, v = torch.randn(1, 4), torch.randn(1, 4)
    with pytest.raises(ValueError, match="sigma_max"):
        sde.step("flow-sde", x, v, 1.0, 0.9, eta=0.7)
    out = sde.step("flow-sde", x, v, 1.0, 0.9, eta=0.7, noise=torch.randn(1, 4), sigma_max=0.9)
    assert torch.isfinite(out.log_prob).all()


def test_bad_sampler_and_eta():
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="Unknown sampler"):
        sde.step("euler-a", x, x, 0.5, 0.4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sde.step("flow-sde", x, x, 0.5, 0.4, eta=-0.1)


def test_per_sample_sigmas_broadcast():
    x, v, n = torch.randn(3, 2, 2), torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    s, sn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    batched = sde.step("dance-sde", x, v, s, sn, eta=0.4, noise=n)
    for i in range(3):
        one = sde.step("dance-sde", x[i:i + 1], v[i:i + 1], s[i], sn[i], eta=0.4, noise=n[i:i + 1])
        torch.testing.assert_close(batched.x_next[i], one.x_next[0])
        torch.testing.assert_close(batched.log_prob[i], one.log_prob[0])


def _gaussian_velocity(x, s, m, c):
    """Exact velocity E[eps - x0 | x_s] for data N(m, c^2)."""
    var = (1 - s) ** 2 * c**2 + s**2
    centred = x - (1 - s) * m
    return s / var * centred - (m + (1 - s) * c**2 / var * centred)


@pytest.mark.parametrize("rule", ["ode", "flow-sde", "dance-sde"])
def test_samplers_preserve_the_marginals_of_an_exact_flow(rule):
    """With the exact velocity of a Gaussian data law, the ODE and the reverse SDEs end at that law.

    (CPS is excluded by design: its per-step noise does not vanish with the step size, so with an exact
    posterior-mean predictor it contracts the variance; it trades that for exact noise levels.)
    """
    torch.manual_seed(0)
    m, c, n_steps = 1.5, 0.5, 200
    sig = flow.shift_sigmas(torch.linspace(1, 0, n_steps + 1), 3.0)
    x = torch.randn(40000, 1)
    for i in range(n_steps):
        s, sn = sig[i].item(), sig[i + 1].item()
        v = _gaussian_velocity(x, s, m, c)
        x = sde.step(rule, x, v, s, sn, noise=torch.randn_like(x), sigma_max=sig[1].item()).x_next
    assert abs(x.mean().item() - m) < 0.03
    assert abs(x.std().item() - c) < 0.03, x.std().item()


def test_cps_keeps_the_noise_level():
    """CPS: x_next = (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat + std z has noise coefficient exactly s'."""
    eta, sn = 0.8, 0.4
    std = sn * math.sin(eta * math.pi / 2)
    x0, eps = torch.zeros(1, 1), torch.ones(1, 1)
    x = flow.interpolate(x0, eps, 0.6)
    mean, s = sde.cps_mean_std(x, flow.velocity_target(x0, eps), 0.6, sn, eta=eta)
    assert math.isclose((mean.item() ** 2 + s.item() ** 2) ** 0.5, sn, rel_tol=1e-5)
    assert math.isclose(s.item(), std, rel_tol=1e-6)


def test_lr_schedules_warm_up_then_decay_to_the_final_fraction():
    from flowalign.functional.schedule import lr_factor

    assert [lr_factor("constant", e, 10, 2) for e in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    cos = [lr_factor("cosine", e, 11, 2, final=0.1) for e in range(11)]
    lin = [lr_factor("linear", e, 10, 0) for e in range(10)]
    assert cos[2] == 1.0 and cos[-1] == pytest.approx(0.1) and cos[6] == pytest.approx(0.55)  # midway
    assert all(a > b for a, b in zip(cos[2:], cos[3:]))
    assert lin == pytest.approx([1 - e / 9 for e in range(10)])
    assert lr_factor("cosine", 0, 1) == 1.0  # a one-epoch run is not decayed to nothing at once
    with pytest.raises(ValueError, match="cosine"):
        lr_factor("step", 0, 10)
