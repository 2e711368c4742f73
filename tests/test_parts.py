"""The config groups space, manifold and localize each build one object (hydra.utils.instantiate);
behaviour comes from the object, its constructor checks its own options, and the run's
InversionOptions carries what the objects say (not what their names are)."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from disc_pl.cf.gate import GateOptions
from disc_pl.cf.objective import default_objective
from disc_pl.cf.engine import InversionOptions, PriorFallback
from disc_pl.cf.losses import (DEP, DUQ, DEPManifold, DUQManifold, LatentSpace, NoManifold, PixelSpace,
                               SurrogateManifold, Surrogates)
from disc_pl.errors import ConfigError
from disc_pl.job import inversion_options

from conftest import compose_cfg


@pytest.mark.parametrize("override, kind", [
    ("space=lso", LatentSpace), ("space=iso", PixelSpace), ("manifold=dep", DEP), ("manifold=duq", DUQ),
    ("manifold=none", NoManifold), ("manifold=surrogates", Surrogates), ("localize=gate", GateOptions),
    ("localize=none", type(None))])
def test_each_shipped_option_builds_its_object(override, kind):
    group = override.split("=")[0]
    assert isinstance(instantiate(compose_cfg([override])[group]), kind)


def test_command_line_overrides_reach_the_objects_and_the_options():
    cfg = compose_cfg(["prior=inr", "manifold=duq", "manifold.lambda_mc=0.3", "manifold.margin=0.2", "space.lambda_sem=2.5",
                       "space.layers=[1,3]", "localize.grid=4", "localize.fallback=false", "localize.lambda_area=7",
                       "inversion.target_confidence=0.99", "term=[eot,palette]", "term.eot.views=2",
                       "term.eot.hflip=true"])
    options, _ = inversion_options(cfg)
    assert options.target_confidence == 0.99 and [t.name for t in options.terms] == ["eot", "palette"]
    assert options.terms[0].views == 2 and options.terms[0].hflip is True
    assert options.lambda_mc == 0.3 and options.lambda_sem == 2.5
    assert isinstance(options.space, LatentSpace) and options.space.layers == (1, 3)
    assert options.gate == GateOptions(grid=4, fallback=False, lambda_area=7.0)
    assert instantiate(cfg.manifold).margin == 0.2
    assert inversion_options(compose_cfg(["localize=none", "space=iso"]))[0].gate is None


def test_prior_fallback_runs_with_the_fallback_priors_own_schedule_and_the_rest_of_the_options():
    """prior=warp composes conf/prior/inr.yaml at prior.fallback (Hydra): the fallback's lr,
    stages and generator are the INR's, overridable on the command line (prior.fallback.lr);
    every other option (gate, lambdas, confidence) is the run's; prior.fallback=null: None."""
    cfg = compose_cfg(["prior=warp", "space.lambda_sem=0.5", "inversion.target_confidence=0.99",
                       "prior.fallback.lr=0.004", "prior.fallback.hparams.hidden=32", "prior.fallback_below=0.9",
                       "prior.fallback_keep_smaller=0.25"])
    options, factory = inversion_options(cfg)
    inr = compose_cfg(["prior=inr"])
    fb = options.fallback
    assert fb.name == "inr" and fb.options.fallback is None
    assert fb.below == 0.9 and fb.keep_smaller == 0.25
    with pytest.raises(ConfigError, match="fallback_keep_smaller"):
        inversion_options(compose_cfg(["prior=warp", "prior.fallback_keep_smaller=0"]))
    assert fb.options.lr == 0.004 and [s.groups for s in fb.options.stages] == [list(g) for g in inr.prior.stages]
    assert fb.options.recon_steps == inr.prior.recon.max_steps
    assert fb.options.lambda_sem == 0.5 and fb.options.target_confidence == 0.99
    assert fb.options.gate == options.gate
    generator, default = (f(torch.rand(1, 3, 32, 32), [0]) for f in (fb.prior, instantiate(inr.prior.hparams)))
    size = [sum(p.numel() for p in g.parameters()) for g in (generator, default)]
    assert type(generator).__name__ == "INRPrior" and size[0] < size[1]  # hidden 32, not 128
    assert type(factory(torch.rand(1, 3, 32, 32), [0])).__name__ == "WarpPrior"
    assert inversion_options(compose_cfg(["prior=warp", "prior.fallback=null"]))[0].fallback is None
    assert inversion_options(compose_cfg(["prior=inr"]))[0].fallback is None
    other = inversion_options(compose_cfg(["prior=tv", "+prior@prior.fallback=dip"]))[0].fallback
    assert other.name == "dip" and other.options.lr == compose_cfg(["prior=dip"]).prior.lr


def test_the_semantic_weight_defaults_to_the_priors_own_and_the_fallback_keeps_its_own():
    """lambda1 = space.lambda_sem, whose default is the prior's prior.lambda_sem (warp: 0.6; the
    others have none: 1.0). The fallback prior runs with its own (the INR: 1.0), not the warp's;
    set on the command line, space.lambda_sem wins for the run and its fallback's."""
    options, _ = inversion_options(compose_cfg(["prior=warp"]))
    assert options.lambda_sem == 0.6 and options.fallback.options.lambda_sem == 1.0
    options, _ = inversion_options(compose_cfg(["prior=warp", "prior.lambda_sem=0.25"]))
    assert options.lambda_sem == 0.25 and options.fallback.options.lambda_sem == 1.0
    own = inversion_options(compose_cfg(["prior=warp", "+prior.fallback.lambda_sem=3.0"]))[0]
    assert own.fallback.options.lambda_sem == 3.0
    options, _ = inversion_options(compose_cfg(["prior=warp", "space.lambda_sem=2.0"]))
    assert options.lambda_sem == 2.0 and options.fallback.options.lambda_sem == 2.0
    programmatic = PriorFallback("inr", below=0.95).options_for(InversionOptions(lambda_sem=0.6))
    assert programmatic.lambda_sem == 1.0 and programmatic.lr == compose_cfg(["prior=inr"]).prior.lr
    assert inversion_options(compose_cfg(["prior=inr"]))[0].lambda_sem == 1.0
    assert inversion_options(compose_cfg(["prior=inr", "space=iso"]))[0].lambda_sem == 1.0


def test_the_prior_config_sets_each_stage_grid():
    def sizes(overrides):
        return [s.size for s in inversion_options(compose_cfg(["prior=inr", *overrides]))[0].stages]
    assert sizes([]) == [48, 48, None]  # early_size: every stage but the last
    assert sizes(["prior.stages=[[out],[all]]"]) == [48, None]  # follows the number of stages
    assert sizes(["prior.early_size=null"]) == [None, None, None]
    assert sizes(["prior.early_size=null", "prior.sizes=[32,48,null]"]) == [32, 48, None]
    with pytest.raises(ValueError, match="set one"):
        sizes(["prior.sizes=[32,48,null]"])


@pytest.mark.parametrize("build, key", [
    (lambda: GateOptions(grid=0), "localize.grid"), (lambda: GateOptions(lr=0.0), "localize.lr"),
    (lambda: GateOptions(fallback="yes"), "localize.fallback"), (lambda: LatentSpace(layers=[]), "space.layers"),
    (lambda: PixelSpace(lambda_sem=-1.0), "space.lambda_sem"), (lambda: DUQ(margin=-0.5), "manifold.margin"),
    (lambda: DEP(lambda_mc=float("nan")), "manifold.lambda_mc")])
def test_each_part_checks_its_own_options(build, key):
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key and "must" in info.value.allowed


def test_all_problems_of_one_part_are_reported_together():
    with pytest.raises(ConfigError) as info:
        GateOptions(grid=-1, lambda_area=-2.0)
    assert [p.key for p in info.value.problems] == ["localize.grid", "localize.lambda_area"]


class _WithDEP(nn.Module):
    has_loss_predictor = True

    def __init__(self) -> None:
        super().__init__()
        self.dep_target = torch.tensor(0.5)


def test_manifold_factories_build_their_model_and_load_duq_only_when_needed():
    calls = []

    def load_duq():
        calls.append(1)
        return nn.Identity()

    clf = _WithDEP()
    assert NoManifold()(clf, load_duq) is None
    dep = DEP(lambda_mc=0.1)(clf, load_duq)
    assert isinstance(dep, DEPManifold) and dep.target_level == 0.5 and not calls
    duq = DUQ(margin=0.25)(clf, load_duq)
    assert isinstance(duq, DUQManifold) and duq.margin == 0.25 and calls == [1]
    assert (DEP.needs_dep, DUQ.needs_duq, NoManifold.needs_dep, NoManifold.needs_duq) == (True, True, False, False)


def test_surrogate_manifold_is_the_weighted_mean_cross_entropy_of_its_surrogates_plus_dep():
    import torch.nn.functional as F

    loaded = []

    def load_surrogate(i):
        loaded.append(i)
        lin = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]) * (i + 1))
        return nn.Sequential(nn.Flatten(), lin)

    class _Predictor(_WithDEP):
        def predict_loss(self, feats):
            return feats[0]

    clf = _Predictor()
    made = Surrogates(k=2, weight=3.0)(clf, None, load_surrogate)
    assert isinstance(made, SurrogateManifold) and loaded == [0, 1] and made.dep is not None
    x = torch.tensor([[[[0.2, 0.7], [0.0, 0.0]]], [[[0.9, 0.1], [0.0, 0.0]]]])  # [2, 1, 2, 2]
    target = torch.tensor([1, 1])
    s_hat = torch.tensor([0.8, 0.1])
    logits = [x.flatten(1)[:, :2] * (i + 1) for i in range(2)]  # what each surrogate computes
    ce = (F.cross_entropy(logits[0], target, reduction="none") + F.cross_entropy(logits[1], target, reduction="none")) / 2
    # the manifold term is the explained classifier's DEP; the surrogates' mean CE is their own term
    torch.testing.assert_close(made(x, None, [s_hat], target * 0, target), (s_hat - 0.5).abs())
    torch.testing.assert_close(made.ensemble_loss(x, target), ce)
    alone = Surrogates(k=2, weight=3.0, dep=False)(clf, None, load_surrogate)
    torch.testing.assert_close(alone(x, None, [s_hat], target * 0, target), torch.zeros(2))
    terms = {t.name: t for t in default_objective(InversionOptions(), made)}
    assert terms["manifold"].weight == 0.1 and terms["surrogates"].weight == 3.0  # two weights, not a product
    assert Surrogates(k=3).needs_surrogates == 3 and Surrogates(dep=False).needs_dep is False
    with pytest.raises(ConfigError, match="k"):
        Surrogates(k=0)
    with pytest.raises(ValueError, match="load_surrogate"):
        Surrogates()(clf, None)


def test_a_space_checks_the_feature_maps_it_reads():
    LatentSpace(layers=[0, 3]).check_feature_maps(4)
    PixelSpace().check_feature_maps(0)  # pixels: no feature map needed
    with pytest.raises(ConfigError, match="exposes 4 feature maps"):
        LatentSpace(layers=[4]).check_feature_maps(4)
