"""The objective as a list of named, weighted terms (paper eq. 5, plus the gate's area).

    total = sum_k  weight_k * relax_k ** stage * term_k(step)

Each term maps the b active queries of one step to a tensor ``[b]`` and is logged under its
name (``cf/loss_<name>``, results.csv ``loss_<name>``). The engine sums whatever list it is
given, so a new term (an L1 trial, a view-averaging term) is a small class here plus a config
entry, not an edit of the engine: an optional term is one class (here or in any importable
module) and one yaml in ``conf/term/`` (``_target_`` + its arguments, under the term's name),
chosen with ``term=[name, ...]``. ``default_objective`` is the paper's objective (+ the area of
the localization gate, + the chosen optional terms), built from ``InversionOptions``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from disc_pl.cf.losses import (EnsembleManifold, RobustManifoldLoss, SemanticSpace, cone_project, functional_loss,
                              semantic_space)
from disc_pl.errors import is_integer, is_number, require


@dataclass
class Step:
    """What a term sees at one step: the b active queries (rows ``idx`` of the batch)."""

    x: Tensor                 # [b, C, H, W] candidate counterfactuals in [0, 1]
    logits: Tensor            # [b, K] classifier logits of x
    feats: Sequence[Tensor]   # the classifier's feature maps of x
    query: Tensor             # [b, C, H, W] the queries
    source: Tensor            # [b] class predicted for the query
    target: Tensor            # [b]
    idx: Tensor               # [b] rows of the batch
    prior: Any                # the batch's generators, a disc_pl.cf.priors.Prior (its regulariser)
    mask: Tensor | None       # [b, 1, H, W] gate mask, None without the gate
    classifier: Any = None    # the explained classifier (terms that evaluate other views of x)
    # x with the gate held fixed (same values, no gradient to the gate): what models other than
    # the explained classifier evaluate under ``localize.opened_by=explained``; None: x itself
    x_held: Tensor | None = None

    @property
    def x_guide(self) -> Tensor:
        """The image a guiding model (robust models, surrogates) evaluates."""
        return self.x if self.x_held is None else self.x_held


class Term:
    """A named, weighted term. ``relax`` < 1 shrinks its weight at every progressive stage."""

    name: str = "term"

    def __init__(self, weight: float = 1.0, relax: float = 1.0) -> None:
        require(f"term.{self.name}", [("weight", weight, is_number(weight, 0), "must be a number >= 0")])
        self.weight, self.relax = float(weight), float(relax)

    def weight_at(self, stage: int) -> float:
        return self.weight * self.relax ** stage

    def prepare(self, images: Tensor, feats: Sequence[Tensor]) -> Any:
        """Per-pass state (e.g. a reference), from the queries and their features."""
        return None

    def __call__(self, step: Step, state: Any) -> Tensor:  # -> [b]
        raise NotImplementedError


class SemanticTerm(Term):
    """d(Phi(x'), Phi(x)) in the latent (lso) or image (iso) space (``disc_pl.cf.losses``)."""

    name = "semantic"

    def __init__(self, space: str | SemanticSpace = "lso", layers: Sequence[int] = (0, 1, 2, 3),
                 weight: float = 1.0, relax: float = 1.0) -> None:
        super().__init__(weight, relax)
        self.loss = semantic_space(space, layers)

    def prepare(self, images, feats):
        return self.loss.reference(images, feats)

    def __call__(self, step, state):
        return self.loss(step.x, step.feats, [r[step.idx] for r in state])


class ManifoldTerm(Term):
    """L_mc of a manifold model (``DEPManifold``, ``DUQManifold``); zeros for ``None``."""

    name = "manifold"

    def __init__(self, manifold: nn.Module | None, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.manifold = manifold

    def __call__(self, step, state):
        if self.manifold is None:
            return torch.zeros(step.logits.shape[0], device=step.logits.device, dtype=step.logits.dtype)
        return self.manifold(step.x, step.logits, step.feats, step.source, step.target)


class EnsembleTerm(Term):
    """The mean cross entropy to the target of a manifold's other models (robust models or
    surrogates: ``disc_pl.cf.losses.EnsembleManifold``), named after the manifold (``robust``,
    ``surrogates``), weighted by the manifold's ``weight``."""

    def __init__(self, manifold: nn.Module, weight: float = 1.0) -> None:
        self.name = manifold.name
        super().__init__(weight)
        self.manifold = manifold

    def prepare(self, images, feats):
        """The models' logits at the queries where the manifold sets a ``margin`` (its goal)."""
        if self.manifold.margin is None:
            return None
        with torch.no_grad():
            return self.manifold.ensemble_logits(images)

    def __call__(self, step, state):
        shift = None if state is None else self.manifold.goal_shift(state[:, step.idx], step.target)
        return self.manifold.ensemble_loss(step.x_guide, step.target, shift)


def random_views(x: Tensor, shift: float, noise: float, hflip: bool = False) -> Tensor:
    """One random view of each image: a bilinear translation by up to ``shift`` pixels per axis
    (border padding), with ``hflip`` a left-right mirror of half the images (at random), plus
    Gaussian pixel noise of std ``noise``, clamped to [0, 1]."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if hflip:  # x -> -x in the sampling grid mirrors the image
        theta[:, 0, 0] = torch.where(torch.rand(b, device=x.device) < 0.5, -1.0, 1.0).to(x.dtype)
    offsets = (torch.rand(b, 2, device=x.device, dtype=x.dtype) * 2 - 1) * shift
    theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out + noise * torch.randn_like(out)).clamp(0, 1)


class FunctionalTerm(Term):
    """Cross entropy of F(x') to the target class (lambda3)."""

    name = "functional"

    def __call__(self, step, state):
        return functional_loss(step.logits, step.target)


class EOTTerm(Term):
    """Expectation over transformations (not in the paper; ``term=[eot]``): the cross entropy of
    F to the target averaged over ``views`` random views of x' (``random_views``: sub-pixel shifts
    up to ``shift`` px, Gaussian noise ``noise``, with ``hflip`` mirrored at random too, only
    where labels survive mirroring), so the change must survive them. Success is still judged on
    x' itself."""

    name = "eot"

    def __init__(self, weight: float = 1.0, views: int = 4, shift: float = 1.0, noise: float = 0.02,
                 hflip: bool = False) -> None:
        super().__init__(weight)
        require("term.eot", [
            ("views", views, is_integer(views, 1), "must be an integer >= 1"),
            ("shift", shift, is_number(shift, 0), "must be a number >= 0 (pixels)"),
            ("noise", noise, is_number(noise, 0), "must be a number >= 0 (pixel noise std)"),
            ("hflip", hflip, isinstance(hflip, bool), "must be true or false")])
        self.views, self.shift, self.noise, self.hflip = int(views), float(shift), float(noise), hflip

    def __call__(self, step, state):
        losses = [functional_loss(step.classifier(random_views(step.x, self.shift, self.noise, self.hflip)),
                                  step.target)
                  for _ in range(self.views)]
        return torch.stack(losses).mean(0)


class ConeFunctionalTerm(Term):
    """The functional term (cross entropy of the explained classifier F to the target) whose
    gradient in image space is replaced by DVCE's cone projection (Augustin et al. 2022): the
    gradient of the robust models' cross entropy, rotated into the cone of ``angle`` degrees
    around F's own gradient (``disc_pl.cf.losses.cone_project``), at the norm of F's gradient.
    The step still lowers F's loss (an ascent direction of p_target under F, to first order),
    but follows what the robust models see, whose gradients look like the class. Its value is
    F's cross entropy (what is logged and weighed); only the direction differs. Costs one more
    backward pass through F and one through the robust models per step."""

    name = "functional"

    def __init__(self, robust: nn.Module, weight: float = 1.0, angle: float = 30.0) -> None:
        super().__init__(weight)
        self.robust, self.angle = robust, float(angle)

    def __call__(self, step, state):
        ce = functional_loss(step.logits, step.target)
        x = step.x
        if not (torch.is_grad_enabled() and x.requires_grad):
            return ce
        g_f, = torch.autograd.grad(ce.sum(), x, retain_graph=True)
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            g_r, = torch.autograd.grad(self.robust.ensemble_loss(xr, step.target).sum(), xr)
        d = cone_project(g_r, g_f, self.angle).float()
        d = (d * (g_f.float().flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-30)).view(
            -1, *([1] * (d.dim() - 1)))).detach()
        lin = (x.float() * d.float()).flatten(1).sum(1)
        return ce.detach() + (lin - lin.detach())  # the value of F's loss, the gradient d


def farthest_colours(images: Tensor, k: int) -> Tensor:
    """A palette of ``k`` colours per image, [B, C, H, W] -> [B, k, C]: farthest-point sampling
    over the image's pixels (from the pixel nearest the mean colour, each next colour the pixel
    farthest from those taken), so rare but distinct colours (lips, an iris) are in it."""
    pix = images.detach().float().flatten(2).transpose(1, 2)  # [B, N, C]
    first = (pix - pix.mean(1, keepdim=True)).pow(2).sum(2).argmin(1)  # [B]
    rows = torch.arange(pix.shape[0], device=pix.device)
    chosen = [pix[rows, first]]
    dist = (pix - chosen[0][:, None]).pow(2).sum(2)  # [B, N] to the nearest chosen colour
    for _ in range(1, min(k, pix.shape[1])):
        nxt = pix[rows, dist.argmax(1)]
        chosen.append(nxt)
        dist = torch.minimum(dist, (pix - nxt[:, None]).pow(2).sum(2))
    return torch.stack(chosen, 1)


def palette_distance(x: Tensor, palette: Tensor) -> Tensor:
    """[b, C, H, W] pixels, [b, k, C] palettes -> [b, H*W]: squared distance of each pixel to
    the nearest colour of its image's palette."""
    pix = x.float().flatten(2).transpose(1, 2)  # [b, N, C]
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 as one batched matmul (no [b, N, k, C] intermediate)
    d2 = torch.baddbmm(palette.pow(2).sum(2)[:, None, :], pix, palette.transpose(1, 2), alpha=-2.0)
    return (d2.min(2).values + pix.pow(2).sum(2)).clamp_min(0.0)


class PaletteTerm(Term):
    """Colour consistency (not in the paper): no pixel of x' may end farther from the query's
    palette than it was in the query, mean_p relu(d(x'_p) - d(x_p)), d = squared distance to
    the nearest of ``colours`` palette colours (``farthest_colours``). A change drawn in
    colours the image already has (skin, lips, background) costs nothing; one in colours it
    lacks (the saturated speckle an optimiser paints to move a classifier) costs its distance.
    Zero for x' = x whatever the palette misses."""

    name = "palette"

    def __init__(self, weight: float = 1.0, colours: int = 32) -> None:
        super().__init__(weight)
        require("term.palette", [("colours", colours, is_integer(colours, 1), "must be an integer >= 1")])
        self.colours = int(colours)

    def prepare(self, images, feats):
        palette = farthest_colours(images, self.colours)
        return palette, palette_distance(images, palette)

    def __call__(self, step, state):
        palette, base = state[0][step.idx], state[1][step.idx]
        return torch.relu(palette_distance(step.x, palette) - base).mean(1)


class ChangeTVTerm(Term):
    """Smoothness of the change (not in the paper): the anisotropic total variation of x' - x,
    mean |horizontal and vertical neighbour differences| per query. Pixel speckle costs much
    more than a coherent stroke of the same energy."""

    name = "change_tv"

    def __call__(self, step, state):
        d = step.x.float() - step.query.float()
        dy = (d[:, :, 1:, :] - d[:, :, :-1, :]).abs().flatten(1).mean(1)
        dx = (d[:, :, :, 1:] - d[:, :, :, :-1]).abs().flatten(1).mean(1)
        return dx + dy


class ChangeL1Term(Term):
    """Sparsity of the change (not in the paper): mean |x' - x| per query, the L1 cost of
    sparse counterfactuals (elastic-net style, as CEM / Wachter et al.'s L1). Under the same
    pixel budget a change that moves a few pixels far costs less than a faint wash over many:
    the change collects on the pixels the classifier responds to most."""

    name = "change_l1"

    def __init__(self, weight: float = 10.0) -> None:  # conf/term/change_l1.yaml
        super().__init__(weight)

    def __call__(self, step, state):
        return (step.x.float() - step.query.float()).abs().flatten(1).mean(1)


class GateSharpTerm(Term):
    """A decided gate (not in the paper): mean 4 m (1 - m) over the pixels, 1 where the gate is
    half open and 0 where it is shut or open. A half-open gate blends the query with the prior's
    image (x' = x + m (G - x)): with a deformation prior that is the old mouth and the bent one
    laid over each other, a ghost the classifier may accept. This term asks the gate to decide, so
    the prior has to draw the edit itself. Zeros without the gate."""

    name = "gate_sharp"

    def __init__(self, weight: float = 10.0) -> None:  # conf/term/gate_sharp.yaml
        super().__init__(weight)

    def __call__(self, step, state):
        if step.mask is None:
            return torch.zeros(step.x.shape[0], device=step.x.device, dtype=step.x.dtype)
        m = step.mask.float()
        return (4 * m * (1 - m)).flatten(1).mean(1)


class PriorTerm(Term):
    """The prior's own regulariser (TV + L2 for tv; zeros for the network priors)."""

    name = "prior"

    def __call__(self, step, state):
        return step.prior.regularizer(step.x, step.idx)


class AreaTerm(Term):
    """The gated fraction of the image, mean(m) (``disc_pl.cf.gate``); zeros without the gate."""

    name = "area"

    def __call__(self, step, state):
        if step.mask is None:
            return torch.zeros(step.x.shape[0], device=step.x.device, dtype=step.x.dtype)
        return step.mask.flatten(1).mean(1)


def functional_term(options: Any, manifold: nn.Module | None) -> Term:
    """F's cross entropy; with a robust manifold that sets ``cone_angle``, cone-projected."""
    if isinstance(manifold, RobustManifoldLoss) and manifold.cone_angle is not None:
        return ConeFunctionalTerm(manifold, options.lambda_fc, manifold.cone_angle)
    return FunctionalTerm(options.lambda_fc)


def default_objective(options: Any, manifold: nn.Module | None = None) -> list[Term]:
    """The paper's objective (eq. 5) with the coefficients of ``options`` (an
    ``InversionOptions``), + the gate's area, + the optional terms ``options.terms`` (the
    ``term`` config group: one class and one yaml each)."""
    ensemble = [EnsembleTerm(manifold, manifold.weight)] if isinstance(manifold, EnsembleManifold) else []
    return [SemanticTerm(options.space, options.layers, options.lambda_sem, options.relax),
            ManifoldTerm(manifold, options.lambda_mc), *ensemble,
            functional_term(options, manifold),
            PriorTerm(1.0), AreaTerm(options.gate.lambda_area if options.gate is not None else 0.0),
            *options.terms]


def check_objective(terms: Sequence[Term]) -> list[Term]:
    names = [t.name for t in terms]
    if not terms or len(set(names)) != len(names) or "total" in names:
        raise ValueError(f"objective terms {names}: need at least one, unique names, none called 'total'")
    return list(terms)
