"""Bring your own classifier: wrap a trained model for the counterfactual engine, and give it
a post-hoc DEP loss predictor.

Two sources (``conf/model/byo.yaml``, target :func:`load_byo`):
- a torchvision architecture name + a state-dict file (``torch.save(model.state_dict())``),
  loaded with ``weights_only=True``. Features are tapped with forward hooks on named
  submodules, ``feature_layers`` (default ``layer1..layer4`` for ResNets);
- a TorchScript file (``torch.jit.load``). Python hooks cannot be attached to a ScriptModule,
  so features come from an exported method ``forward_features(x) -> (logits, List[Tensor])``
  if the scripted model has one (``@torch.jit.export``). Otherwise the logits are the only
  feature (``forward_features`` returns ``(logits, [logits])``, with a warning): LSO then
  compares logits, which is weak; export ``forward_features`` for real layer taps.

Either way the wrapper takes [0, 1] pixels and applies the model's mean/std itself.

Post-hoc DEP (:func:`fit_posthoc_dep`) differs from the paper's joint training (section 4):
the classifier is frozen, so its features were never shaped by the auxiliary ranking loss;
the loss predictor is fitted afterwards on a few hundred labelled images the user provides
(ideally not the classifier's training images, whose losses are all near zero), and only sees
those. Its ranking quality, and so the DEP manifold term, is therefore usually weaker than for
a jointly trained classifier; the held-out Spearman correlation it reports says how much.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.functional import spearman_corrcoef

from omegaconf import DictConfig

from disc_pl.errors import ConfigError
from disc_pl.models.loading import safe_load
from disc_pl.models.classifier import dep_ranking_loss
from disc_pl.nets.dep import LossPredictor

RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _stats(values: Sequence[float] | None, channels: int, fill: float) -> torch.Tensor:
    t = torch.full((channels,), fill) if values is None else torch.as_tensor(list(values), dtype=torch.float32)
    return t.expand(channels).reshape(1, channels, 1, 1).clone()


class BYOClassifier(nn.Module):
    """A user's classifier behind the engine's interface.

    forward(x) -> logits; forward_features(x) -> (logits, feats); predict_loss(feats) -> [B];
    has_loss_predictor; dep_target (buffer, NaN until fit_posthoc_dep); class_names.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        feature_layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        for p in model.parameters():  # (ScriptModules have no requires_grad_)
            p.requires_grad_(False)
        self.num_classes, self.in_channels, self.image_size = int(num_classes), int(in_channels), int(image_size)
        self.class_names = [str(c) for c in class_names] if class_names else [str(i) for i in range(num_classes)]
        self.register_buffer("mean", _stats(mean, in_channels, 0.0))
        self.register_buffer("std", _stats(std, in_channels, 1.0))
        self.register_buffer("dep_target", torch.tensor(float("nan")))
        self.loss_predictor: LossPredictor | None = None
        self._captured: dict[str, torch.Tensor] = {}
        self.is_script = isinstance(model, torch.jit.ScriptModule)
        if self.is_script:
            self.exported_features = hasattr(model, "forward_features")
            self.feature_layers: list[str] = []
            if not self.exported_features:
                warnings.warn(
                    "TorchScript classifier without an exported forward_features(): its logits are "
                    "its only feature (LSO compares logits; DEP reads logits). Export "
                    "forward_features(x) -> (logits, List[Tensor]) for layer taps.",
                    stacklevel=2,
                )
        else:
            self.exported_features = False
            if feature_layers is None:
                names = dict(model.named_modules())
                feature_layers = [n for n in RESNET_LAYERS if n in names] if all(n in names for n in RESNET_LAYERS) else []
            self.feature_layers = list(feature_layers)
            if not self.feature_layers:
                raise ValueError("feature_layers is empty: name the submodules to tap (e.g. for a ResNet: layer1..layer4)")
            for name in self.feature_layers:
                self.model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def capture(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._captured[name] = output

        return capture

    @property
    def has_loss_predictor(self) -> bool:
        return self.loss_predictor is not None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._normalise(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self._normalise(x)
        if self.is_script:
            if self.exported_features:
                logits, feats = self.model.forward_features(h)
                return logits, list(feats)
            logits = self.model(h)
            return logits, [logits]
        self._captured = {}
        logits = self.model(h)
        feats = [self._captured.pop(name) for name in self.feature_layers]
        return logits, feats

    def predict_loss(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.loss_predictor is None:
            raise RuntimeError("no loss predictor yet: run disc_pl.models.byo.fit_posthoc_dep (or set dep_path)")
        return self.loss_predictor(feats)

    def feature_channels(self) -> list[int]:
        """Channels of each tapped feature (one probe forward on a blank image)."""
        probe = torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=self.mean.device)
        with torch.no_grad():
            _, feats = self.forward_features(probe)
        return [int(f.shape[1]) for f in feats]


def _wrap(model: nn.Module, num_classes: int, dep_path: str | os.PathLike | None, **meta: Any) -> BYOClassifier:
    """``BYOClassifier(model, num_classes, **meta)`` (+ its post-hoc DEP head from ``dep_path``)."""
    wrapper = BYOClassifier(model, num_classes, **meta)
    if dep_path is not None:
        load_posthoc_dep(wrapper, dep_path)
    return wrapper


def from_torchvision(arch: str, weights: str | os.PathLike, num_classes: int,
                     dep_path: str | os.PathLike | None = None, **meta: Any) -> BYOClassifier:
    """torchvision.models.get_model(arch, num_classes) with a state dict loaded weights_only;
    ``meta``: the other arguments of :class:`BYOClassifier` (in_channels, image_size, mean, std,
    class_names, feature_layers)."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=int(num_classes))
    state = safe_load(weights)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # e.g. a checkpoint for another number of classes
        raise ConfigError.one("model.path", str(weights), (
            f"the weights do not fit torchvision {arch!r} built for this dataset ({int(num_classes)} classes "
            f"{list(meta.get('class_names') or [])}, {int(meta.get('in_channels', 3))} input channels): use a "
            f"checkpoint of this architecture trained on this dataset's classes, or set model.arch. {err}")) from None
    return _wrap(model, num_classes, dep_path, **meta)


def from_torchscript(path: str | os.PathLike, num_classes: int, dep_path: str | os.PathLike | None = None,
                     **meta: Any) -> BYOClassifier:
    """torch.jit.load(path) (TorchScript archives hold code and constants, no pickled objects);
    ``meta`` as for :func:`from_torchvision` (no ``feature_layers``: hooks need a Python module)."""
    return _wrap(torch.jit.load(str(path), map_location="cpu"), num_classes, dep_path, **meta)


def load_byo(
    path: str | os.PathLike,
    num_classes: int,
    arch: str | None = None,
    in_channels: int = 3,
    image_size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    feature_layers: Sequence[str] | None = None,
    dep_path: str | os.PathLike | None = None,
) -> BYOClassifier:
    """Config entry point: `arch` set -> torchvision arch + state dict at `path`; null -> TorchScript."""
    meta = dict(in_channels=in_channels, image_size=image_size, mean=mean, std=std, class_names=class_names)
    if arch is None:
        if feature_layers:
            raise ValueError("feature_layers cannot be hooked in a TorchScript model; export forward_features instead")
        return from_torchscript(path, num_classes, dep_path, **meta)
    return from_torchvision(arch, path, num_classes, dep_path, feature_layers=feature_layers, **meta)


# --- post-hoc DEP --------------------------------------------------------------------------
def _collect(data: Any, split: str, max_images: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, H, W] and labels [N] from a datamodule (its `split`), Dataset or DataLoader."""
    if hasattr(data, "dataset") and callable(data.dataset):
        data = data.dataset(split)
    if not isinstance(data, DataLoader) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        data = DataLoader(data, batch_size=256, shuffle=False)  # a map-style dataset of items
    images, labels, count = [], [], 0
    for batch in data:
        images.append(batch["image"])
        labels.append(torch.as_tensor(batch["label"]))
        count += len(labels[-1])
        if max_images is not None and count >= max_images:
            break
    x, y = torch.cat(images), torch.cat(labels).long()
    return (x[:max_images], y[:max_images]) if max_images is not None else (x, y)


@torch.no_grad()
def _pooled_features(wrapper: BYOClassifier, x: torch.Tensor, batch_size: int = 256):
    """Frozen-classifier pass: pooled features per tap ([N, C_i] each) and logits [N, K]."""
    pooled, logits = [], []
    for i in range(0, len(x), batch_size):
        out, feats = wrapper.forward_features(x[i : i + batch_size].to(wrapper.mean.device))
        pooled.append([f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1) for f in feats])
        logits.append(out)
    return [torch.cat(p) for p in zip(*pooled)], torch.cat(logits)


def fit_posthoc_dep(
    wrapper: BYOClassifier,
    data: Any,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    holdout: float = 0.3,
    margin: float = 1.0,
    hidden: int = 128,
    split: str = "val",
    max_images: int | None = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Train a LossPredictor on the frozen classifier's features (ranking loss, Yoo & Kweon).

    `data`: a datamodule (its `split` is used), a Dataset or a DataLoader of labelled items.
    A `holdout` fraction is kept apart: dep_target = median predicted loss on it, and the
    Spearman correlation of predicted vs true loss on it is returned with the other figures.
    Features are computed once (the classifier is frozen), so this takes seconds.
    """
    x, y = _collect(data, split, max_images)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=g)
    n_hold = max(2, int(round(holdout * len(y))))
    if len(y) - n_hold < 2:
        raise ValueError(f"fit_posthoc_dep needs more labelled images than {len(y)}")
    hold, fit = perm[:n_hold], perm[n_hold:]
    wrapper.eval()
    feats, logits = _pooled_features(wrapper, x)
    loss = F.cross_entropy(logits, y.to(logits.device), reduction="none")
    predictor = LossPredictor([f.shape[1] for f in feats], hidden).to(logits.device)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for _ in range(int(epochs)):
            order = fit[torch.randperm(len(fit))]
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                step_loss = dep_ranking_loss(predictor([f[idx] for f in feats]), loss[idx], margin)
                opt.zero_grad()
                step_loss.backward()
                opt.step()
    predictor.eval().requires_grad_(False)
    with torch.no_grad():
        pred_hold = predictor([f[hold] for f in feats])
    wrapper.loss_predictor = predictor
    wrapper.dep_target.fill_(pred_hold.median().item())
    rho = spearman_corrcoef(pred_hold, loss[hold]).item()
    acc = (logits.argmax(1).cpu() == y).float().mean().item()
    return {
        "dep/holdout_spearman": rho if math.isfinite(rho) else float("nan"),
        "dep/target": float(wrapper.dep_target),
        "dep/n_fit": float(len(fit)),
        "dep/n_holdout": float(len(hold)),
        "dep/acc": acc,
    }


def save_posthoc_dep(wrapper: BYOClassifier, path: str | os.PathLike) -> None:
    """The fitted loss predictor + dep_target, as plain tensors (loadable weights_only)."""
    if wrapper.loss_predictor is None:
        raise RuntimeError("nothing to save: fit_posthoc_dep has not run")
    p = wrapper.loss_predictor
    payload = {
        "in_channels": list(p.in_channels),
        "hidden": int(p.head.in_features // len(p.in_channels)),
        "state_dict": p.state_dict(),
        "dep_target": float(wrapper.dep_target),
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_posthoc_dep(wrapper: BYOClassifier, path: str | os.PathLike) -> BYOClassifier:
    payload = safe_load(path)
    predictor = LossPredictor(payload["in_channels"], payload["hidden"])
    predictor.load_state_dict(payload["state_dict"])
    wrapper.loss_predictor = predictor.eval().requires_grad_(False).to(wrapper.mean.device)
    wrapper.dep_target.fill_(float(payload["dep_target"]))
    return wrapper


def is_byo(node: Any) -> bool:
    """A model config node that names a bring-your-own classifier (``model=byo``)."""
    return isinstance(node, DictConfig) and (node.get("name") == "byo"
                                             or str(node.get("_target_", "")).endswith("load_byo"))
