"""The search as an object: one optimisation pass over a batch of queries, and its retries.

``Search`` is the engine's loop (``disc_pl.cf.engine`` module docstring, steps 1-4): its set-up
builds the precision policy, the generators (fitted to the queries, or loaded from a ``Fitted``
snapshot), the renderer, the gate, the objective's states and the bookkeeping; ``step`` is one
optimisation step of the active queries; ``keep_best`` the bookkeeping of the iterate just
evaluated; ``finish`` the ``CounterfactualBatch``; ``run`` loops the stages' steps.

A query a search leaves ``not_flipped`` may be searched again: a ``Retry`` is one way to do it
(``search(rows)``), and ``retry`` tries a list of them in order on the rows still not flipped,
merging each result with ``_take_better``. The engine uses it for both of its second chances:
the gate's ungated retry (``Search.ungated_retry``: same prior, from the generators already
fitted, ``gate=None``) and the prior fallback (a fresh run by a second prior).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from disc_pl.cf import precision as amp
from disc_pl.cf.batch import DIVERGED, FLIPPED, NOT_FLIPPED, CounterfactualBatch, _probs, is_flipped
from disc_pl.cf.gate import GateOptions, SpatialGate, blend, cell_change, main_region
from disc_pl.cf.losses import per_sample_mse
from disc_pl.cf.objective import Step, Term
from disc_pl.cf.optim import RowAdam
from disc_pl.cf.priors import Prior, build_prior

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


@dataclass
class Setting:
    """What a search needs besides its queries and options: the prior (a name + ``prior_hparams``,
    a factory ``(images, seeds) -> Prior``, or a ``Prior``), the manifold (frozen with the
    classifier), the objective's terms and the ``on_log`` callback."""

    prior: str | Prior | PriorFactory
    prior_hparams: Mapping | None
    manifold: nn.Module | None
    objective: list[Term]
    on_log: Callable[[dict[str, float]], None] | None = None


@dataclass
class Fitted:
    """Generators right after their reconstruction: state rows (one per query) and PSNRs."""

    state: dict[str, Tensor]
    psnr: Tensor

    @classmethod
    def of(cls, gen: Prior, psnr: Tensor) -> Fitted:
        return cls({k: v.detach().clone() for k, v in gen.state_dict().items()}, psnr)

    def rows(self, rows: Tensor) -> Fitted:
        """The generators of queries ``rows`` alone."""
        return Fitted({k: v[rows.to(v.device)] for k, v in self.state.items()}, self.psnr[rows.to(self.psnr.device)])


class _Precision:
    """The precision policy of a search (``disc_pl.cf.precision``): the precision resolved on the
    queries' device, its autocast region and loss scale; the objective and the success test
    take float32 (``float32``)."""

    def __init__(self, choice: str, device: torch.device) -> None:
        self.name, self.device = amp.resolve(choice, device), device
        self.scale = amp.loss_scale(self.name)

    def autocast(self):
        return amp.autocast(self.name, self.device)

    def float32(self, x: Tensor, logits: Tensor, feats: Sequence[Tensor]):
        if self.name == "32":
            return x, logits, feats
        return x.float(), logits.float(), [f.float() for f in feats]

    def backward(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        amp.scaled_backward(loss, params, self.scale)


class _Gate:
    """The localization gate in a search (``disc_pl.cf.gate``): per-query logits with their own
    RowAdam; x' = x + m * (G - x)."""

    def __init__(self, options: GateOptions, batch: int, size: tuple[int, int], device: torch.device,
                 allowed: Tensor | None = None) -> None:
        self.gate = SpatialGate(batch, options.grid, size, options.init, device, allowed)
        self.held_for_guides = options.opened_by == "explained"
        self.optim = RowAdam([self.gate.logits], lr=options.lr)
        self.params = tuple(self.optim.params)

    def apply(self, query: Tensor, x: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with record_function("disc_pl.gate"):
            return self.gate.apply(query, x, rows)

    def held(self, query: Tensor, x: Tensor, m: Tensor | None) -> Tensor | None:
        """x' with the gate held fixed (its gradient reaches the generator only), for the terms
        that may not open the gate (``opened_by=explained``); None: they see x' itself."""
        return blend(query, x, m.detach()) if self.held_for_guides and m is not None else None

    def zero_grad(self) -> None:
        self.optim.zero_grad()

    def step(self, rows: Tensor | None) -> None:
        self.optim.step(rows)

    def localized(self, batch: int) -> Tensor | None:
        return torch.ones(batch, dtype=torch.bool)


class _NoGate(_Gate):
    """No gate (``options.gate=None``, the paper's objective): x' as rendered."""

    def __init__(self) -> None:
        self.params = ()

    def apply(self, query: Tensor, x: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return x, None

    def held(self, query: Tensor, x: Tensor, m: Tensor | None) -> Tensor | None:
        return None

    def zero_grad(self) -> None:
        pass

    def step(self, rows: Tensor | None) -> None:
        pass

    def localized(self, batch: int) -> Tensor | None:
        return None


class _Kept:
    """Keep-the-best, per query: the closest valid iterate (lowest pixel MSE to the query among
    those at the goal margin), else the attempt with the highest target probability; with the
    terms of the iterate kept and whether a valid one was found."""

    def __init__(self, images: Tensor, names: Sequence[str], p_dtype: torch.dtype) -> None:
        B, device = images.shape[0], images.device
        self.query = images
        self.images = images.clone()
        self.dist = torch.full((B,), math.inf, device=device)     # among valid iterates
        self.attempt_p = torch.full((B,), -1.0, device=device, dtype=p_dtype)  # among all iterates
        self.valid = torch.zeros(B, dtype=torch.bool, device=device)
        self.terms = {t: torch.full((B,), math.nan, device=device) for t in names}

    def update(self, idx: Tensor, x: Tensor, logits: Tensor, targets: Tensor, terms: Mapping[str, Tensor],
               goal: float) -> Tensor:
        """Keep the iterate ``x`` of rows ``idx`` where it is better; which of them reached ``goal``."""
        valid = is_flipped(logits, targets, goal)
        dist = per_sample_mse(x, self.query[idx])
        better = valid & (dist < self.dist[idx])
        p_t = _probs(logits).gather(1, targets[:, None]).squeeze(1)
        attempt = ~self.valid[idx] & ~valid & (p_t > self.attempt_p[idx])
        keep = better | attempt
        rows = idx[keep]
        self.images[rows] = x[keep].detach()
        self.dist[idx[better]] = dist[better]
        self.attempt_p[idx[attempt]] = p_t[attempt]
        for t, v in self.terms.items():
            v[rows] = terms[t][keep]
        self.valid[idx[valid]] = True
        return valid


def _freeze(*modules: nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(False)


class Search:
    """One search over a batch of B queries ``images`` towards ``targets`` (``opts``: an
    ``InversionOptions``; ``setting``: a ``Setting``). ``fitted``: start from these generators
    (a ``Fitted`` of this batch) instead of reconstructing; ``snapshot``: keep the fitted
    generators as ``self.fitted`` (for ``ungated_retry``); ``active``: ``[B]`` bool, the rows
    searched (None: all; the others are not touched and cost nothing, their status is
    ``not_flipped`` with 0 steps); ``allowed``: bool ``[B, 1, g, g]``, the gate cells each query
    may open (None: all; ``disc_pl.cf.gate.SpatialGate``)."""

    def __init__(self, classifier: nn.Module, images: Tensor, targets: Tensor, seeds: Sequence[int], opts: Any,
                 setting: Setting, *, fitted: Fitted | None = None, snapshot: bool = False,
                 active: Tensor | None = None, allowed: Tensor | None = None) -> None:
        t_start = time.perf_counter()
        self.classifier, self.images, self.targets, self.seeds = classifier, images.detach(), targets, list(seeds)
        self.opts, self.setting, self.objective = opts, setting, setting.objective
        self.B, self.device = self.images.shape[0], self.images.device
        classifier.eval()
        _freeze(classifier, setting.manifold)
        self.precision = _Precision(opts.precision, self.device)
        self.gen, self.recon_psnr = self._generators(fitted)
        self.fitted = Fitted.of(self.gen, self.recon_psnr) if snapshot else None
        with self.precision.autocast():
            self.render = _Renderer(self.gen, self.images, opts.residual, [s.size for s in opts.stages])
        self.gate = _NoGate() if opts.gate is None else _Gate(opts.gate, self.B, tuple(self.images.shape[-2:]),
                                                                self.device, allowed)
        with torch.no_grad():
            logits0, feats0 = classifier.forward_features(self.images)
            self.states = {t.name: t.prepare(self.images, feats0) for t in self.objective}
        self.source = logits0.argmax(1)
        self.initial_prob = _probs(logits0).gather(1, targets[:, None]).squeeze(1)
        self._bookkeeping(active)
        self._share(time.perf_counter() - t_start)  # set-up and reconstruction, per query
        self.optim = RowAdam(self.gen.parameter_groups(["all"]), lr=opts.lr)

    def _generators(self, fitted: Fitted | None) -> tuple[Prior, Tensor]:
        """The batch's generators, loaded from ``fitted`` or fitted to the queries now; their PSNRs."""
        setting, opts = self.setting, self.opts
        gen = make_prior(setting.prior, self.images, self.seeds, setting.prior_hparams)
        if fitted is not None:
            gen.load_state_dict(fitted.state)
            return gen, fitted.psnr
        if opts.recon_steps:
            with self.precision.autocast():
                return gen, gen.reconstruct(opts.recon_steps, opts.psnr_target, lr=opts.recon_lr,
                                            sizes=opts.recon_sizes, loss_scale=self.precision.scale)
        return gen, torch.full((self.B,), float("nan"))

    def _bookkeeping(self, active: Tensor | None) -> None:
        B, device, opts = self.B, self.device, self.opts
        self.kept = _Kept(self.images, [t.name for t in self.objective] + ["total"], self.initial_prob.dtype)
        self.goal = opts.target_margin if opts.target_confidence is None else opts.target_confidence  # stop and keep
        self.diverged = torch.zeros(B, dtype=torch.bool, device=device)
        self.active = (torch.ones(B, dtype=torch.bool, device=device) if active is None
                       else active.to(device=device, dtype=torch.bool).clone())
        self.searched = self.active.cpu().clone()                # the rows this search is for
        self.steps = torch.zeros(B, dtype=torch.long, device=device)
        self.seconds = torch.zeros(B, dtype=torch.float64)       # wall time, shared among the active queries
        self.global_step = 0
        self.seen_flipped = torch.zeros(B, dtype=torch.bool, device=device)  # progress only: flipped at a logged step

    def _share(self, seconds: float) -> None:
        """Wall time outside the steps (set-up, finish), evenly among the rows searched."""
        if self.searched.all():
            self.seconds += seconds / self.B
        else:
            self.seconds[self.searched] += seconds / int(self.searched.sum())

    def run(self) -> CounterfactualBatch:
        """Every stage's steps (a stage ends early when no query is active), then ``finish``."""
        for k, stage in enumerate(self.opts.stages):
            self.gen.set_trainable(stage.groups)
            self.render.set_size(stage.size)
            weights = [t.weight_at(k) for t in self.objective]
            for it in range(stage.steps):
                if not self.step(k, it, weights):
                    break
        return self.finish()

    def step(self, k: int, it: int, weights: Sequence[float]) -> bool:
        """Step ``it`` of stage ``k`` over the active queries: x', the objective, one update of
        the rows whose objective is finite, ``keep_best``, logging. False: no query is active."""
        t_step = time.perf_counter()
        idx = self.active.nonzero().squeeze(1)
        if idx.numel() == 0:
            return False
        # While every query is active (most steps), None takes the prior's and RowAdam's
        # whole-batch paths instead of gathering and scattering every parameter row.
        everyone = idx.numel() == self.B
        query = self.images if everyone else self.images[idx]
        x, m, logits, feats, guide = self._forward(None if everyone else idx, query)
        terms = self._objective(idx, query, x, m, logits, feats, weights, guide)
        finite = torch.isfinite(terms["total"])
        self._update(terms["total"], finite, idx, everyone)
        with torch.no_grad(), record_function("disc_pl.bookkeeping"):
            kept = self.keep_best(idx, finite, x, logits, terms, it + 1 >= self.opts.stages[k].min_steps)
        self.global_step += 1
        self._log(k, it, *kept)
        self.seconds[idx.cpu()] += (time.perf_counter() - t_step) / idx.numel()
        return True

    def _forward(self, subset: Tensor | None, query: Tensor):
        """x' of rows ``subset`` (None: all; gated), its logits and features, as the objective takes them."""
        with self.precision.autocast():
            with record_function("disc_pl.generator"):
                g = self.render(subset)
            x, m = self.gate.apply(query, g, subset)
            guide = self.gate.held(query, g, m)
            with record_function("disc_pl.classifier"):
                logits, feats = self.classifier.forward_features(x)
        x, logits, feats = self.precision.float32(x, logits, feats)
        if guide is not None and self.precision.name != "32":
            guide = guide.float()
        return x, m, logits, feats, guide

    def _objective(self, idx: Tensor, query: Tensor, x: Tensor, m: Tensor | None, logits: Tensor,
                   feats: Sequence[Tensor], weights: Sequence[float], guide: Tensor | None = None) -> dict[str, Tensor]:
        """Each term ``[b]`` by name, and their weighted sum ``total``."""
        with record_function("disc_pl.objective"):
            step = Step(x=x, logits=logits, feats=feats, query=query, source=self.source[idx],
                        target=self.targets[idx], idx=idx, prior=self.gen, mask=m, classifier=self.classifier,
                        x_held=guide)
            terms = {t.name: t(step, self.states[t.name]) for t in self.objective}
            total = None
            for w, t in zip(weights, self.objective):
                total = w * terms[t.name] if total is None else total + w * terms[t.name]
            terms["total"] = total
        return terms

    def _update(self, total: Tensor, finite: Tensor, idx: Tensor, everyone: bool) -> None:
        """Backward of the finite rows' objective; one update of their generator (and gate) rows."""
        self.optim.zero_grad()
        self.gate.zero_grad()
        if not finite.any():
            return
        with record_function("disc_pl.backward"):
            self.precision.backward(total[finite].sum(), (*self.optim.params, *self.gate.params))
        with record_function("disc_pl.optimizer"):
            stepped = None if everyone and bool(finite.all()) else idx[finite]
            self.optim.step(stepped)
            self.gate.step(stepped)

    def keep_best(self, idx: Tensor, finite: Tensor, x: Tensor, logits: Tensor, terms: Mapping[str, Tensor],
                  may_stop: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Bookkeeping of the iterate just evaluated (before this step's update): a row whose
        objective is not finite is ``diverged`` and leaves; the others count a step and keep
        their iterate where it is better (``_Kept``); one at the goal leaves when ``may_stop``
        (the stage's minimum steps are done). Returns the finite rows, their logits and terms."""
        bad = idx[~finite]
        self.diverged[bad] = True
        self.active[bad] = False
        idx, x, logits = idx[finite], x[finite], logits[finite]
        terms = {t: v.detach()[finite] for t, v in terms.items()}
        self.steps[idx] += 1
        valid = self.kept.update(idx, x, logits, self.targets[idx], terms, self.goal)
        done = valid & may_stop
        self.active[idx[done]] = False
        return idx, logits, terms

    def _log(self, k: int, it: int, idx: Tensor, logits: Tensor, terms: Mapping[str, Tensor]) -> None:
        """Every ``log_every`` steps: the mean terms and where the pass stands to ``on_log``."""
        opts, on_log = self.opts, self.setting.on_log
        if on_log is None or not opts.log_every or self.global_step % opts.log_every != 0:
            return
        stage = opts.stages[k]
        stats = {f"cf/loss_{t}": float(v.mean()) for t, v in terms.items() if v.numel()}
        stats.update({"cf/stage": k, "cf/active": int(self.active.sum()),
                      "cf/lambda_sem": opts.lambda_sem * opts.relax ** k})
        # where the pass stands, for progress (disc_pl.cf.progress): flipped = at the margin at a logged step
        self.seen_flipped |= self.kept.valid
        self.seen_flipped[idx[is_flipped(logits, self.targets[idx], opts.target_margin)]] = True
        stats.update({"cf/stages": len(opts.stages), "cf/step": it + 1, "cf/stage_steps": stage.steps,
                      "cf/global_step": self.global_step, "cf/pass_queries": int(self.searched.sum()),
                      "cf/flipped": int(self.seen_flipped.sum()),
                      "cf/steps_left": stage.steps - it - 1 + sum(s.steps for s in opts.stages[k + 1:])})
        on_log(stats)

    def finish(self) -> CounterfactualBatch:
        """The batch's results: the kept images, judged again by the classifier at the margin."""
        t_end = time.perf_counter()
        opts, targets, B = self.opts, self.targets, self.B
        with torch.no_grad():
            logits = self.classifier(self.kept.images)
        valid = self.kept.valid
        if opts.target_confidence is not None:  # the image kept reached the goal or came closest to it
            valid = is_flipped(logits, targets, opts.target_margin)
        elif self.precision.name != "32":  # success is judged in float32, on the image returned
            valid = valid & is_flipped(logits, targets, opts.target_margin)
        # A query that found a valid iterate before diverging still has a valid counterfactual.
        status = [FLIPPED if v else (DIVERGED if d else NOT_FLIPPED)
                  for d, v in zip(self.diverged.tolist(), valid.tolist())]
        self._share(time.perf_counter() - t_end)
        return CounterfactualBatch(
            images=self.kept.images.cpu(), status=status, source=self.source.cpu(), target=targets.cpu(),
            initial_prob=self.initial_prob.cpu(),
            target_prob=_probs(logits).gather(1, targets[:, None]).squeeze(1).cpu(),
            prediction=logits.argmax(1).cpu(), steps=self.steps.cpu(), recon_psnr=self.recon_psnr.cpu(),
            seconds=self.seconds, losses={t: v.cpu() for t, v in self.kept.terms.items()},
            localized=self.gate.localized(B), precision=self.precision.name)

    def ungated_retry(self) -> Retry:
        """The gate's ungated retry (``gate.fallback``) as a ``Retry``: the same prior, from the
        generators this search fitted (``snapshot=True``), with the paper's objective (gate=None)."""
        return Retry("ungated", functools.partial(self.search_again, dataclasses.replace(self.opts, gate=None)))

    def confined_retry(self) -> Retry:
        """The prior's confined search (``options.refine``) as a ``Retry``: the flipped queries whose
        change lies at least ``refine`` outside its main region (``disc_pl.cf.gate.main_region``)
        are searched again with the gate confined to that region; the result replaces the first
        where it flips (``refined``)."""
        share = self.opts.refine
        return self._region_retry("confined", "flipped", lambda status, region, outside: (
            region if status == FLIPPED and outside >= share else None))

    def elsewhere_retry(self) -> Retry:
        """The prior's search elsewhere (``options.retry_elsewhere``) as a ``Retry``: the queries
        left ``not_flipped`` are searched again with the gate closed over the main region of the
        failed attempt's change grown by one cell (the place the first-order search committed
        to); the result replaces the first where it flips or comes closer (``refined``)."""
        def away(status: str, region: Tensor, outside: float) -> Tensor | None:
            if status != NOT_FLIPPED or not region.any():
                return None
            return ~F.max_pool2d(region[None].float(), 3, 1, 1)[0].bool()

        return self._region_retry("elsewhere", "better", away)

    def _region_retry(self, name: str, keep: str,
                      allowed_for: Callable[[str, Tensor, float], Tensor | None]) -> Retry:
        """A ``Retry`` by the same prior, from the generators this search fitted (``snapshot=True``),
        over the queries for which ``allowed_for(status, main region [1, g, g], share of the change
        outside it)`` gives the gate cells they may open (None: not searched again)."""
        allowed: dict[int, Tensor] = {}

        def select(out: CounterfactualBatch) -> list[int]:
            region, outside = main_region(cell_change(self.images.cpu(), out.images, self.opts.gate.grid))
            allowed.clear()
            for i, status in enumerate(out.status):
                cells = allowed_for(status, region[i], float(outside[i]))
                if cells is not None:
                    allowed[i] = cells
            return list(allowed)

        def search(rows: list[int]) -> CounterfactualBatch:
            return self.search_again(self.opts, rows, torch.stack([allowed[i] for i in rows]))

        return Retry(name, search, flag="refined", select=select, keep=keep)

    def search_again(self, opts: Any, rows: Sequence[int], allowed: Tensor | None = None) -> CounterfactualBatch:
        """A new search with ``opts`` over the queries ``rows`` (in order), from the generators
        this search fitted (its snapshot ``self.fitted``). A prior given by name or factory is built
        again for those queries alone and loads their state rows. A ``Prior`` instance holds every
        query of the batch: it is restored to the snapshot and searched with only ``rows`` active
        (its rows are independent; the others are not touched). ``allowed``: bool ``[len(rows), 1, g, g]``,
        the gate cells each may open (None: all)."""
        if isinstance(self.setting.prior, Prior):
            active = torch.zeros(self.B, dtype=torch.bool)
            active[list(rows)] = True
            if allowed is not None:
                every = torch.ones(self.B, *allowed.shape[1:], dtype=torch.bool)
                every[list(rows)] = allowed
                allowed = every
            again = Search(self.classifier, self.images, self.targets, self.seeds, opts, self.setting,
                           fitted=self.fitted, active=active, allowed=allowed)
            return again.run().rows(rows)
        on = torch.tensor(list(rows), dtype=torch.long)
        return Search(self.classifier, self.images[on.to(self.device)], self.targets[on.to(self.targets.device)],
                      [self.seeds[i] for i in rows], opts, self.setting, fitted=self.fitted.rows(on),
                      allowed=allowed).run()


@dataclass
class Retry:
    """One more search for the queries a search left ``not_flipped``: ``search(rows)`` is the
    ``CounterfactualBatch`` of those rows of the batch (in order). ``flag``: a field of the batch
    (e.g. ``fallback``) set True on the rows whose result this retry's replaced."""

    name: str
    search: Callable[[list[int]], CounterfactualBatch]
    flag: str | None = None
    # the rows of a result it searches again (None: those ``not_flipped``)
    select: Callable[[CounterfactualBatch], list[int]] | None = None
    # which result is kept (``_take_better``): "better" (a flip over none, a closer attempt, a
    # more confident flip) or "flipped" (the retry's wherever it flipped)
    keep: str = "better"
    # with keep="better": of two flips, the first stays where its change (mean squared, to
    # ``query``: the batch's query images) is below ``smaller`` x the retry's, however confident
    smaller: float | None = None
    query: Tensor | None = None


# per-row flags of how a kept image was made, which follow the image through later retries
FOLLOW_THE_IMAGE = ("localized", "refined", "relaxed")


def retry(out: CounterfactualBatch, plans: Sequence[Retry]) -> CounterfactualBatch:
    """``out`` after each plan in turn, on the rows still ``not_flipped`` (none: the plan is
    skipped), merged by ``_take_better``. ``localized`` follows the image kept: a replaced row
    takes the retry's (False where the retry ran without the gate)."""
    for plan in plans:
        if plan.flag is not None and getattr(out, plan.flag) is None:
            setattr(out, plan.flag, torch.zeros(len(out.status), dtype=torch.bool))
        redo = (plan.select(out) if plan.select is not None
                else [i for i, s in enumerate(out.status) if s == NOT_FLIPPED])
        if not redo:
            continue
        again = plan.search(redo)
        take, src = _take_better(out, redo, again, plan.keep, plan.smaller, plan.query)
        if plan.flag is not None:
            getattr(out, plan.flag)[take] = True
        for name in FOLLOW_THE_IMAGE:  # a replaced row takes the retry's (False where it has none)
            mine, theirs = getattr(out, name), getattr(again, name)
            if name == plan.flag or (mine is None and theirs is None):
                continue
            if mine is None:
                mine = torch.zeros(len(out.status), dtype=torch.bool)
                setattr(out, name, mine)
            mine[take] = theirs[src] if theirs is not None else False
    return out


def _take_better(out: CounterfactualBatch, redo: Sequence[int],
                 again: CounterfactualBatch, keep: str = "better", smaller: float | None = None,
                 query: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Merge a second search over the rows ``redo`` of ``out`` into ``out``: its result replaces
    a first attempt that did not flip where it flipped, or where neither flipped and it came
    closer (higher target probability); a first attempt that flipped, where it flipped too with
    a higher target probability. ``keep="flipped"``: its result replaces the first wherever it
    flipped. ``smaller``: a first flip stays where its mean squared change to ``query`` (the
    batch's query images) is below ``smaller`` x the retry's, however confident the retry's flip
    (a much smaller edit is the more minimal counterfactual). Steps and seconds of both are
    counted. Returns the rows replaced (of ``out``) and where they are in ``again``."""
    rows = torch.tensor(list(redo), dtype=torch.long)

    if smaller is not None and query is None:
        raise ValueError("_take_better(smaller=...) needs the query images to measure the changes")
    # where a first flip is much smaller than the retry's (both flips or not: the rule below asks)
    small = torch.zeros(len(redo), dtype=torch.bool)
    if smaller is not None:
        q = query[rows].float().cpu()  # a CounterfactualBatch's tensors are on the CPU
        small = per_sample_mse(out.images[rows].float(), q) < smaller * per_sample_mse(again.images.float(), q)

    def better_than_first(s: str, p: Tensor, i: int, first_smaller: bool) -> bool:
        if keep == "flipped":
            return s == FLIPPED
        closer = float(p) > float(out.target_prob[i])
        if out.status[i] == FLIPPED:
            return s == FLIPPED and closer and not first_smaller
        return s == FLIPPED or (s == NOT_FLIPPED and closer)

    better = torch.tensor([better_than_first(s, p, i, f) for s, p, i, f
                           in zip(again.status, again.target_prob, redo, small.tolist())], dtype=torch.bool)
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
