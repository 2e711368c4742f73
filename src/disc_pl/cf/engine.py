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
   With ``options.gate`` set (default in ``conf/run.yaml``; not in the paper) a soft spatial
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
5. With ``options.fallback`` (a ``PriorFallback``; not in the paper) the queries still not
   flipped are optimised again from scratch by a second prior (e.g. a deformation prior, which
   can only move pixels, falls back to the INR for the queries that need new ones).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from torch.profiler import record_function

from disc_pl.cf import precision as amp
from disc_pl.cf.gate import GateOptions, SpatialGate
from disc_pl.cf.losses import SemanticSpace, per_sample_mse
from disc_pl.cf.objective import Step, Term, check_objective, default_objective
from disc_pl.cf.optim import RowAdam
from disc_pl.cf.priors import Prior, build_prior

FLIPPED, NOT_FLIPPED, DIVERGED = "flipped", "not_flipped", "diverged"


@dataclass
class Stage:
    """One progressive stage: which generator layer groups train, for how many steps."""

    groups: list[str]
    steps: int = 100
    min_steps: int = 10
    # Coarse-to-fine (continuous priors): the generator renders a grid of at most this many
    # pixels per side and its change is enlarged bilinearly to full size (None = full size).
    size: int | None = None


@dataclass
class PriorFallback:
    """A second prior for the queries the first one does not flip (``prior.fallback``): the
    generator (a prior name + ``prior_hparams``, or a factory ``(images, seeds) -> Prior``) and
    the full options of its run (its own lr, stages, reconstruction; the rest as the first's)."""

    prior: str | Callable[[Tensor, Sequence[int]], Prior]
    options: "InversionOptions"
    prior_hparams: Mapping | None = None
    name: str = ""                          # a label for logs


@dataclass
class InversionOptions:
    """Every coefficient of the objective and the schedule. Defaults suit the synthetic set."""

    space: SemanticSpace | str = "lso"      # a SemanticSpace (cf/losses.py); by name: lso | iso
    layers: Sequence[int] = (0, 1, 2, 3)    # feature maps compared by space="lso" (given by name)
    lambda_sem: float = 1.0                 # lambda1, relaxed by `relax` every stage
    lambda_mc: float = 1.0                  # lambda2 (ignored when manifold is None)
    lambda_fc: float = 1.0                  # lambda3
    relax: float = 0.5                      # lambda1 *= relax per stage (paper section 3.4)
    lr: float = 1e-3                        # Adam lr of the counterfactual stages
    stages: list[Stage] = field(default_factory=lambda: [Stage(["all"])])
    target_margin: float = 0.1              # flipped: argmax = target and p_t - max p_other >= margin
    # A query keeps optimising until its margin reaches `target_confidence` (None: target_margin),
    # and the image kept is the closest one that reaches it, else the most confident one; the
    # status still counts as flipped at `target_margin` (not in the paper).
    target_confidence: float | None = None
    recon_steps: int = 300                  # reconstruction stage budget
    psnr_target: float = 35.0               # reconstruction stops per query at this PSNR (dB)
    recon_lr: float | None = None           # None: the prior's own default
    recon_sizes: Sequence[int | None] = (None,)  # coarse-to-fine reconstruction grids (Prior.reconstruct)
    residual: bool = True                   # x' = x + G(z) - G_0(z): see module docstring
    # Localization gate (cf/gate.py; not in the paper): x' = x + m * (G - x), + lambda_area * mean(m)
    # None = off (the paper's objective); GateOptions: grid, lambda_area, lr, init, fallback
    gate: GateOptions | None = field(default_factory=GateOptions)
    log_every: int = 10                     # call `on_log` every N steps (0 = never)
    # Expectation over transformations (not in the paper): the functional term is averaged over
    # `eot_views` random views of x' (sub-pixel shifts up to `eot_shift` px, Gaussian noise
    # `eot_noise`), so the change must survive them; 0 = off. Success is judged on x' itself.
    eot_views: int = 0
    eot_shift: float = 1.0
    eot_noise: float = 0.02
    eot_hflip: bool = False                 # views are also mirrored left-right at random
    # Colour consistency (not in the paper; cf/objective.PaletteTerm): weight of the mean squared
    # distance from each pixel of x' to the nearest colour of its query; 0 = off.
    lambda_palette: float = 0.0
    # Smoothness of the change (cf/objective.ChangeTVTerm): weight of the TV of x' - x; 0 = off.
    lambda_change_tv: float = 0.0
    # Numeric precision (disc_pl.cf.precision): 32 | bf16-mixed | 16-mixed | auto (resolved on
    # the queries' device when the batch starts: bf16-mixed where it computes bf16 natively).
    precision: str = "32"
    # A second prior for the queries this one does not flip (PriorFallback; None = off). With it,
    # the gate's own ungated retry (gate.fallback) is left to the fallback prior's run.
    fallback: PriorFallback | None = None

    def __post_init__(self) -> None:
        self.precision = amp.normalize(self.precision)
        if self.fallback is not None and not isinstance(self.fallback, PriorFallback):
            raise ValueError(f"inversion fallback must be a PriorFallback or None, got {type(self.fallback).__name__}")
        if self.fallback is not None and self.fallback.options.fallback is not None:
            raise ValueError("a fallback prior cannot have a fallback of its own (one level only)")
        checks = {"lr": self.lr > 0, "relax": 0 < self.relax <= 1, "lambda_sem": self.lambda_sem >= 0,
                  "lambda_mc": self.lambda_mc >= 0, "lambda_fc": self.lambda_fc > 0,
                  "recon_steps": self.recon_steps >= 0, "target_margin": 0 <= self.target_margin < 1,
                  "target_confidence": (self.target_confidence is None
                                        or self.target_margin <= self.target_confidence < 1),
                  "eot_views": self.eot_views >= 0,
                  "eot_shift": self.eot_shift >= 0, "eot_noise": self.eot_noise >= 0,
                  "eot_hflip": isinstance(self.eot_hflip, bool), "lambda_palette": self.lambda_palette >= 0,
                  "lambda_change_tv": self.lambda_change_tv >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"inversion.{key}={getattr(self, key)!r} is out of range "
                                 "(lr, lambda_fc > 0; lambdas >= 0; 0 < relax <= 1; "
                                 "0 <= target_margin < 1; target_confidence null or in "
                                 "[target_margin, 1); recon_steps >= 0; "
                                 "eot_views, eot_shift, eot_noise >= 0; eot_hflip true or false)")
        if not self.stages:
            raise ValueError("inversion needs at least one stage (prior.stages)")
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        for i, s in enumerate(self.stages):
            if s.steps <= 0 or s.min_steps < 0:
                raise ValueError(f"stage {i}: steps={s.steps}, min_steps={s.min_steps}; "
                                 "steps must be > 0 and min_steps >= 0")
            if s.size is not None and s.size < 4:
                raise ValueError(f"stage {i}: size={s.size} must be null (full size) or a grid of >= 4 pixels per side")
        self.recon_sizes = tuple(None if r is None else int(r) for r in self.recon_sizes)
        if not self.recon_sizes or not all(r is None or r >= 4 for r in self.recon_sizes):
            raise ValueError(f"recon_sizes={list(self.recon_sizes)} must be a non-empty list of grid sizes "
                             "(pixels per side, >= 4; null = full size), e.g. [48] or [24, 48, null]")


def stage_sizes(prior: Mapping) -> list[int | None]:
    """One render grid per stage of a prior config (coarse-to-fine; None = full size): its
    ``sizes`` list, or ``early_size`` for every stage but the last (which renders full size)."""
    n = len(prior["stages"])
    sizes, early = prior.get("sizes"), prior.get("early_size")
    if sizes is not None and early is not None:
        raise ValueError(f"prior.sizes={list(sizes)} and prior.early_size={early} both set the stages' "
                         "grids: set one (prior.early_size=null to use prior.sizes)")
    return list(sizes) if sizes is not None else [early] * (n - 1) + [None]


def prior_schedule(prior: Mapping, steps_per_stage: int, min_steps: int) -> dict:
    """The ``InversionOptions`` a prior's config owns: its stage lr and layer-group stages
    (``lr``, ``stages``, coarse-to-fine ``early_size`` or ``sizes``) and its reconstruction (``recon.max_steps``,
    ``recon.psnr_target``, ``recon.lr``, ``recon.sizes``), each stage ``steps_per_stage`` long
    with ``min_steps`` before an early stop."""
    recon = prior.get("recon") or {}
    sizes = stage_sizes(prior)
    return dict(lr=float(prior["lr"]),
                stages=[Stage(list(g), int(steps_per_stage), int(min_steps), size=size)
                        for g, size in zip(prior["stages"], sizes, strict=True)],  # lengths: validate
                recon_steps=int(recon.get("max_steps", 0)), psnr_target=float(recon.get("psnr_target", 35.0)),
                recon_lr=recon.get("lr"), recon_sizes=tuple(recon.get("sizes") or (None,)))


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
    seconds: Tensor                # [B] float64 wall time per query (its share of each step it ran)
    losses: dict[str, Tensor] = field(default_factory=dict)  # term -> [B] at the kept iterate
    localized: Tensor | None = None  # [B] bool: the kept image came from the gated search; None: no gate
    fallback: Tensor | None = None   # [B] bool: the kept image came from the fallback prior; None: none set
    precision: str = "32"          # the precision it ran in (inversion.precision, resolved)


def _probs(logits: Tensor) -> Tensor:
    # at least float32 (half-precision logits), float64 logits stay float64
    return torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))


def is_flipped(logits: Tensor, target: Tensor, margin: float) -> Tensor:
    """argmax = target and p_target - max_{c != target} p_c >= margin, per query ``[b]``."""
    p = _probs(logits)
    p_t = p.gather(1, target[:, None]).squeeze(1)
    other = p.scatter(1, target[:, None], -1.0).max(1).values
    return (p.argmax(1) == target) & (p_t - other >= margin)


PriorFactory = Callable[[Tensor, Sequence[int]], Prior]  # (images, seeds) -> Prior, e.g. partial(INRPrior, ...)


def make_prior(prior: str | Prior | PriorFactory, images: Tensor, seeds: Sequence[int],
               hparams: Mapping | None = None) -> Prior:
    """The batch's generators: ``prior`` itself (a Prior), built by a factory (what a run
    config's ``prior.hparams`` instantiates to), or by name (+ ``hparams``; the Python API)."""
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, str):
        return build_prior(prior, images, seeds, **dict(hparams or {}))
    return prior(images, seeds)


class _Renderer:
    """x'(rows) from the generator: with ``residual``, x' = x + G - G_0 (module docstring);
    on a coarse stage the change G - G_0 is rendered on the prior's coarse grid and enlarged
    bilinearly to full size, x' = x + up(G_c - G_0,c). G_0 is rendered once per grid, right
    after the reconstruction (before any counterfactual step changes G)."""

    def __init__(self, gen: Prior, images: Tensor, residual: bool, sizes: list[int | None]) -> None:
        self.gen, self.images, self.residual = gen, images, residual
        self.full = gen.full_size
        self.size = self.full
        self.base: dict[tuple[int, int], Tensor] = {}
        if not residual:
            return  # x' = G (enlarged on a coarse grid): no G_0 needed
        with torch.no_grad():
            for size in {gen.size_at(s) for s in sizes} | {self.full}:
                gen.set_render_size(size)
                self.base[size] = images - gen() if size == self.full else gen()
            gen.set_render_size(self.full)

    def set_size(self, max_side: int | None) -> None:
        self.size = self.gen.size_at(max_side)
        self.gen.set_render_size(self.size)

    def __call__(self, rows: Tensor | None) -> Tensor:
        gen, size = self.gen, self.images.shape[-2:]
        if not self.residual:
            x = gen(rows)
            return x if self.size == self.full else torch.nn.functional.interpolate(
                x, size=size, mode="bilinear", align_corners=False)
        base = self.base[self.size]
        if self.size == self.full:
            return (gen(rows) + (base if rows is None else base[rows])).clamp(0, 1)
        delta = gen(rows) - (base if rows is None else base[rows])
        query = self.images if rows is None else self.images[rows]
        up = torch.nn.functional.interpolate(delta, size=size, mode="bilinear", align_corners=False)
        return (query + up).clamp(0, 1)


def _invert(classifier: nn.Module, images: Tensor, targets: Tensor, seeds: Sequence[int], opts: InversionOptions,
            pass_: dict, fitted: tuple[dict[str, Tensor], Tensor] | None = None,
            ) -> tuple[CounterfactualBatch, tuple[dict[str, Tensor], Tensor] | None]:
    """One inversion pass over a batch (see ``generate_counterfactuals``; ``pass_``: its
    ``prior``, ``prior_hparams``, ``manifold``, ``objective`` and ``on_log``). With the gate and
    its fallback on, also returns the reconstructed generators (state rows and PSNRs; else None),
    which ``fitted`` takes instead of fitting again (the fit does not depend on the gate)."""
    prior, prior_hparams, manifold = pass_["prior"], pass_["prior_hparams"], pass_["manifold"]
    objective, on_log = pass_["objective"], pass_["on_log"]
    t_start = time.perf_counter()
    images = images.detach()
    B, device = images.shape[0], images.device
    classifier.eval()
    for module in (classifier, manifold):
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)

    precision = amp.resolve(opts.precision, device)
    autocast, scale = (lambda: amp.autocast(precision, device)), amp.loss_scale(precision)
    gen = make_prior(prior, images, seeds, prior_hparams)
    if fitted is not None:
        gen.load_state_dict(fitted[0])
        recon_psnr = fitted[1]
    elif opts.recon_steps:
        with autocast():
            recon_psnr = gen.reconstruct(opts.recon_steps, opts.psnr_target, lr=opts.recon_lr,
                                         sizes=opts.recon_sizes, loss_scale=scale)
    else:
        recon_psnr = torch.full((B,), float("nan"))
    fit = None  # kept only for the gate fallback, which starts again from the fitted generators
    if opts.gate is not None and opts.gate.fallback:
        fit = ({k: v.detach().clone() for k, v in gen.state_dict().items()}, recon_psnr)
    with autocast():
        render = _Renderer(gen, images, opts.residual, [s.size for s in opts.stages])
    gate = None
    if opts.gate is not None:
        gate = SpatialGate(B, opts.gate.grid, tuple(images.shape[-2:]), opts.gate.init, device)
        gate_optim = RowAdam([gate.logits], lr=opts.gate.lr)
    with torch.no_grad():
        logits0, feats0 = classifier.forward_features(images)
        states = {t.name: t.prepare(images, feats0) for t in objective}
    source = logits0.argmax(1)
    initial_prob = _probs(logits0).gather(1, targets[:, None]).squeeze(1)

    best = images.clone()
    best_dist = torch.full((B,), math.inf, device=device)     # among valid iterates
    best_attempt_p = torch.full((B,), -1.0, device=device, dtype=initial_prob.dtype)  # among all iterates
    valid_found = torch.zeros(B, dtype=torch.bool, device=device)
    goal = opts.target_margin if opts.target_confidence is None else opts.target_confidence  # stop and keep
    diverged = torch.zeros(B, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)
    seconds = torch.zeros(B, dtype=torch.float64)           # wall time, shared among the active queries
    names = [t.name for t in objective] + ["total"]
    kept_terms = {t: torch.full((B,), math.nan, device=device) for t in names}
    seconds += (time.perf_counter() - t_start) / B           # set-up and reconstruction, per query

    optim = RowAdam(gen.parameter_groups(["all"]), lr=opts.lr)
    global_step = 0
    seen_flipped = torch.zeros(B, dtype=torch.bool, device=device)  # progress only: flipped at a logged step
    for k, stage in enumerate(opts.stages):
        gen.set_trainable(stage.groups)
        render.set_size(stage.size)
        weights = [t.weight_at(k) for t in objective]
        for it in range(stage.steps):
            t_step = time.perf_counter()
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # While every query is active (most steps), None takes the prior's and RowAdam's
            # whole-batch paths instead of gathering and scattering every parameter row.
            everyone = idx.numel() == B
            subset = None if everyone else idx
            query = images if everyone else images[idx]
            with autocast():
                with record_function("disc_pl.generator"):
                    x = render(subset)
                m = None
                if gate is not None:
                    with record_function("disc_pl.gate"):
                        x, m = gate.apply(query, x, subset)
                with record_function("disc_pl.classifier"):
                    logits, feats = classifier.forward_features(x)
            if precision != "32":  # the objective and the success test in float32
                x, logits, feats = x.float(), logits.float(), [f.float() for f in feats]
            with record_function("disc_pl.objective"):
                step = Step(x=x, logits=logits, feats=feats, query=query, source=source[idx],
                            target=targets[idx], idx=idx, prior=gen, mask=m,
                            classifier=classifier)
                terms = {t.name: t(step, states[t.name]) for t in objective}
                total = None
                for w, t in zip(weights, objective):
                    total = w * terms[t.name] if total is None else total + w * terms[t.name]
                terms["total"] = total
            finite = torch.isfinite(total)
            optim.zero_grad()
            if gate is not None:
                gate_optim.zero_grad()
            if finite.any():
                with record_function("disc_pl.backward"):
                    params = (*optim.params, *(gate_optim.params if gate is not None else ()))
                    amp.scaled_backward(total[finite].sum(), params, scale)
                with record_function("disc_pl.optimizer"):
                    stepped = None if everyone and bool(finite.all()) else idx[finite]
                    optim.step(stepped)
                    if gate is not None:
                        gate_optim.step(stepped)

            with torch.no_grad(), record_function("disc_pl.bookkeeping"):
                # Bookkeeping on the iterate just evaluated (before this step's update).
                ran = idx
                bad = idx[~finite]
                diverged[bad] = True
                active[bad] = False
                idx, x, logits = idx[finite], x[finite], logits[finite]
                terms = {t: v.detach()[finite] for t, v in terms.items()}
                steps[idx] += 1
                valid = is_flipped(logits, targets[idx], goal)
                dist = per_sample_mse(x, images[idx])
                better = valid & (dist < best_dist[idx])
                p_t = _probs(logits).gather(1, targets[idx, None]).squeeze(1)
                attempt = ~valid_found[idx] & ~valid & (p_t > best_attempt_p[idx])
                keep = better | attempt
                rows = idx[keep]
                best[rows] = x[keep].detach()
                best_dist[idx[better]] = dist[better]
                best_attempt_p[idx[attempt]] = p_t[attempt]
                for t in names:
                    kept_terms[t][rows] = terms[t][keep]
                valid_found[idx[valid]] = True
                done = valid & (it + 1 >= stage.min_steps)
                active[idx[done]] = False
            global_step += 1
            if on_log is not None and opts.log_every and global_step % opts.log_every == 0:
                stats = {f"cf/loss_{t}": float(v.mean()) for t, v in terms.items() if v.numel()}
                stats.update({"cf/stage": k, "cf/active": int(active.sum()),
                              "cf/lambda_sem": opts.lambda_sem * opts.relax ** k})
                # where the pass stands, for progress (disc_pl.cf.progress): flipped = at the margin at a logged step
                seen_flipped |= valid_found
                seen_flipped[idx[is_flipped(logits, targets[idx], opts.target_margin)]] = True
                stats.update({"cf/stages": len(opts.stages), "cf/step": it + 1, "cf/stage_steps": stage.steps,
                              "cf/global_step": global_step, "cf/pass_queries": B, "cf/flipped": int(seen_flipped.sum()),
                              "cf/steps_left": stage.steps - it - 1 + sum(s.steps for s in opts.stages[k + 1:])})
                on_log(stats)
            seconds[ran.cpu()] += (time.perf_counter() - t_step) / ran.numel()

    t_end = time.perf_counter()
    with torch.no_grad():
        logits_final = classifier(best)
    if opts.target_confidence is not None:  # the image kept reached the goal or came closest to it
        valid_found = is_flipped(logits_final, targets, opts.target_margin)
    elif precision != "32":  # success is judged in float32, on the image returned
        valid_found &= is_flipped(logits_final, targets, opts.target_margin)
    # A query that found a valid iterate before diverging still has a valid counterfactual.
    status = [FLIPPED if v else (DIVERGED if d else NOT_FLIPPED)
              for d, v in zip(diverged.tolist(), valid_found.tolist())]
    seconds += (time.perf_counter() - t_end) / B
    return CounterfactualBatch(
        images=best.cpu(), status=status, source=source.cpu(), target=targets.cpu(),
        initial_prob=initial_prob.cpu(),
        target_prob=_probs(logits_final).gather(1, targets[:, None]).squeeze(1).cpu(),
        prediction=logits_final.argmax(1).cpu(), steps=steps.cpu(), recon_psnr=recon_psnr.cpu(),
        seconds=seconds, losses={t: v.cpu() for t, v in kept_terms.items()},
        localized=torch.ones(B, dtype=torch.bool) if gate is not None else None, precision=precision,
    ), fit


def generate_counterfactuals(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    prior: str | Prior | PriorFactory = "inr",
    prior_hparams: Mapping | None = None,
    manifold: nn.Module | None = None,
    options: InversionOptions | None = None,
    objective: Sequence[Term] | None = None,
    seeds: Sequence[int] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> CounterfactualBatch:
    """Counterfactuals for a batch of queries ``images [B,C,H,W]`` in [0, 1] towards ``targets [B]``.

    ``seeds[i]`` seeds query i's generator; results for a query depend only on its image, target
    and seed, not on the rest of the batch. See the module docstring for the algorithm.

    With the localization gate on and ``gate.fallback`` (default), a query the gated search
    does not flip is optimised again from scratch with the paper's objective (no gate, same
    seed); ``localized[i]`` says which search the returned image came from, and ``steps``
    counts both. A query is thus never left unflipped only because its evidence is not local.
    The fallback rebuilds the generator, so it needs ``prior`` by name or as a factory
    ``(images, seeds) -> Prior``; with a ``Prior`` instance the gated result is returned as it is.

    With ``options.fallback`` (a ``PriorFallback``), the queries this prior does not flip are
    optimised again from scratch by the fallback prior with its own options (its gate and gate
    fallback included; this prior's ungated retry is skipped), and ``fallback[i]`` says which
    prior the returned image came from. Each query still depends only on its image, target and
    seed.

    ``objective``: the named, weighted terms to minimise (``disc_pl.cf.objective``); default the
    paper's objective with the coefficients of ``options`` and the ``manifold`` term.
    ``seconds[i]`` is query i's share of the wall time: each step's time is split among the
    queries active in it, set-up evenly (so the batch's wall time is ``seconds.sum()``).
    """
    opts = options or InversionOptions()
    objective_given = objective
    objective = check_objective(objective if objective is not None else default_objective(opts, manifold))
    images = images.detach()
    B = images.shape[0]
    targets = torch.as_tensor(targets, device=images.device).long().view(-1)
    if targets.shape[0] != B:
        raise ValueError(f"{B} images but {targets.shape[0]} targets")
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    pass_ = dict(prior=prior, prior_hparams=prior_hparams, manifold=manifold, objective=objective, on_log=on_log)
    fb = opts.fallback
    if fb is not None and opts.gate is not None and opts.gate.fallback:  # the fallback prior's run retries ungated
        opts = dataclasses.replace(opts, gate=dataclasses.replace(opts.gate, fallback=False), fallback=None)
    out, fit = _invert(classifier, images, targets, seeds, opts, pass_)
    redo = [i for i, s in enumerate(out.status) if s == NOT_FLIPPED]
    if fb is not None:
        out.fallback = torch.zeros(B, dtype=torch.bool)
        if not redo:
            return out
        on = torch.tensor(redo).to(images.device)
        again = generate_counterfactuals(
            classifier, images[on], targets[on], prior=fb.prior, prior_hparams=fb.prior_hparams,
            manifold=manifold, options=fb.options, objective=objective_given,
            seeds=[seeds[i] for i in redo], on_log=on_log)
        take, src = _take_better(out, redo, again)
        out.fallback[take] = True
        if out.localized is not None:
            out.localized[take] = again.localized[src] if again.localized is not None else False
        return out
    if not (opts.gate is not None and opts.gate.fallback and redo and not isinstance(prior, Prior)):
        return out
    rows = torch.tensor(redo)
    on = rows.to(images.device)
    refit = ({k: v[on] for k, v in fit[0].items()}, fit[1][rows.to(fit[1].device)])  # rows = queries
    again, _ = _invert(classifier, images[on], targets[rows.to(targets.device)], [seeds[i] for i in redo],
                       dataclasses.replace(opts, gate=None), pass_, fitted=refit)
    take, _ = _take_better(out, redo, again)
    out.localized[take] = False
    return out


def _take_better(out: CounterfactualBatch, redo: Sequence[int],
                 again: CounterfactualBatch) -> tuple[Tensor, Tensor]:
    """Merge a second search over the rows ``redo`` of ``out`` into ``out``: its result replaces
    the first attempt where it flipped, or where neither flipped and it came closer (higher
    target probability); steps and seconds of both are counted. Returns the rows replaced (of
    ``out``) and where they are in ``again``."""
    rows = torch.tensor(list(redo), dtype=torch.long)
    better = torch.tensor([s == FLIPPED or (s == NOT_FLIPPED and float(p) > float(out.target_prob[i]))
                           for s, p, i in zip(again.status, again.target_prob, redo)], dtype=torch.bool)
    take, src = rows[better], torch.arange(len(redo))[better]
    for name in ("images", "target_prob", "prediction", "recon_psnr"):
        getattr(out, name)[take] = getattr(again, name)[src]
    for t, v in out.losses.items():
        if t in again.losses:
            v[take] = again.losses[t][src]
    for i, j in zip(take.tolist(), src.tolist()):
        out.status[i] = again.status[j]
    out.steps[rows] += again.steps
    out.seconds[rows] += again.seconds
    return take, src
