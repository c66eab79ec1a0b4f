"""Test-time search: best-of-N and noise-aware pruning under an NFE budget."""

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.rewards import Reward
from flowalign.rewards.latent import LatentReward
from flowalign.sampling.search import best_of_n, prune_search, pruning_nfe
from flowalign.zoo.toy2d import QuadraticReward, load_toy2d


@pytest.fixture(scope="module")
def toy():
    return load_toy2d()


class LatentQuadratic(LatentReward):
    name = "latent-quadratic"
    uses_prompts = False

    def score(self, latents, sigma, prompts):
        return -0.5 * ((latents - torch.tensor([1.5, 1.5])) ** 2).sum(-1)


def test_best_of_n_picks_the_max_of_the_sampler_candidates(toy):
    r = QuadraticReward(center=(1.5, 1.5))
    res = best_of_n(toy, ["gaussian"], r, n=8, num_steps=10, generator=gen(3))
    traj = fa.sample(toy, ["gaussian"], num_steps=10, num_images_per_prompt=8, generator=gen(3))
    assert torch.allclose(res.candidate_latents[0], traj.x0, atol=1e-6)  # the same candidates as fa.sample
    assert res.scores[0] == r(traj.x0).max()
    assert torch.equal(res.latents[0], traj.x0[r(traj.x0).argmax()])
    assert res.nfe == 8 * 10 and res.survivors == [8] and res.forward_passes == 80  # toy2d: no CFG at scale 1


def test_best_of_n_budget_and_cfg_forward_passes(tiny_sd3):
    jpeg = fa.rewards.load("jpeg-compressibility")  # not differentiable: fine for search
    res = best_of_n(tiny_sd3, ["a red circle", "two blue squares"], jpeg, num_steps=3, budget=10,
                    guidance_scale=4.5, generator=gen(0))
    assert res.num_candidates == 3 and res.nfe == 9 and res.nfe_total == 18 and res.forward_passes == 18
    assert res.images.shape == (2, 3, 32, 32) and res.candidate_scores.shape == (2, 3)
    assert torch.equal(res.scores, res.candidate_scores.max(1).values)
    assert torch.allclose(jpeg(res.images), res.scores)


def test_pruning_respects_the_budget(toy):
    r = QuadraticReward(center=(1.5, 1.5))
    res = prune_search(toy, ["gaussian", "2blobs"], r, num_steps=20, budget=160, prune_at=(5,), keep=0.25,
                       generator=gen(0))
    # N = 16: 16 candidates for steps 0-5 (96 NFE), then 4 for the last 14 (56 NFE)
    assert res.num_candidates == 16 and res.survivors == [16, 4]
    assert res.nfe == pruning_nfe(16, 20, (5,), 0.25) == 152 <= 160
    assert pruning_nfe(17, 20, (5,), 0.25) > 160
    assert res.candidate_scores.shape == (2, 4) and torch.equal(res.scores, res.candidate_scores.max(1).values)
    assert res.reward_evals == 16 + 4
    two = prune_search(toy, ["gaussian"], r, num_steps=20, n=20, prune_at=(3, 8), keep=(0.5, 0.5), generator=gen(0))
    assert two.survivors == [20, 10, 5] and two.nfe == 20 * 4 + 10 * 5 + 5 * 11


def test_pruning_beats_best_of_n_at_the_same_budget(toy):
    """Measured (40 prompts, ODE, 20 steps, budget 160): best-of-8 -1.19; pruning at step 5 keeping 1/4 (N=16)
    -0.93. Pruning too early (step 2, sigma 0.9, N=20) did worse: -1.33, as x0_hat there ranks poorly."""
    r = QuadraticReward(center=(1.5, 1.5))
    prompts = ["gaussian"] * 40
    bon = best_of_n(toy, prompts, r, num_steps=20, budget=160, generator=gen(1))
    pruned = prune_search(toy, prompts, r, num_steps=20, budget=160, prune_at=(5,), keep=0.25, generator=gen(1))
    assert bon.nfe == 160 and pruned.nfe <= 160
    assert pruned.scores.mean() > bon.scores.mean() + 0.1


def test_pruning_with_a_latent_proxy_and_sde(toy):
    r = QuadraticReward(center=(1.5, 1.5))
    res = prune_search(toy, ["gaussian"] * 10, r, num_steps=10, n=12, prune_at=(3,), keep=0.25,
                       proxy=LatentQuadratic(), sampler="flow-sde", generator=gen(0))
    base = fa.sample(toy, ["gaussian"] * 10, num_steps=10, sampler="flow-sde", generator=gen(5))
    assert res.survivors == [12, 3] and res.nfe == 12 * 4 + 3 * 6
    assert res.scores.mean() > r(base.x0).mean() + 0.5


def test_search_errors(toy):
    r = QuadraticReward()
    with pytest.raises(ValueError, match="cannot denoise even one candidate"):
        best_of_n(toy, ["gaussian"], r, num_steps=20, budget=10)
    with pytest.raises(ValueError, match="over the budget"):
        prune_search(toy, ["gaussian"], r, num_steps=10, n=50, budget=40)
    with pytest.raises(ValueError, match="prune_at"):
        prune_search(toy, ["gaussian"], r, num_steps=10, n=4, prune_at=(12,))
    with pytest.raises(ValueError, match="n or an NFE budget"):
        prune_search(toy, ["gaussian"], r, num_steps=10)
    with pytest.raises(TypeError, match="prune_search"):
        best_of_n(toy, ["gaussian"], r, n=2, keep=0.5)

    class Nan(Reward):
        name = "nan"
        uses_prompts = False

        def check_inputs(self, images, prompts):
            return images, [""] * len(images)

        def score(self, points, prompts):
            return points.sum(-1) * float("nan")

    with pytest.raises(ValueError, match="'nan' returned non-finite"):
        best_of_n(toy, ["gaussian"], Nan(), n=2, num_steps=2)
