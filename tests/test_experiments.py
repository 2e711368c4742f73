"""Every paper experiment composes (run and evaluate, each dataset), its sweep names real options,
each has a README; the query corruptions of Figure 8 behave."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_cfg as compose_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disc_pl import run as run_lib
from disc_pl.data.corruptions import CORRUPTIONS, CorruptedDataset, check_corruption, corrupt, corrupted

CONF = Path(run_lib.CONF_DIR)
ROOT = CONF.parent
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(primary: str, overrides: list[str]):
    return compose_overrides(overrides, primary, hydra_config=True)


def test_the_paper_experiments_exist():
    assert set(EXPERIMENTS) >= {"table1", "fig4_iso_lso", "fig5_manifold", "fig6_dip_inr", "fig8_corruptions"}


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("dataset", ["synthetic_faces", "celeba", "isic2018"])
def test_experiment_composes_and_sweeps_real_options(name, dataset):
    # evaluate.yaml includes run.yaml, so this also covers `python -m disc_pl.run experiment=...`.
    if name == "shortcut" and dataset != "synthetic_faces":
        pytest.skip("the planted cue (dataset.shortcut) exists in the synthetic faces only")
    cfg = compose_cfg("evaluate", [f"experiment={name}", f"dataset={dataset}"])
    assert cfg.experiment_name == name
    assert cfg.dataset.name == dataset
    assert name in cfg.hydra.sweep.dir
    params = cfg.hydra.sweeper.params
    assert params, "an ablation sets hydra.sweeper.params"
    for key, values in params.items():
        options = [v.strip() for v in str(values).split(",")]
        assert len(options) > 1
        if (CONF / key).is_dir():  # a config group: every option is a file of the group
            assert all((CONF / key / f"{o}.yaml").exists() for o in options), (key, options)
        else:  # a config value: the key exists in the composed config
            parent, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            assert leaf in (OmegaConf.select(cfg, parent) if parent else cfg), key
        if key == "query.corruption.name":
            for option in options:
                check_corruption(None if option == "null" else option, 1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_readme_states_command_expectation_and_claims(name):
    readme = ROOT / "experiments" / name / "README.md"
    text = readme.read_text()
    assert f"experiment={name}" in text
    assert "python -m disc_pl.report" in text
    assert "Expected" in text or "expected" in text
    for claim in range(1, 6):
        assert f"Claim {claim}" in text, f"{readme} does not say how claim {claim} is judged"


def test_evaluate_config_includes_the_run_groups():
    cfg = compose_cfg("evaluate", ["prior=dip", "manifold=none", "space=iso", "cache_dir=/nonexistent"])
    assert (cfg.prior.name, cfg.manifold.name, cfg.space.name) == ("dip", "none", "iso")
    assert callable(instantiate(cfg.cd.recipe))  # the CD recipe builds (a train_fn)
    # An experiment's evaluate.* / cd.* values win over evaluate.yaml's defaults.
    table1 = compose_cfg("evaluate", ["experiment=table1"])
    assert table1.evaluate.queries is False and table1.cd.n_per_class == 64


# ----------------------------------------------------------------------------- corruptions
@pytest.fixture(scope="module")
def face():
    from disc_pl.data.synthetic import SyntheticFacesDataModule

    dm = SyntheticFacesDataModule(n_train=8, n_val=4, n_test=8, seed=0)
    dm.setup()
    return dm.dataset("test")[0]["image"]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_grows_with_severity_and_is_deterministic(name, face):
    assert torch.equal(corrupt(face, name, 0), face)
    change = [float((corrupt(face, name, s, seed=3) - face).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(change, change[1:])), change
    assert change[0] > 0
    again = corrupt(face, name, 3, seed=3)
    assert torch.equal(again, corrupt(face, name, 3, seed=3))
    assert again.shape == face.shape and again.min() >= 0 and again.max() <= 1


def test_corrupted_dataset_changes_only_the_image_and_validates(face):
    base = [{"image": face, "label": torch.tensor(0), "index": 0}]
    data = corrupted(base, {"name": "gaussian_noise", "severity": 2}, seed=1)
    assert isinstance(data, CorruptedDataset)
    item = data[0]
    assert item["label"] == 0 and item["index"] == 0 and not torch.equal(item["image"], face)
    assert corrupted(base, {"name": None, "severity": 3}) is base
    assert corrupted(base, {"name": "jpeg", "severity": 0}) is base
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupted(base, {"name": "fog", "severity": 2})
    with pytest.raises(ValueError, match="severity"):
        corrupted(base, {"name": "jpeg", "severity": 9})


TUNED = sorted(p.stem for p in (CONF / "tuned").glob("*.yaml"))


@pytest.mark.parametrize("name", TUNED)
def test_each_tuned_file_names_a_dataset_and_a_manifold(name):
    """conf/tuned/<dataset>_<manifold>.yaml is merged only where both names are options: a file
    whose name matches none (a typo) would be ignored without a word, so the suite refuses it."""
    pairs = {f"{d.stem}_{m.stem}" for d in (CONF / "dataset").glob("*.yaml") for m in (CONF / "manifold").glob("*.yaml")}
    assert name in pairs, f"conf/tuned/{name}.yaml matches no <dataset>_<manifold> pair"


@pytest.mark.parametrize("primary", ["run", "evaluate"])
def test_tuned_settings_reach_their_pair_only_and_the_command_line_wins(primary):
    """Fashion-MNIST with the robust manifold gets every tuned value (the weight and the robust
    models' recipe), the faces keep the manifold's own values, another manifold on Fashion-MNIST is
    untouched, and a value given on the command line still decides; `~tuned` drops the file."""
    own = OmegaConf.load(CONF / "manifold" / "robust.yaml")
    tuned = OmegaConf.load(CONF / "tuned" / "fashion_mnist_robust.yaml").manifold
    keys = [("weight",)] + [("recipe", k) for k in tuned.recipe]

    def values(manifold):
        return [OmegaConf.select(manifold, ".".join(k)) for k in keys]

    expected = values(OmegaConf.merge(own, tuned))
    assert all(a != b for a, b in zip(values(own), expected))  # else the test cannot tell them apart
    for overrides, want in (
            ([], values(own)),
            (["dataset=fashion_mnist"], expected),
            (["experiment=validity_fmnist"], expected),
            (["experiment=validity_fmnist", "manifold.weight=1.5", "manifold.recipe.eps=0.2"],
             [1.5 if k == ("weight",) else 0.2 if k == ("recipe", "eps") else v for k, v in zip(keys, expected)])):
        cfg = compose_overrides(overrides, primary)
        assert cfg.manifold.name == "robust"
        assert values(cfg.manifold) == want, overrides
    dropped = compose_overrides(["dataset=fashion_mnist", "~tuned"], primary).manifold
    assert values(dropped) == values(own)
    surrogates = compose_overrides(["dataset=fashion_mnist", "manifold=surrogates"], primary).manifold
    assert surrogates.weight == OmegaConf.load(CONF / "manifold" / "surrogates.yaml").weight
