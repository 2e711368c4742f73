"""One place for every default (issue 30): the Python API's defaults are what ``python -m
disc_pl.run`` composes from conf/, field by field, so a user of either gets the same method."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from conftest import compose_cfg
from disc_pl.cf.engine import InversionOptions, generate_counterfactuals
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.losses import semantic_space
from disc_pl.job import inversion_options
from disc_pl.utils import CONF_DIR

PRIORS = sorted(p.stem for p in (Path(CONF_DIR) / "prior").glob("*.yaml"))


def _same_options(api: InversionOptions, run: InversionOptions) -> None:
    """Every field equal; the semantic space (a name in the API, an object in the run) by kind
    and layers; the fallback by name and by the options of its run."""
    for field in dataclasses.fields(InversionOptions):
        mine, theirs = getattr(api, field.name), getattr(run, field.name)
        if field.name == "space":
            built = semantic_space(mine, api.layers)
            assert type(built) is type(theirs) and getattr(built, "layers", None) == getattr(theirs, "layers", None)
        elif field.name == "fallback":
            assert (mine is None) == (theirs is None), "fallback"
            if mine is not None:
                assert (mine.name, mine.below, mine.keep_smaller) == (theirs.name, theirs.below, theirs.keep_smaller), \
                    "fallback name / below / keep_smaller"
                _same_options(mine.options_for(api), theirs.options_for(run))
        else:
            assert mine == theirs, f"InversionOptions().{field.name}={mine!r} but disc_pl.run builds {theirs!r}"


def test_inversion_options_defaults_are_the_runs():
    run, _ = inversion_options(compose_cfg([]))
    _same_options(InversionOptions(), run)
    assert InversionOptions().fallback is not None and InversionOptions().gate == GateOptions()
    default_prior = inspect.signature(generate_counterfactuals).parameters["prior"].default
    assert default_prior == compose_cfg([]).prior.name


@pytest.mark.parametrize("prior", PRIORS)
def test_each_priors_options_are_the_runs(prior):
    _same_options(InversionOptions.for_prior(prior), inversion_options(compose_cfg([f"prior={prior}"]))[0])


def test_gate_defaults_are_the_gate_groups():
    assert GateOptions() == instantiate(compose_cfg(["localize=gate"]).localize)


def _signature_defaults(target: str) -> dict:
    fn = get_method(target)
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _option_nodes():
    """(label, node) for every option of the groups whose yaml builds an object: the class's
    own defaults must be the yaml's values."""
    for group in ("space", "manifold", "localize", "term"):
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            node = compose_cfg([f"{group}={path.stem}" if group != "term" else f"term=[{path.stem}]",
                                "prior=inr"])  # prior=inr: the semantic weight's plain default
            node = node[group] if group != "term" else node.term[path.stem]
            if "_target_" in node:
                yield f"{group}={path.stem}", node
    for prior in PRIORS:
        yield f"prior={prior}", compose_cfg([f"prior={prior}"]).prior.hparams


@pytest.mark.parametrize("label, node", list(_option_nodes()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_objects_defaults_are_its_yamls(label, node):
    values = OmegaConf.to_container(node, resolve=True)
    defaults = _signature_defaults(values.pop("_target_"))
    values.pop("_partial_", None)
    values.pop("name", None)  # a label
    differ = {k: (defaults[k], v) for k, v in values.items()
              if k in defaults and not (defaults[k] == v or (isinstance(defaults[k], tuple) and list(defaults[k]) == v))}
    assert not differ, f"{label}: class default != yaml value for {differ}"
