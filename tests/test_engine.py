"""The counterfactual engine: properties on analytic classifiers (per-query independence,
divergence isolation, a pinned reference loop), and a flip of a trained toy classifier."""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import analytic
import pytest
import torch
import torch.nn.functional as F
from analytic import PatchReader

from disc_pl.cf.engine import InversionOptions, PriorFallback, Stage, generate_counterfactuals, is_flipped
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.losses import DEPManifold, SemanticLoss, functional_loss
from disc_pl.cf.objective import Term, default_objective
from disc_pl.cf.priors import TVPrior, WarpPrior
from disc_pl.errors import ConfigError

SMALL_INR = dict(n_frequencies=64, sigma=3.0, first_omega0=3.0, hidden=64, depth=2)


def options(**kw) -> InversionOptions:
    base = dict(lr=3e-3, recon_steps=150, psnr_target=30.0, target_margin=0.2, target_confidence=None, fallback=None,
                retry_hparams=(),
                lambda_sem=1.0, lambda_mc=1.0, gate=GateOptions(fallback=True),
                stages=[Stage(["out"], 60, 5), Stage(["hidden1", "out"], 60, 5), Stage(["all"], 80, 5)])
    base.update(kw)
    return InversionOptions(**base)


def test_counterfactual_flips_trained_classifier(toy_classifier, toy_queries):
    images, targets, _ = toy_queries
    out = generate_counterfactuals(toy_classifier, images, targets, prior="inr",
                                   prior_hparams=SMALL_INR, manifold=DEPManifold(toy_classifier),
                                   options=options(), seeds=list(range(len(images))))
    flipped = torch.tensor([s == "flipped" for s in out.status])
    # Any toy classifier of this recipe (DISC_PL_TEST_SEED) is flippable for most queries.
    assert flipped.float().mean() >= 0.5, out.status
    # status agrees with what the classifier says about the returned image
    with torch.no_grad():
        really = is_flipped(toy_classifier(out.images), targets, 0.2)
    assert torch.equal(really, flipped)
    assert (out.target_prob[flipped] > out.initial_prob[flipped]).all()
    # a counterfactual is a small change of the query, not a new image
    mse = (out.images - images).pow(2).flatten(1).mean(1)
    assert mse[flipped].median() < 0.02
    assert (out.recon_psnr > 25).all()


def _analytic_opts(prior: str, gate: bool, **kw) -> InversionOptions:
    schedule = ([Stage(["out"], 20, 3), Stage(["all"], 20, 3)] if prior == "inr"
                else [Stage(["pixels"], 150, 3)])
    base = dict(space="iso", lambda_sem=10.0, lr=3e-3 if prior == "inr" else 1e-3, recon_steps=40 if prior == "inr" else 0,
                psnr_target=30.0, target_margin=0.2, target_confidence=None, fallback=None,
                retry_hparams=(), stages=schedule,
                gate=GateOptions(lambda_area=50.0, fallback=True) if gate else None)
    base.update(kw)
    return InversionOptions(**base)


def _generate(model, x, t, prior, opts, seeds):
    hparams = SMALL_INR if prior == "inr" else None
    return generate_counterfactuals(model, x, t, prior=prior, prior_hparams=hparams, options=opts, seeds=seeds)


@pytest.mark.parametrize("prior", ["tv", "inr"])
@pytest.mark.parametrize("gate", [False, True], ids=["paper", "gate"])
def test_batched_matches_one_at_a_time(float64, prior, gate):
    """Every decision is the query's own (status, steps, which search), whatever the batch."""
    model = PatchReader()
    x, t = analytic.patch_queries(3)
    seeds = [11, 12, 13]
    opts = _analytic_opts(prior, gate)
    together = _generate(model, x, t, prior, opts, seeds)
    for i in range(3):
        alone = _generate(model, x[i:i + 1], t[i:i + 1], prior, opts, seeds[i:i + 1])
        assert alone.status[0] == together.status[i]
        assert int(alone.steps[0]) == int(together.steps[i])
        if gate:
            assert bool(alone.localized[0]) == bool(together.localized[i])
        torch.testing.assert_close(alone.images[0], together.images[i], atol=1e-9, rtol=0)
    assert "flipped" in together.status  # the comparison covers a search that succeeds


@pytest.mark.parametrize("gate", [False, True], ids=["paper", "gate"])
def test_diverging_query_is_isolated(gate):
    """A poisoned query is `diverged`; every other row is bit for bit that of a run without it."""
    model = PatchReader()
    x, t = analytic.patch_queries(3)
    poisoned = x.clone()
    poisoned[1, :, 4:8, 4:8] = float("nan")
    opts = _analytic_opts("tv", gate, stages=[Stage(["pixels"], 60, 3)])
    out = generate_counterfactuals(model, poisoned, t, prior="tv", options=opts, seeds=[1, 2, 3])
    clean = generate_counterfactuals(model, x[[0, 2]], t[[0, 2]], prior="tv", options=opts, seeds=[1, 3])
    assert out.status[1] == "diverged"
    assert [out.status[0], out.status[2]] == clean.status
    for name in ("images", "target_prob", "initial_prob", "prediction", "steps"):
        assert torch.equal(getattr(out, name)[[0, 2]], getattr(clean, name)), name
    for term, v in out.losses.items():
        assert torch.equal(v[[0, 2]], clean.losses[term]), term


def test_engine_matches_a_plain_reference_loop(float64):
    """Pins the engine's output: the paper objective with the tv prior, one query at a time, as a
    plain loop with torch.optim.Adam (what the engine computed before any refactor)."""
    model = PatchReader()
    x, t = analytic.patch_queries(3)
    opts = _analytic_opts("tv", False, stages=[Stage(["pixels"], 150, 7)])
    out = generate_counterfactuals(model, x, t, prior="tv", options=opts)
    prior = TVPrior(x[:1], [0])  # its regulariser (TV + L2); its defaults are the engine's
    for i in range(3):
        q, target = x[i:i + 1], t[i:i + 1]
        pixels = q.clone().requires_grad_(True)
        adam = torch.optim.Adam([pixels], lr=opts.lr)
        best, best_dist, steps, found = q, math.inf, 0, False
        for it in range(opts.stages[0].steps):
            xc = pixels.clamp(0, 1)
            logits = model(xc)
            total = (opts.lambda_sem * (xc - q).pow(2).mean() + opts.lambda_fc * F.cross_entropy(logits, target)
                     + prior.regularizer(xc).sum())
            adam.zero_grad()
            total.backward()
            adam.step()
            steps += 1
            p = torch.softmax(logits, 1)[0]
            valid = bool(p.argmax() == 1) and float(p[1] - p[0]) >= opts.target_margin
            dist = float((xc - q).pow(2).mean())
            if valid and dist < best_dist:
                best, best_dist = xc.detach(), dist
            found |= valid
            if valid and it + 1 >= opts.stages[0].min_steps:
                break
        assert out.status[i] == ("flipped" if found else "not_flipped")
        assert int(out.steps[i]) == steps
        torch.testing.assert_close(out.images[i], best[0], atol=1e-9, rtol=0)
    assert out.status == ["flipped"] * 3


def test_query_that_cannot_flip_keeps_best_attempt():
    model = PatchReader()
    images, targets = analytic.patch_queries(2)
    # gate=None: one search, so its 5 steps are all there is (the gate's fallback is in test_gate.py)
    opts = options(space="iso", recon_steps=0, lr=1e-5, stages=[Stage(["pixels"], 5, 1)], gate=None)
    out = generate_counterfactuals(model, images, targets, prior="tv", options=opts)
    assert out.status == ["not_flipped", "not_flipped"]
    assert torch.isfinite(out.images).all()
    assert (out.steps == 5).all()
    # the kept image is the attempt with the highest target probability, reported honestly
    with torch.no_grad():
        p = torch.softmax(model(out.images), 1)[:, 1]
    torch.testing.assert_close(p, out.target_prob)
    assert (out.target_prob >= out.initial_prob).all()


def test_semantic_loss_hand_values():
    x = torch.zeros(2, 1, 2, 2)
    x_cf = x.clone()
    x_cf[1, 0, 0, 0] = 2.0
    iso = SemanticLoss("iso")
    ref = iso.reference(x, [])
    assert iso(x_cf, [], ref).tolist() == [0.0, 1.0]  # (2^2) / 4 pixels
    lso = SemanticLoss("lso", layers=[1])
    feats = [torch.zeros(2, 3), torch.ones(2, 2)]
    ref = lso.reference(x, feats)
    assert lso(x_cf, [torch.zeros(2, 3), torch.tensor([[1.0, 1.0], [3.0, 1.0]])], ref).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="feature maps"):
        SemanticLoss("lso", layers=[5]).reference(x, feats)


def test_functional_loss_is_cross_entropy_to_target():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    ce = functional_loss(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(ce, torch.tensor([0.6931472, 2.126928]), atol=1e-5, rtol=0)


def test_bad_options_fail_early():
    with pytest.raises(ValueError, match="lr"):
        InversionOptions(lr=0)
    with pytest.raises(ValueError, match="steps"):
        InversionOptions(stages=[Stage(["all"], steps=0)])



class L1Term(Term):
    """A new term is a small class: mean |x' - x| (an L1 trial)."""

    name = "l1"

    def __call__(self, step, state):
        return (step.x - step.query).abs().flatten(1).mean(1)


def test_objective_is_a_list_of_named_terms_the_engine_sums_and_logs():
    model = PatchReader()
    x, t = analytic.patch_queries(2)
    opts = _analytic_opts("tv", False, stages=[Stage(["pixels"], 40, 3)], log_every=1)
    logged: list[dict] = []
    paper = generate_counterfactuals(model, x, t, prior="tv", options=opts)
    explicit = generate_counterfactuals(model, x, t, prior="tv", options=opts,
                                        objective=default_objective(opts), on_log=logged.append)
    assert torch.equal(paper.images, explicit.images)  # the default objective is the options'
    assert {"cf/loss_semantic", "cf/loss_functional", "cf/loss_area", "cf/loss_total"} <= set(logged[0])
    terms = [*default_objective(opts), L1Term(weight=5.0)]
    l1 = generate_counterfactuals(model, x, t, prior="tv", options=opts, objective=terms, on_log=logged.append)
    assert "cf/loss_l1" in logged[-1] and set(l1.losses) == {*(t.name for t in terms), "total"}
    # the kept iterate's total is the weighted sum of its terms
    weighted = sum(term.weight * l1.losses[term.name] for term in terms)
    torch.testing.assert_close(l1.losses["total"], weighted)
    assert not torch.equal(l1.images, paper.images)
    with pytest.raises(ValueError, match="unique names"):
        generate_counterfactuals(model, x, t, prior="tv", options=opts, objective=[L1Term(), L1Term()])


def test_seconds_are_per_query_and_add_up_to_the_batch():
    model = PatchReader()
    x, t = analytic.patch_queries(3)
    x[1] = 0.5  # a grey query: flips later than the others (more steps, more time)
    start = time.perf_counter()
    out = generate_counterfactuals(model, x, t, prior="tv", options=_analytic_opts("tv", False))
    wall = time.perf_counter() - start
    assert out.seconds.shape == (3,) and (out.seconds > 0).all()
    assert float(out.seconds.sum()) <= wall
    assert float(out.seconds.sum()) >= 0.5 * wall


def test_coarse_stage_changes_start_from_the_query_and_end_at_full_size(float64):
    """A coarse-to-fine schedule: the first stages render the change at half resolution and
    enlarge it, the last at full size. With the residual form the first iterate is the query
    exactly (delta 0 at every scale); the counterfactuals are full-size, flip the analytic
    classifier and are judged on what is returned."""
    model = PatchReader()
    x, t = analytic.patch_queries(3)
    seen = []
    forward = model.forward_features
    model.forward_features = lambda images: (seen.append(images.detach().clone()), forward(images))[1]
    opts = _analytic_opts("inr", False, stages=[Stage(["out"], 20, 3, size=16), Stage(["all"], 20, 3)],
                          recon_sizes=(16, None))
    out = _generate(model, x, t, "inr", opts, [1, 2, 3])
    assert torch.equal(seen[1], x)  # seen[0]: the queries' own features; seen[1]: the first iterate
    assert out.images.shape == x.shape
    with torch.no_grad():
        assert torch.equal(is_flipped(forward(out.images)[0], t, opts.target_margin),
                           torch.tensor([s == "flipped" for s in out.status]))
    assert out.status == ["flipped"] * 3
    assert (out.recon_psnr > 25).all()  # measured at full size after the coarse phase


def test_bad_coarse_to_fine_scales_fail_early():
    with pytest.raises(ValueError, match="size"):
        InversionOptions(stages=[Stage(["all"], size=2)])
    with pytest.raises(ValueError, match="recon_sizes"):
        InversionOptions(recon_sizes=())


class _BarReader(torch.nn.Module):
    """Class 1 when the 6 x 6 patch at rows 13-18, columns 16-21 is bright: logit 40 (patch
    mean - 0.5). The queries have a bright bar just left of it (columns 12-15, soft edge), so moving the
    bar 2-4 px right flips the class; adding new bright pixels would too."""

    def forward_features(self, x):
        s = 40.0 * (x[:, :, 13:19, 16:22].mean((1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(s), s], 1), [x]

    def forward(self, x):
        return self.forward_features(x)[0]


def test_warp_counterfactual_moves_the_querys_own_pixels(float64):
    """prior=warp flips the class by moving the bar: every pixel of x' is a convex combination
    of the query's pixels (within the query's per-channel range), and bar-bright pixels now lie
    in the patch."""
    x = torch.full((2, 3, 32, 32), 0.2)
    x[:, :, 10:22, 12:16] = 0.9
    x[:, :, 10:22, 16], x[:, :, 10:22, 17] = 0.6, 0.35  # a soft edge (an exact step has no gradient)
    x[1, 1] += 0.05  # a second, different query
    t = torch.ones(2, dtype=torch.long)
    opts = InversionOptions(space="iso", lambda_sem=1.0, lr=0.05, recon_steps=0, target_margin=0.2,
                            target_confidence=None, fallback=None, retry_hparams=(), stages=[Stage(["flow"], 150, 3)])
    out = generate_counterfactuals(_BarReader(), x, t, prior="warp", prior_hparams={"grid": 8}, options=opts,
                                   seeds=[0, 1])
    assert out.status == ["flipped", "flipped"]
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    assert bool(((out.images >= lo - 1e-9) & (out.images <= hi + 1e-9)).all())
    assert (out.images[:, :, 13:19, 16:22].amax((1, 2, 3)) > 0.75).all()  # the bar's pixels moved in


def _bar_and_grey():
    """Query 0: a bar beside the patch (the warp can move it in); query 1: uniform grey (nothing
    to move); targets 1; and the warp's options for them (no gate, no fallback)."""
    x = torch.full((2, 3, 32, 32), 0.2)
    x[0, :, 10:22, 12:16] = 0.9
    x[0, :, 10:22, 16], x[0, :, 10:22, 17] = 0.6, 0.35
    warp = InversionOptions(space="iso", lambda_sem=1.0, lr=0.05, recon_steps=0, target_margin=0.2,
                            target_confidence=None, fallback=None,
                            retry_hparams=(), stages=[Stage(["flow"], 150, 3)], gate=None)
    return x, torch.ones(2, dtype=torch.long), warp


def test_fallback_prior_takes_over_only_the_queries_the_first_cannot_flip(float64):
    """prior=warp with a tv fallback: query 0 (a bar beside the patch) is flipped by the warp,
    query 1 (uniform grey: nothing bright to move) cannot be. With the fallback, query 1 is
    flipped by new bright pixels (outside its own range: the tv prior drew them), fallback =
    [False, True], and query 0's image, status and steps equal a warp-only run's."""
    x, t, warp = _bar_and_grey()
    tv = dataclasses.replace(warp, lr=0.05, stages=[Stage(["pixels"], 150, 3)])
    alone = generate_counterfactuals(_BarReader(), x, t, prior="warp", prior_hparams={"grid": 8}, options=warp,
                                     seeds=[0, 1])
    assert alone.status == ["flipped", "not_flipped"] and alone.fallback is None
    both = generate_counterfactuals(_BarReader(), x, t, prior="warp", prior_hparams={"grid": 8},
                                    options=dataclasses.replace(warp, fallback=PriorFallback("tv", tv)),
                                    seeds=[0, 1])
    assert both.status == ["flipped", "flipped"] and both.fallback.tolist() == [False, True]
    assert torch.equal(both.images[0], alone.images[0]) and both.steps[0] == alone.steps[0]
    assert both.steps[1] > alone.steps[1]  # both searches are counted
    assert both.images[1].max() > 0.2 + 0.1  # brightness the query does not have
    with pytest.raises(ValueError, match="one level only"):
        InversionOptions(fallback=PriorFallback("tv", dataclasses.replace(tv, fallback=PriorFallback("tv", tv))))


def test_a_weak_flip_also_goes_to_the_fallback_and_the_more_confident_result_is_kept(float64):
    """``PriorFallback.below``: the warp flips query 0 (a bar beside the patch) only just; the tv
    fallback, which may paint, runs for it too and its more confident flip replaces the warp's.
    Query 1 (the warp cannot flip it) goes to the fallback either way. With ``below`` None the
    weak flip is kept as it was."""
    x, t, warp = _bar_and_grey()
    tv = dataclasses.replace(warp, stages=[Stage(["pixels"], 150, 3)], target_confidence=0.99)
    runs = {below: generate_counterfactuals(_BarReader(), x, t, prior="warp", prior_hparams={"grid": 8},
                                            options=dataclasses.replace(warp, fallback=PriorFallback("tv", tv,
                                                                                                     below=below)),
                                            seeds=[0, 1])
            for below in (None, 0.9)}
    weak, strong = runs[None], runs[0.9]
    assert weak.status == strong.status == ["flipped", "flipped"]
    assert float(weak.target_prob[0]) < 0.9                      # the warp's flip is weak
    assert weak.fallback.tolist() == [False, True] and strong.fallback.tolist() == [True, True]
    assert float(strong.target_prob[0]) > 0.98                   # the fallback's confident flip replaced it
    assert strong.steps[0] > weak.steps[0]                       # both searches are counted
    torch.testing.assert_close(strong.images[1], weak.images[1])  # query 1 as before
    with pytest.raises(ConfigError, match="fallback_below"):
        PriorFallback("tv", tv, below=1.5)


def test_target_confidence_goes_on_past_the_flip_and_still_counts_the_flip_at_the_margin(float64):
    """With target_confidence the search continues past target_margin: each query returns an
    image whose margin reaches the confidence (more confident than the plain run's); with too few
    steps to reach it, the query still counts as flipped at target_margin, with its most
    confident image."""
    model = PatchReader()
    x, t = analytic.patch_queries(3)

    def margin(images):
        p = torch.softmax(model(images), 1)
        return p[:, 1] - p[:, 0]

    plain = generate_counterfactuals(model, x, t, prior="tv", options=_analytic_opts("tv", False), seeds=[1, 2, 3])
    sure = generate_counterfactuals(model, x, t, prior="tv", options=_analytic_opts("tv", False, target_confidence=0.9),
                                    seeds=[1, 2, 3])
    assert plain.status == sure.status == ["flipped"] * 3
    assert (margin(sure.images) >= 0.9).all() and (margin(plain.images) < 0.9).all()
    assert (sure.steps > plain.steps).all()
    short = _analytic_opts("tv", False, target_confidence=0.9999, stages=[Stage(["pixels"], 40, 3)])
    cut = generate_counterfactuals(model, x, t, prior="tv", options=short, seeds=[1, 2, 3])
    m = margin(cut.images)
    assert cut.status == ["flipped"] * 3 and ((m >= 0.2) & (m < 0.9999)).all()
    assert (cut.steps == 40).all()  # never reached the goal: ran every step
    with pytest.raises(ValueError, match="target_confidence"):
        _analytic_opts("tv", False, target_confidence=0.1)  # below target_margin=0.2


@pytest.mark.parametrize("by", ["name", "partial"])
def test_a_relaxed_prior_retries_the_queries_the_prior_cannot_flip_before_the_fallback(float64, by):
    """``retry_hparams``: a warp whose shift is capped at 0.5 px cannot move the bar of query 0
    into the patch; the same warp with the cap lifted can, and its image is exactly an uncapped
    run's (the retry is that search). Query 1 (uniform grey) is flipped by neither warp and goes on
    to the tv fallback: relaxed = [True, False], fallback = [False, True]."""
    x, t, warp = _bar_and_grey()
    tv = dataclasses.replace(warp, stages=[Stage(["pixels"], 150, 3)])
    capped = {"grid": 8, "max_shift": 0.5}
    prior, hparams = (("warp", capped) if by == "name" else (functools.partial(WarpPrior, **capped), None))
    alone = generate_counterfactuals(_BarReader(), x, t, prior=prior, prior_hparams=hparams, options=warp, seeds=[0, 1])
    assert alone.status == ["not_flipped", "not_flipped"] and alone.relaxed is None
    free = generate_counterfactuals(_BarReader(), x, t, prior="warp", prior_hparams={"grid": 8}, options=warp,
                                    seeds=[0, 1])
    opts = dataclasses.replace(warp, retry_hparams=[{"max_shift": None}], fallback=PriorFallback("tv", tv))
    out = generate_counterfactuals(_BarReader(), x, t, prior=prior, prior_hparams=hparams, options=opts, seeds=[0, 1])
    assert out.status == ["flipped", "flipped"]
    assert out.relaxed.tolist() == [True, False] and out.fallback.tolist() == [False, True]
    assert torch.equal(out.images[0], free.images[0])
    assert out.steps[0] == alone.steps[0] + free.steps[0]  # both searches are counted
    assert out.images[1].max() > 0.2 + 0.1  # the fallback painted what no warp can move


def test_relaxed_priors_need_the_prior_by_name_or_partial_and_mappings(float64):
    x, t, warp = _bar_and_grey()
    prior = WarpPrior(x, [0, 1], grid=8, max_shift=0.5)
    with pytest.raises(ValueError, match="retry_hparams"):
        generate_counterfactuals(_BarReader(), x, t, prior=prior, seeds=[0, 1],
                                 options=dataclasses.replace(warp, retry_hparams=[{"max_shift": None}]))
    for bad in ([{}], ["max_shift"], {"max_shift": 1}):
        with pytest.raises(ConfigError, match="retry_hparams"):
            InversionOptions(retry_hparams=bad)
