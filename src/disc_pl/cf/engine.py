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
5. With ``options.retry_hparams`` (not in the paper) the queries still not flipped (or flipped
   below the fallback's ``below``) are optimised again by the same prior with some of its
   hyperparameters changed, one change after the other (e.g. the warp: a smooth field first, a
   rough one where it fails; off by default). With ``options.fallback`` (a ``PriorFallback``; not in the paper)
   those still left are optimised again from scratch by a second prior (e.g. a deformation
   prior, which can only move pixels, falls back to the INR for the queries that need new ones).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from disc_pl.cf import precision as amp
from disc_pl.cf.batch import (  # noqa: F401 (re-exported: the engine's API)
    DIVERGED, FLIPPED, NOT_FLIPPED, CounterfactualBatch, _probs, is_flipped)
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.losses import SemanticSpace
from disc_pl.cf.objective import Term, check_objective, default_objective
from disc_pl.errors import is_integer, is_number, require
from disc_pl.utils import CONF_DIR
from disc_pl.cf.priors import PRIORS, Prior
from disc_pl.cf.search import (  # noqa: F401 (re-exported: the engine's API)
    PriorFactory, Retry, Search, Setting, _Renderer, _take_better, make_prior, retry)


@dataclass
class Stage:
    """One progressive stage: which generator layer groups train, for how many steps."""

    groups: list[str]
    steps: int | None = None       # None: the options' steps_per_stage
    min_steps: int | None = None   # None: the options' min_steps
    # Coarse-to-fine (continuous priors): the generator renders a grid of at most this many
    # pixels per side and its change is enlarged bilinearly to full size (None = full size).
    size: int | None = None


@dataclass
class PriorFallback:
    """A second prior for the queries the first one does not flip (``prior.fallback``): the
    generator (a prior name + ``prior_hparams``, or a factory ``(images, seeds) -> Prior``) and
    the options of its run. ``options`` None (a prior given by name): the first prior's options
    with conf/prior/<name>.yaml's schedule (lr, stages, reconstruction) and lambda1
    (``prior_lambda_sem``)."""

    prior: str | Callable[[Tensor, Sequence[int]], Prior]
    options: "InversionOptions | None" = None
    prior_hparams: Mapping | None = None
    name: str = ""                          # a label for logs
    # The fallback also runs for the queries the first prior flipped with a target probability
    # below this (a weak flip: the first prior could not draw the classifier's evidence, e.g. a
    # colour a deformation has nowhere to take from); the more confident flipped result is kept.
    # None: only the queries not flipped (conf/prior/warp.yaml's fallback_below).
    below: float | None = None
    # Of a first prior's weak flip and the fallback's flip, the weak one stays where its change (mean
    # squared) is below this fraction of the fallback's (a much smaller edit); None: the more
    # confident is kept (conf/prior/warp.yaml's fallback_keep_smaller).
    keep_smaller: float | None = None

    def __post_init__(self) -> None:
        require("prior", [("fallback_below", self.below, self.below is None or (is_number(self.below, 0)
                                                                                and self.below <= 1),
                           "must be a probability in [0, 1] or null"),
                          ("fallback_keep_smaller", self.keep_smaller, self.keep_smaller is None
                           or is_number(self.keep_smaller, 0, low_open=True),
                           "must be a number > 0 (a fraction of the fallback's change) or null")])

    def rows(self, out: CounterfactualBatch) -> list[int]:
        """The queries of a first run ``out`` the fallback runs for."""
        return unflipped_or_weak(out, self.below)

    def options_for(self, first: "InversionOptions") -> "InversionOptions":
        """The options of the fallback's run after a first run with ``first``."""
        if self.options is not None:
            return self.options
        if not isinstance(self.prior, str):
            raise ValueError("a PriorFallback with a generator factory needs its options")
        config = prior_config(self.prior)
        return dataclasses.replace(first, **prior_schedule(config), lambda_sem=prior_lambda_sem(config), fallback=None)


def prior_lambda_sem(prior: Mapping) -> float:
    """A prior's own lambda1: its config's ``lambda_sem``, else 1 (``space.lambda_sem``'s default
    rule). A fallback prior runs with its own, not the first prior's: the warp's 0.6 is a weight
    for a change of moved pixels (issue 27, seventh session)."""
    return float(prior.get("lambda_sem", 1.0))


def unflipped_or_weak(out: CounterfactualBatch, below: float | None) -> list[int]:
    """The rows of ``out`` not flipped, or flipped with a target probability under ``below``
    (None: only those not flipped): what the relaxations and the fallback prior search again."""
    return [i for i, s in enumerate(out.status)
            if s == NOT_FLIPPED or (below is not None and s == FLIPPED and float(out.target_prob[i]) < below)]


DEFAULT_FALLBACK_BELOW = 0.95  # conf/prior/warp.yaml's fallback_below
DEFAULT_FALLBACK_KEEP_SMALLER = 0.5  # and its fallback_keep_smaller


def _default_fallback() -> PriorFallback:
    # conf/prior/warp.yaml's (prior@prior.fallback: inr, fallback_below, fallback_keep_smaller)
    return PriorFallback("inr", name="inr", below=DEFAULT_FALLBACK_BELOW, keep_smaller=DEFAULT_FALLBACK_KEEP_SMALLER)


def _default_precision() -> str:
    return os.environ.get("DISC_PL_PRECISION", "auto")  # as conf/run.yaml's inversion.precision


@dataclass
class InversionOptions:
    """Every coefficient of the objective and the schedule. The defaults are ``python -m
    disc_pl.run``'s with its default groups (the ``inversion`` node, ``prior=warp`` with its INR
    fallback, ``space=lso``, ``localize=gate``, the manifolds' lambda2); tests/test_defaults.py
    compares every field. For another prior's schedule: ``InversionOptions.for_prior(name)``."""

    space: SemanticSpace | str = "lso"      # a SemanticSpace (cf/losses.py); by name: lso | iso
    layers: Sequence[int] = (0, 1, 2, 3)    # feature maps compared by space="lso" (given by name)
    lambda_sem: float = 0.6                 # lambda1 (space.lambda_sem: the warp's), relaxed by `relax` every stage
    lambda_mc: float = 0.1                  # lambda2 (ignored when manifold is None)
    lambda_fc: float = 1.0                  # lambda3
    relax: float = 0.5                      # lambda1 *= relax per stage (paper section 3.4)
    steps_per_stage: int = 100              # steps of a stage that does not set its own
    min_steps: int = 10                     # per stage, before a flipped query stops
    # The prior's schedule (conf/prior/<name>.yaml; these: the warp's)
    lr: float = 0.05                        # Adam lr of the counterfactual stages
    stages: list[Stage] = field(default_factory=lambda: [Stage(["flow"]), Stage(["flow"]), Stage(["flow"])])
    recon_steps: int = 0                    # reconstruction stage budget
    psnr_target: float = 35.0               # reconstruction stops per query at this PSNR (dB)
    recon_lr: float | None = None           # None: the prior's own default
    recon_sizes: Sequence[int | None] = (None,)  # coarse-to-fine reconstruction grids (Prior.reconstruct)
    target_margin: float = 0.2              # flipped: argmax = target and p_t - max p_other >= margin
    # A query keeps optimising until its margin reaches `target_confidence` (None: target_margin),
    # and the image kept is the closest one that reaches it, else the most confident one; the
    # status still counts as flipped at `target_margin` (not in the paper).
    target_confidence: float | None = 0.9999
    residual: bool = True                   # x' = x + G(z) - G_0(z): see module docstring
    # Localization gate (cf/gate.py; not in the paper): x' = x + m * (G - x), + lambda_area * mean(m)
    # None = off (the paper's objective); GateOptions: grid, lambda_area, lr, init, fallback
    gate: GateOptions | None = field(default_factory=GateOptions)
    log_every: int = 10                     # call `on_log` every N steps (0 = never)
    # Numeric precision (disc_pl.cf.precision): 32 | bf16-mixed | 16-mixed | auto (resolved on
    # the queries' device when the batch starts: bf16-mixed where it computes bf16 natively).
    precision: str = field(default_factory=_default_precision)
    # A second prior for the queries this one does not flip (PriorFallback; None = off). With it,
    # the gate's own ungated retry (gate.fallback) is left to the fallback prior's run.
    fallback: PriorFallback | None = field(default_factory=_default_fallback)
    # Optional objective terms after the paper's (disc_pl.cf.objective.Term; the `term` group).
    terms: Sequence[Term] = ()
    # The prior's confined search (conf/prior/<name>.yaml's refine; with the gate only): a flipped
    # query whose change lies at least this share outside its main region (the 8-connected gate
    # cells holding the most change, disc_pl.cf.gate.main_region) is searched again with the gate
    # confined to that region, and that result is kept where it flips. None: off (the warp's).
    refine: float | None = None
    # The prior's search elsewhere (conf/prior/<name>.yaml's retry_elsewhere; with the gate only):
    # a query it leaves not flipped is searched again with the gate closed over the main region of
    # its failed attempt (grown by one cell); that result is kept where it flips or comes closer.
    retry_elsewhere: bool = False
    # The prior's relaxations (conf/prior/<name>.yaml's retry_hparams; not in the paper): the
    # queries the run leaves not flipped, or flipped below the fallback's `below`, are searched
    # again by the same prior with these generator hyperparameters changed, one entry after the
    # other (e.g. the warp's smoothness lowered), before the fallback prior; a result replaces the
    # first where it flips or is more confident. Needs the prior by name or as a functools.partial.
    # Off by default (issue 27, seventh session): on the cue classifier the rough warp's flips hid
    # the planted cue the INR fallback would have drawn; conf/prior/warp.yaml says how to turn it on.
    retry_hparams: Sequence[Mapping] = ()

    def __post_init__(self) -> None:
        self._check()
        self.terms = tuple(self.terms)
        self.retry_hparams = tuple(dict(h) for h in self.retry_hparams)
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        self.stages = [dataclasses.replace(s, steps=self.steps_per_stage if s.steps is None else s.steps,
                                           min_steps=self.min_steps if s.min_steps is None else s.min_steps)
                       for s in self.stages]
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

    def _check(self) -> None:
        try:
            self.precision = amp.normalize(self.precision)
            precision_ok = True
        except ValueError:
            precision_ok = False
        confidence = self.target_confidence
        require("inversion", [
            ("precision", self.precision, precision_ok, f"must be one of {', '.join(amp.CHOICES)} (auto: "
             "bf16-mixed where the device computes bf16 natively, else 32)"),
            ("lr", self.lr, is_number(self.lr, 0, low_open=True), "must be a number > 0"),
            ("relax", self.relax, is_number(self.relax, 0, low_open=True) and self.relax <= 1,
             "must be a number > 0 and <= 1"),
            ("lambda_sem", self.lambda_sem, is_number(self.lambda_sem, 0), "must be a number >= 0"),
            ("lambda_mc", self.lambda_mc, is_number(self.lambda_mc, 0), "must be a number >= 0"),
            ("lambda_fc", self.lambda_fc, is_number(self.lambda_fc, 0, low_open=True), "must be a number > 0"),
            ("steps_per_stage", self.steps_per_stage, is_integer(self.steps_per_stage, 1), "must be an integer >= 1"),
            ("min_steps", self.min_steps, is_integer(self.min_steps, 0), "must be an integer >= 0"),
            ("recon_steps", self.recon_steps, is_integer(self.recon_steps, 0), "must be an integer >= 0"),
            ("target_margin", self.target_margin, is_number(self.target_margin, 0) and self.target_margin < 1,
             "must be a number >= 0 and < 1"),
            ("target_confidence", confidence, confidence is None or (is_number(confidence, 0) and confidence < 1),
             "must be null or a number in [0, 1): the margin p_target - max p_other a query optimises towards"),
            ("target_confidence", confidence, confidence is None or not is_number(confidence)
             or confidence >= self.target_margin,
             f"must be >= inversion.target_margin={self.target_margin} (the margin that counts as flipped), or null"),
            ("log_every", self.log_every, is_integer(self.log_every, 0), "must be an integer >= 0"),
            ("refine", self.refine, self.refine is None or (is_number(self.refine, 0, low_open=True) and self.refine < 1),
             "must be null (off) or a share in (0, 1): how much of a flipped query's change outside its main "
             "region sends it to a search confined to that region"),
            ("retry_elsewhere", self.retry_elsewhere, isinstance(self.retry_elsewhere, bool), "must be true or false"),
            ("retry_hparams", self.retry_hparams, isinstance(self.retry_hparams, (list, tuple)) and all(
                isinstance(h, Mapping) and h and all(isinstance(k, str) for k in h) for h in self.retry_hparams),
             "must be a list of non-empty mappings of the prior's hyperparameters, e.g. [{alpha_smooth: 0.01}]"),
            ("terms", self.terms, all(isinstance(t, Term) for t in self.terms),
             "must be objective terms (disc_pl.cf.objective.Term)")])
        if not self.stages:
            raise ValueError("inversion needs at least one stage (prior.stages)")
        if self.fallback is not None and not isinstance(self.fallback, PriorFallback):
            raise ValueError(f"inversion fallback must be a PriorFallback or None, got {type(self.fallback).__name__}")
        if self.fallback is not None and self.fallback.options is not None and self.fallback.options.fallback:
            raise ValueError("a fallback prior cannot have a fallback of its own (one level only)")

    @classmethod
    def for_prior(cls, name: str, **kw) -> "InversionOptions":
        """The options ``python -m disc_pl.run prior=<name>`` runs with: conf/prior/<name>.yaml's
        schedule and fallback (none unless it composes one), the rest as given or the defaults."""
        prior = prior_config(name)
        fallback = prior.get("fallback")
        kw.setdefault("fallback", None if fallback is None else PriorFallback(
            str(fallback.name), name=str(fallback.name), below=prior.get("fallback_below"),
            keep_smaller=prior.get("fallback_keep_smaller")))
        kw.setdefault("lambda_sem", prior_lambda_sem(prior))  # as space.lambda_sem
        return cls(**{**prior_schedule(prior), **kw})


@functools.lru_cache(maxsize=None)
def prior_config(name: str) -> Mapping:
    """conf/prior/<name>.yaml as Hydra composes it at ``prior`` (with the fallback prior it
    composes, at ``fallback``); read once per process (the default fallback asks every batch),
    so read-only."""
    from omegaconf import OmegaConf

    path = Path(CONF_DIR) / "prior" / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"prior {name!r} has no config in {path.parent}; one of {names}")
    node = OmegaConf.load(path)
    fallback = None
    for entry in node.pop("defaults", None) or []:
        if isinstance(entry, Mapping) and "/prior@fallback" in entry:
            fallback = prior_config(str(entry["/prior@fallback"]))
    if fallback is not None:
        node.fallback = fallback
    return node


def stage_sizes(prior: Mapping) -> list[int | None]:
    """One render grid per stage of a prior config (coarse-to-fine; None = full size): its
    ``sizes`` list, or ``early_size`` for every stage but the last (which renders full size)."""
    n = len(prior["stages"])
    sizes, early = prior.get("sizes"), prior.get("early_size")
    if sizes is not None and early is not None:
        raise ValueError(f"prior.sizes={list(sizes)} and prior.early_size={early} both set the stages' "
                         "grids: set one (prior.early_size=null to use prior.sizes)")
    return list(sizes) if sizes is not None else [early] * (n - 1) + [None]


def prior_schedule(prior: Mapping, steps_per_stage: int | None = None, min_steps: int | None = None) -> dict:
    """The ``InversionOptions`` a prior's config owns: its stage lr and layer-group stages
    (``lr``, ``stages``, coarse-to-fine ``early_size`` or ``sizes``), its second searches
    (``refine``, ``retry_elsewhere``) and its reconstruction (``recon.max_steps``, ``recon.psnr_target``,
    ``recon.lr``, ``recon.sizes``), each stage ``steps_per_stage`` long with ``min_steps``
    before an early stop (None: the options')."""
    recon = prior["recon"]
    sizes = stage_sizes(prior)
    return dict(lr=float(prior["lr"]), refine=prior.get("refine"), retry_elsewhere=bool(prior.get("retry_elsewhere", False)),
                retry_hparams=tuple(dict(h) for h in prior.get("retry_hparams") or ()),
                stages=[Stage(list(g), steps_per_stage, min_steps, size=size)
                        for g, size in zip(prior["stages"], sizes, strict=True)],  # lengths: validate
                recon_steps=int(recon["max_steps"]), psnr_target=float(recon["psnr_target"]),
                recon_lr=recon["lr"], recon_sizes=tuple(recon.get("sizes") or (None,)))  # sizes: optional


def generate_counterfactuals(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    prior: str | Prior | PriorFactory = "warp",
    prior_hparams: Mapping | None = None,
    manifold: nn.Module | None = None,
    options: InversionOptions | None = None,
    objective: Sequence[Term] | None = None,
    seeds: Sequence[int] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> CounterfactualBatch:
    """Counterfactuals for a batch of queries ``images [B,C,H,W]`` in [0, 1] towards ``targets [B]``.

    ``seeds[i]`` seeds query i's generator; results for a query depend only on its image, target
    and seed, not on the rest of the batch. See the module docstring for the algorithm; one pass
    is a ``disc_pl.cf.search.Search``, and a query it leaves ``not_flipped`` gets the second
    chances below, both ``Retry`` plans of ``disc_pl.cf.search.retry`` (a retry's result replaces
    the first where it flipped or came closer; ``steps`` and ``seconds`` count both).

    With the localization gate on and ``gate.fallback`` (off by default: where no local edit
    flips a query, the ungated search repaints the whole image), a query the gated search
    does not flip is searched again with the paper's objective (no gate, same seed), starting
    from the generators the gated search fitted (one reconstruction); ``localized[i]`` says
    which search the returned image came from. It works whatever form ``prior`` takes: a prior by name
    or factory is built again for the queries retried and loads their fitted state rows; a
    ``Prior`` instance (built for the whole batch) is restored to its fitted state and searched
    again with only those queries active.

    With ``options.fallback`` (a ``PriorFallback``: a prior by name or factory), the queries this
    prior does not flip are optimised again from scratch by the fallback prior with its own
    options (its gate and gate fallback included; this prior's ungated retry is skipped), and
    ``fallback[i]`` says which prior the returned image came from. Each query still depends only
    on its image, target and seed.

    ``objective``: the named, weighted terms to minimise (``disc_pl.cf.objective``); default the
    paper's objective with the coefficients of ``options`` and the ``manifold`` term.
    ``seconds[i]`` is query i's share of the wall time: each step's time is split among the
    queries active in it, set-up evenly (so the batch's wall time is ``seconds.sum()``).
    """
    opts = options or InversionOptions()
    terms = check_objective(objective if objective is not None else default_objective(opts, manifold))
    setting = Setting(prior, prior_hparams, manifold, terms, on_log)
    images = images.detach()
    B = images.shape[0]
    targets = torch.as_tensor(targets, device=images.device).long().view(-1)
    if targets.shape[0] != B:
        raise ValueError(f"{B} images but {targets.shape[0]} targets")
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    fb = opts.fallback
    fb_options = fb.options_for(opts) if fb is not None else None  # its own schedule, the rest as these
    if fb is not None and opts.gate is not None and opts.gate.fallback:  # the fallback prior's run retries ungated
        opts = dataclasses.replace(opts, gate=dataclasses.replace(opts.gate, fallback=False), fallback=None)
    ungated = fb is None and opts.gate is not None and opts.gate.fallback
    first = Search(classifier, images, targets, seeds, opts, setting, snapshot=ungated or _searches_again(opts))
    # before the fallback: this prior's own results (the fallback's run does the same for its own)
    plans = []
    if opts.gate is not None and opts.refine is not None:
        plans.append(first.confined_retry())
    if opts.gate is not None and opts.retry_elsewhere:
        plans.append(first.elsewhere_retry())
    plans += [_relaxed_retry(classifier, images, targets, seeds, hp, opts, setting, objective)
              for hp in opts.retry_hparams]
    plans += ([_prior_fallback(classifier, images, targets, seeds, fb, fb_options, setting, objective)] if fb is not None
              else [first.ungated_retry()] if ungated else [])
    out = retry(first.run(), plans)
    if out.refined is None and (_searches_again(opts) or _searches_again(fb_options)):
        out.refined = torch.zeros(B, dtype=torch.bool)  # one `refined` column per run, whichever batch ran one
    if out.relaxed is None and opts.retry_hparams:
        out.relaxed = torch.zeros(B, dtype=torch.bool)  # likewise `relaxed`
    return out


def _searches_again(opts: InversionOptions | None) -> bool:
    """Whether a prior's run may search a query again in a region of its own (``refine``,
    ``retry_elsewhere``; both need the gate)."""
    return opts is not None and opts.gate is not None and (opts.refine is not None or opts.retry_elsewhere)


def relaxed_prior(prior: str | Prior | PriorFactory, prior_hparams: Mapping | None,
                  change: Mapping) -> tuple[str | PriorFactory, Mapping | None]:
    """``(prior, prior_hparams)`` of the same prior with the hyperparameters ``change`` changed: a
    prior by name takes them into its hparams, a ``functools.partial`` factory as new keywords."""
    if not isinstance(prior, (str, functools.partial)):
        raise ValueError(f"inversion retry_hparams={dict(change)} needs the prior by name or as a functools.partial "
                         f"factory (prior.hparams with _partial_: true), got {type(prior).__name__}; set "
                         "retry_hparams=() for this prior")
    cls = PRIORS.get(prior) if isinstance(prior, str) else prior.func  # an unknown name: make_prior says so
    takes = set(inspect.signature(cls).parameters) if isinstance(cls, type) else set(change)
    if not set(change) <= takes:
        raise ValueError(f"inversion retry_hparams={dict(change)} changes {sorted(set(change) - takes)}, not "
                         f"parameters of {cls.__name__} (its: {sorted(takes - {'images', 'seeds'})}); the "
                         "default InversionOptions are the warp's: for another prior use "
                         "InversionOptions.for_prior(name) or retry_hparams=()")
    if isinstance(prior, str):
        return prior, {**(prior_hparams or {}), **change}
    return functools.partial(prior, **change), prior_hparams


def _relaxed_retry(classifier: nn.Module, images: Tensor, targets: Tensor, seeds: Sequence[int],
                   change: Mapping, opts: InversionOptions, setting: Setting,
                   objective: Sequence[Term] | None) -> Retry:
    """One of the prior's relaxations (``options.retry_hparams``) as a ``Retry``: the same prior
    with ``change`` in its hyperparameters, on the rows the fallback prior would take (not flipped,
    or flipped below its ``below``), which sets ``relaxed`` on the rows it replaced."""
    prior, hparams = relaxed_prior(setting.prior, setting.prior_hparams, change)
    below = opts.fallback.below if opts.fallback is not None else None
    options = dataclasses.replace(opts, fallback=None, retry_hparams=())

    def search(on_rows: list[int]) -> CounterfactualBatch:
        on = torch.tensor(on_rows).to(images.device)
        return generate_counterfactuals(
            classifier, images[on], targets[on], prior=prior, prior_hparams=hparams, manifold=setting.manifold,
            options=options, objective=objective, seeds=[seeds[i] for i in on_rows], on_log=setting.on_log)

    name = ", ".join(f"{k}={v}" for k, v in change.items())
    return Retry(f"the prior with {name}", search, flag="relaxed", select=lambda out: unflipped_or_weak(out, below))


def _prior_fallback(classifier: nn.Module, images: Tensor, targets: Tensor, seeds: Sequence[int],
                    fb: PriorFallback, options: InversionOptions, setting: Setting,
                    objective: Sequence[Term] | None) -> Retry:
    """The prior fallback (``options.fallback``) as a ``Retry``: a fresh run of
    ``generate_counterfactuals`` over the rows by the fallback prior with its own options (the
    objective given, else its options' default), which sets ``fallback`` on the rows it replaced."""

    def search(rows: list[int]) -> CounterfactualBatch:
        on = torch.tensor(rows).to(images.device)
        return generate_counterfactuals(
            classifier, images[on], targets[on], prior=fb.prior, prior_hparams=fb.prior_hparams,
            manifold=setting.manifold, options=options, objective=objective,
            seeds=[seeds[i] for i in rows], on_log=setting.on_log)

    return Retry(fb.name or "fallback prior", search, flag="fallback", select=fb.rows,
                 smaller=fb.keep_smaller, query=images)
