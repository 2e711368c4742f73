"""Shared fixtures and the one toy config of the suite.

- ``TEST_SEED`` (env ``DISC_PL_TEST_SEED``, default 0) shifts the seed of every model the suite
  trains, so a run with 0, 1 and 2 shows that no test hinges on one lucky set of weights.
- ``TOY_*`` are the overrides of a toy-size ``disc_pl.run`` (tiny data, a width-8 classifier,
  short schedules); with the session-wide ``cache_dir`` the toy classifier trains once.
- ``compose_cfg`` composes a primary config (run / train / evaluate) from the repo's conf/;
  the ``cfg_run`` fixture is the composed toy run (lightning-hydra-template's ``cfg_train``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# inversion.precision=auto would run bf16 on some CPUs: the suite's verdicts must not depend on
# the machine, so every run it composes or starts (subprocesses inherit this) is float32; the
# bf16 and auto paths have their own tests (test_precision.py).
os.environ.setdefault("DISC_PL_PRECISION", "32")
torch.set_num_threads(min(2, torch.get_num_threads()))

TEST_SEED = int(os.environ.get("DISC_PL_TEST_SEED", "0"))
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Data + classifier of every toy run (one cached model per session and seed).
TOY_DATA = ["dataset.n_train=1200", "dataset.n_val=200", "dataset.n_test=300",
            "trainer.enable_progress_bar=false", "logger=none", f"seed={TEST_SEED}"]
TOY_MODEL = [*TOY_DATA, "models.classifier.width=8", "models.classifier.fit.trainer.max_epochs=3",
             "models.classifier.lr=3e-3"]
# A small INR generator and a short progressive schedule.
TOY_INR = ["prior=inr", "prior.hparams.hidden=64", "prior.hparams.depth=2", "prior.stages=[[out],[hidden1,out],[all]]",
           "prior.recon.max_steps=100", "prior.recon.psnr_target=28", "inversion.steps_per_stage=50"]
# A cheap, fixed-length generation schedule: the tv prior (nothing to reconstruct), 3 stages.
FAST_TV = ["prior=tv", "inversion.steps_per_stage=12", "inversion.min_steps=2", "prior.lr=0.02",
           "query.count=6", "query.batch_size=2"]


def compose_cfg(overrides: list[str], config_name: str = "run", hydra_config: bool = False):
    """A primary config of conf/ composed with ``overrides`` (no Hydra job is started)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Model cache shared by every test that runs ``disc_pl.run`` at toy size: the toy
    classifier is trained once per session (the cache is keyed by its config)."""
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="session")
def toy_overrides(cache_dir) -> list[str]:
    """Overrides of the cheap toy run (TOY_MODEL + FAST_TV) into the shared model cache."""
    return [*TOY_MODEL, *FAST_TV, f"cache_dir={cache_dir}"]


@pytest.fixture
def cfg_run(toy_overrides):
    """The composed toy run config (a fresh copy per test: tests may edit it)."""
    return compose_cfg(toy_overrides)


@pytest.fixture(scope="module")
def one_thread():
    """Toy models on one thread: as fast as two on an idle machine, far faster on a busy one
    (OpenMP threads of a tiny conv wait on each other), and the thread count of each spawned
    DDP rank. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def faces():
    """Small synthetic-faces datamodule (32x32, with ground truth)."""
    from disc_pl.data.synthetic import SyntheticFacesDataModule

    dm = SyntheticFacesDataModule(n_train=1500, n_val=200, n_test=300, seed=0, batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def toy_classifier(faces):
    """A width-8 ResNet-18 + DEP head trained for a few epochs (seed ``TEST_SEED``). Tests that
    use it assert what holds for any such model, not how well this one learned."""
    import pytorch_lightning as pl

    from disc_pl.models.classifier import ClassifierModule

    pl.seed_everything(TEST_SEED, verbose=False)
    model = ClassifierModule(num_classes=2, image_size=32, width=8, lr=3e-3,
                             mean=[0.5] * 3, std=[0.25] * 3, class_names=faces.class_names)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, faces.train_dataloader())
    model.calibrate_dep_target(faces.val_dataloader())
    return model.eval()


@pytest.fixture(scope="session")
def toy_queries(faces, toy_classifier):
    """Up to 8 correctly classified non-smiling test faces: (images, targets, indices)."""
    data = faces.dataset("test")
    idx = [i for i in range(len(data)) if int(data[i]["label"]) == 0]
    x = torch.stack([data[i]["image"] for i in idx])
    with torch.no_grad():
        ok = toy_classifier(x).argmax(1) == 0
    idx = [i for i, k in zip(idx, ok.tolist()) if k][:8]
    images = torch.stack([data[i]["image"] for i in idx])
    return images, torch.ones(len(idx), dtype=torch.long), idx


@pytest.fixture
def float64():
    """Float64 for the analytic engine tests: round-off (1e-16) cannot cross a threshold."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
