"""The terms of the DISC objective (paper eq. 5), each returning one value per query.

    total = lambda_sem * semantic + lambda_mc * manifold + lambda_fc * functional + prior

Every term maps a batch of b counterfactuals to a tensor ``[b]`` so the engine can sum
over queries for one backward pass while keeping per-query bookkeeping (early stopping,
divergence isolation, logging).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disc_pl.errors import ConfigError, is_integer, is_number, require


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error over all but the first dim: ``[b, ...] -> [b]``."""
    return (a - b).pow(2).flatten(1).mean(1)


class SemanticSpace(nn.Module):
    """Semantic preservation d(Phi(x'), Phi(x)) in one space (paper eq. 3 / 5): the object the
    ``space`` config group builds (``conf/space/*.yaml``). ``lambda_sem`` is its weight (lambda1);
    ``name`` only labels it (run directories, report rows)."""

    name = "space"

    def __init__(self, lambda_sem: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        require("space", [("lambda_sem", lambda_sem, is_number(lambda_sem, 0), "must be a number >= 0")])
        self.lambda_sem = float(lambda_sem)
        if name is not None:
            self.name = str(name)

    def check_feature_maps(self, n: int) -> None:
        """Raise ConfigError when this space needs feature maps a classifier with ``n`` lacks."""

    def reference(self, x: Tensor, feats: Sequence[Tensor]) -> list[Tensor]:
        """What the counterfactual is compared to, computed once per query batch."""
        raise NotImplementedError

    def current(self, x_cf: Tensor, feats_cf: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x_cf: Tensor, feats_cf: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
        return torch.stack([per_sample_mse(c, r) for c, r in zip(self.current(x_cf, feats_cf), reference)]).sum(0)


class LatentSpace(SemanticSpace):
    """LSO: MSE between classifier activations at ``layers`` (indices into the list returned
    by ``forward_features``; default the four residual stages), summed over layers."""

    name = "lso"

    def __init__(self, layers: Sequence[int] = (0, 1, 2, 3), lambda_sem: float = 1.0, name: str | None = None) -> None:
        super().__init__(lambda_sem, name)
        layers = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else layers
        require("space", [("layers", layers, isinstance(layers, list) and len(layers) > 0
                           and all(is_integer(i) for i in layers),
                           "must be a non-empty list of feature-map indices (space.layers=[0,1,2,3]: "
                           "ResNet-18 layer1..layer4); or use space=iso to compare pixels")])
        self.layers = tuple(int(i) for i in layers)

    def check_feature_maps(self, n: int) -> None:
        bad = [i for i in self.layers if not -n <= i < n]
        if bad:
            raise ConfigError.one("space.layers", list(self.layers), f"the classifier exposes {n} feature maps: "
                                  f"use indices in 0..{n - 1} (or space=iso to compare pixels)")

    def reference(self, x, feats):
        self.check_feature_maps(len(feats))
        return [feats[i].detach() for i in self.layers]

    def current(self, x_cf, feats_cf):
        return [feats_cf[i] for i in self.layers]


class PixelSpace(SemanticSpace):
    """ISO: pixel MSE between x' and x."""

    name = "iso"

    def reference(self, x, feats):
        return [x.detach()]

    def current(self, x_cf, feats_cf):
        return [x_cf]


SPACES = {"lso": LatentSpace, "iso": PixelSpace}


def semantic_space(space: str | SemanticSpace = "lso", layers: Sequence[int] = (0, 1, 2, 3),
                   lambda_sem: float = 1.0) -> SemanticSpace:
    """A space object as it is, or by name (the Python API: ``space="iso"``)."""
    if isinstance(space, SemanticSpace):
        return space
    if space not in SPACES:
        raise ConfigError.one("space", space, "is not known; use 'lso' (latent) or 'iso' (pixels)")
    return LatentSpace(layers, lambda_sem) if space == "lso" else PixelSpace(lambda_sem)


def SemanticLoss(space: str = "lso", layers: Sequence[int] = (0, 1, 2, 3)) -> SemanticSpace:  # noqa: N802
    """The semantic space by name (kept for the Python API; ``semantic_space``)."""
    return semantic_space(space, layers)


class ManifoldLoss(Protocol):
    """L_mc: ``(x_cf, logits, feats, source, target) -> [b]``."""

    def __call__(self, x_cf: Tensor, logits: Tensor, feats: Sequence[Tensor],
                 source: Tensor, target: Tensor) -> Tensor: ...


class DEPManifold(nn.Module):
    """Direct error prediction (paper eq. 8): |s_hat(x') - s|.

    ``s_hat`` is the jointly trained loss predictor applied to the classifier's features of
    x'; ``s`` is the target loss level, the median predicted loss on the validation split
    (stored with the classifier as ``dep_target``). Pulling the predicted loss of x' to a
    typical in-distribution level keeps x' where the classifier's error is predictable.
    """

    def __init__(self, classifier: nn.Module, target_level: float | None = None) -> None:
        super().__init__()
        if not getattr(classifier, "has_loss_predictor", False):
            raise ValueError(
                "manifold=dep needs a classifier trained with a loss predictor (DEP head). "
                "Train one with model.use_dep=true (the default), or fit a post-hoc head for a "
                "bring-your-own classifier, or choose manifold=none|duq")
        level = target_level if target_level is not None else float(classifier.dep_target)
        if not torch.isfinite(torch.tensor(level)):
            raise ValueError("manifold=dep: the classifier has no calibrated dep_target (NaN); "
                             "retrain it or call calibrate_dep_target on a validation loader")
        self.classifier = classifier
        self.target_level = level

    def forward(self, x_cf, logits, feats, source, target) -> Tensor:
        s_hat = self.classifier.predict_loss(feats)
        return (s_hat - self.target_level).abs()


class DUQManifold(nn.Module):
    """DUQ kernel margin (paper eq. 9): max(K_src(x') - K_tgt(x') + delta, 0)."""

    def __init__(self, duq: nn.Module, margin: float = 0.5) -> None:
        super().__init__()
        self.duq = duq
        self.margin = float(margin)

    def forward(self, x_cf, logits, feats, source, target) -> Tensor:
        k = self.duq(x_cf)  # [b, K] kernel values in [0, 1]
        k_src = k.gather(1, source[:, None]).squeeze(1)
        k_tgt = k.gather(1, target[:, None]).squeeze(1)
        return F.relu(k_src - k_tgt + self.margin)


class EnsembleManifold(nn.Module):
    """DEP of the explained classifier (optional; the manifold term, weight lambda2) beside the
    mean cross entropy to the target class of other ``models`` (their own objective term, named
    ``name``, with its own ``weight``: ``disc_pl.cf.objective.EnsembleTerm``). Called like the
    other manifold models, it returns the DEP term alone (zeros without it)."""

    name = "ensemble"

    def __init__(self, models: Sequence[nn.Module], dep: DEPManifold | None = None, weight: float = 1.0,
                 margin: float | None = None) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.dep = dep
        self.weight = float(weight)
        self.margin = None if margin is None else float(margin)

    def ensemble_logits(self, x: Tensor) -> Tensor:
        """The models' logits, ``[k, b, K]``."""
        return torch.stack([m(x) for m in self.models])

    def ensemble_loss(self, x_cf: Tensor, target: Tensor, shift: Tensor | None = None) -> Tensor:
        """Mean cross entropy to ``target`` of the models, ``[b]``. With ``shift`` (``[k, b]``, >= 0),
        model i's target logit is lowered by ``shift[i]`` first: its loss keeps falling until the
        target leads the other classes by about that much (a margin-shifted cross entropy)."""
        logits = self.ensemble_logits(x_cf)
        if shift is not None:
            onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
            logits = logits - shift.to(logits.dtype)[..., None] * onehot
        return torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits]).mean(0)

    def goal_shift(self, query_logits: Tensor, target: Tensor) -> Tensor | None:
        """``margin`` x each model's margin *against* the target at the query (``[k, b]``; 0 where
        the query already leans to the target): the certainty with which the models read the
        query's own class, mirrored, is what the counterfactual must reach. None without margin."""
        if self.margin is None:
            return None
        return self.margin * (-target_margin(query_logits.float(), target)).clamp_min(0)

    def forward(self, x_cf, logits, feats, source, target) -> Tensor:
        if self.dep is None:
            return torch.zeros(x_cf.shape[0], device=x_cf.device, dtype=torch.promote_types(x_cf.dtype, torch.float32))
        return self.dep(x_cf, logits, feats, source, target)


def target_margin(logits: Tensor, target: Tensor) -> Tensor:
    """The target logit minus the log-sum-exp of the others, ``[..., b]`` for logits ``[..., b, K]``
    (two classes: the logit difference; > 0 where the target is predicted)."""
    z_t = logits.gather(-1, target.expand(logits.shape[:-1])[..., None]).squeeze(-1)
    others = logits.masked_fill(F.one_hot(target, logits.shape[-1]).bool().expand(logits.shape), float("-inf"))
    return z_t - torch.logsumexp(others, dim=-1)


class SurrogateManifold(EnsembleManifold):
    """``models``: classifiers trained from the explained one's recipe and data with other seeds.
    A change that moves them all is less tied to one network's quirks."""

    name = "surrogates"


def functional_loss(logits: Tensor, target: Tensor) -> Tensor:
    """L_fc: cross entropy of F(x') to the target class, per query ``[b]``."""
    return F.cross_entropy(logits, target, reduction="none")


class Manifold:
    """The ``manifold`` config group (``conf/manifold/*.yaml``): a factory that builds the L_mc
    model for the explained classifier, ``manifold(classifier, load_duq) -> nn.Module | None``.
    ``lambda_mc`` is the DEP / DUQ term's weight (lambda2); ``name`` a label."""

    name = "manifold"
    needs_dep = False   # the classifier needs its DEP loss predictor
    needs_duq = False   # a DUQ model is trained (models.duq)

    def __init__(self, lambda_mc: float = 1.0, name: str | None = None) -> None:
        require("manifold", [("lambda_mc", lambda_mc, is_number(lambda_mc, 0), "must be a number >= 0")])
        self.lambda_mc = float(lambda_mc)
        if name is not None:
            self.name = str(name)

    needs_surrogates = 0  # classifiers trained from the explained one's recipe with other seeds
    needs_robust = 0      # adversarially trained models (disc_pl.models.robust)

    def __call__(self, classifier: nn.Module, load_duq: Callable[[], nn.Module] | None = None,
                 load_surrogate: Callable[[int], nn.Module] | None = None,
                 load_robust: Callable[[int], nn.Module] | None = None) -> nn.Module | None:
        """The L_mc model; ``load_duq()``, ``load_surrogate(i)``, ``load_robust(i)`` give the
        (cached) models a manifold says it needs (``needs_duq``, ``needs_surrogates``,
        ``needs_robust``); the others are never called."""
        raise NotImplementedError


class NoManifold(Manifold):
    """No manifold-consistency term (the paper's "LSO + prior" baselines)."""

    name = "none"

    def __init__(self, lambda_mc: float = 0.0, name: str | None = None) -> None:
        super().__init__(lambda_mc, name)

    def __call__(self, classifier, load_duq=None, load_surrogate=None, load_robust=None):
        return None


class DEP(Manifold):
    """Direct error prediction (``DEPManifold``) with the classifier's own loss predictor."""

    name = "dep"
    needs_dep = True

    def __init__(self, lambda_mc: float = 0.1, name: str | None = None) -> None:
        super().__init__(lambda_mc, name)

    def __call__(self, classifier, load_duq=None, load_surrogate=None, load_robust=None):
        return DEPManifold(classifier)


class DUQ(Manifold):
    """DUQ kernel margin (``DUQManifold``) of a DUQ model trained on the same data."""

    name = "duq"
    needs_duq = True

    def __init__(self, lambda_mc: float = 1.0, margin: float = 0.5, name: str | None = None) -> None:
        super().__init__(lambda_mc, name)
        require("manifold", [("margin", margin, is_number(margin, 0), "must be a number >= 0")])
        self.margin = float(margin)

    def __call__(self, classifier, load_duq=None, load_surrogate=None, load_robust=None):
        if load_duq is None:
            raise ValueError("manifold=duq needs the DUQ model: pass load_duq (a callable returning it)")
        return DUQManifold(load_duq(), margin=self.margin)


class Surrogates(Manifold):
    """``SurrogateManifold``: ``k`` surrogate classifiers (the explained classifier's recipe and
    training data, seeds ``seed + 1000 (i + 1)``) whose mean cross entropy to the target is its
    own objective term (``surrogates``, weight ``weight``), beside the DEP term (``dep``: true;
    weight ``lambda_mc``) of the explained one. A
    bring-your-own classifier has no recipe here: its surrogates are trained by disc_pl's own
    classifier recipe (``conf/model/classifier.yaml``) on the dataset's training images."""

    name = "surrogates"
    #: Why a bring-your-own classifier is refused when the dataset gives no training images (by
    #: disc_pl.validate.validate_with_data, and by job.build_manifold)
    BYO_NO_TRAINING_IMAGES = (
        "trains surrogate classifiers by disc_pl's recipe (conf/model/classifier.yaml) on the dataset's "
        "training images for a bring-your-own classifier, and the training split is empty: give training "
        "images (e.g. dataset=folder dataset.root=<a folder with one sub-folder of images per class>), "
        "or choose manifold=dep, duq or none")

    def __init__(self, lambda_mc: float = 0.1, k: int = 4, weight: float = 1.0, dep: bool = True,
                 name: str | None = None) -> None:
        super().__init__(lambda_mc, name)
        require("manifold", [("k", k, is_integer(k) and k >= 1, "must be an integer >= 1"),
                             ("weight", weight, is_number(weight, 0), "must be a number >= 0"),
                             ("dep", dep, isinstance(dep, bool), "must be true or false")])
        self.k, self.weight, self.dep = int(k), float(weight), bool(dep)
        self.needs_dep = self.dep
        self.needs_surrogates = self.k

    def __call__(self, classifier, load_duq=None, load_surrogate=None, load_robust=None):
        if load_surrogate is None:
            raise ValueError("manifold=surrogates needs load_surrogate (a callable i -> the i-th surrogate)")
        return SurrogateManifold([load_surrogate(i) for i in range(self.k)],
                                 DEPManifold(classifier) if self.dep else None, self.weight)


class RobustManifoldLoss(EnsembleManifold):
    """``models``: adversarially trained CNNs (``disc_pl.models.robust``). A robust model's loss
    falls only when the image takes on the target class's features (perceptually aligned
    gradients), so their term pulls the change towards what the class looks like.
    ``cone_angle`` (degrees, or None) also turns the functional term into the cone projection
    (``disc_pl.cf.objective.ConeFunctionalTerm``)."""

    name = "robust"

    def __init__(self, models: Sequence[nn.Module], dep: DEPManifold | None = None, weight: float = 1.0,
                 cone_angle: float | None = None, margin: float | None = None) -> None:
        super().__init__(models, dep, weight, margin)
        self.cone_angle = None if cone_angle is None else float(cone_angle)

    def ensemble_logits(self, x: Tensor) -> Tensor:
        """In float32 (the models were trained in float32 and are cheap)."""
        x = x.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().ensemble_logits(x)


# The robust models' training recipe (disc_pl.models.robust; conf/manifold/robust.yaml's recipe).
ROBUST_RECIPE = {"width": 16, "epochs": 16, "lr": 3.0e-3, "batch_size": 64, "weight_decay": 0.0, "hflip": False,
                 "max_shift": 2, "noise": 0.0, "max_train": 2000, "eps": 0.1, "steps": 5, "warmup_epochs": 2,
                 "ramp_epochs": 6}


class Robust(Manifold):
    """``RobustManifoldLoss``: ``k`` small CNNs adversarially trained (L2 PGD, radius ``eps``) on
    the explained classifier's training images by disc_pl's recipe (``disc_pl.models.robust``;
    also for a bring-your-own classifier, given its training images), plus the DEP term of the
    explained one (``dep``); ``cone_angle`` (degrees) steers the functional term's gradient into
    a cone around the explained classifier's (DVCE)."""

    name = "robust"

    def __init__(self, lambda_mc: float = 0.1, k: int = 2, weight: float = 1.0, dep: bool = True,
                 cone_angle: float | None = None, recipe: Any = ROBUST_RECIPE, name: str | None = None,
                 margin: float | None = None) -> None:
        super().__init__(lambda_mc, name)
        require("manifold", [("k", k, is_integer(k) and k >= 1, "must be an integer >= 1"),
                             ("weight", weight, is_number(weight, 0), "must be a number >= 0"),
                             ("dep", dep, isinstance(dep, bool), "must be true or false"),
                             ("cone_angle", cone_angle, cone_angle is None or (is_number(cone_angle, 0)
                                                                                and cone_angle < 90),
                              "degrees in [0, 90) (the cone around the explained classifier's gradient), or null"),
                             ("margin", margin, margin is None or is_number(margin, 0),
                              "a number >= 0 (the share of the query's mirrored margin to reach), or null (cross entropy)")])
        self.k, self.weight, self.dep = int(k), float(weight), bool(dep)
        self.cone_angle = None if cone_angle is None else float(cone_angle)
        self.margin = None if margin is None else float(margin)
        self.recipe = recipe
        self.needs_dep = self.dep
        self.needs_robust = self.k

    def __call__(self, classifier, load_duq=None, load_surrogate=None, load_robust=None):
        if load_robust is None:
            raise ValueError("manifold=robust needs load_robust (a callable i -> the i-th robust model)")
        return RobustManifoldLoss([load_robust(i) for i in range(self.k)],
                                  DEPManifold(classifier) if self.dep else None, self.weight, self.cone_angle,
                                  self.margin)


def cone_project(g: Tensor, around: Tensor, angle_deg: float) -> Tensor:
    """Per sample, the vector nearest ``g`` within ``angle_deg`` of ``around`` (DVCE's cone
    projection, Augustin et al. 2022), with ``g``'s norm. Inside the cone ``g`` is returned as it
    is; outside it is rotated towards ``around`` onto the cone's surface. With angle < 90 the
    result has a positive dot product with ``around``: a step along it is still an ascent step
    of the function ``around`` is the gradient of. Where ``around`` is 0, ``g``; where ``g`` is 0
    or exactly opposite, ``around`` scaled to ``g``'s norm (then 0 for g = 0)."""
    shape = g.shape
    gf, af = g.flatten(1).float(), around.flatten(1).float()
    g_norm = gf.norm(dim=1, keepdim=True)
    a_norm = af.norm(dim=1, keepdim=True)
    u = af / a_norm.clamp_min(1e-30)
    along = (gf * u).sum(1, keepdim=True)
    perp = gf - along * u
    p_norm = perp.norm(dim=1, keepdim=True)
    cos_a = torch.cos(torch.deg2rad(torch.tensor(float(angle_deg))))
    sin_a = torch.sin(torch.deg2rad(torch.tensor(float(angle_deg))))
    inside = along >= cos_a * g_norm
    w = perp / p_norm.clamp_min(1e-30)
    w = w - (w * u).sum(1, keepdim=True) * u  # orthogonal to u to rounding
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    rotated = g_norm * (cos_a * u + sin_a * w)
    degenerate = p_norm <= 1e-5 * g_norm  # g (anti)parallel to around: no plane to rotate in
    rotated = torch.where(degenerate, g_norm * u, rotated)
    out = torch.where(inside, gf, rotated)
    out = torch.where(a_norm > 0, out, gf)
    return out.reshape(shape).to(g.dtype)
