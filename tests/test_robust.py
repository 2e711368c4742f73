"""Robust judges and manifold models (L2 adversarial training), the classifier-free realism
score (IM1), and DVCE's cone projection (issue 27)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf
from torch import nn

from disc_pl.cf.losses import (ROBUST_RECIPE, Robust, RobustManifoldLoss, cone_project, functional_loss,
                              target_margin)
from disc_pl.cf.objective import ConeFunctionalTerm, EnsembleTerm, FunctionalTerm, Step, default_objective
from disc_pl.errors import ConfigError
from disc_pl.models.realism import ConvAE, RealismScore, fit_autoencoder, im1, nn_margin
from disc_pl.models.robust import adversarial_fit, check_robust_config, eps_at, l2_pgd

SIDE = 8


def _checker() -> torch.Tensor:
    i = torch.arange(SIDE)
    return ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().view(1, 1, SIDE, SIDE)  # +-1


def _two_feature_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = a 4x4 patch's brightness (0.25 / 0.75: an L2 distance of 2 between the classes),
    and, perfectly correlated with it, a faint +-0.03 checkerboard (L2 norm 0.24)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, 1, SIDE, SIDE), 0.5)
    x[:, :, :4, :4] = (0.25 + 0.5 * y.float()).view(-1, 1, 1, 1)
    x = x + 0.03 * (2 * y.float() - 1).view(-1, 1, 1, 1) * _checker()
    return (x + 0.01 * torch.randn(x.shape, generator=gen)).clamp(0, 1), y


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(SIDE * SIDE, 2)
        if w is not None:
            with torch.no_grad():
                self.fc.weight.copy_(w)
                self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _plain_checker_reader() -> nn.Module:
    """An analytic 'plain' classifier: it reads only the faint checkerboard (the non-robust
    feature); 100 % accurate on the data."""
    c = _checker().flatten()
    return _Linear(torch.stack([-50 * c, 50 * c]), torch.zeros(2))


def test_l2_pgd_stays_in_the_ball_and_in_range():
    x, y = _two_feature_data(16, 0)
    adv = l2_pgd(_plain_checker_reader(), x, y, 0.3, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.3 + 1e-5
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_robust_judge_resists_the_pgd_attack_that_flips_a_plain_one(seed):
    x, y = _two_feature_data(256, seed)
    plain = _plain_checker_reader()
    assert (plain(x).argmax(1) == y).all()
    torch.manual_seed(seed)
    robust = _Linear()
    recipe = {"epochs": 30, "lr": 0.05, "batch_size": 32, "hflip": False, "max_shift": 0, "noise": 0.0}
    adversarial_fit(robust, x, y, seed, recipe, {"eps": 0.3, "steps": 5, "warmup_epochs": 0, "ramp_epochs": 5})
    assert (robust(x).argmax(1) == y).float().mean() == 1.0
    queries = x[y == 0]
    target = torch.ones(len(queries), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    on_plain = l2_pgd(plain, queries, target, 0.3, steps=20, targeted=True, generator=gen)
    on_robust = l2_pgd(robust, queries, target, 0.3, steps=20, targeted=True, generator=gen)
    assert (plain(on_plain).argmax(1) == 1).all()        # the faint pattern is erased: the plain judge flips
    assert (robust(on_robust).argmax(1) == 0).all()      # the patch cannot move 2 in L2 within 0.3


def test_eps_ramps_after_the_warm_up_and_bad_settings_are_named():
    robust = {"eps": 0.4, "steps": 3, "warmup_epochs": 2, "ramp_epochs": 4}
    assert [eps_at(e, robust) for e in range(7)] == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.4, 0.4])
    with pytest.raises(ConfigError) as err:
        check_robust_config("judge.robust", {"eps": -1, "steps": 0, "warmup_epochs": 1, "ramp_epochs": 1})
    assert {p.key for p in err.value.problems} == {"judge.robust.eps", "judge.robust.steps"}


def _bars(n: int, vertical: bool, seed: int) -> torch.Tensor:
    """16 px images of one bright bar at a random place: vertical (target class) or horizontal."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 16, 16), 0.2)
    pos = torch.randint(2, 14, (n,), generator=gen)
    for i, p in enumerate(pos.tolist()):
        if vertical:
            x[i, :, :, p - 1:p + 1] = 0.9
        else:
            x[i, :, p - 1:p + 1, :] = 0.9
    return x


@pytest.mark.parametrize("seed", [0, 1])
def test_realism_score_ranks_a_real_target_image_above_noise(seed):
    """IM1 < 1: closer to the target class. A real target image scores lower than a query
    (source class) with noise of the same size as the true change added."""
    rc = {"epochs": 30, "lr": 3e-3, "batch_size": 32, "noise": 0.05}
    aes = []
    for vertical in (False, True):
        torch.manual_seed(seed)
        ae = ConvAE(1, 16, width=8, latent=2)
        fit_autoencoder(ae, _bars(256, vertical, seed + 10 * vertical), seed, rc)
        aes.append(ae)
    ae_source, ae_target = aes
    real = _bars(32, True, 100 + seed)
    query = _bars(32, False, 200 + seed)
    change = (real - query).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    noise = torch.randn(query.shape, generator=torch.Generator().manual_seed(seed))
    noisy = (query + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * change).clamp(0, 1)
    s_real, s_noisy, s_query = (im1(ae_target, ae_source, v) for v in (real, noisy, query))
    assert s_real.median() < 1 < s_query.median()
    assert (s_real < s_noisy).float().mean() >= 0.9
    # the manifold gap of an every-class autoencoder: turning the query into a real image of the
    # other class costs far less than the same amount of noise
    torch.manual_seed(seed)
    ae_all = ConvAE(1, 16, width=8, latent=2)
    fit_autoencoder(ae_all, torch.cat([_bars(128, False, seed + 20), _bars(128, True, seed + 30)]), seed, rc)
    score = RealismScore(ae_source, ae_target, ae_all)
    assert torch.equal(score(real), s_real)
    assert (score.gap(query, real) < score.gap(query, noisy)).float().mean() >= 0.9


@pytest.mark.parametrize("angle", [0.0, 10.0, 30.0, 60.0, 89.0])
def test_cone_projection_keeps_an_ascent_direction_of_the_explained_classifier(angle):
    gen = torch.Generator().manual_seed(int(angle))
    g = torch.randn(64, 3, 4, 4, generator=gen)
    around = torch.randn(64, 3, 4, 4, generator=gen)
    g[:8] = -around[:8]                        # exactly opposite
    g[8:16] = around[8:16] * 2 + 1e-3 * g[8:16]  # already inside any cone
    out = cone_project(g, around, angle)
    o, a, gf = out.flatten(1), around.flatten(1), g.flatten(1)
    cos = (o * a).sum(1) / (o.norm(dim=1) * a.norm(dim=1))
    assert (cos >= math.cos(math.radians(angle)) - 1e-4).all()   # within the cone ...
    assert ((o * a).sum(1) > 0).all()                              # ... so an ascent direction of around's function
    assert torch.allclose(o.norm(dim=1), gf.norm(dim=1), rtol=1e-4)  # the norm of g
    g_cos = (gf * a).sum(1) / (gf.norm(dim=1) * a.norm(dim=1))
    inside = g_cos >= math.cos(math.radians(angle))
    assert torch.equal(out[inside], g[inside])                      # inside the cone: unchanged
    assert torch.equal(cone_project(g, torch.zeros_like(g), angle), g)  # no explained gradient: g


def test_cone_functional_term_has_the_explained_loss_and_the_projected_gradient():
    """Value: F's cross entropy. Gradient in x: the robust gradient projected into the cone
    around F's, at the norm of F's gradient (analytic linear classifiers)."""
    torch.manual_seed(0)
    explained, robust_net = _Linear(), _Linear()
    robust = RobustManifoldLoss([robust_net], None, weight=1.0, cone_angle=20.0)
    x = torch.rand(5, 1, SIDE, SIDE, requires_grad=True)
    target = torch.ones(5, dtype=torch.long)
    logits = explained(x)
    step = Step(x=x, logits=logits, feats=[], query=x.detach(), source=1 - target, target=target,
                idx=torch.arange(5), prior=None, mask=None)
    value = ConeFunctionalTerm(robust, 1.0, 20.0)(step, None)
    assert torch.allclose(value, functional_loss(logits, target))
    grad, = torch.autograd.grad(value.sum(), x)
    xe = x.detach().requires_grad_(True)
    g_f, = torch.autograd.grad(functional_loss(explained(xe), target).sum(), xe)
    xr = x.detach().requires_grad_(True)
    g_r, = torch.autograd.grad(robust.ensemble_loss(xr, target).sum(), xr)
    expect = cone_project(g_r, g_f, 20.0)
    expect = expect * (g_f.flatten(1).norm(dim=1) / expect.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    assert torch.allclose(grad, expect, atol=1e-6)
    assert ((grad.flatten(1) * g_f.flatten(1)).sum(1) > 0).all()


def test_robust_manifold_term_and_objective_wiring():
    torch.manual_seed(0)
    nets = [_Linear(), _Linear()]
    loss = RobustManifoldLoss(nets, None, weight=3.0)
    x = torch.rand(4, 1, SIDE, SIDE)
    t = torch.tensor([0, 1, 1, 0])
    expect = torch.stack([functional_loss(n(x), t) for n in nets]).mean(0)
    assert torch.allclose(loss.ensemble_loss(x, t), expect)
    assert torch.equal(loss(x, torch.zeros(4, 2), [], 1 - t, t), torch.zeros(4))  # no DEP: the manifold term is 0

    class Opts:
        space, layers, lambda_sem, relax, lambda_fc, lambda_mc, gate, terms = "iso", (0,), 1.0, 0.5, 1.0, 0.1, None, ()

    terms = default_objective(Opts(), loss)
    plain = {type(t).__name__ for t in terms}
    assert [(t.name, t.weight) for t in terms[1:3]] == [("manifold", 0.1), ("robust", 3.0)]
    cone = {type(t).__name__ for t in default_objective(Opts(), RobustManifoldLoss(nets, None, 1.0, 30.0))}
    assert FunctionalTerm.__name__ in plain and ConeFunctionalTerm.__name__ in cone
    made = Robust(k=2, weight=3.0, dep=False, cone_angle=30)(None, load_robust=lambda i: nets[i])
    assert list(made.models) == nets and made.cone_angle == 30.0 and made.dep is None
    with pytest.raises(ConfigError, match="cone_angle"):
        Robust(cone_angle=90)


def _step(x: torch.Tensor, target: torch.Tensor, idx: torch.Tensor) -> Step:
    return Step(x=x, logits=torch.zeros(len(x), 2), feats=[], query=x.detach(), source=1 - target, target=target,
                idx=idx, prior=None, mask=None)


def test_target_margin_is_the_target_logit_over_the_log_sum_exp_of_the_others():
    z = torch.tensor([[[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]]])
    t = torch.tensor([0, 2])
    expect = torch.tensor([[1.0 - math.log(math.exp(2) + math.exp(3)), 4.0 - math.log(math.exp(0.5) + math.exp(-1))]])
    assert torch.allclose(target_margin(z, t), expect)


def test_the_margin_goal_is_the_query_margin_mirrored_and_rows_follow_their_queries():
    """Two classes: the margin-shifted cross entropy of model i is softplus(r * max(0, -m_i(x)) -
    m_i(x')), m_i = logit(target) - logit(other), x the row's own query (hand-computed here from
    the linear models' weights); margin=None is the plain cross entropy."""
    torch.manual_seed(0)
    nets = [_Linear(torch.randn(2, SIDE * SIDE) * 0.3, torch.randn(2)) for _ in range(2)]
    queries = torch.rand(4, 1, SIDE, SIDE)
    cand = torch.rand(4, 1, SIDE, SIDE)
    target = torch.tensor([1, 0, 1, 1])
    idx = torch.tensor([2, 0])  # the step's active rows: queries 2 and 0, in that order

    def m(net, x, t):
        z = net(x)
        return z.gather(1, t[:, None])[:, 0] - z.gather(1, (1 - t)[:, None])[:, 0]

    for r in (1.0, 0.5):
        term = EnsembleTerm(RobustManifoldLoss(nets, None, 1.0, None, margin=r))
        state = term.prepare(queries, [])
        got = term(_step(cand[idx], target[idx], idx), state)
        expect = torch.stack([torch.nn.functional.softplus(r * (-m(n, queries[idx], target[idx])).clamp_min(0)
                                                           - m(n, cand[idx], target[idx])) for n in nets]).mean(0)
        assert torch.allclose(got, expect, atol=1e-6)
    plain = EnsembleTerm(RobustManifoldLoss(nets, None, 1.0))
    assert plain.prepare(queries, []) is None
    ce = torch.stack([functional_loss(n(cand[idx]), target[idx]) for n in nets]).mean(0)
    assert torch.allclose(plain(_step(cand[idx], target[idx], idx), None), ce)
    with pytest.raises(ConfigError, match="margin"):
        Robust(margin=-1)


def test_the_margin_goal_keeps_pulling_where_the_cross_entropy_has_saturated():
    """A robust model already predicting the target by a margin of 6 (p = 0.998) gives its cross
    entropy almost no gradient; with the goal of the query's mirrored margin (12) the term still
    pulls with nearly its full strength, and stops pulling once the goal is passed."""
    w = torch.zeros(2, SIDE * SIDE)
    w[1, 0] = 1.0  # margin of class 1 = pixel 0
    net = _Linear(w, torch.zeros(2))
    target = torch.ones(1, dtype=torch.long)
    query = torch.zeros(1, 1, SIDE, SIDE)
    query[0, 0, 0, 0] = -12.0

    def grad_norm(loss: RobustManifoldLoss, pixel: float) -> float:
        x = torch.zeros(1, 1, SIDE, SIDE)
        x[0, 0, 0, 0] = pixel
        x.requires_grad_(True)
        term = EnsembleTerm(loss)
        value = term(_step(x, target, torch.tensor([0])), term.prepare(query, []))
        return torch.autograd.grad(value.sum(), x)[0].norm().item()

    goal, ce = RobustManifoldLoss([net], None, margin=1.0), RobustManifoldLoss([net], None)
    assert grad_norm(goal, 6.0) > 0.99 and grad_norm(ce, 6.0) < 0.003
    assert grad_norm(goal, 20.0) < 0.001


def test_nn_margin_is_the_hand_computed_neighbour_distance_difference():
    """Mean squared difference per pixel to the k nearest real target images minus to the k
    nearest real source images, on 2x2 images whose distances are known."""
    x = torch.zeros(2, 1, 2, 2)
    x[1] = 1.0
    target = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.5, 1.0)])
    source = torch.stack([torch.full((1, 2, 2), v) for v in (0.2, 0.3, 0.9)])
    got = nn_margin(x, target, source, k=2)
    # image 0 (all 0): target neighbours 0.1, 0.5 -> (0.01 + 0.25) / 2; source 0.2, 0.3 -> (0.04 + 0.09) / 2
    # image 1 (all 1): target 1.0, 0.5 -> (0 + 0.25) / 2; source 0.9, 0.3 -> (0.01 + 0.49) / 2
    assert torch.allclose(got, torch.tensor([0.13 - 0.065, 0.125 - 0.25]))
    with pytest.raises(ValueError, match="at least k=4"):
        nn_margin(x, target, source, k=4)
    with pytest.raises(ValueError, match="both classes"):
        RealismScore(None, None, None, bank_source=source)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nn_margin_ranks_a_real_target_image_above_noise_and_noise_leaves_it_where_the_query_was(seed):
    """On generated bars (source: horizontal, target: vertical) a real target image has a
    negative margin and a query a positive one; the query plus noise as large as the change to a
    real target image stays positive, nearly where the query was (noise adds about its energy to
    every distance), while IM1's ratio is what noise pulls towards 1."""
    bank_s, bank_t = _bars(200, False, 300 + seed), _bars(200, True, 400 + seed)
    real, query = _bars(32, True, 100 + seed), _bars(32, False, 200 + seed)
    change = (real - query).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    noise = torch.randn(query.shape, generator=torch.Generator().manual_seed(seed))
    noisy = query + noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * change  # unclamped: pure added energy
    s_real, s_query, s_noisy = (nn_margin(v, bank_t, bank_s) for v in (real, query, noisy))
    assert (s_real < 0).all() and (s_query > 0).all()
    assert (s_noisy > 0).float().mean() >= 0.9
    assert (s_real < s_noisy).all()
    spread = s_query.mean() - s_real.mean()
    assert (s_noisy.mean() - s_query.mean()).abs() < 0.25 * spread
    score = RealismScore(None, None, None, bank_source=bank_s, bank_target=bank_t, k=3)
    assert score.has_nn and torch.equal(score.nn(real), nn_margin(real, bank_t, bank_s, k=3))


def test_noise_control_scores_noise_and_a_blur_each_as_large_as_the_counterfactuals_change():
    """The content-free controls: the queries plus Gaussian noise and the queries blurred, each
    with the counterfactuals' mean MSE, scored by the same realism scores."""
    from disc_pl.validity import noise_control

    class Recorder:  # a realism score that remembers what it was asked about: IM1 = the image's mean
        has_nn = True

        def __init__(self):
            self.seen = []

        def __call__(self, v):
            self.seen.append(v)
            return v.flatten(1).mean(1)

        def nn(self, v):
            return -v.flatten(1).mean(1)

    gen = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(8, 1, 16, 16, generator=gen)  # away from 0 and 1: the clamp stays idle
    x_cf = x + 0.05 * torch.randn(x.shape, generator=gen)
    mse = float((x_cf - x).square().mean())
    rec = Recorder()
    out = noise_control(rec, x, x_cf)
    noisy, blurred = rec.seen
    assert float((noisy - x).square().mean()) == pytest.approx(mse, rel=0.1)
    assert float((blurred - x).square().mean()) == pytest.approx(mse, rel=0.01)
    assert 0.05 < out["realism/blur_sigma"] < 8
    assert out["realism/im1_noise"] == pytest.approx(float(noisy.mean())) and out["realism/nn_margin_blur"] == pytest.approx(
        -float(blurred.mean()))
    # a change larger than any blur can make: the widest blur is used
    out = noise_control(Recorder(), x, 1 - x)
    assert out["realism/blur_sigma"] == 8.0


def test_bad_robust_and_realism_settings_are_refused_before_any_work():
    from conftest import compose_cfg

    from disc_pl.validate import validate_run_config

    validate_run_config(compose_cfg(["judge=ensemble"]))  # the defaults pass
    cfg = compose_cfg(["judge=ensemble", "judge.robust.eps=0", "judge.realism.latent=0", "manifold.recipe.steps=0",
                       "manifold.recipe.max_train=1", "judge.realism.knn=0"])
    with pytest.raises(ConfigError) as err:
        validate_run_config(cfg)
    assert {"judge.robust.eps", "judge.realism.latent", "manifold.recipe.steps",
            "manifold.recipe.max_train", "judge.realism.knn"} <= {p.key for p in err.value.problems}


def test_the_composed_robust_recipe_is_the_python_default():
    """`Robust()` built in Python (the API) trains the same robust models as `manifold=robust`
    from conf/ (the model cache is keyed by the recipe): the two defaults may not drift apart."""
    cfg = compose_cfg(["manifold=robust"])
    assert OmegaConf.to_container(cfg.manifold.recipe) == ROBUST_RECIPE
    assert Robust().recipe == ROBUST_RECIPE
