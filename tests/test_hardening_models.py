"""Hardening, models: missing, mismatched and malicious checkpoints, and manifold terms whose
model is missing, fail with a clear error before any counterfactual is generated."""
from __future__ import annotations

import os

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from disc_pl import run as run_lib
from disc_pl import train as train_lib
from disc_pl.errors import ConfigError, UnsafeCheckpointError
from disc_pl.models.cache import model_key, model_kind
from disc_pl.models.classifier import ClassifierModule

from conftest import FAST_TV, TOY_DATA, TOY_MODEL, compose_cfg
from hardening_support import entries

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models on one thread

# a bring-your-own classifier with DEP (a post-hoc head) only: no surrogates to train
BYO = ["model@models.classifier=byo", "models.classifier.arch=resnet18", "manifold=dep"]


class _Payload:
    """Unpickling this runs `touch marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_cfg(tmp_path, *extra: str):
    base = TOY_DATA if any(o.startswith("model@models.classifier=") for o in extra) else TOY_MODEL
    return compose_cfg([*base, *FAST_TV, f"cache_dir={tmp_path / 'cache'}", *extra])


# --------------------------------------------------------------------------- bring your own
def test_byo_checkpoint_path_not_set_or_missing(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_lib.run(run_cfg(tmp_path, *BYO), out_dir=tmp_path / "out")
    assert info.value.key == "models.classifier.path" and "models.classifier.path=???: must be set" in str(info.value)
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(ConfigError) as info:
        run_lib.run(run_cfg(tmp_path, *BYO, f"models.classifier.path={missing}"), out_dir=tmp_path / "out")
    assert (info.value.key, info.value.value) == ("models.classifier.path", str(missing))
    assert f"models.classifier.path='{missing}': no such file" in str(info.value)
    assert entries(tmp_path / "cache") == []
    # the train entry point checks the same
    cfg = compose_cfg(["model=byo", f"model.path={missing}", f"cache_dir={tmp_path / 'cache'}"], "train")
    with pytest.raises(ConfigError, match=f"model.path='{missing}': no such file"):
        train_lib.main(cfg)
    assert entries(tmp_path / "cache") == []


def test_byo_classifier_with_surrogates_passes_the_config_check(tmp_path):
    """manifold=surrogates is no longer refused for a bring-your-own classifier: its surrogates
    are trained by disc_pl's recipe (refused only without training images: tests/test_own_data.py)."""
    from disc_pl.validate import validate_run_config

    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), weights)
    validate_run_config(run_cfg(tmp_path, *BYO[:2], f"models.classifier.path={weights}", "manifold=surrogates"))
    assert entries(tmp_path / "cache") == []


def test_byo_checkpoint_for_another_number_of_classes(tmp_path):
    weights = tmp_path / "five_classes.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), weights)
    with pytest.raises(ConfigError) as info:
        run_lib.run(run_cfg(tmp_path, *BYO, f"models.classifier.path={weights}"), out_dir=tmp_path / "out")
    msg = str(info.value)
    assert f"model.path='{weights}': the weights do not fit torchvision 'resnet18' built for this dataset " \
           "(2 classes ['not_smiling', 'smiling'], 3 input channels)" in msg
    assert "size mismatch for fc.weight" in msg
    assert entries(tmp_path / "cache") == []


def test_malicious_pickle_is_refused_on_the_run_path(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError) as info:
        run_lib.run(run_cfg(tmp_path, *BYO, f"models.classifier.path={evil}"), out_dir=tmp_path / "out")
    assert not marker.exists()
    assert f"refusing to load {evil}" in str(info.value) and "GLOBAL posix.system" in str(info.value)
    assert "set to `False`" not in str(info.value)  # torch's advice to switch weights_only off is dropped


# --------------------------------------------------------------------------- disc_pl checkpoints
def plant_classifier(tmp_path, cfg, **hparams) -> "os.PathLike":
    """Put a checkpoint where run's model cache looks for this config's classifier (as a cache
    copied from another project or dataset would)."""
    dm = instantiate(cfg.dataset)
    entry = tmp_path / "cache" / f"{model_kind(cfg.models.classifier)}-" \
        f"{model_key(cfg.models.classifier, dm, cfg.trainer, cfg.seed)[:16]}"
    entry.mkdir(parents=True)
    args = dict(num_classes=2, in_channels=3, image_size=32, width=8, class_names=["not_smiling", "smiling"])
    args.update(hparams)
    model = ClassifierModule(**args)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, entry / "model.ckpt")
    return entry / "model.ckpt"


@pytest.mark.parametrize("hparams, says", [
    ({"num_classes": 3, "class_names": ["a", "b", "c"]}, "num_classes=3 but dataset 'synthetic_faces' has num_classes=2"),
    ({"in_channels": 1}, "in_channels=1 but dataset 'synthetic_faces' has in_channels=3"),
    ({"image_size": 24}, "image_size=24 but dataset 'synthetic_faces' has image_size=32"),
    ({"class_names": ["cat", "dog"]}, "classes ['cat', 'dog'] but dataset 'synthetic_faces' has ['not_smiling', 'smiling']"),
])
def test_checkpoint_for_another_dataset_is_refused_before_generation(tmp_path, hparams, says):
    cfg = run_cfg(tmp_path)
    path = plant_classifier(tmp_path, cfg, **hparams)
    with pytest.raises(ConfigError) as info:
        run_lib.run(cfg, out_dir=tmp_path / "out")
    assert (info.value.key, info.value.value) == ("models.classifier", str(path))
    assert "the checkpoint does not fit the data: " + says in str(info.value)
    assert not (tmp_path / "out" / "parts").exists()  # nothing generated


def test_malicious_pickle_in_the_model_cache_is_refused(tmp_path):
    cfg = run_cfg(tmp_path)
    path = plant_classifier(tmp_path, cfg)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {path}"):
        run_lib.run(cfg, out_dir=tmp_path / "out")
    assert not marker.exists()


# --------------------------------------------------------------------------- manifold models
def test_dep_manifold_without_a_loss_predictor_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_lib.run(run_cfg(tmp_path, "manifold=dep", "models.classifier.use_dep=false"), out_dir=tmp_path / "out")
    assert info.value.key == "models.classifier.use_dep"
    assert "set models.classifier.use_dep=true (the default), or choose manifold=duq or manifold=none" in str(info.value)
    assert entries(tmp_path / "cache") == []


@pytest.mark.parametrize("byo", [False, True], ids=["classifier", "byo"])
def test_duq_manifold_without_a_duq_model(tmp_path, byo):
    extra = []
    if byo:
        (tmp_path / "weights.pt").write_bytes(b"never read: the config fails first")
        extra = [*BYO[:2], f"models.classifier.path={tmp_path / 'weights.pt'}"]
    with pytest.raises(ConfigError) as info:
        run_lib.run(run_cfg(tmp_path, "manifold=duq", "~model@models.duq", *extra), out_dir=tmp_path / "out")
    assert info.value.key == "models.duq"
    assert "manifold=duq needs a DUQ model to train" in str(info.value)
    assert ("also for a bring-your-own classifier" in str(info.value)) == byo
    assert "or choose manifold=dep or manifold=none" in str(info.value)
    assert entries(tmp_path / "cache") == []


def test_rgb_bring_your_own_model_on_grayscale_data_is_refused():
    """The wrapper takes in_channels from the data; the user's network decides what it accepts."""
    from types import SimpleNamespace

    from disc_pl.models.byo import BYOClassifier
    from disc_pl.validate import check_model_fits_data

    gray = SimpleNamespace(name="folder", num_classes=2, channels=1, image_size=32, class_names=["a", "b"])
    model = BYOClassifier(torchvision.models.resnet18(weights=None, num_classes=2), num_classes=2, in_channels=1,
                          image_size=32, mean=[0.5], std=[0.25])
    with pytest.raises(ConfigError) as info:
        check_model_fits_data(model, gray, "models.classifier", "rgb_weights.pt")
    assert info.value.key == "models.classifier" and info.value.value == "rgb_weights.pt"
    assert "it does not accept the dataset's images [1, 32, 32] (dataset.channels, dataset.image_size)" \
        in str(info.value)
