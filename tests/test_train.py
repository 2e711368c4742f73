"""Training entry point, model cache, DDP: configs compose, models train and are reused."""

import os
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from conftest import TEST_SEED
from test_models import ToyDataModule  # tests/ is on sys.path

import disc_pl.train as train_lib
from disc_pl.models import cache
from disc_pl.models.cache import ensure_model, file_lock, load_classifier, model_key
from disc_pl.utils import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread (conftest.py)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
TOY_DATASET = OmegaConf.create({"_target_": "test_models.ToyDataModule"})
CPU = OmegaConf.create(
    {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 1,
     "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
)


def _toy_model_cfg(kind: str = "classifier", **overrides):
    cfg = OmegaConf.load(f"{CONF}/model/{kind}.yaml")
    cfg.width, cfg.small_input = 4, True
    cfg.fit.trainer.max_epochs = 2
    cfg.lr = 1e-2
    return OmegaConf.merge(cfg, overrides)


@pytest.mark.parametrize("model", ["classifier", "duq", "byo"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_every_train_config_composes(model, trainer):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"trainer={trainer}", "logger=none"],
                      return_hydra_config=True)
    assert cfg.model.name == model and cfg.seed == 0
    assert cfg.model._target_.startswith("disc_pl.models.")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert "_target_" not in cfg.logger
    # data-dependent arguments are not in the model yaml
    assert not {"num_classes", "in_channels", "image_size", "class_names"} & set(cfg.model)


def test_csv_logger_config_instantiates(tmp_path):
    from disc_pl.train import build_logger

    logger_cfg = OmegaConf.load(f"{CONF}/logger/csv.yaml")
    logger = build_logger(logger_cfg, tmp_path)
    assert logger.__class__.__name__ == "CSVLogger" and Path(logger.log_dir).is_relative_to(tmp_path)
    assert build_logger(OmegaConf.load(f"{CONF}/logger/none.yaml"), tmp_path) is False


@pytest.mark.slow
def test_train_model_writes_checkpoint_metrics_and_config(tmp_path):
    dm = ToyDataModule()
    metrics = train_lib.train_model(_toy_model_cfg(), TOY_DATASET, CPU, TEST_SEED, tmp_path, datamodule=dm)
    assert {"test/acc", "test/dep_spearman", "train/seconds", "best/val/acc"} <= set(metrics)
    assert read_metrics(tmp_path / "metrics.json")["test/acc"] == pytest.approx(metrics["test/acc"])
    assert OmegaConf.load(tmp_path / "config.yaml").model.width == 4
    model = load_classifier(tmp_path / "model.ckpt")
    assert torch.isfinite(model.dep_target) and model.class_names == ["top", "bottom"]
    # test/acc is the kept model's accuracy on the test split (whatever this seed's training reached)
    test = dm.dataset("test")
    with torch.no_grad():
        pred = model(torch.stack([item["image"] for item in test])).argmax(1)
    acc = float((pred == torch.stack([item["label"] for item in test])).float().mean())
    assert metrics["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert not (tmp_path / "checkpoints").exists()  # only model.ckpt is kept
    # weights + plain hyper-parameters only; loadable without Hydra
    assert set(torch.load(tmp_path / "model.ckpt", weights_only=True)) <= set(train_lib.SLIM_KEYS)
    from disc_pl.models.classifier import ClassifierModule

    x = torch.rand(2, 3, 12, 12)
    torch.testing.assert_close(ClassifierModule.load_from_checkpoint(tmp_path / "model.ckpt").eval()(x), model(x))


class _CountingTrain:
    """Wraps train_model, counting calls (a reused cache entry must not call it)."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.mark.slow
def test_cache_reuses_and_retrains_on_a_relevant_change(tmp_path, monkeypatch):
    counter = _CountingTrain(train_lib.train_model)
    dm = ToyDataModule()

    first = ensure_model(_toy_model_cfg(), TOY_DATASET, CPU, TEST_SEED, tmp_path, train_fn=counter, datamodule=dm)
    assert counter.calls == 1 and first.name == "model.ckpt" and first.parent.name.startswith("classifier-")
    assert {p.name for p in first.parent.iterdir()} >= {"model.ckpt", "metrics.json", "config.yaml"}
    mtime = first.stat().st_mtime_ns

    quiet = OmegaConf.merge(CPU, {"enable_progress_bar": True, "log_every_n_steps": 3})
    again = ensure_model(_toy_model_cfg(), TOY_DATASET, quiet, TEST_SEED, tmp_path, train_fn=counter, datamodule=dm)
    assert again == first and counter.calls == 1 and again.stat().st_mtime_ns == mtime

    changed = ensure_model(_toy_model_cfg(lr=5e-3), TOY_DATASET, CPU, TEST_SEED, tmp_path, train_fn=counter, datamodule=dm)
    assert changed != first and counter.calls == 2
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("*.lock"))


def test_cache_key_covers_model_recipe_data_seed_not_presentation():
    dm = ToyDataModule()
    base = model_key(_toy_model_cfg(), dm, CPU, 0)
    assert base == model_key(_toy_model_cfg(), dm, OmegaConf.merge(CPU, {"enable_progress_bar": True}), 0)
    assert base != model_key(_toy_model_cfg(), dm, CPU, 1)
    assert base != model_key(_toy_model_cfg(fit={"trainer": {"max_epochs": 3}}), dm, CPU, 0)
    assert base != model_key(_toy_model_cfg(), ToyDataModule(seed=1), CPU, 0)
    assert base != model_key(_toy_model_cfg(), dm, OmegaConf.merge(CPU, {"precision": "16-mixed"}), 0)


def test_killed_training_leaves_no_entry_and_the_next_call_trains(tmp_path, monkeypatch):
    def crash(model_cfg, dataset_cfg, trainer_cfg, seed, out_dir, *args):
        (Path(out_dir) / "model.ckpt").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the job were killed mid-training

    with pytest.raises(KeyboardInterrupt):
        ensure_model(_toy_model_cfg(), TOY_DATASET, CPU, TEST_SEED, tmp_path, train_fn=crash, datamodule=ToyDataModule())
    assert list(tmp_path.iterdir()) == []  # no entry, no temp folder, no lock

    def fake_train(model_cfg, dataset_cfg, trainer_cfg, seed, out_dir, *args):
        (Path(out_dir) / "model.ckpt").write_bytes(b"complete")

    path = ensure_model(_toy_model_cfg(), TOY_DATASET, CPU, TEST_SEED, tmp_path, train_fn=fake_train,
                        datamodule=ToyDataModule())
    assert path.read_bytes() == b"complete"


def test_lock_waits_for_a_live_holder_and_breaks_a_dead_one(tmp_path):
    lock = tmp_path / "x.lock"
    with file_lock(lock):
        with pytest.raises(TimeoutError):
            with file_lock(lock, timeout_s=0.3, poll_s=0.05):
                pass
        released = threading.Event()

        def waiter():
            with file_lock(lock, poll_s=0.05):
                released.set()

        t = threading.Thread(target=waiter)
        t.start()
        assert not released.wait(0.3)  # still held
    t.join(5)
    assert released.is_set() and not lock.exists()
    # a lock left by a process that no longer exists is broken, not waited on
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    lock.write_text(f"{cache.socket.gethostname()} {dead}\n")
    with file_lock(lock, timeout_s=2, poll_s=0.05):
        assert lock.exists()


@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes_train_and_checkpoint(tmp_path):
    ddp = OmegaConf.merge(CPU, {"devices": 2, "strategy": "ddp_spawn"})
    path = ensure_model(_toy_model_cfg(), TOY_DATASET, ddp, TEST_SEED, tmp_path, train_fn=train_lib.train_model,
                        datamodule=ToyDataModule())
    model = load_classifier(path)
    metrics = read_metrics(path.parent / "metrics.json")
    assert metrics["test/acc"] > 0.6 and torch.isfinite(model.dep_target)
