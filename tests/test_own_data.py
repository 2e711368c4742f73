"""Your own classifier and images (issue 29, parts 1-2).

- A bring-your-own classifier gets manifold=surrogates: its surrogate classifiers are trained by
  disc_pl's own recipe (conf/model/classifier.yaml) on the dataset's training images, cached,
  and metrics.json says so (``manifold/surrogates_recipe``).
- ``dataset=folder`` judges with no extra flags (a reserved ``judge_fraction`` of the folder that
  a classifier trained by disc_pl skips), or on a second folder (``judge.root``) for a classifier
  trained elsewhere; the two stay disjoint and their class names must match.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import FAST_TV, TEST_SEED, compose_cfg
from hardening_support import entries
from own_images import make_own_folder

from disc_pl import evaluate as evaluate_lib
from disc_pl import run as run_lib
from disc_pl.errors import ConfigError
from disc_pl.job import surrogate_recipe, surrogates_provenance
from disc_pl.models.judge import judge_datamodule
from disc_pl.utils import CONF_DIR
from disc_pl.validate import validate_with_data

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models on one thread (conftest.py)

# A toy folder run: 16 px images, a tiny schedule, two queries.
FOLDER = ["dataset=folder", "dataset.image_size=16", "dataset.num_workers=0", "dataset.batch_size=8",
          "trainer.enable_progress_bar=false", "logger=none", *FAST_TV, "query.count=2",
          "query.require_correct=false", f"seed={TEST_SEED}"]
# disc_pl's own classifier at toy size (the explained one when it is not byo)
TOY_CLASSIFIER = ["models.classifier.width=8", "models.classifier.fit.trainer.max_epochs=1"]
# judges at toy size, on by default in disc_pl.evaluate; no classifier discrepancy
TOY_JUDGES = ["cd.enabled=false", "judge.k=2", "judge.epochs=1", "judge.width=4", "judge.robust.k=0",
              "judge.realism.epochs=1", "judge.realism.max_per_class=20", "validity.pgd.steps=2",
              "validity.cout_steps=4", "manifold=dep"]


def _byo(tmp_path: Path) -> list[str]:
    """A user's torchvision ResNet-18 (state dict) as the explained classifier."""
    torch.manual_seed(TEST_SEED)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "weights.pt")
    return ["model@models.classifier=byo", f"models.classifier.path={tmp_path / 'weights.pt'}",
            "models.classifier.posthoc_dep.epochs=3"]


def _config(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) if path.suffix == ".yaml" else json.loads(path.read_text())


# ------------------------------------------------------------------ part 1: byo + surrogates
def test_byo_classifier_runs_the_default_method_with_disc_pl_surrogates(tmp_path):
    root = make_own_folder(tmp_path / "imgs", per_class=20, seed=TEST_SEED)
    cache = tmp_path / "cache"
    overrides = [*FOLDER, f"dataset.root={root}", *_byo(tmp_path), "manifold=surrogates", "manifold.k=2",
                 f"cache_dir={cache}"]
    metrics = run_lib.run(compose_cfg(overrides), out_dir=tmp_path / "out")
    assert metrics["cf/queries"] == 2
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["manifold/surrogates_recipe"] == "disc_pl"

    found = entries(cache)
    surrogates = [e for e in found if e.startswith("classifier-")]
    assert len(surrogates) == 2 and len([e for e in found if e.startswith("byo-")]) == 1  # + the post-hoc DEP head
    recipe = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "classifier.yaml"))
    seeds = set()
    for entry in surrogates:
        stored = _config(cache / entry / "config.yaml")
        assert stored["model"] == recipe  # disc_pl's recipe, not the user's model
        assert stored["dataset"]["root"] == str(root) and stored["dataset"]["role"] == "explained"
        seeds.add(stored["seed"])
    assert seeds == {TEST_SEED + 1000, TEST_SEED + 2000}

    # a second run reuses them: nothing new is trained
    run_lib.run(compose_cfg(overrides), out_dir=tmp_path / "again")
    assert entries(cache) == found


def test_surrogate_recipe_and_its_record():
    ours = compose_cfg(["manifold=surrogates"])
    byo = compose_cfg(["manifold=surrogates", "model@models.classifier=byo", "models.classifier.path=/x.pt"])
    assert surrogate_recipe(ours) is ours.models.classifier
    assert surrogate_recipe(byo) == OmegaConf.load(Path(CONF_DIR) / "model" / "classifier.yaml")
    manifold = instantiate(ours.manifold)
    assert surrogates_provenance(ours, manifold) == {"manifold/surrogates_recipe": "explained"}
    assert surrogates_provenance(byo, manifold) == {"manifold/surrogates_recipe": "disc_pl"}
    assert surrogates_provenance(byo, instantiate(compose_cfg(["manifold=dep"]).manifold)) == {}


def test_byo_surrogates_are_refused_only_without_training_images(tmp_path, monkeypatch):
    from disc_pl.data.folder import FolderDataModule

    root = make_own_folder(tmp_path / "imgs", per_class=6)
    cfg = compose_cfg([*FOLDER, f"dataset.root={root}", *_byo(tmp_path), "manifold=surrogates",
                       f"cache_dir={tmp_path / 'cache'}"])
    dm = instantiate(cfg.dataset)
    dm.setup()
    validate_with_data(cfg, dm)  # training images given: accepted
    whole = FolderDataModule.dataset
    monkeypatch.setattr(FolderDataModule, "dataset", lambda self, split: [] if split == "train" else whole(self, split))
    with pytest.raises(ConfigError) as info:
        run_lib.run(cfg, out_dir=tmp_path / "out")
    assert info.value.key == "manifold" and "the training split is empty" in str(info.value)
    assert "dataset.root=" in str(info.value) and "manifold=dep, duq or none" in str(info.value)  # the fixes
    assert entries(tmp_path / "cache") == []  # refused before anything was trained


# ------------------------------------------------------------------ part 2: judges on the user's images
def _judge_entries(cache: Path) -> dict[str, dict]:
    return {e: _config(cache / e / "config.json") for e in entries(cache) if e.startswith("judge-")}


def test_evaluate_on_a_folder_judges_with_no_extra_flags(tmp_path):
    root = make_own_folder(tmp_path / "imgs", per_class=20, seed=TEST_SEED)
    cache = tmp_path / "cache"
    cfg = compose_cfg([*FOLDER, *TOY_CLASSIFIER, *TOY_JUDGES, f"dataset.root={root}", f"cache_dir={cache}"], "evaluate")
    assert cfg.dataset.judge_fraction > 0 and cfg.judge.root is None  # the defaults
    metrics = evaluate_lib.evaluate(cfg, out_dir=tmp_path / "out")
    assert 0.0 <= metrics["cf/judge_flip_rate"] <= 1.0 and "judge/acc" in metrics

    judges = _judge_entries(cache)
    assert len(judges) == 2
    assert {j["data"]["root"] for j in judges.values()} == {str(root)}
    assert {j["data"]["train_role"] for j in judges.values()} == {"judge"}
    # the classifier disc_pl trained skipped the judges' part: disjoint training images
    dm = instantiate(cfg.dataset)
    dm.setup()
    jdm = judge_datamodule(cfg, dm)
    explained, judged = set(dm.split_files("train")), set(jdm.split_files("train"))
    assert explained and judged and not explained & judged
    classifier = [e for e in entries(cache) if e.startswith("classifier-")]
    assert len(classifier) == 1
    assert _config(cache / classifier[0] / "config.yaml")["dataset"]["role"] == "explained"


def test_judge_root_trains_the_judges_on_a_second_folder(tmp_path):
    root = make_own_folder(tmp_path / "imgs", per_class=20, seed=TEST_SEED)
    unseen = make_own_folder(tmp_path / "unseen", per_class=20, seed=TEST_SEED + 1)
    cache = tmp_path / "cache"
    cfg = compose_cfg([*FOLDER, *TOY_JUDGES, *_byo(tmp_path), f"dataset.root={root}", f"judge.root={unseen}",
                       f"cache_dir={cache}"], "evaluate")
    metrics = evaluate_lib.evaluate(cfg, out_dir=tmp_path / "out")
    assert "cf/judge_flip_rate" in metrics and "judge/acc" in metrics
    judges = _judge_entries(cache)
    assert len(judges) == 2 and {j["data"]["root"] for j in judges.values()} == {str(unseen)}
    dm = instantiate(cfg.dataset)
    dm.setup()
    jdm = judge_datamodule(cfg, dm, byo=True)
    assert all(p.is_relative_to(unseen) for p in jdm.split_files("train"))


def test_judge_root_is_refused_before_anything_trains(tmp_path):
    root = make_own_folder(tmp_path / "imgs", per_class=6, seed=0)
    base = [*FOLDER, *TOY_JUDGES, *_byo(tmp_path), f"dataset.root={root}", f"cache_dir={tmp_path / 'cache'}"]

    def refused(judge_root) -> str:
        with pytest.raises(ConfigError) as info:
            evaluate_lib.evaluate(compose_cfg([*base, f"judge.root={judge_root}"], "evaluate"),
                                  out_dir=tmp_path / "out")
        assert info.value.key == "judge.root"
        assert entries(tmp_path / "cache") == []
        return str(info.value)

    other = make_own_folder(tmp_path / "other", per_class=6, classes=("cat", "emu"), seed=1)
    msg = refused(other)
    assert "['cat', 'emu']" in msg and "['cat', 'dog']" in msg and "same class names" in msg
    assert "no such folder" in refused(tmp_path / "absent")
    assert "is dataset.root itself" in refused(root)
    copy = make_own_folder(tmp_path / "copy", per_class=6, seed=2)
    shutil.copy(root / "dog" / "dog_0_003.png", copy / "dog" / "renamed.png")  # one query-folder image, renamed
    assert "holds images of dataset.root" in refused(copy) and "renamed.png" in refused(copy)


def test_judge_root_needs_dataset_folder(tmp_path):
    cfg = compose_cfg(["dataset.n_train=64", "dataset.n_val=16", "dataset.n_test=16", f"judge.root={tmp_path}",
                       f"cache_dir={tmp_path / 'cache'}"], "evaluate")
    dm = instantiate(cfg.dataset)
    dm.setup()
    with pytest.raises(ConfigError, match="judge.root=.*second image folder for dataset=folder"):
        validate_with_data(cfg, dm)
