"""The search object (cf/search.py) and its one retry mechanism: a query a search leaves
``not_flipped`` is searched again by a list of ``Retry`` plans, merged with ``_take_better``;
the gate's ungated retry and the prior fallback are both such plans, whatever form the prior takes."""
from __future__ import annotations

import dataclasses

import analytic
import pytest
import torch
from analytic import SpreadReader

from disc_pl.cf import engine
from disc_pl.cf.batch import CounterfactualBatch
from disc_pl.cf.engine import InversionOptions, PriorFallback, Stage, generate_counterfactuals
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.priors import INRPrior, TVPrior, build_prior
from disc_pl.cf.search import Retry, _take_better, retry

SMALL_INR = dict(n_frequencies=64, sigma=3.0, first_omega0=3.0, hidden=64, depth=2)


def _batch(status, target_prob, value, localized=None) -> CounterfactualBatch:
    """A hand-made result: every per-query field of row i is ``value + i`` (images, losses, ...)."""
    n = len(status)
    rows = torch.arange(n, dtype=torch.float64) + value
    return CounterfactualBatch(
        images=rows.view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(), status=list(status), source=torch.zeros(n).long(),
        target=torch.ones(n).long(), initial_prob=torch.zeros(n), target_prob=torch.tensor(target_prob, dtype=torch.float64),
        prediction=torch.full((n,), int(value)).long(), steps=torch.full((n,), 10 * int(value) + 10).long(),
        recon_psnr=rows.clone(), seconds=torch.full((n,), float(value) + 1, dtype=torch.float64),
        losses={"total": rows.clone()}, localized=localized)


def test_take_better_replaces_only_where_the_retry_flipped_or_came_closer():
    out = _batch(["not_flipped", "flipped", "not_flipped", "not_flipped", "not_flipped"],
                 [0.3, 0.9, 0.3, 0.3, 0.3], 0.0)
    redo = [0, 2, 3, 4]
    # row 0: flipped; row 2: not flipped but closer; row 3: not flipped, further; row 4: diverged
    again = _batch(["flipped", "not_flipped", "not_flipped", "diverged"], [0.7, 0.4, 0.2, 0.9], 100.0)
    take, src = _take_better(out, redo, again)
    assert take.tolist() == [0, 2] and src.tolist() == [0, 1]
    assert out.status == ["flipped", "flipped", "not_flipped", "not_flipped", "not_flipped"]
    assert out.target_prob.tolist() == [0.7, 0.9, 0.4, 0.3, 0.3]
    assert out.images[:, 0, 0, 0].tolist() == [100.0, 1.0, 101.0, 3.0, 4.0]
    assert out.losses["total"].tolist() == out.recon_psnr.tolist() == [100.0, 1.0, 101.0, 3.0, 4.0]
    assert out.prediction.tolist() == [100, 0, 100, 0, 0]
    # both searches are counted on every row searched again, replaced or not
    assert out.steps.tolist() == [10 + 1010, 10, 10 + 1010, 10 + 1010, 10 + 1010]
    assert out.seconds.tolist() == [102.0, 1.0, 102.0, 102.0, 102.0]


def test_take_better_keeps_a_first_flip_much_smaller_than_the_retrys_however_confident():
    """``smaller=0.5``: a first flip whose change to the query is below half the retry's stays,
    however much more confident the retry's flip; a larger first flip, or a first attempt that did
    not flip, is replaced as without it."""
    query = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    out = _batch(["flipped", "flipped", "flipped", "not_flipped"], [0.6, 0.6, 0.6, 0.3], 0.0)
    out.images[:] = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(4, 1, 1, 1)  # changes 1 (squared)
    again = _batch(["flipped"] * 4, [0.99] * 4, 0.0)
    # the retry's changes: 4 (the first is under half: stays), 1.5 (not: replaced), 4 but not
    # flipped on row 2 (replaced only by a flip), 0.25 where the first did not flip
    again.images[:] = torch.tensor([2.0, 1.5 ** 0.5, 2.0, 0.5]).view(4, 1, 1, 1)
    again.status[2] = "not_flipped"
    take, src = _take_better(out, [0, 1, 2, 3], again, smaller=0.5, query=query)
    assert take.tolist() == [1, 3] and src.tolist() == [1, 3]
    assert out.target_prob.tolist() == [0.6, 0.99, 0.6, 0.99]
    # without it, the more confident flips replace rows 0 and 1
    out = _batch(["flipped", "flipped", "flipped", "not_flipped"], [0.6, 0.6, 0.6, 0.3], 0.0)
    assert _take_better(out, [0, 1, 2, 3], again)[0].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="smaller"):
        _take_better(out, [0], again.rows([0]), smaller=0.5)  # no query images to measure the change


def test_retry_plans_run_in_order_on_the_rows_still_not_flipped():
    out = _batch(["not_flipped", "flipped", "not_flipped", "not_flipped"], [0.3, 0.9, 0.3, 0.3], 0.0,
                 localized=torch.ones(4, dtype=torch.bool))
    asked = []

    def ungated(rows):  # flips its first row only; no gate (localized None)
        asked.append(("ungated", rows))
        return _batch(["flipped"] + ["not_flipped"] * (len(rows) - 1), [0.8] + [0.1] * (len(rows) - 1), 50.0)

    def other_prior(rows):  # gated: flips everything, the last one not localized
        asked.append(("fallback", rows))
        return _batch(["flipped"] * len(rows), [0.95] * len(rows), 70.0,
                      localized=torch.tensor([True] * (len(rows) - 1) + [False]))

    done = retry(out, [Retry("ungated", ungated), Retry("fallback", other_prior, flag="fallback"),
                       Retry("never", lambda rows: pytest.fail("nothing is left to retry"), flag="fallback")])
    assert done is out and asked == [("ungated", [0, 2, 3]), ("fallback", [2, 3])]
    assert out.status == ["flipped"] * 4
    assert out.localized.tolist() == [False, True, True, False]
    assert out.fallback.tolist() == [False, False, True, True]
    assert out.steps.tolist() == [10 + 510, 10, 10 + 510 + 710, 10 + 510 + 710]
    # a flag plan leaves its field set (all False) even when nothing was left for it
    assert retry(_batch(["flipped"], [0.9], 0.0), [Retry("x", None, flag="fallback")]).fallback.tolist() == [False]


def test_counterfactual_batch_rows():
    out = _batch(["flipped", "not_flipped", "diverged"], [0.9, 0.2, 0.1], 0.0, localized=torch.tensor([1, 0, 1]).bool())
    part = out.rows([2, 0])
    assert part.status == ["diverged", "flipped"] and part.localized.tolist() == [True, True]
    assert part.images[:, 0, 0, 0].tolist() == [2.0, 0.0] and part.losses["total"].tolist() == [2.0, 0.0]
    assert part.fallback is None and part.precision == out.precision


def _mixed_queries():
    """Three SpreadReader queries: the first is flipped by the gated search (it starts just past
    the margin), the other two need a change over the whole image, which the gate's area cost
    (lambda_area=500) forbids: only the ungated retry flips them."""
    x, t = analytic.patch_queries(3)
    x[0] += 0.0066
    return x, t


def _strict(**kw) -> InversionOptions:
    base = dict(space="iso", lambda_sem=10.0, lr=1e-3, recon_steps=0, target_margin=0.2, target_confidence=None,
                fallback=None,
                retry_hparams=(), stages=[Stage(["pixels"], 60, 5)], gate=GateOptions(lambda_area=500.0, fallback=True))
    base.update(kw)
    return InversionOptions(**base)


def test_prior_instance_query_the_gate_cannot_flip_is_retried_ungated(float64):
    model = SpreadReader()
    x, t = _mixed_queries()
    gated_only = _strict(gate=GateOptions(lambda_area=500.0, fallback=False))
    alone = generate_counterfactuals(model, x, t, prior=TVPrior(x, [0, 1, 2]), options=gated_only)
    assert alone.status == ["flipped", "not_flipped", "not_flipped"] and alone.localized.all()
    rescued = generate_counterfactuals(model, x, t, prior=TVPrior(x, [0, 1, 2]), options=_strict())
    assert rescued.status == ["flipped"] * 3
    assert rescued.localized.tolist() == [True, False, False]
    assert rescued.steps[0] == alone.steps[0] and (rescued.steps[1:] > alone.steps[1:]).all()
    assert torch.equal(rescued.images[0], alone.images[0])  # the flipped query is not searched again
    assert (rescued.losses["area"][1:] == 0).all()           # the kept images are the ungated ones
    # the same as with the prior by name (built again for the two queries retried)
    by_name = generate_counterfactuals(model, x, t, prior="tv", options=_strict())
    assert by_name.status == rescued.status and by_name.localized.tolist() == rescued.localized.tolist()
    assert torch.equal(by_name.steps, rescued.steps) and torch.equal(by_name.images, rescued.images)


def test_prior_instance_retry_starts_from_its_fitted_generators(float64, monkeypatch):
    """An INR instance: one reconstruction, restored for the ungated retry of the queries the gate
    could not flip; the result is that of the prior by name (per-query independence)."""
    model = SpreadReader()
    x, t = _mixed_queries()
    opts = _strict(lr=3e-3, recon_steps=20, stages=[Stage(["out"], 30, 3), Stage(["all"], 30, 3)])
    fits = []
    reconstruct = INRPrior.reconstruct
    monkeypatch.setattr(INRPrior, "reconstruct", lambda self, *a, **k: (fits.append(self.batch_size),
                                                                       reconstruct(self, *a, **k))[1])
    rescued = generate_counterfactuals(model, x, t, prior=build_prior("inr", x, [0, 1, 2], **SMALL_INR), options=opts)
    assert fits == [3] and rescued.localized.tolist() == [True, False, False]
    assert rescued.status == ["flipped"] * 3
    by_name = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR, options=opts)
    assert by_name.status == rescued.status and torch.equal(by_name.steps, rescued.steps)
    torch.testing.assert_close(rescued.images, by_name.images, atol=1e-9, rtol=0)
    assert torch.equal(rescued.recon_psnr, by_name.recon_psnr)


def test_both_second_chances_are_retry_plans(float64, monkeypatch):
    """The gate's ungated retry and the prior fallback go through the same ``retry``."""
    plans = []
    real = engine.retry
    monkeypatch.setattr(engine, "retry", lambda out, p: (plans.append([(r.name, r.flag) for r in p]), real(out, p))[1])
    model = SpreadReader()
    x, t = _mixed_queries()
    short = _strict(stages=[Stage(["pixels"], 10, 5)])
    generate_counterfactuals(model, x, t, prior="tv", options=short)
    generate_counterfactuals(model, x, t, prior="tv",
                             options=dataclasses.replace(short, fallback=PriorFallback("tv", short, name="tv")))
    # the ungated retry; the prior fallback, then its own run's ungated retry
    assert plans == [[("ungated", None)], [("tv", "fallback")], [("ungated", None)]]
