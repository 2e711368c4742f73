"""The localization gate (cf/gate.py): the change collects where the classifier reads the class."""
from __future__ import annotations

import dataclasses

import analytic
import pytest
import torch
from analytic import PatchReader, SpreadReader

from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals
from disc_pl.cf.objective import default_objective
from disc_pl.cf.gate import GateOptions, SpatialGate
from disc_pl.cf.losses import DEPManifold
from disc_pl.errors import ConfigError
from disc_pl.metrics import functional as M

SMALL_INR = dict(n_frequencies=64, sigma=3.0, first_omega0=3.0, hidden=64, depth=2)


def test_gate_mask_starts_at_init_and_blends_query_and_candidate():
    gate = SpatialGate(2, 4, (8, 8), init=-3.0)
    m = gate.mask()
    assert m.shape == (2, 1, 8, 8)
    torch.testing.assert_close(m, torch.full_like(m, 1 / (1 + torch.e**3)))
    q, c = torch.full((2, 3, 8, 8), 0.2), torch.full((2, 3, 8, 8), 0.6)
    with torch.no_grad():
        gate.logits[1] = 0.0  # half open
    x, m = gate.apply(q[1:], c[1:], torch.tensor([1]))
    torch.testing.assert_close(x, torch.full((1, 3, 8, 8), 0.4))
    with pytest.raises(ValueError, match="finer than the 8x8 image"):
        SpatialGate(1, 9, (8, 8))
    with pytest.raises(ValueError, match="must be >= 1"):
        SpatialGate(1, 0, (8, 8))


def _in_patch(model, x, x_cf) -> torch.Tensor:
    change = (x_cf - x).abs().sum(1, keepdim=True)
    return (change * model.patch).flatten(1).sum(1) / change.flatten(1).sum(1)


@pytest.fixture(scope="module")
def patch_queries():
    return analytic.patch_queries(4)


def _gate(grid: int) -> GateOptions | None:
    return GateOptions(grid=grid, lambda_area=50.0, fallback=True) if grid else None


def _opts(grid: int) -> InversionOptions:
    # Adam moves every free pixel at the same rate, so the ungated change covers the image
    # evenly; the gate has to learn where to open before the query flips (small lr).
    return InversionOptions(space="iso", lambda_sem=10.0, lr=1e-3, recon_steps=0, target_margin=0.2,
                            target_confidence=None, fallback=None,
                            retry_hparams=(), stages=[Stage(["pixels"], 300, 5)], gate=_gate(grid))


def test_gate_moves_the_change_onto_the_evidence(patch_queries):
    model = PatchReader()
    x, t = patch_queries
    free = generate_counterfactuals(model, x, t, prior="tv", options=_opts(0))
    gated = generate_counterfactuals(model, x, t, prior="tv", options=_opts(8))
    assert free.status == gated.status == ["flipped"] * 4
    free_in, gated_in = _in_patch(model, x, free.images), _in_patch(model, x, gated.images)
    assert free_in.max() < 0.2                      # the paper's objective spreads the change
    assert gated_in.min() > 0.85, gated_in          # the gate puts it on the patch
    assert (gated.losses["area"] < 0.2).all()       # and stays mostly closed
    assert (free.losses["area"] == 0).all() and free.localized is None and gated.localized.all()


def test_gate_localizes_inr_dep_counterfactuals_on_the_mouth(faces, toy_classifier, toy_queries):
    """On the synthetic faces (true masks) the gate raises the share of the change on the mouth."""
    images, targets, idx = toy_queries
    images, targets, idx = images[:6], targets[:6], idx[:6]
    _, mask = faces.ground_truth("test", idx)
    results = {}
    for grid in (0, 8):
        opts = InversionOptions(lr=3e-3, recon_steps=150, psnr_target=30.0, target_margin=0.2,
                                target_confidence=None, fallback=None,
                                retry_hparams=(), lambda_sem=1.0, lambda_mc=0.3, gate=_gate(grid),
                                stages=[Stage(["out"], 60, 5), Stage(["hidden1", "out"], 60, 5),
                                        Stage(["all"], 80, 5)])
        out = generate_counterfactuals(toy_classifier, images, targets, prior="inr", prior_hparams=SMALL_INR,
                                       manifold=DEPManifold(toy_classifier), options=opts,
                                       seeds=list(range(len(images))))
        assert sum(s == "flipped" for s in out.status) >= 5, out.status
        results[grid] = float(M.in_mask_fraction(images, out.images, mask).nanmean())
    # For any toy classifier of the recipe (DISC_PL_TEST_SEED=0..2: 0.46-0.8 with the gate, 0.1-0.2
    # without), the gate at least doubles the share and adds a quarter of the change on the mouth.
    assert results[8] > 2 * results[0] and results[8] > results[0] + 0.25, results


def test_query_the_gate_cannot_flip_falls_back_to_the_paper_objective(patch_queries):
    model = SpreadReader()
    x, t = patch_queries
    x, t = x[:2], t[:2]
    strict = dataclasses.replace(_opts(8), gate=GateOptions(lambda_area=500.0, fallback=True),
                                 stages=[Stage(["pixels"], 60, 5)])
    # off by default: the query is reported not flipped, with its closest localized attempt
    alone = generate_counterfactuals(model, x, t, prior="tv",
                                     options=dataclasses.replace(strict, gate=GateOptions(lambda_area=500.0)))
    assert alone.status == ["not_flipped"] * 2 and alone.localized.all()
    rescued = generate_counterfactuals(model, x, t, prior="tv", options=strict)
    assert rescued.status == ["flipped"] * 2 and not rescued.localized.any()
    assert (rescued.steps > alone.steps).all()        # both searches are counted
    assert (rescued.losses["area"] == 0).all()        # the kept image is the ungated one
    with torch.no_grad():
        p = torch.softmax(model(rescued.images), 1)[:, 1]
    torch.testing.assert_close(p, rescued.target_prob)


def test_fallback_reuses_the_reconstruction(patch_queries, monkeypatch):
    """The ungated second search starts from the generators the first pass fitted (the fit does
    not depend on the gate): one reconstruction per query, and the rescued counterfactuals are
    exactly those of an ungated run."""
    from disc_pl.cf.priors import INRPrior

    model = SpreadReader()
    x, t = patch_queries
    x, t = x[:2], t[:2]
    strict = dataclasses.replace(_opts(8), gate=GateOptions(lambda_area=500.0, fallback=True), recon_steps=20, lr=3e-3,
                                 stages=[Stage(["out"], 30, 3), Stage(["all"], 30, 3)])
    fits = []
    reconstruct = INRPrior.reconstruct
    monkeypatch.setattr(INRPrior, "reconstruct", lambda self, *a, **k: (fits.append(self.batch_size),
                                                                       reconstruct(self, *a, **k))[1])
    rescued = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR, options=strict)
    assert not rescued.localized.any() and fits == [2]  # both redone, one fit
    ungated = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR,
                                       options=dataclasses.replace(strict, gate=None))
    assert rescued.status == ungated.status
    assert torch.equal(rescued.images, ungated.images)
    assert torch.equal(rescued.recon_psnr, ungated.recon_psnr)


class _RegionReader(PatchReader):
    """A guiding model that reads one region (``rows``, ``cols`` slices) and nothing else."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.w.fill_(0.0)
        self.w[..., rows, cols] = 1.0
        self.w /= self.w.sum()
        self.patch = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
        self.patch[..., rows, cols] = True


def _MirrorReader() -> _RegionReader:
    """Reads the patch's mirror image (cols 16:24): like robust models trained with mirrored
    images on a classifier that never saw a mirror."""
    return _RegionReader(slice(20, 28), slice(16, 24))


@pytest.mark.parametrize("opened_by", ["all", "explained"])
def test_only_the_explained_classifier_opens_the_gate_when_told(patch_queries, opened_by):
    """``opened_by=explained``: a guiding model (robust / surrogate term) that rewards a change
    where the explained classifier does not look shapes nothing there; with ``all`` it opens the
    gate on its own region and takes a large share of the change."""
    from disc_pl.cf.losses import RobustManifoldLoss

    model, guide = PatchReader(), _MirrorReader()
    x, t = patch_queries
    opts = dataclasses.replace(_opts(8), gate=GateOptions(grid=8, lambda_area=50.0, opened_by=opened_by))
    out = generate_counterfactuals(model, x, t, prior="tv", manifold=RobustManifoldLoss([guide], None, weight=1.0),
                                   options=opts)
    assert out.status == ["flipped"] * 4
    on_guide, on_model = _in_patch(guide, x, out.images), _in_patch(model, x, out.images)
    if opened_by == "explained":
        assert on_guide.max() < 0.05 and on_model.min() > 0.9, (on_guide, on_model)
    else:
        assert on_guide.min() > 0.25, on_guide
    assert torch.isfinite(out.losses["robust"]).all()  # the guide's term is evaluated either way


def test_opened_by_is_checked():
    with pytest.raises(ConfigError, match="localize.opened_by"):
        GateOptions(opened_by="robust")


def test_main_region_is_the_connected_group_of_cells_holding_the_most_change():
    from disc_pl.cf.gate import cell_change, main_region

    q = torch.zeros(2, 3, 8, 8)
    x = q.clone()
    x[0, 0, 0:2, 0:4] = 1.0   # cells (0,0), (0,1): 4 + 4 = 8
    x[0, 1, 2:4, 4:6] = 0.5   # cell (1,2), diagonal to (0,1): 8-connected, 4 x 0.5 = 2
    x[0, 2, 6:8, 6:8] = 1.0   # cell (3,3), apart: 4
    change = cell_change(q, x, 4)
    torch.testing.assert_close(change[0], torch.tensor([[4.0, 4.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 0], [0, 0, 0, 4.0]]))
    region, outside = main_region(change)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[0, 1] = expected[1, 2] = True
    assert torch.equal(region[0, 0], expected)
    torch.testing.assert_close(outside, torch.tensor([4.0 / 14.0, 0.0]))  # query 1: no change at all
    assert not region[1].any()
    # a cell under open_share of the largest is not part of any group
    region, outside = main_region(change, open_share=0.6)
    assert region[0, 0].sum() == 2 and abs(float(outside[0]) - 6.0 / 14.0) < 1e-6


def test_gate_mask_is_zero_outside_the_allowed_cells():
    allowed = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    allowed[0, 0, 1, 2] = True
    allowed[1] = True
    gate = SpatialGate(2, 4, (8, 8), init=0.0, allowed=allowed)
    m = gate.mask()
    assert torch.equal(m[0, 0] > 0, torch.kron(allowed[0, 0], torch.ones(2, 2, dtype=torch.bool)))
    torch.testing.assert_close(m[1], torch.full((1, 8, 8), 0.5))
    torch.testing.assert_close(gate.mask(torch.tensor([1])), m[1:])
    with pytest.raises(ValueError, match="do not match the gate"):
        SpatialGate(2, 4, (8, 8), allowed=allowed[:1])


def _FarReader() -> _RegionReader:
    """Reads a far corner (rows 0:8, cols 24:32)."""
    return _RegionReader(slice(0, 8), slice(24, 32))


def test_a_scattered_change_is_searched_again_in_its_main_region():
    """``InversionOptions.refine``: a guiding model pulls part of the change to a far corner the explained
    classifier barely reads; the confined search redraws it on the explained reader's patch alone,
    and a query whose change was one region already is returned as without ``refine``."""
    from disc_pl.cf.losses import RobustManifoldLoss

    model, guide = PatchReader(), _FarReader()
    x, t = analytic.patch_queries(3)
    manifold = RobustManifoldLoss([guide], None, weight=1.0)
    base = dataclasses.replace(_opts(8), gate=GateOptions(grid=8, lambda_area=50.0))
    first = generate_counterfactuals(model, x, t, prior="tv", manifold=manifold, options=base)
    assert first.status == ["flipped"] * 3 and first.refined is None
    assert _in_patch(guide, x, first.images).min() > 0.2        # scattered: two places
    refined = dataclasses.replace(base, refine=0.2)
    out = generate_counterfactuals(model, x, t, prior="tv", manifold=manifold, options=refined)
    assert out.status == ["flipped"] * 3 and out.refined.all()
    assert _in_patch(model, x, out.images).min() > 0.9 and _in_patch(guide, x, out.images).max() < 0.01
    assert (out.steps > first.steps).all()                        # both searches are counted
    # a Prior instance (restored to its fitted state, only the rows confined active) gives the same
    from disc_pl.cf.priors import TVPrior

    inst = generate_counterfactuals(model, x, t, prior=TVPrior(x, [0, 1, 2]), manifold=manifold, options=refined)
    assert inst.status == out.status and torch.equal(inst.refined, out.refined)
    torch.testing.assert_close(inst.images, out.images)
    # without the guide the change is one region: nothing is searched again, the results are equal
    alone = generate_counterfactuals(model, x, t, prior="tv", options=base)
    alone_refined = generate_counterfactuals(model, x, t, prior="tv", options=refined)
    assert not alone_refined.refined.any()
    assert torch.equal(alone.images, alone_refined.images) and torch.equal(alone.steps, alone_refined.steps)


def test_refine_is_checked_and_set_per_prior():
    for bad in (0.0, 1.0, "yes"):
        with pytest.raises(ConfigError, match="inversion.refine"):
            InversionOptions(refine=bad)
    # the INR's confined search is on, the warp's off; the default fallback (the INR) inherits it
    assert InversionOptions.for_prior("inr").refine == 0.2 and InversionOptions().refine is None
    assert InversionOptions().fallback.options_for(InversionOptions()).refine == 0.2


def test_a_query_left_unflipped_is_searched_again_away_from_where_it_failed():
    """``InversionOptions.retry_elsewhere``: a query the search leaves unflipped is searched again
    with the gate closed over its attempt's main region (grown by one cell); the image kept there
    has no change on those cells, and a run without it differs only by that second search."""
    from disc_pl.cf.gate import cell_change, main_region

    model = PatchReader()
    x, t = analytic.patch_queries(2)
    short = dataclasses.replace(_opts(8), stages=[Stage(["pixels"], 8, 2)], gate=GateOptions(grid=8, lambda_area=50.0))
    first = generate_counterfactuals(model, x, t, prior="tv", options=short)
    assert first.status == ["not_flipped"] * 2 and first.refined is None
    region, _ = main_region(cell_change(x, first.images, 8))
    assert region.any(dim=(1, 2, 3)).all()
    closed = torch.nn.functional.max_pool2d(region.float(), 3, 1, 1).bool()
    out = generate_counterfactuals(model, x, t, prior="tv", options=dataclasses.replace(short, retry_elsewhere=True))
    assert (out.steps == 2 * first.steps).all()                     # every query was searched twice
    assert (out.target_prob >= first.target_prob).all()            # kept where it came closer
    for i in range(2):
        if out.refined[i]:
            on_closed = cell_change(x[i:i + 1], out.images[i:i + 1], 8)[0][closed[i, 0]]
            assert float(on_closed.abs().max()) == 0.0
        else:
            assert torch.equal(out.images[i], first.images[i])
    # the plan itself: an attempt whose change sits in the far corner is searched again with that
    # corner (grown by one cell) closed, and the new change lands on the patch the model reads
    from disc_pl.cf.search import Search, Setting

    opts = dataclasses.replace(_opts(8), gate=GateOptions(grid=8, lambda_area=50.0), retry_elsewhere=True)
    search = Search(model, x, t, [0, 1], opts, Setting("tv", None, None, default_objective(opts)), snapshot=True)
    attempt = search.run()
    attempt.status = ["not_flipped", "flipped"]
    attempt.images = x.clone()
    attempt.images[0, :, 0:8, 24:32] += 0.3                         # the failed attempt: the far corner
    plan = search.elsewhere_retry()
    assert plan.select(attempt) == [0]                              # flipped rows are left alone
    again = plan.search([0])
    change = (again.images[0] - x[0]).abs().sum(0)
    assert float(change[0:12, 20:32].max()) == 0.0                  # the corner's cells and one more
    assert again.status == ["flipped"] and _in_patch(model, x[:1], again.images).item() > 0.85
    with pytest.raises(ConfigError, match="inversion.retry_elsewhere"):
        InversionOptions(retry_elsewhere="yes")
    assert InversionOptions.for_prior("inr").retry_elsewhere and not InversionOptions().retry_elsewhere
