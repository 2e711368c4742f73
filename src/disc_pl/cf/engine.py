"""The DISC counterfactual engine: progressive, batched, per-query inversion.

This is the Python API under ``python -m disc_pl.run``; it needs no Hydra::

    from disc_pl.cf import generate_counterfactuals, InversionOptions
    out = generate_counterfactuals(classifier, images, targets, prior="inr",
                                   manifold=DEPManifold(classifier))
    out.images, out.status, out.target_prob

``classifier`` is any module with ``forward_features(x) -> (logits, [feature maps])`` taking
[0, 1] pixels (``ClassifierModule``, a bring-your-own wrapper, or anything duck-typed).

How a batch is optimised (SPEC sections 2-5):
1. One generator per query (``disc_pl.cf.priors``), all stored as batched tensors, is fitted
   to reproduce its query (reconstruction stage, PSNR target). With ``residual=True`` (default;
   the paper is silent) the counterfactual is x' = x + G(z) - G_0(z), G_0 the fitted
   generator: the reconstruction error (e.g. 1-3 % at 30-35 dB, spread over the whole image)
   is not counted as a change, so x' = x exactly when the counterfactual stages begin and every
   difference |x - x'| is one the objective asked for, shaped by the prior.
   With ``localize_grid > 0`` (default in ``conf/run.yaml``; not in the paper) a soft spatial
   gate m (``disc_pl.cf.gate``) is learned with the generator: x' = x + m * (G - x), plus
   ``lambda_area * mean(m)`` in the objective, so the change collects where the classifier
   reads the class (term ``area``).
2. Stages k = 0..S-1 each train a growing set of generator layer groups with the semantic
   weight relaxed by ``relax**k``. Frozen prefixes are cached by the prior.
3. Each step runs only the *active* queries: a query leaves the batch once it is flipped with
   the margin and has done the stage's minimum steps (so finished queries cost nothing), or
   when its loss becomes non-finite (``diverged``: isolated, the batch goes on).
4. The best valid iterate (lowest pixel MSE to the query among flipped ones) is kept; a query
   that never flips returns its best attempt (highest target probability), ``not_flipped``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from disc_pl.cf.gate import SpatialGate
from disc_pl.cf.losses import SemanticLoss, functional_loss, per_sample_mse
from disc_pl.cf.optim import RowAdam
from disc_pl.cf.priors import Prior, build_prior

FLIPPED, NOT_FLIPPED, DIVERGED = "flipped", "not_flipped", "diverged"
TERMS = ("semantic", "manifold", "functional", "prior", "area", "total")


@dataclass
class Stage:
    """One progressive stage: which generator layer groups train, for how many steps."""

    groups: list[str]
    steps: int = 100
    min_steps: int = 10


@dataclass
class InversionOptions:
    """Every coefficient of the objective and the schedule. Defaults suit the synthetic set."""

    space: str = "lso"                      # lso: classifier activations, iso: pixels
    layers: Sequence[int] = (0, 1, 2, 3)    # feature maps compared in LSO
    lambda_sem: float = 1.0                 # lambda1, relaxed by `relax` every stage
    lambda_mc: float = 1.0                  # lambda2 (ignored when manifold is None)
    lambda_fc: float = 1.0                  # lambda3
    relax: float = 0.5                      # lambda1 *= relax per stage (paper section 3.4)
    lr: float = 1e-3                        # Adam lr of the counterfactual stages
    stages: list[Stage] = field(default_factory=lambda: [Stage(["all"])])
    target_margin: float = 0.1              # flipped: argmax = target and p_t - max p_other >= margin
    recon_steps: int = 300                  # reconstruction stage budget
    psnr_target: float = 35.0               # reconstruction stops per query at this PSNR (dB)
    recon_lr: float | None = None           # None: the prior's own default
    residual: bool = True                   # x' = x + G(z) - G_0(z): see module docstring
    # Localization gate (cf/gate.py; not in the paper): x' = x + m * (G - x), + lambda_area * mean(m)
    localize_grid: int = 8                  # gate cells per side; 0 = off (the paper's objective)
    lambda_area: float = 50.0
    gate_lr: float = 0.1                    # Adam lr of the gate logits
    gate_init: float = -3.0                 # initial logit: sigmoid(-3) = 0.05 open
    gate_fallback: bool = True              # queries the gated search cannot flip are redone ungated
    log_every: int = 10                     # call `on_log` every N steps (0 = never)
    # Expectation over transformations (not in the paper): the functional term is averaged over
    # `eot_views` random views of x' (sub-pixel shifts up to `eot_shift` px, Gaussian noise
    # `eot_noise`), so the change must survive them; 0 = off. Success is judged on x' itself.
    eot_views: int = 0
    eot_shift: float = 1.0
    eot_noise: float = 0.02

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "relax": 0 < self.relax <= 1, "lambda_sem": self.lambda_sem >= 0,
                  "lambda_mc": self.lambda_mc >= 0, "lambda_fc": self.lambda_fc > 0,
                  "recon_steps": self.recon_steps >= 0, "target_margin": 0 <= self.target_margin < 1,
                  "localize_grid": self.localize_grid >= 0, "lambda_area": self.lambda_area >= 0,
                  "gate_lr": self.gate_lr > 0, "eot_views": self.eot_views >= 0,
                  "eot_shift": self.eot_shift >= 0, "eot_noise": self.eot_noise >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"inversion.{key}={getattr(self, key)!r} is out of range "
                                 "(lr, lambda_fc > 0; lambdas >= 0; 0 < relax <= 1; "
                                 "0 <= target_margin < 1; recon_steps >= 0; localize_grid >= 0; "
                                 "lambda_area >= 0; gate_lr > 0; eot_views, eot_shift, eot_noise >= 0)")
        if not self.stages:
            raise ValueError("inversion needs at least one stage (prior.stages)")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        for i, s in enumerate(self.stages):
            if s.steps <= 0 or s.min_steps < 0:
                raise ValueError(f"stage {i}: steps={s.steps}, min_steps={s.min_steps}; "
                                 "steps must be > 0 and min_steps >= 0")


@dataclass
class CounterfactualBatch:
    """What the engine returns for B queries (all tensors on CPU)."""

    images: Tensor                 # [B, C, H, W] counterfactuals (best valid or best attempt)
    status: list[str]              # flipped | not_flipped | diverged
    source: Tensor                 # [B] class predicted for the query
    target: Tensor                 # [B]
    initial_prob: Tensor           # [B] p(target | query)
    target_prob: Tensor            # [B] p(target | counterfactual)
    prediction: Tensor             # [B] argmax F(counterfactual)
    steps: Tensor                  # [B] counterfactual-stage optimisation steps taken
    recon_psnr: Tensor             # [B] PSNR of the reconstruction stage (dB)
    seconds: float                 # wall time of the whole batch
    losses: dict[str, Tensor] = field(default_factory=dict)  # term -> [B] at the kept iterate
    localized: Tensor | None = None  # [B] bool: the kept image came from the gated search; None: no gate


def _probs(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=1)


def is_flipped(logits: Tensor, target: Tensor, margin: float) -> Tensor:
    """argmax = target and p_target - max_{c != target} p_c >= margin, per query ``[b]``."""
    p = _probs(logits)
    p_t = p.gather(1, target[:, None]).squeeze(1)
    other = p.scatter(1, target[:, None], -1.0).max(1).values
    return (p.argmax(1) == target) & (p_t - other >= margin)


def random_views(x: Tensor, shift: float, noise: float) -> Tensor:
    """One random view of each image: a bilinear translation by up to ``shift`` pixels per axis
    (border padding) plus Gaussian pixel noise of std ``noise``, clamped to [0, 1]."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    offsets = (torch.rand(b, 2, device=x.device, dtype=x.dtype) * 2 - 1) * shift
    theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (out + noise * torch.randn_like(out)).clamp(0, 1)


def _invert(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    prior: str | Prior = "inr",
    prior_hparams: Mapping | None = None,
    manifold: nn.Module | None = None,
    options: InversionOptions | None = None,
    seeds: Sequence[int] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> CounterfactualBatch:
    """One inversion pass over a batch (see ``generate_counterfactuals``)."""
    opts = options or InversionOptions()
    t_start = time.perf_counter()
    images = images.detach()
    B, device = images.shape[0], images.device
    classifier.eval()
    for module in (classifier, manifold):
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)

    gen = prior if isinstance(prior, Prior) else build_prior(prior, images, seeds, **dict(prior_hparams or {}))
    recon_psnr = gen.reconstruct(opts.recon_steps, opts.psnr_target, lr=opts.recon_lr) if opts.recon_steps \
        else torch.full((B,), float("nan"))

    if opts.residual:
        with torch.no_grad():
            residual = images - gen()
        render = lambda rows: (gen(rows) + (residual if rows is None else residual[rows])).clamp(0, 1)  # noqa: E731
    else:
        render = gen
    gate = None
    if opts.localize_grid:
        gate = SpatialGate(B, opts.localize_grid, tuple(images.shape[-2:]), opts.gate_init, device)
        gate_optim = RowAdam([gate.logits], lr=opts.gate_lr)
    semantic = SemanticLoss(opts.space, opts.layers)
    with torch.no_grad():
        logits0, feats0 = classifier.forward_features(images)
        reference = semantic.reference(images, feats0)
    source = logits0.argmax(1)
    initial_prob = _probs(logits0).gather(1, targets[:, None]).squeeze(1)

    best = images.clone()
    best_dist = torch.full((B,), math.inf, device=device)     # among valid iterates
    best_attempt_p = torch.full((B,), -1.0, device=device)   # among all iterates
    valid_found = torch.zeros(B, dtype=torch.bool, device=device)
    diverged = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)
    kept_terms = {t: torch.full((B,), math.nan, device=device) for t in TERMS}

    optim = RowAdam(gen.parameter_groups(["all"]), lr=opts.lr)
    global_step = 0
    for k, stage in enumerate(opts.stages):
        gen.set_trainable(stage.groups)
        lam_sem = opts.lambda_sem * opts.relax ** k
        for it in range(stage.steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # While every query is active (most steps), None takes the prior's and RowAdam's
            # whole-batch paths instead of gathering and scattering every parameter row.
            everyone = idx.numel() == B
            subset = None if everyone else idx
            x = render(subset)
            area = torch.zeros(idx.numel(), device=device)
            if gate is not None:
                x, m = gate.apply(images if everyone else images[idx], x, subset)
                area = m.flatten(1).mean(1)
            logits, feats = classifier.forward_features(x)
            terms = {
                "semantic": semantic(x, feats, [r[idx] for r in reference]),
                "functional": functional_loss(logits, targets[idx]) if not opts.eot_views else
                torch.stack([functional_loss(classifier(random_views(x, opts.eot_shift, opts.eot_noise)),
                                             targets[idx]) for _ in range(opts.eot_views)]).mean(0),
                "prior": gen.regularizer(x, idx),
                "area": area,
            }
            terms["manifold"] = (manifold(x, logits, feats, source[idx], targets[idx])
                                 if manifold is not None else torch.zeros_like(terms["functional"]))
            total = (lam_sem * terms["semantic"] + opts.lambda_mc * terms["manifold"]
                     + opts.lambda_fc * terms["functional"] + terms["prior"]
                     + opts.lambda_area * terms["area"])
            terms["total"] = total
            finite = torch.isfinite(total)
            optim.zero_grad()
            if gate is not None:
                gate_optim.zero_grad()
            if finite.any():
                total[finite].sum().backward()
                stepped = None if everyone and bool(finite.all()) else idx[finite]
                optim.step(stepped)
                if gate is not None:
                    gate_optim.step(stepped)

            with torch.no_grad():
                # Bookkeeping on the iterate just evaluated (before this step's update).
                bad = idx[~finite]
                diverged[bad] = True
                active[bad] = False
                idx, x, logits = idx[finite], x[finite], logits[finite]
                terms = {t: v.detach()[finite] for t, v in terms.items()}
                steps[idx] += 1
                valid = is_flipped(logits, targets[idx], opts.target_margin)
                dist = per_sample_mse(x, images[idx])
                better = valid & (dist < best_dist[idx])
                p_t = _probs(logits).gather(1, targets[idx, None]).squeeze(1)
                attempt = ~valid_found[idx] & ~valid & (p_t > best_attempt_p[idx])
                keep = better | attempt
                rows = idx[keep]
                best[rows] = x[keep].detach()
                best_dist[idx[better]] = dist[better]
                best_attempt_p[idx[attempt]] = p_t[attempt]
                for t in TERMS:
                    kept_terms[t][rows] = terms[t][keep]
                valid_found[idx[valid]] = True
                done = valid & (it + 1 >= stage.min_steps)
                active[idx[done]] = False
            global_step += 1
            if on_log is not None and opts.log_every and global_step % opts.log_every == 0:
                stats = {f"cf/loss_{t}": float(v.mean()) for t, v in terms.items() if v.numel()}
                stats.update({"cf/stage": k, "cf/active": int(active.sum()),
                              "cf/lambda_sem": lam_sem})
                on_log(stats)

    with torch.no_grad():
        logits_final = classifier(best)
    # A query that found a valid iterate before diverging still has a valid counterfactual.
    status = [FLIPPED if v else (DIVERGED if d else NOT_FLIPPED)
              for d, v in zip(diverged.tolist(), valid_found.tolist())]
    return CounterfactualBatch(
        images=best.cpu(), status=status, source=source.cpu(), target=targets.cpu(),
        initial_prob=initial_prob.cpu(),
        target_prob=_probs(logits_final).gather(1, targets[:, None]).squeeze(1).cpu(),
        prediction=logits_final.argmax(1).cpu(), steps=steps.cpu(), recon_psnr=recon_psnr.cpu(),
        seconds=time.perf_counter() - t_start, losses={t: v.cpu() for t, v in kept_terms.items()},
        localized=torch.ones(B, dtype=torch.bool) if gate is not None else None,
    )


def generate_counterfactuals(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    prior: str | Prior = "inr",
    prior_hparams: Mapping | None = None,
    manifold: nn.Module | None = None,
    options: InversionOptions | None = None,
    seeds: Sequence[int] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> CounterfactualBatch:
    """Counterfactuals for a batch of queries ``images [B,C,H,W]`` in [0, 1] towards ``targets [B]``.

    ``seeds[i]`` seeds query i's generator; results for a query depend only on its image, target
    and seed, not on the rest of the batch. See the module docstring for the algorithm.

    With the localization gate on and ``gate_fallback`` (default), a query the gated search
    does not flip is optimised again from scratch with the paper's objective (no gate, same
    seed); ``localized[i]`` says which search the returned image came from, and ``steps``
    counts both. A query is thus never left unflipped only because its evidence is not local.
    The fallback rebuilds the generator, so it needs ``prior`` by name; with a ``Prior`` instance
    the gated result is returned as it is.
    """
    opts = options or InversionOptions()
    t_start = time.perf_counter()
    images = images.detach()
    B = images.shape[0]
    targets = torch.as_tensor(targets, device=images.device).long().view(-1)
    if targets.shape[0] != B:
        raise ValueError(f"{B} images but {targets.shape[0]} targets")
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    kwargs = dict(prior=prior, prior_hparams=prior_hparams, manifold=manifold, on_log=on_log)
    out = _invert(classifier, images, targets, options=opts, seeds=seeds, **kwargs)
    redo = [i for i, s in enumerate(out.status) if s == NOT_FLIPPED]
    if not (opts.localize_grid and opts.gate_fallback and redo and isinstance(prior, str)):
        out.seconds = time.perf_counter() - t_start
        return out
    rows = torch.tensor(redo)
    again = _invert(classifier, images[rows.to(images.device)], targets[rows.to(targets.device)],
                    options=dataclasses.replace(opts, localize_grid=0), seeds=[seeds[i] for i in redo],
                    **kwargs)
    # The ungated result replaces the gated attempt when it flipped, or when neither flipped
    # and it came closer (higher target probability).
    better = torch.tensor([s == FLIPPED or (s == NOT_FLIPPED and float(p) > float(out.target_prob[i]))
                           for s, p, i in zip(again.status, again.target_prob, redo)])
    take, src = rows[better], torch.arange(len(redo))[better]
    for name in ("images", "target_prob", "prediction", "recon_psnr"):
        getattr(out, name)[take] = getattr(again, name)[src]
    for t, v in out.losses.items():
        v[take] = again.losses[t][src]
    for i, j in zip(take.tolist(), src.tolist()):
        out.status[i] = again.status[j]
    out.localized[take] = False
    out.steps[rows] += again.steps
    out.seconds = time.perf_counter() - t_start
    return out
