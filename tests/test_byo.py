"""Bring-your-own classifiers: TorchScript and torchvision wrappers, post-hoc DEP, safe loading."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf
from conftest import FAST_TV, TEST_SEED, TOY_DATA, compose_cfg
from test_models import ToyDataModule  # tests/ is on sys.path
from torch import nn

from disc_pl.models.byo import (
    BYOClassifier,
    fit_posthoc_dep,
    from_torchscript,
    from_torchvision,
    save_posthoc_dep,
)
from disc_pl.errors import UnsafeCheckpointError
from disc_pl.models.fit import build_model, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread (conftest.py)

CONF = Path(__file__).resolve().parents[1] / "conf"
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class _TwoConvs(nn.Module):
    """A user's classifier: expects normalised input ((x - 0.5) / 0.25)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 2)


class TinyNet(_TwoConvs):
    """With an exported forward_features (the layer taps of a TorchScript model)."""

    def forward(self, x):
        return self.forward_features(x)[0]

    @torch.jit.export
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = F.relu(self.conv1(x))
        f2 = F.relu(self.conv2(f1))
        return self.fc(f2.mean(dim=(2, 3))), [f1, f2]


class PlainNet(_TwoConvs):
    """The same net without an exported forward_features."""

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean(dim=(2, 3)))


def _train_briefly(net, dm, steps=60):
    """Fit the user's model on the toy task, to a few % error, so per-image losses vary."""
    torch.manual_seed(TEST_SEED)
    data = dm.dataset("train")
    x = torch.stack([d["image"] for d in data])
    y = torch.stack([torch.as_tensor(d["label"]) for d in data])
    flip = torch.rand(len(y)) < 0.1  # label noise: some confidently wrong, some uncertain
    y = torch.where(flip, 1 - y, y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(net((x[idx] - 0.5) / 0.25), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def toy():
    dm = ToyDataModule(n=256)
    dm.setup()
    return dm


def test_torchscript_classifier_gets_a_posthoc_dep_head(tmp_path, toy):
    path = tmp_path / "user.ts"
    torch.jit.script(_train_briefly(PlainNet(), toy)).save(str(path))
    with pytest.warns(UserWarning, match="forward_features"):
        wrapper = from_torchscript(path, num_classes=2, image_size=12, mean=MEAN, std=STD, class_names=["a", "b"])
    assert not wrapper.has_loss_predictor and torch.isnan(wrapper.dep_target)
    x = torch.stack([toy.dataset("test")[i]["image"] for i in range(8)])
    # the wrapper takes [0, 1] pixels and normalises itself
    torch.testing.assert_close(wrapper(x), wrapper.model((x - 0.5) / 0.25))
    logits, feats = wrapper.forward_features(x)
    assert len(feats) == 1 and torch.equal(feats[0], logits)  # logits are the only feature

    figures = fit_posthoc_dep(wrapper, toy, split="val", epochs=60, holdout=0.4, seed=TEST_SEED)
    assert figures["dep/holdout_spearman"] > 0.2, figures
    assert wrapper.has_loss_predictor and torch.isfinite(wrapper.dep_target)
    assert wrapper.predict_loss(feats).shape == (8,)

    # the head round-trips through a weights-only file
    save_posthoc_dep(wrapper, tmp_path / "dep.pt")
    fresh = from_torchscript(path, num_classes=2, image_size=12, mean=MEAN, std=STD, dep_path=tmp_path / "dep.pt")
    torch.testing.assert_close(fresh.predict_loss(feats), wrapper.predict_loss(feats))
    assert fresh.dep_target.item() == wrapper.dep_target.item()


def test_torchscript_exported_forward_features_are_the_taps(tmp_path, toy):
    net = _train_briefly(TinyNet(), toy, steps=10)
    path = tmp_path / "user.ts"
    torch.jit.script(net).save(str(path))
    wrapper = from_torchscript(path, num_classes=2, image_size=12, mean=MEAN, std=STD)
    x = torch.rand(3, 3, 12, 12)
    logits, feats = wrapper.forward_features(x)
    assert [f.shape[1] for f in feats] == [8, 16] == wrapper.feature_channels()
    ref_logits, ref_feats = net.forward_features((x - 0.5) / 0.25)
    torch.testing.assert_close(feats[1], ref_feats[1])
    torch.testing.assert_close(logits, ref_logits)


def test_torchvision_state_dict_wrapper_taps_resnet_layers(tmp_path, toy):
    torch.manual_seed(TEST_SEED)
    user = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(user.state_dict(), tmp_path / "weights.pt")
    cfg = OmegaConf.load(CONF / "model" / "byo.yaml")
    cfg.path = str(tmp_path / "weights.pt")
    wrapper = build_model(cfg, toy)  # the config route: data-dependent args filled in
    assert isinstance(wrapper, BYOClassifier) and wrapper.feature_layers == ["layer1", "layer2", "layer3", "layer4"]
    x = torch.rand(2, 3, 32, 32)
    logits, feats = wrapper.forward_features(x)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(logits, user((x - mean) / std))
    figures = fit_posthoc_dep(wrapper, toy.dataset("val"), epochs=2, max_images=64)
    assert figures["dep/n_fit"] + figures["dep/n_holdout"] == 64 and wrapper.has_loss_predictor


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": _Payload(marker)}, tmp_path / "weights.pt")
    with pytest.raises(UnsafeCheckpointError):
        from_torchvision("resnet18", tmp_path / "weights.pt", num_classes=2)
    assert not marker.exists()


def test_posthoc_dep_head_through_the_model_cache(tmp_path, toy):
    from disc_pl.models.cache import ensure_model
    from disc_pl.utils import read_metrics

    user = tmp_path / "user.ts"
    torch.jit.script(_train_briefly(PlainNet(), toy)).save(str(user))
    cfg = OmegaConf.load(CONF / "model" / "byo.yaml")
    cfg.arch, cfg.path, cfg.mean, cfg.std = None, str(user), MEAN, STD
    cfg.posthoc_dep.epochs = 20
    dataset_cfg = OmegaConf.create({"_target_": "test_models.ToyDataModule"})
    with pytest.warns(UserWarning):
        head = ensure_model(cfg, dataset_cfg, None, 0, tmp_path / "cache", train_fn=train_model, datamodule=toy)
    assert head.name == "posthoc_dep.pt" and head.parent.name.startswith("byo-")
    assert "dep/holdout_spearman" in read_metrics(head.parent / "metrics.json")
    mtime = head.stat().st_mtime_ns
    assert ensure_model(cfg, dataset_cfg, None, 0, tmp_path / "cache", train_fn=train_model, datamodule=toy) == head
    assert head.stat().st_mtime_ns == mtime
    # the same path with other weights in it is another model
    torch.jit.script(_train_briefly(PlainNet(), toy, steps=5)).save(str(user))
    with pytest.warns(UserWarning):
        other = ensure_model(cfg, dataset_cfg, None, 0, tmp_path / "cache", train_fn=train_model, datamodule=toy)
    assert other != head
    # and the config route loads the wrapper with its head
    with pytest.warns(UserWarning):
        wrapper = build_model(OmegaConf.merge(cfg, {"dep_path": str(other)}), toy)
    assert wrapper.has_loss_predictor and torch.isfinite(wrapper.dep_target)


def test_full_run_explains_a_bring_your_own_classifier(tmp_path):
    """`python -m disc_pl.run model@models.classifier=byo ...` end to end: the user's torchvision
    weights are wrapped (nothing trained but the post-hoc DEP head, once, into the cache), and the
    reported probabilities are the user's model's own on the saved counterfactuals."""
    import csv

    from disc_pl import run as run_lib

    torch.manual_seed(TEST_SEED)
    user = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(user.state_dict(), tmp_path / "weights.pt")
    overrides = [*TOY_DATA, *FAST_TV, "model@models.classifier=byo", "models.classifier.arch=resnet18",
                 f"models.classifier.path={tmp_path / 'weights.pt'}", "models.classifier.posthoc_dep.epochs=3",
                 "query.require_correct=false", "query.count=4", f"cache_dir={tmp_path / 'cache'}"]
    metrics = run_lib.run(compose_cfg([*overrides, "manifold=dep"]), out_dir=tmp_path / "dep")
    assert metrics["cf/queries"] == 4
    heads = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(heads) == 1 and heads[0].startswith("byo-")
    assert (tmp_path / "cache" / heads[0] / "posthoc_dep.pt").is_file()

    saved = torch.load(tmp_path / "dep" / "counterfactuals.pt", weights_only=True)
    rows = list(csv.DictReader(open(tmp_path / "dep" / "results.csv")))
    assert {r["status"] for r in rows} <= {"flipped", "not_flipped", "diverged"}
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.softmax(user((saved["counterfactual"] - mean) / std), 1)[:, 1]
    by_id = {int(r["query_id"]): float(r["target_prob"]) for r in rows}
    reported = torch.tensor([by_id[int(i)] for i in saved["query_id"]])
    torch.testing.assert_close(p, reported, atol=1e-5, rtol=0)

    # manifold=none needs no DEP head: nothing new is fitted
    run_lib.run(compose_cfg([*overrides, "manifold=none"]), out_dir=tmp_path / "none")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == heads
