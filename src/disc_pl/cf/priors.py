"""Image priors (SPEC section 3): B independent per-query generators, batched.

A prior holds, for a batch of B query images, one generator per query whose parameters are
rows of batched tensors (dim 0 = query). The generator is a chain of named layer groups
(``prior.groups``, input->output); the progressive schedule (SPEC section 5) trains a suffix
of them, and the output of the frozen prefix is computed once and cached.

Per-query independence: everything random about query i (DIP noise input and its fitting
perturbation, INR Fourier matrix, all initial weights) is drawn from ``torch.Generator``
seeded with ``seeds[i]``, and losses are summed over queries, so query i's result does not
depend on B or on the other queries (up to float round-off of batched kernels).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from disc_pl.cf import precision as amp
from disc_pl.cf.optim import RowAdam
from disc_pl.data.corruptions import blur
from disc_pl.errors import ConfigError, Problem, is_integer
from disc_pl.metrics.functional import dilate_mask
from disc_pl.nets.siren import BatchedFourierSiren
from disc_pl.nets.unet import BatchedSkipNet

State = Tensor | tuple[Tensor, ...]


def psnr(mse: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from their MSE; capped at 100 dB (exact match)."""
    return -10 * torch.log10(mse.clamp_min(1e-10))


def _take(state: State, idx: Tensor | None) -> State:
    if idx is None:
        return state
    if isinstance(state, Tensor):
        return state[idx]
    return tuple(t[idx] for t in state)


class Prior(nn.Module, ABC):
    """Base class: the group chain, trainable groups, the frozen-prefix cache, reconstruction.

    Subclasses set ``groups``, ``default_recon_lr`` and implement ``_input``, ``_run_group``,
    ``_group_parameters`` (and ``default_stages``, ``regularizer`` if they differ)."""

    groups: tuple[str, ...]
    default_recon_lr: float

    def __init__(self, images: Tensor, seeds: Sequence[int]) -> None:
        super().__init__()
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if len(seeds) != images.shape[0]:
            raise ValueError(f"need one seed per query: {images.shape[0]} images, {len(seeds)} seeds")
        self.register_buffer("images", images.detach().clone(), persistent=False)
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._trainable: tuple[str, ...] = ()
        self._first_trainable = 0  # groups before this index are frozen and cached
        self._cache: State | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    # -- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def _input(self, idx: Tensor | None, perturb: bool) -> State:
        """State fed to the first group for rows idx (perturb: add fitting noise, DIP only)."""

    @abstractmethod
    def _run_group(self, name: str, state: State, idx: Tensor | None) -> State:
        """The state after group ``name`` for rows idx."""

    @abstractmethod
    def _group_parameters(self, name: str) -> list[Tensor]:
        """The batched parameter tensors of group ``name``."""

    def _image(self, state: State) -> Tensor:
        """The image [b, C, H, W] from the state after the last group."""
        return state if isinstance(state, Tensor) else state[0]

    # -- public API -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def default_stages(self) -> list[list[str]]:
        return [["all"]]

    def regularizer(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """Per-query prior penalty ``[b]`` added to the objective; zero for network priors."""
        return x.new_zeros(x.shape[0])

    # -- coarse-to-fine rendering -----------------------------------------------------------
    @property
    def full_size(self) -> tuple[int, int]:
        return (int(self.images.shape[-2]), int(self.images.shape[-1]))

    @property
    def render_size(self) -> tuple[int, int]:
        """The (h, w) grid ``forward`` renders now: the full image size unless ``set_render_size``."""
        return self.full_size

    def size_at(self, max_side: int | None) -> tuple[int, int]:
        """The render grid whose longer side is at most ``max_side`` pixels (aspect kept; None or
        a size at least the image's: the full size)."""
        h, w = self.full_size
        if max_side is None or max_side >= max(h, w):
            return (h, w)
        if max_side < 4:
            raise ValueError(f"a render grid of {max_side} pixels per side is too coarse (need >= 4)")
        f = max_side / max(h, w)
        return (max(round(h * f), 1), max(round(w * f), 1))

    def set_render_size(self, size: tuple[int, int]) -> None:
        """Render on an (h, w) grid from now on (coarse-to-fine: early steps on a coarse grid,
        enlarged to full size by the caller). Priors that are not continuous in space (free
        pixels) render at full size only."""
        if tuple(size) != self.full_size:
            raise ValueError(f"the {type(self).__name__} renders at full size only ({self.full_size}), not {size}; "
                             "coarse-to-fine grids (prior.recon.sizes, prior.sizes) need prior=inr")

    def target_images(self) -> Tensor:
        """The queries at the current render size (area-averaged when coarser)."""
        if self.render_size == self.full_size:
            return self.images
        return torch.nn.functional.interpolate(self.images, size=self.render_size, mode="area")

    def resolve_groups(self, groups: Sequence[str] | str) -> tuple[str, ...]:
        """Group names (``"all"`` expanded) in input->output order; unknown -> ValueError."""
        groups = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in groups if g != "all" and g not in self.groups]
        if unknown:
            raise ValueError(
                f"unknown {type(self).__name__} group(s) {unknown}; valid groups are "
                f"{list(self.groups)} or 'all'"
            )
        return self.groups if "all" in groups else tuple(g for g in self.groups if g in groups)

    def check_schedule(self, stages: Sequence[Sequence[str]] | None = None,
                       sizes: Sequence[int | None] | None = None,
                       recon_sizes: Sequence[int | None] | None = None, early_size: int | None = None) -> None:
        """One ``ConfigError`` for every entry of a schedule this prior cannot run: layer groups
        it does not have (``prior.stages[i]``), and coarse-to-fine grids (``prior.sizes``, one per
        stage; ``prior.early_size``, every stage but the last; ``prior.recon.sizes``) that are
        malformed or that it cannot render. None: not given."""
        problems = []
        for i, groups in enumerate(stages or []):
            try:
                self.resolve_groups(groups)
            except ValueError:
                problems.append(Problem(f"prior.stages[{i}]", list(groups), (
                    f"layer groups of this {type(self).__name__} are {', '.join(self.groups)} (or all); "
                    f"e.g. prior.stages={self.default_stages}").replace("'", "")))
        early = None
        if early_size is not None:
            if not (is_integer(early_size) and early_size >= 4):
                problems.append(Problem("prior.early_size", early_size,
                                        "must be an integer >= 4 (pixels per side) or null (full size)"))
            elif sizes is not None:
                problems.append(Problem("prior.early_size", early_size, "must be null when prior.sizes lists "
                                        "the stages' grids (prior.early_size=null), or drop prior.sizes"))
            else:
                early = [early_size]
        for key, grid, count in (("prior.recon.sizes", recon_sizes, None),
                                 ("prior.sizes", sizes, len(stages) if stages else None),
                                 ("prior.early_size", early, None)):
            if grid is None:
                continue
            grid = list(grid) if isinstance(grid, (list, tuple)) else grid
            if not isinstance(grid, list) or not grid or not all(s is None or (is_integer(s) and s >= 4) for s in grid):
                problems.append(Problem(key, grid, "must be a list of grid sizes in pixels per side (>= 4) or "
                                        "null (full size), e.g. [48] or [24, 48, null]"))
                continue
            if count is not None and len(grid) != count:
                problems.append(Problem(key, grid, f"needs one entry per stage of prior.stages ({count}), "
                                        f"e.g. {[None] * count}".replace("None", "null")))
                continue
            try:
                for s in grid:
                    self.set_render_size(self.size_at(s))
            except ValueError as err:
                problems.append(Problem(key, grid, f"{err}; use null (full size)"))
            finally:
                self.set_render_size(self.full_size)
        if problems:
            raise ConfigError(problems)

    def parameter_groups(self, groups: Sequence[str] | str) -> list[Tensor]:
        return [p for g in self.resolve_groups(groups) for p in self._group_parameters(g)]

    def set_trainable(self, groups: Sequence[str] | str) -> None:
        names = self.resolve_groups(groups)
        for g in self.groups:
            for p in self._group_parameters(g):
                p.requires_grad_(g in names)
        self._trainable = names
        self._first_trainable = self.groups.index(names[0]) if names else len(self.groups)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget the cached frozen prefix (call after changing frozen parameters by hand)."""
        self._cache = None

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.double(): the cache would be stale
        self.clear_cache()
        return super()._apply(fn, recurse)

    def _run(self, state: State, start: int, stop: int, idx: Tensor | None) -> State:
        for name in self.groups[start:stop]:
            state = self._run_group(name, state, idx)
        return state

    def _rows(self, idx: Tensor | Sequence[int] | None) -> Tensor | None:
        return None if idx is None else torch.as_tensor(idx, device=self.images.device).long().flatten()

    def forward(self, idx: Tensor | Sequence[int] | None = None, perturb: bool = False) -> Tensor:
        """Images ``[b, C, H, W]`` in [0, 1] of query rows idx (None = all B).

        perturb=True (used while reconstructing) adds the prior's fitting noise and bypasses
        the cache."""
        idx = self._rows(idx)
        start = 0 if perturb else self._first_trainable
        if start == 0:
            state = self._input(idx, perturb)
        else:
            if self._cache is None:
                with torch.no_grad():
                    self._cache = self._run(self._input(None, False), 0, start, None)
            state = _take(self._cache, idx)
        return self._image(self._run(state, start, len(self.groups), idx))

    def reconstruct(self, max_steps: int, psnr_target: float, lr: float | None = None,
                    sizes: Sequence[int | None] = (None,), loss_scale: float = 1.0) -> Tensor:
        """Fit every generator to its own query (pixel MSE), batched, with RowAdam.

        Query i stops (and is frozen exactly) at the first step where its PSNR reaches
        ``psnr_target`` (dB, measured on the output of that step's forward). Trainable groups
        are restored afterwards. Returns the final PSNR per query ``[B]`` (clean output) on the
        grid of the last phase.

        ``sizes`` (coarse-to-fine, continuous priors): one fitting phase of up to ``max_steps``
        per entry, in order, each on a grid whose longer side is at most that many pixels (None:
        full size) against the area-averaged queries. E.g. ``(48,)`` fits a 96 x 96 query on a
        48 x 48 grid, a quarter of the pixels per step; the INR is continuous, so it renders the
        full size afterwards (an interpolating fit: its full-size PSNR is lower by the detail
        finer than the grid, which the engine's residual form keeps in x' anyway).

        Under ``torch.autocast`` (``inversion.precision``) the forward passes run in its dtype;
        ``loss_scale`` multiplies the MSE before backward and divides the gradients after it
        (float16: small gradients do not underflow)."""
        out = None
        for size in sizes:
            self.set_render_size(self.size_at(size))
            out = self._fit(max_steps, psnr_target, lr, loss_scale)
        self.set_render_size(self.full_size)
        return out

    def _fit(self, max_steps: int, psnr_target: float, lr: float | None, loss_scale: float = 1.0) -> Tensor:
        previous = self._trainable
        self.set_trainable(["all"])
        params = self.parameter_groups(["all"])
        optimizer = RowAdam(params, self.default_recon_lr if lr is None else lr) if params else None
        active = torch.ones(self.batch_size, dtype=torch.bool, device=self.images.device)
        target = self.target_images()
        with torch.enable_grad():
            for _ in range(max_steps):
                rows = active.nonzero().flatten()
                if rows.numel() == 0:
                    break
                idx = None if rows.numel() == self.batch_size else rows
                mse = (self(idx, perturb=True).float() - target[rows]).square().flatten(1).mean(1)
                done = psnr(mse.detach()) >= psnr_target
                active[rows[done]] = False
                if optimizer is None or bool(done.all()):
                    continue
                optimizer.zero_grad()
                amp.scaled_backward(mse.sum(), params, loss_scale)  # a sum: each query's gradient is its own MSE's
                optimizer.step(rows[~done])
        if optimizer is not None:
            optimizer.zero_grad()
        self.set_trainable(previous)
        with torch.no_grad():
            return psnr((self().float() - target).square().flatten(1).mean(1))


class _ClampInward(torch.autograd.Function):
    """clamp(x, 0, 1) whose gradient passes inside [0, 1] and, outside, only where a descent
    step moves x back towards [0, 1]: a plain clamp would kill the gradient of saturated
    pixels, a plain straight-through would let them drift arbitrarily far out."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad.masked_fill(((x < 0) & (grad > 0)) | ((x > 1) & (grad < 0)), 0)


class TVPrior(Prior):
    """Free pixels initialised at the query, regularised by TV + L2 (paper eq. 4).

    Regulariser per query, all terms as means so they do not scale with image size:
        alpha_tv * (mean |dx|^beta + mean |dy|^beta) + alpha_l2 * mean x^2
    With beta = 2 this is SPEC's anisotropic squared TV. An i.i.d. perturbation of amplitude
    a raises the TV term by ~4 a^2, i.e. alpha_tv = 0.1 weighs noise at ~0.4x a pixel MSE of
    weight 1 (a deliberately weak prior, as the paper's TV+L2 baseline); alpha_l2 = 1e-3
    only discourages saturating pixels (the mean of x^2 is ~0.3 for natural images)."""

    groups = ("pixels",)
    default_recon_lr = 0.01  # unused: the pixels start exactly at the query

    def __init__(
        self,
        images: Tensor,
        seeds: Sequence[int],
        alpha_tv: float = 0.1,
        alpha_l2: float = 1e-3,
        tv_beta: float = 2.0,
    ) -> None:
        super().__init__(images, seeds)
        if tv_beta < 1:
            raise ValueError(f"tv_beta must be >= 1 (|d|^beta is not differentiable at 0 below), got {tv_beta}")
        self.alpha_tv, self.alpha_l2, self.tv_beta = alpha_tv, alpha_l2, tv_beta
        self.pixels = nn.Parameter(images.detach().clone())  # [B, C, H, W], clamped in forward
        self.set_trainable(["all"])

    @property
    def default_stages(self) -> list[list[str]]:
        # Three stages so the semantic weight relaxes as often as for the network priors.
        return [["pixels"], ["pixels"], ["pixels"]]

    def _input(self, idx: Tensor | None, perturb: bool) -> State:
        return ()

    def _run_group(self, name: str, state: State, idx: Tensor | None) -> State:
        return _ClampInward.apply(self.pixels if idx is None else self.pixels[idx])

    def _group_parameters(self, name: str) -> list[Tensor]:
        return [self.pixels]

    def regularizer(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().pow(self.tv_beta).flatten(1).mean(1)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().pow(self.tv_beta).flatten(1).mean(1)
        return self.alpha_tv * (dx + dy) + self.alpha_l2 * x.square().flatten(1).mean(1)


class _NetPrior(Prior):
    """A prior whose generator is a batched net with ``groups``, ``blocks`` and ``run_group``."""

    def _set_net(self, net: BatchedSkipNet | BatchedFourierSiren) -> None:
        self.net = net.to(self.images.device)
        self.groups = net.groups
        self.set_trainable(["all"])

    def _run_group(self, name: str, state: State, idx: Tensor | None) -> State:
        return self.net.run_group(name, state, idx)

    def _group_parameters(self, name: str) -> list[Tensor]:
        return list(self.net.blocks[name].parameters())


def _max_dip_scales(h: int, w: int) -> int:
    """Most halvings of an h x w image that stay exact and leave more than one pixel."""
    s = 0
    while h % 2 ** (s + 1) == 0 and w % 2 ** (s + 1) == 0 and (h * w) >> (2 * s + 2) >= 2:
        s += 1
    return s


class DIPPrior(_NetPrior):
    """Deep Image Prior: x_i = f_theta_i(z_i), a per-query skip encoder-decoder (nets.unet).

    Defaults are conf/prior/dip.yaml's, sized for 32x32 images on a CPU; the reference DIP uses
    5 scales x 128 channels (for 96x96 and larger), 4 skip channels, 32-channel noise
    U(0,1)*0.1, Adam lr 0.01 and a fitting perturbation std of 1/30. Groups: enc0..enc{S-1},
    dec{S-1}..dec0 (dec0 finest), out."""

    default_recon_lr = 0.01

    def __init__(
        self,
        images: Tensor,
        seeds: Sequence[int],
        scales: int = 3,
        channels: int = 32,
        skip_channels: int = 4,
        input_channels: int = 32,
        input_scale: float = 0.1,
        input_noise_std: float = 1 / 30,
    ) -> None:
        super().__init__(images, seeds)
        _, c, h, w = images.shape
        allowed = _max_dip_scales(h, w)
        if not (is_integer(scales) and 1 <= scales <= allowed):
            step = 2 ** scales if is_integer(scales) and scales >= 1 else 2
            fix = (f"or 1 <= scales <= {allowed} for {h}x{w}" if allowed
                   else f"no number of scales fits {h}x{w} images: use prior=inr or prior=tv")
            raise ConfigError.one(
                "prior.hparams.scales", scales,
                f"DIP prior: image size {h}x{w} does not fit scales={scales}: height and width must be "
                f"divisible by 2**scales = {step}, with more than one pixel left at the coarsest scale "
                f"(instance norm); use image sizes that are multiples of {step} and at least {2 * step} "
                f"(e.g. {', '.join(str(step * k) for k in range(2, 5))}), {fix}")
        self.input_noise_std = input_noise_std
        z = torch.stack([torch.rand(input_channels, h, w, generator=g) for g in self.generators])
        self.register_buffer("z", z.to(images) * input_scale, persistent=False)
        self._set_net(BatchedSkipNet(self.generators, input_channels, c, channels, skip_channels, scales))

    @property
    def default_stages(self) -> list[list[str]]:
        # SPEC section 5: decoder output + finest scale -> + middle scales -> all.
        scales = (len(self.groups) - 1) // 2
        middle = [f"dec{i}" for i in range(scales // 2, 0, -1)]
        return [["dec0", "out"], [*middle, "dec0", "out"], ["all"]]

    def _input(self, idx: Tensor | None, perturb: bool) -> State:
        z = self.z if idx is None else self.z[idx]
        if perturb and self.input_noise_std > 0:
            rows = range(self.batch_size) if idx is None else idx.tolist()
            noise = torch.stack([torch.randn(z.shape[1:], generator=self.generators[i]) for i in rows])
            z = z + noise.to(z) * self.input_noise_std
        return (z,)


class INRPrior(_NetPrior):
    """Implicit neural representation: x_i(v) = MLP_i(gamma_i(v)), Fourier features + SIREN.

    Defaults are conf/prior/inr.yaml's, sized for 32x32 images on a CPU (64 frequencies at
    sigma = 3 cycles per image, 3 x 128 hidden layers); the paper uses 256 frequencies at
    sigma = 10 for 96x96 images and SPEC 3 x 256 hidden layers. SIREN's omega0 = 30 in the
    hidden layers but first_omega0 = 3 in the first: on top of Fourier features, a larger first
    omega0 or a sigma too high for the resolution makes a prior that fits but does not
    interpolate (docs/FINDINGS.md). Groups: hidden0..hidden{D-1}, out.

    Memory: the Fourier features are stored per query, [B, H*W, 2F] floats (32 queries of
    96x96 with F = 256: 0.6 GB); the cached frozen activations are [B, H*W, hidden]."""

    default_recon_lr = 1e-3

    def __init__(
        self,
        images: Tensor,
        seeds: Sequence[int],
        n_frequencies: int = 64,
        sigma: float = 3.0,
        hidden: int = 128,
        depth: int = 3,
        omega0: float = 30.0,
        first_omega0: float = 3.0,
        compile: bool = False,
    ) -> None:
        super().__init__(images, seeds)
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be true or false")
        _, c, h, w = images.shape
        self._set_net(BatchedFourierSiren(
            self.generators, h, w, c, n_frequencies, sigma, hidden, depth, omega0, first_omega0, compile
        ))

    @property
    def default_stages(self) -> list[list[str]]:
        # SPEC section 5: last layer -> last half of the groups -> all.
        return [["out"], list(self.groups[len(self.groups) // 2 :]), ["all"]]

    def _input(self, idx: Tensor | None, perturb: bool) -> State:
        return self.net.features if idx is None else self.net.features[idx]

    @property
    def render_size(self) -> tuple[int, int]:
        return self.net.size

    def set_render_size(self, size: tuple[int, int]) -> None:
        if tuple(size) != self.net.size:
            self.net.set_size(size)
            self.clear_cache()


def _border_connected(mask: Tensor) -> Tensor:
    """The pixels of a bool mask ``[B, H, W]`` 8-connected within it to the image's border (the
    background around an object, not a dark print or seam inside it)."""
    out = torch.zeros_like(mask)
    out[:, 0], out[:, -1], out[:, :, 0], out[:, :, -1] = mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]
    while True:
        grown = dilate_mask(out, 1) & mask
        if torch.equal(grown, out):
            return out
        out = grown


class WarpPrior(Prior):
    """The counterfactual as a smooth deformation of the query: x'(p) = x(p + d(p)), sampled
    bilinearly (border padding), with the displacement d a per-query field of ``grid`` x
    ``grid`` control points (pixels), enlarged bicubically to the image. The change can only
    move the query's own pixels: it brings no colour or texture the query does not have, so an
    edit of shape (a mouth's curvature, a sleeve's length, a lesion's border) is drawn with
    the query's own strokes instead of as new high-frequency texture.

    Regulariser per query: ``alpha_smooth`` x the mean squared difference of neighbouring
    control points, ``alpha_mag`` x their mean squared displacement (both in pixels^2, so
    independent of the image size for a given displacement in pixels) and ``alpha_l1`` x their
    mean absolute displacement (pixels; a sparse, hence local, deformation). The field starts at
    zero, where x' = x exactly; it is continuous, but rendered at full size only.

    ``grad_blur`` (pixels, or None): the image x' is sampled from the query as it is, but the
    displacement's gradient is taken from a Gaussian-blurred copy (sigma ``grad_blur``) sampled at
    the same points. A thin stroke's own gradient reaches only the pixels beside it; the blurred
    one sees it from a few pixels away, so a stroke can be pulled as a whole instead of torn.

    ``erase_band`` (pixels, or None): the deformation may also fade the object's rim to the
    background, ``x' = (1 - e) x(p + d(p)) + e * erase_to``, with ``e`` a second field of
    ``grid`` x ``grid`` control points clamped to [0, 1] (its gradient kept at the bounds) and
    allowed only within ``erase_band`` pixels of the query's background (pixels within 0.05 of
    ``erase_to`` connected to the image's border: a dark print inside the object is no background).
    A long sleeve beside the body can go, a hole inside the object cannot. ``alpha_erase`` x the mean erased share is
    added to the regulariser; the field starts at 0, where x' is the warp alone."""

    groups = ("flow",)
    default_recon_lr = 0.01  # unused: the field starts at the identity

    def __init__(self, images: Tensor, seeds: Sequence[int], grid: int = 24, alpha_smooth: float = 10.0,
                 alpha_mag: float = 0.0, alpha_l1: float = 0.0, max_shift: float | None = None,
                 grad_blur: float | None = None, erase_band: float | None = None, erase_to: float = 0.0,
                 alpha_erase: float = 1.0) -> None:
        super().__init__(images, seeds)
        if not (is_integer(grid) and 2 <= int(grid)):
            raise ValueError(f"grid must be an integer >= 2 (control points per side), got {grid!r}")
        if not (alpha_smooth >= 0 and alpha_mag >= 0 and alpha_l1 >= 0):
            raise ValueError(f"alpha_smooth, alpha_mag and alpha_l1 must be >= 0, got {alpha_smooth!r}, "
                             f"{alpha_mag!r}, {alpha_l1!r}")
        if max_shift is not None and not max_shift > 0:
            raise ValueError(f"max_shift must be > 0 pixels or null, got {max_shift!r}")
        if grad_blur is not None and not grad_blur > 0:
            raise ValueError(f"grad_blur must be > 0 pixels (the blur the displacement's gradient is taken from) "
                             f"or null, got {grad_blur!r}")
        if erase_band is not None and not erase_band > 0:
            raise ValueError(f"erase_band must be > 0 pixels (how far from the background the object may fade "
                             f"to it) or null, got {erase_band!r}")
        if not (0.0 <= erase_to <= 1.0 and alpha_erase >= 0):
            raise ValueError(f"erase_to must be a value in [0, 1] (the background's) and alpha_erase >= 0, got "
                             f"{erase_to!r}, {alpha_erase!r}")
        self.grid, self.alpha_smooth, self.alpha_mag = int(grid), float(alpha_smooth), float(alpha_mag)
        self.alpha_l1 = float(alpha_l1)
        self.max_shift = None if max_shift is None else float(max_shift)
        b, _, h, w = images.shape
        self.flow = nn.Parameter(images.new_zeros(b, 2, self.grid, self.grid))  # (dx, dy) in pixels
        self.grad_blur = None if grad_blur is None else float(grad_blur)
        self.register_buffer("blurred", None if grad_blur is None else blur(images, self.grad_blur, "replicate"),
                             persistent=False)
        ys = (torch.arange(h, dtype=images.dtype, device=images.device) + 0.5) * 2 / h - 1
        xs = (torch.arange(w, dtype=images.dtype, device=images.device) + 0.5) * 2 / w - 1
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, 2]: (x, y) pixel centres
        self.register_buffer("base_grid", base, persistent=False)
        self.register_buffer("to_unit", torch.tensor([2.0 / w, 2.0 / h], dtype=images.dtype,
                                                      device=images.device), persistent=False)
        self.erase_to, self.alpha_erase = float(erase_to), float(alpha_erase)
        self.erase = None
        band = None
        if erase_band is not None:
            self.erase = nn.Parameter(images.new_zeros(b, 1, self.grid, self.grid))
            background = _border_connected(((images - self.erase_to).abs() <= 0.05).all(dim=1))  # [b, H, W]
            near = dilate_mask(background, math.ceil(float(erase_band)))
            band = (near & ~background)[:, None].to(images.dtype)  # object pixels within erase_band of it
        self.register_buffer("band", band, persistent=False)
        self.set_trainable(["all"])

    @property
    def default_stages(self) -> list[list[str]]:
        return [["flow"], ["flow"], ["flow"]]  # as many semantic relaxations as the network priors

    def _field(self, idx: Tensor | None) -> Tensor:
        flow = self.flow if idx is None else self.flow[idx]
        if self.max_shift is not None:
            flow = self.max_shift * torch.tanh(flow / self.max_shift)
        return flow

    def displacement(self, idx: Tensor | None = None) -> Tensor:
        """The full-size displacement field [b, 2, H, W] in pixels (dx, dy)."""
        return torch.nn.functional.interpolate(self._field(idx), size=self.full_size, mode="bicubic",
                                               align_corners=True)

    def _input(self, idx: Tensor | None, perturb: bool) -> State:
        return ()

    def _run_group(self, name: str, state: State, idx: Tensor | None) -> State:
        images = self.images if idx is None else self.images[idx]
        d = self.displacement(idx).permute(0, 2, 3, 1).to(images.dtype)  # [b, H, W, 2]
        grid = self.base_grid + d * self.to_unit
        sharp = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                                align_corners=False)
        if self.blurred is not None:
            blurred = self.blurred if idx is None else self.blurred[idx]
            soft = torch.nn.functional.grid_sample(blurred, grid, mode="bilinear",
                                                   padding_mode="border", align_corners=False)
            sharp = sharp.detach() + soft - soft.detach()  # the value of sharp, the gradient of soft
        if self.erase is None:
            return sharp
        e = self.erased(idx).to(sharp.dtype)
        return sharp * (1 - e) + e * self.erase_to

    def erased(self, idx: Tensor | None = None) -> Tensor:
        """The full-size share of each pixel faded to the background [b, 1, H, W] (with ``erase_band``)."""
        a = self.erase if idx is None else self.erase[idx]
        band = self.band if idx is None else self.band[idx]
        e = torch.nn.functional.interpolate(a, size=self.full_size, mode="bicubic", align_corners=True)
        # a plain clamp's gradient is 0 at the start (e = 0 exactly), where the field would never move
        return _ClampInward.apply(e) * band

    def _group_parameters(self, name: str) -> list[Tensor]:
        return [self.flow] if self.erase is None else [self.flow, self.erase]

    def regularizer(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        f = self._field(idx)
        smooth = ((f[:, :, 1:, :] - f[:, :, :-1, :]).square().flatten(1).mean(1)
                  + (f[:, :, :, 1:] - f[:, :, :, :-1]).square().flatten(1).mean(1))
        reg = (self.alpha_smooth * smooth + self.alpha_mag * f.square().flatten(1).mean(1)
               + self.alpha_l1 * f.abs().flatten(1).mean(1))
        if self.erase is not None:
            reg = reg + self.alpha_erase * self.erased(idx).flatten(1).mean(1)
        return reg


PRIORS: dict[str, type[Prior]] = {"tv": TVPrior, "dip": DIPPrior, "inr": INRPrior, "warp": WarpPrior}


def build_prior(name: str, images: Tensor, seeds: Sequence[int], **hparams) -> Prior:
    """The prior ``name`` (tv | dip | inr | warp) for query images [B, C, H, W] in [0, 1]."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {sorted(PRIORS)}")
    return PRIORS[name](images, seeds, **hparams)
