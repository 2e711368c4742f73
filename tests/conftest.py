"""Shared fixtures: a tiny trained classifier on the embedded synthetic faces (trained once
per test session), and environment settings that keep tests offline and quiet."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Model cache shared by every test that runs ``disc_pl.run`` at toy size: the toy
    classifier is trained once per session (the cache is keyed by its config)."""
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(scope="session")
def faces():
    """Small synthetic-faces datamodule (32x32, with ground truth)."""
    from disc_pl.data.synthetic import SyntheticFacesDataModule

    dm = SyntheticFacesDataModule(n_train=1500, n_val=200, n_test=300, seed=0, batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def toy_classifier(faces):
    """A width-8 ResNet-18 + DEP head trained for a few epochs: accurate enough to explain."""
    import pytorch_lightning as pl

    from disc_pl.models.classifier import ClassifierModule

    pl.seed_everything(0, verbose=False)
    model = ClassifierModule(num_classes=2, image_size=32, width=8, lr=3e-3,
                             mean=[0.5] * 3, std=[0.25] * 3, class_names=faces.class_names)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, faces.train_dataloader())
    model.calibrate_dep_target(faces.val_dataloader())
    model.eval()
    acc = _accuracy(model, faces.dataset("test"))
    assert acc > 0.85, f"toy classifier failed to learn (test acc {acc:.2f})"
    return model


def _accuracy(model, data) -> float:
    x = torch.stack([data[i]["image"] for i in range(len(data))])
    y = torch.stack([torch.as_tensor(data[i]["label"]) for i in range(len(data))])
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


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
