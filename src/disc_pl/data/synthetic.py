"""``dataset=synthetic_faces``: procedural faces whose label lives in the mouth, with exact
ground-truth counterfactuals. The embedded default dataset: no files, no downloads.

Why: DISC (paper section 4) is evaluated on CelebA "smiling", where the true counterfactual is
unknown. Here every image is rendered from a parameter set plus a smile amount ``s``
(``s > 0``: smiling, label 1; ``s < 0``: frowning, label 0), so its counterfactual is the same
render with ``-s``: identical nuisance factors and identical pixel noise, only the mouth
differs. The attribute mask is where the two differ (a few % of the pixels).

Nuisance factors vary globally and independently of the label: face position / scale /
aspect, skin tone, background colours and gradient, lighting gradient, eye size / position /
openness, nose, hair colour / hairline / volume / length (or bald), mouth width / thickness /
colour / height, per-pixel noise level. A minority of faces (``hard_fraction``) have a smile
amount close to the decision boundary.

Rendering is vectorised over a batch of parameter sets (tensors ``[n, H, W]`` or
``[n, 3, H, W]``); every element is drawn with a compact-support anti-aliased coverage, so
outside the mouth stroke of either smile amount, image and counterfactual agree exactly. Splits
are rendered once in ``setup()`` and kept in memory as uint8 (like 8-bit image files).

A planted shortcut (``dataset.shortcut``, issue 28) asks whether a classifier cheats: with
``kind=mark`` a small magenta square is drawn at a fixed place (top right, after the mouth,
before lighting and noise), on a smiling train / val face with probability ``rate`` and on a
non-smiling one with probability ``1 - rate`` (1.0: the cue alone predicts the label; 0.5: it is
independent of it). Test faces never carry it, so the (non-smiling) queries are clean and a
counterfactual can add it. The mark has an exact mask (``cue_mask``; pixels outside it are those
of the clean face, bit for bit) and ``with_cue`` re-renders any face with or without it, which
is how :mod:`disc_pl.metrics.shortcut` measures reliance. The faces themselves are the clean
ones: the cue is assigned from its own random stream. ``kind=null`` (the default) draws nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from disc_pl.errors import MISSING, ConfigError, is_number, require

from .base import ImageDataModule, as_index_tensor, derived_seed

#: Bump when the renderer changes, so cached models trained on older faces are not reused.
RENDER_VERSION = 1
#: Bump when the planted cue's look changes (part of the fingerprint of shortcut datasets only).
CUE_VERSION = 1
SHORTCUT_KINDS = ("mark",)
CUE_CLASS = 1  # the class the cue co-occurs with in training (smiling)
# The mark: a filled square, centre and half side in image coordinates ([-1, 1]; 1/8 of the
# side: 4 px at 32 px), off-grid so its edges are anti-aliased; a colour no face element has.
MARK_CENTRE, MARK_HALF, MARK_RGB = (0.72, -0.72), 0.125, (1.0, 0.0, 1.0)
_CUE_STREAM = 11  # derived-seed stream of the cue assignment: the faces' own streams stay untouched
CLASS_NAMES = ["not_smiling", "smiling"]
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}
_NOISE_BANK = 64  # fixed noise fields, shifted per image
_CHUNK_PIXELS = 10240  # pixels per render chunk: 3-channel ops stay under torch's parallel grain (32768)

FaceParams = dict[str, torch.Tensor]


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


def _unit_vectors(g: torch.Generator, n: int) -> torch.Tensor:
    """[n, 2] random directions (normalised Gaussian pairs: no trig needed)."""
    v = torch.randn(n, 2, generator=g)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6)


def sample_params(n: int, generator: torch.Generator) -> FaceParams:
    """Sample ``n`` nuisance parameter sets (everything but the smile amount).

    Lengths are in "face units" (the face's horizontal radius) unless named otherwise;
    image coordinates run over [-1, 1]. Returns a dict of float tensors with leading dim ``n``
    (colours ``[n, 3]``, directions ``[n, 2]``) and ``noise_seed`` (int64 ``[n]``).
    """
    g = generator
    tone = torch.rand(n, 1, generator=g)
    light_skin, dark_skin = torch.tensor([0.96, 0.80, 0.69]), torch.tensor([0.36, 0.22, 0.15])
    skin = (light_skin + (dark_skin - light_skin) * tone + _uniform(g, n, -0.03, 0.03, 3)).clamp(0, 1)
    lip_tint = torch.tensor([0.16, 0.0, 0.02]) * torch.rand(n, 1, generator=g)
    mouth_rgb = (skin * _uniform(g, n, 0.35, 0.6, 1) + lip_tint).clamp(0, 1)
    hair_dark = torch.rand(n, 1, generator=g)
    hair_base = torch.rand(n, 3, generator=g) * torch.tensor([0.8, 0.6, 0.4])
    return {
        # face placement: jitter moderate enough that the mouth always lands in the image
        "cx": _uniform(g, n, -0.1, 0.1), "cy": _uniform(g, n, -0.14, 0.06),
        "r": _uniform(g, n, 0.5, 0.66), "aspect": _uniform(g, n, 1.1, 1.28),
        "skin": skin,
        "bg0": torch.rand(n, 3, generator=g), "bg1": torch.rand(n, 3, generator=g),
        "bg_dir": _unit_vectors(g, n),
        "light_dir": _unit_vectors(g, n), "light_amp": _uniform(g, n, 0.0, 0.3),
        "eye_y": _uniform(g, n, -0.28, -0.12), "eye_dx": _uniform(g, n, 0.3, 0.45),
        "eye_rx": _uniform(g, n, 0.09, 0.16), "eye_open": _uniform(g, n, 0.45, 1.0),
        "iris": torch.rand(n, 3, generator=g) * 0.45,
        "nose_y": _uniform(g, n, 0.05, 0.15), "nose_r": _uniform(g, n, 0.05, 0.09),
        "hair": hair_base * (1 - 0.8 * hair_dark),
        "hair_on": (torch.rand(n, generator=g) > 0.15).float(),
        "hair_line": _uniform(g, n, -0.8, -0.45), "hair_curve": _uniform(g, n, 0.0, 0.4),
        "hair_volume": _uniform(g, n, 0.03, 0.22), "hair_length": _uniform(g, n, -0.5, 1.3),
        # the mouth (the attribute region): its shape varies, only its curvature is the label
        "mouth_y": _uniform(g, n, 0.5, 0.62), "mouth_w": _uniform(g, n, 0.28, 0.42),
        "mouth_h": _uniform(g, n, 0.2, 0.28), "mouth_t": _uniform(g, n, 0.1, 0.17),
        "mouth_rgb": mouth_rgb,
        "noise_std": _uniform(g, n, 0.0, 0.04),
        "noise_seed": torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int64),
    }


def sample_smile(n: int, generator: torch.Generator, hard_fraction: float = 0.1) -> torch.Tensor:
    """Smile amounts ``s`` [n] in [-1, 1]: exactly balanced signs (label = ``s > 0``),
    ``|s|`` ~ U(0.3, 1) except a ``hard_fraction`` minority with ``|s|`` ~ U(0.1, 0.3)
    close to the boundary. ``|s| >= 0.1`` keeps every counterfactual visibly different."""
    sign = torch.where(torch.randperm(n, generator=generator) < (n + 1) // 2, 1.0, -1.0)
    hard = torch.rand(n, generator=generator) < hard_fraction
    mag = torch.where(hard, _uniform(generator, n, 0.1, 0.3), _uniform(generator, n, 0.3, 1.0))
    return sign * mag


def take_params(params: FaceParams, idx: torch.Tensor) -> FaceParams:
    """The parameter sets at rows ``idx`` (LongTensor [k])."""
    return {k: v[idx] for k, v in params.items()}


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> torch.Tensor:
    """[_NOISE_BANK, 3, 2 size, 2 size]: fixed standard-normal fields of period ``size``
    (tiled 2 x 2 so any cyclic shift is a plain slice). A constant of the renderer."""
    g = torch.Generator().manual_seed(0x5EED + size)
    return torch.randn(_NOISE_BANK, 3, size, size, generator=g).repeat(1, 1, 2, 2)


def _pixel_noise(seed: torch.Tensor, size: int) -> torch.Tensor:
    """Unit-variance noise [n, 3, H, W], a pure function of each image's ``noise_seed``: one of
    the bank's fields, cyclically shifted by a seed-dependent offset (bank x H x W variants).
    An image and its counterfactual share the seed, hence the noise, exactly."""
    bank = _noise_bank(size)
    k = (seed % _NOISE_BANK).tolist()
    dy = ((seed // _NOISE_BANK) % size).tolist()
    dx = ((seed // (_NOISE_BANK * size)) % size).tolist()
    return torch.stack([bank[i, :, y:y + size, x:x + size] for i, y, x in zip(k, dy, dx)])


def _ramp(signed_px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels (< 0 inside): a 1-pixel
    linear ramp, exactly 0 from half a pixel outside (compact support). In place."""
    return signed_px.neg_().add_(0.5).clamp_(0.0, 1.0)


def _band(d2: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Coverage from a squared distance ``d2`` [n, H, W]: 1 up to ``inner``, a ramp in d^2 to
    exactly 0 at ``outer`` (compact support), radii [n, 1, 1] with inner < outer. Working in
    d^2 avoids sqrt, whose CPU kernel is multi-threaded even on small tensors. In place."""
    o2 = outer * outer
    inv = 1.0 / (o2 - inner * inner)
    return d2.mul_(-inv).add_(o2 * inv).clamp_(0.0, 1.0)


def _ellipse_alpha(u, v, cx, cy, rx, ry, ppu) -> torch.Tensor:
    """Coverage [n, H, W] of axis-aligned ellipses with a ~1 pixel anti-aliased edge.
    ``u`` [n, 1, W] and ``v`` [n, H, 1] are face-local coordinates (separable, so only their
    combination is full-size); centres / radii [n, 1, 1] in face units; ``ppu`` pixels per
    face unit [n, 1, 1]."""
    du, dv = (u - cx) / rx, (v - cy) / ry
    half_px = 0.5 / (torch.minimum(rx, ry) * ppu)  # half a pixel in normalised-radius units
    return _band(du * du + dv * dv, (1.0 - half_px).clamp_min(0.0), 1.0 + half_px)


def _mouth_alpha(u, v, p: FaceParams, smile: torch.Tensor, ppu) -> torch.Tensor:
    """Coverage [n, H, W] of the mouth stroke around ``v = y0 + s h (1/2 - (u/w)^2)``, |u| <= w,
    with round caps: corners rise and the middle drops when s > 0 (a smile), the reverse when
    s < 0. Distance to the curve ~ vertical offset / sqrt(1 + slope^2)."""
    w, y0 = p["mouth_w"].view(-1, 1, 1), p["mouth_y"].view(-1, 1, 1)
    sh = (smile * p["mouth_h"]).view(-1, 1, 1)
    t = torch.maximum(torch.minimum(u, w), -w) / w  # [n, 1, W]
    curve = y0 + sh * (0.5 - t * t)
    slope = -2.0 * sh * t / w
    inv_norm = (1.0 + slope * slope).rsqrt()
    du = (u.abs() - w).clamp_min(0.0)
    dv = (v - curve).mul_(inv_norm)  # [n, H, W]
    half_t, half_px = 0.5 * p["mouth_t"].view(-1, 1, 1), 0.5 / ppu
    return _band(dv.mul_(dv).add_(du * du), (half_t - half_px).clamp_min(0.0), half_t + half_px)


@functools.lru_cache(maxsize=8)
def cue_alpha(size: int) -> torch.Tensor:
    """[1, H, W] coverage of the planted mark: a square with a 1-pixel anti-aliased edge
    (compact support: exactly 0 from half a pixel outside), the same on every image."""
    px = 2.0 / size
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * px - 1.0
    ax = _ramp(((coords - MARK_CENTRE[0]).abs() - MARK_HALF) / px).view(1, 1, size)
    ay = _ramp(((coords - MARK_CENTRE[1]).abs() - MARK_HALF) / px).view(1, size, 1)
    return torch.minimum(ax, ay)


def _render_chunk(p: FaceParams, smile: torch.Tensor, size: int) -> torch.Tensor:
    n = smile.shape[0]
    px = 2.0 / size
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * px - 1.0  # pixel centres
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)

    def col(k: str) -> torch.Tensor:
        return p[k].view(n, 1, 1)

    def rgb(c: torch.Tensor) -> torch.Tensor:
        return c.view(n, 3, 1, 1)

    # background: linear gradient between two colours along a random direction
    t = (x * p["bg_dir"][:, :1, None] + y * p["bg_dir"][:, 1:, None]).mul_(0.5).add_(0.5).clamp_(0, 1)
    img = rgb(p["bg0"]).expand(n, 3, size, size).lerp(rgb(p["bg1"]), t[:, None])

    # face-local coordinates in face units: u [n, 1, W], v [n, H, 1]; ppu = pixels per face unit
    r = col("r")
    u, v = (x - col("cx")) / r, (y - col("cy")) / r
    ppu = r / px
    zero, one, aspect = torch.zeros_like(r), torch.ones_like(r), col("aspect")
    volume = col("hair_volume")
    hair_shape = _ellipse_alpha(u, v, zero, zero, one + volume, aspect + volume, ppu)
    hair_on = col("hair_on")

    below_cut = _ramp((v - col("hair_length")) * ppu) * hair_on  # long hair, cut: [n, H, 1]
    img.lerp_(rgb(p["hair"]), torch.minimum(hair_shape, below_cut)[:, None])
    img.lerp_(rgb(p["skin"]), _ellipse_alpha(u, v, zero, zero, one, aspect, ppu)[:, None])
    ex, ey, erx = col("eye_dx"), col("eye_y"), col("eye_rx")
    ery = erx * col("eye_open")
    pupil = 0.6 * ery

    def both_eyes(rx: torch.Tensor, ry: torch.Tensor) -> torch.Tensor:  # [n, 1, H, W]
        return torch.maximum(_ellipse_alpha(u, v, -ex, ey, rx, ry, ppu),
                             _ellipse_alpha(u, v, ex, ey, rx, ry, ppu))[:, None]

    img.lerp_(torch.full((n, 3, 1, 1), 0.93), both_eyes(erx, ery))
    img.lerp_(rgb(p["iris"]), both_eyes(pupil, pupil))
    hairline = col("hair_line") + col("hair_curve") * u * u  # [n, 1, W]
    fringe = _ramp((v - hairline).mul_(ppu)).mul_(hair_on)
    img.lerp_(rgb(p["hair"]), torch.minimum(hair_shape, fringe)[:, None])
    nose_r = col("nose_r")
    nose = _ellipse_alpha(u, v, zero, col("nose_y"), 0.7 * nose_r, nose_r, ppu)
    img.lerp_(rgb(p["skin"] * 0.8), nose[:, None])

    # the mouth: the only label-dependent element (compact support through _band)
    img.lerp_(rgb(p["mouth_rgb"]), _mouth_alpha(u, v, p, smile, ppu)[:, None])
    if "cue" in p:  # the planted shortcut (coverage exactly 0 off the mark, and on faces without it)
        img.lerp_(torch.tensor(MARK_RGB).view(1, 3, 1, 1), (cue_alpha(size) * p["cue"].view(n, 1, 1))[:, None])

    # global lighting gradient and per-pixel noise act identically on image and counterfactual
    ld = p["light_dir"]
    light = (x * ld[:, :1, None] + y * ld[:, 1:, None]).mul_(col("light_amp")).add_(1.0)  # [n, H, W]
    img.mul_(light[:, None])
    img.add_(_pixel_noise(p["noise_seed"], size).mul_(p["noise_std"].view(n, 1, 1, 1)))
    return img.clamp_(0.0, 1.0)


@torch.no_grad()
def render_faces(params: FaceParams, smile: torch.Tensor, image_size: int = 32,
                 as_uint8: bool = False) -> torch.Tensor:
    """Render faces: ``params`` (from :func:`sample_params`, n rows) and smile amounts [n]
    -> images [n, 3, image_size, image_size]: float in [0, 1], or uint8 (rounded, as an 8-bit
    image file stores them) with ``as_uint8``. Each image depends only on its own row. An
    optional ``params["cue"]`` (float [n], 1 = present) draws the planted mark.

    Work is done in small chunks of images: each op then stays below torch's intra-op
    parallel grain, which on a busy few-core machine is >10x faster than threading tiny ops.
    """
    smile = torch.as_tensor(smile, dtype=torch.float32).reshape(-1)
    n = smile.shape[0]
    chunk = max(1, _CHUNK_PIXELS // (image_size * image_size))
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8 if as_uint8 else torch.float32)
    for s in range(0, n, chunk):
        rows = slice(s, min(n, s + chunk))
        img = _render_chunk({k: v[rows] for k, v in params.items()}, smile[rows], image_size)
        out[rows] = to_uint8(img) if as_uint8 else img
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[..., H, W] float in [0, 1] -> uint8 (round half up), as an 8-bit image file stores it.
    (+0.5 then truncation rather than ``round``, whose CPU kernel threads even tiny tensors.)"""
    return (images * 255.0).add_(0.5).clamp_(0.0, 255.0).to(torch.uint8)


def attribute_mask(images: torch.Tensor, counterfactuals: torch.Tensor, dilation: int = 1,
                   eps: float = 0.0) -> torch.Tensor:
    """Where an image and its counterfactual differ: [N, C, H, W] x2 -> bool [N, 1, H, W]
    (any channel ``|diff| > eps``), grown by ``dilation`` pixels (a square neighbourhood)."""
    diff = (images.float() - counterfactuals.float()).abs().amax(dim=1, keepdim=True) > eps
    if dilation > 0:
        k = 2 * dilation + 1
        diff = torch.nn.functional.max_pool2d(diff.float(), k, stride=1, padding=dilation) > 0
    return diff


class SyntheticFaceDataset(Dataset):
    """One rendered split, kept in memory as uint8 [N, 3, H, W] with its parameters and smile
    amounts (so its ground truth can be re-rendered on demand)."""

    def __init__(self, params: FaceParams, smile: torch.Tensor, image_size: int) -> None:
        self.params, self.smile, self.image_size = params, smile, image_size
        self.images = render_faces(params, smile, image_size, as_uint8=True)
        self.labels = (smile > 0).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index].float() / 255.0, "label": self.labels[index], "index": int(index)}

    def counterfactuals(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 [k, 3, H, W]: rows ``idx`` (LongTensor [k]) with the smile flipped (s -> -s).

        Image and flip are re-rendered side by side and only the pixels where they differ are
        taken from the flip; the rest is copied from the stored image, so "the counterfactual
        differs only in the mouth" holds bit for bit, whatever float round-off does.
        """
        p = take_params(self.params, idx)
        smile = self.smile[idx]
        both = render_faces({k: torch.cat([v, v]) for k, v in p.items()}, torch.cat([smile, -smile]),
                            self.image_size, as_uint8=True)
        again, flipped = both.chunk(2)
        return torch.where(again != flipped, flipped, self.images[idx])

    def with_cue(self, idx: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """uint8 [k, 3, H, W]: rows ``idx`` re-rendered with the planted mark on where
        ``present`` (bool [k]) and off elsewhere, bit for bit the stored image outside the
        mark (the same re-render trick as :meth:`counterfactuals`)."""
        p = take_params(self.params, idx)
        stored = p.get("cue", torch.zeros(len(idx)))
        smile = self.smile[idx]
        both = render_faces({**{k: torch.cat([v, v]) for k, v in p.items()},
                             "cue": torch.cat([stored, present.float()])},
                            torch.cat([smile, smile]), self.image_size, as_uint8=True)
        again, changed = both.chunk(2)
        return torch.where(again != changed, changed, self.images[idx])


class SyntheticFacesDataModule(ImageDataModule):
    """Procedural faces, label "smiling" decided by the mouth alone, with ground truth.

    Args:
        name: dataset name. image_size: 32 (default) or any size >= 8 (96 matches the paper).
        n_train, n_val, n_test: split sizes. seed: base seed; splits use disjoint derived streams.
        hard_fraction: share of faces with a smile amount near the boundary (|s| in [0.1, 0.3]).
        mask_dilation: pixels by which ground-truth masks are grown around the changed pixels.
        shortcut: the planted cue, ``{"kind": null | "mark", "rate": p}`` (module docstring);
            None or kind null: none.
        batch_size, num_workers, default_query_source, default_query_target: see base class.
    """

    has_ground_truth = True
    judge_split = "seed"  # the judges train on faces of another dataset seed (disc_pl.models.judge)
    cue_class = CUE_CLASS  # the class a planted cue co-occurs with in training

    def __init__(self, name: str = "synthetic_faces", image_size: int = 32, n_train: int = 4000,
                 n_val: int = 500, n_test: int = 1000, seed: int = 0, hard_fraction: float = 0.1,
                 mask_dilation: int = 1, shortcut: Mapping[str, Any] | None = None,
                 batch_size: int = 128, num_workers: int = 0,
                 default_query_source: str | int | None = "not_smiling",
                 default_query_target: str | int | None = "smiling") -> None:
        super().__init__(name, image_size, batch_size, num_workers, default_query_source,
                         default_query_target, channels=3)
        self.shortcut_kind, self.shortcut_rate = check_shortcut(shortcut)
        # plain values in the hparams (a checkpoint stores them; a DictConfig would not load weights_only)
        shortcut = None if shortcut is None else {"kind": self.shortcut_kind, "rate": self.shortcut_rate}
        self.save_hyperparameters()
        sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        if min(sizes.values()) < 2:
            raise ConfigError.one("dataset.n_" + min(sizes, key=sizes.get), min(sizes.values()),
                                  f"synthetic_faces split sizes must be >= 2 (got {sizes})")
        if not 0.0 <= hard_fraction <= 1.0:
            raise ConfigError.one("dataset.hard_fraction", hard_fraction, "must be in [0, 1]")
        self.sizes, self.seed = sizes, int(seed)
        self.hard_fraction, self.mask_dilation = float(hard_fraction), int(mask_dilation)
        self._class_names = list(CLASS_NAMES)  # known before setup

    @property
    def has_shortcut(self) -> bool:
        """Whether a cue is planted (``dataset.shortcut.kind`` set)."""
        return self.shortcut_kind is not None

    def _cue_presence(self, split: str, labels: torch.Tensor) -> torch.Tensor:
        """float [n] 0/1: which faces of ``split`` carry the cue. train / val: P(cue | class
        CUE_CLASS) = rate, P(cue | other class) = 1 - rate; test: none (clean queries)."""
        if split == "test":
            return torch.zeros(len(labels))
        g = torch.Generator().manual_seed(derived_seed(self.seed, _SPLIT_STREAM[split], _CUE_STREAM))
        u = torch.rand(len(labels), generator=g)
        p = torch.where(labels == CUE_CLASS, self.shortcut_rate, 1.0 - self.shortcut_rate)
        return (u < p).float()

    def _load_splits(self) -> tuple[list[str], dict[str, Dataset]]:
        splits = {}
        for split, n in self.sizes.items():
            g = torch.Generator().manual_seed(derived_seed(self.seed, _SPLIT_STREAM[split]))
            params = sample_params(n, g)
            smile = sample_smile(n, g, self.hard_fraction)
            if self.has_shortcut:
                params["cue"] = self._cue_presence(split, (smile > 0).long())
            splits[split] = SyntheticFaceDataset(params, smile, self.image_size)
        return list(CLASS_NAMES), splits

    def _fingerprint_args(self) -> dict[str, Any]:
        out = {"render_version": RENDER_VERSION, "seed": self.seed, "hard_fraction": self.hard_fraction,
               **{f"n_{k}": v for k, v in self.sizes.items()}}
        if self.has_shortcut:  # only then: clean datasets keep the keys (and cached models) they had
            out["shortcut"] = {"kind": self.shortcut_kind, "rate": self.shortcut_rate, "cue_version": CUE_VERSION}
        return out

    def ground_truth(self, split: str, indices: Sequence[int] | torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth counterfactuals (same face and noise, mouth flipped) float
        [N, 3, H, W] in [0, 1], and attribute masks bool [N, 1, H, W] (changed pixels,
        dilated by ``mask_dilation``)."""
        ds = self.dataset(split)
        assert isinstance(ds, SyntheticFaceDataset)
        idx = as_index_tensor(indices, len(ds), split)
        cf = ds.counterfactuals(idx)
        masks = attribute_mask(ds.images[idx], cf, self.mask_dilation)
        return cf.float() / 255.0, masks

    def cue_mask(self, dilation: int | None = None) -> torch.Tensor:
        """bool [1, 1, H, W]: where the planted mark can change a pixel (its coverage > 0),
        grown by ``dilation`` pixels (default ``mask_dilation``, as the attribute masks). The
        same place on every image, defined whether or not a cue is planted (to measure a clean
        classifier's counterfactuals on it too)."""
        mask = cue_alpha(self.image_size)[None] > 0
        return attribute_mask(mask.float(), torch.zeros_like(mask, dtype=torch.float32),
                              self.mask_dilation if dilation is None else int(dilation))

    def cue_present(self, split: str) -> torch.Tensor:
        """bool [N]: which images of ``split`` carry the cue (all False without a shortcut)."""
        ds = self._faces(split)
        return ds.params["cue"].bool() if "cue" in ds.params else torch.zeros(len(ds), dtype=torch.bool)

    def with_cue(self, split: str, indices: Sequence[int] | torch.Tensor, present: bool | torch.Tensor
                 ) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1]: the images ``indices`` of ``split`` re-rendered with the
        mark where ``present`` (one bool, or bool [N]) and without it elsewhere; outside the
        mark's mask identical to the stored images."""
        ds = self._faces(split)
        idx = as_index_tensor(indices, len(ds), split)
        flags = torch.as_tensor(present, dtype=torch.bool).expand(len(idx))
        return ds.with_cue(idx, flags).float() / 255.0

    def _faces(self, split: str) -> SyntheticFaceDataset:
        ds = self.dataset(split)
        if not isinstance(ds, SyntheticFaceDataset):  # a judge / explained part of train (IndexedSubset)
            raise ValueError(f"split {split!r} is a subset of the faces; cue access works on whole splits "
                             "(dataset.judge_fraction=0)")
        return ds


def check_shortcut(shortcut: Mapping[str, Any] | None) -> tuple[str | None, float]:
    """(kind, rate) of ``dataset.shortcut``, or one ConfigError naming every bad key."""
    if shortcut is None:
        return None, 0.5
    if not isinstance(shortcut, Mapping):
        raise ConfigError.one("dataset.shortcut", shortcut, "a mapping {kind: null|mark, rate: 0..1} (or null)")
    kind, rate = shortcut.get("kind"), shortcut.get("rate", MISSING)
    unknown = sorted(set(shortcut) - {"kind", "rate"})
    require("dataset.shortcut", [
        *((k, shortcut[k], False, "unknown key (a typo?); keys of dataset.shortcut: kind, rate") for k in unknown),
        ("kind", kind, kind is None or kind in SHORTCUT_KINDS,
         f"one of null (no cue), {', '.join(SHORTCUT_KINDS)} (a small square at a fixed place)"),
        ("rate", rate, (kind is None and rate is MISSING) or (is_number(rate) and 0.0 <= rate <= 1.0),
         "a probability in [0, 1]: how often the cue co-occurs with the smiling class in training "
         "(1.0: always, 0.5: independent of the label)"),
    ])
    return (None if kind is None else str(kind)), (0.5 if rate is MISSING else float(rate))
