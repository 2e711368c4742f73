"""Behavioural tests of dataset=synthetic_faces: ground truth, masks, determinism, contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disc_pl.data.synthetic import (SyntheticFacesDataModule, attribute_mask, render_faces, sample_params,
                                    sample_smile)

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def small(**kw) -> SyntheticFacesDataModule:
    args = dict(n_train=64, n_val=32, n_test=200, batch_size=16)
    args.update(kw)
    dm = SyntheticFacesDataModule(**args)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def dm() -> SyntheticFacesDataModule:
    return small()


@pytest.fixture(scope="module")
def test_gt(dm):
    ds = dm.dataset("test")
    cf, masks = dm.ground_truth("test", list(range(len(ds))))
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    return images, cf, masks


def test_counterfactual_differs_only_inside_the_mask(test_gt):
    images, cf, masks = test_gt
    assert cf.shape == images.shape and masks.shape == (len(images), 1, 32, 32) and masks.dtype == torch.bool
    assert 0.0 <= cf.min() and cf.max() <= 1.0
    changed = (images - cf).abs().amax(dim=1, keepdim=True) > 0
    assert not (changed & ~masks).any(), "ground truth changes pixels outside its mask"
    assert changed.flatten(1).any(1).all(), "every ground-truth counterfactual must change something"


def test_masks_are_small_and_non_empty(test_gt):
    _, _, masks = test_gt
    frac = masks.float().mean(dim=(1, 2, 3))
    assert (frac > 0).all()
    assert frac.mean() < 0.10
    assert frac.max() < 0.2


def test_mask_lies_around_the_mouth(dm, test_gt):
    """The mask centroid sits below the face centre (where the mouth is), horizontally centred."""
    _, _, masks = test_gt
    p = dm.dataset("test").params
    size = 32
    rows = torch.arange(size).view(1, size, 1).float() + 0.5
    cols = torch.arange(size).view(1, 1, size).float() + 0.5
    m = masks[:, 0].float()
    cy_mask = (m * rows).sum((1, 2)) / m.sum((1, 2))
    cx_mask = (m * cols).sum((1, 2)) / m.sum((1, 2))
    face_cy, face_cx = (p["cy"] + 1) * size / 2, (p["cx"] + 1) * size / 2
    radius_px = p["r"] * size / 2
    assert (cy_mask > face_cy + 0.3 * radius_px).all()
    assert ((cx_mask - face_cx).abs() < 0.25 * radius_px).all()


def test_label_matches_visible_mouth_curvature_and_counterfactual_is_opposite(dm, test_gt):
    """In the middle of the mouth, a smile's (dark) mouth pixels lie below those of the flipped
    mouth: read the direction off the pixels and compare it with the labels."""
    images, cf, masks = test_gt
    ds = dm.dataset("test")
    lum = lambda x: x.mean(1)  # noqa: E731
    diff = lum(images) - lum(cf)  # < 0 where the image has the (darker) mouth, > 0 where cf has it
    p = ds.params
    rows = torch.arange(32).view(1, 32, 1).float()
    cols = torch.arange(32).view(1, 1, 32).float() + 0.5
    centre = ((cols - (p["cx"] + 1).view(-1, 1, 1) * 16).abs() < 1.5).float()
    own = ((diff < -0.02).float() * centre)
    other = ((diff > 0.02).float() * centre)
    ok = (own.sum((1, 2)) > 0) & (other.sum((1, 2)) > 0)
    assert ok.float().mean() > 0.9  # weak, near-boundary smiles may not separate in 3 columns
    own_row = (own * rows).sum((1, 2)) / own.sum((1, 2)).clamp_min(1)
    other_row = (other * rows).sum((1, 2)) / other.sum((1, 2)).clamp_min(1)
    looks_smiling = own_row > other_row
    assert torch.equal(looks_smiling[ok], ds.labels[ok].bool())


def test_labels_are_balanced_and_follow_the_smile_sign(dm):
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
        assert abs(labels.float().mean().item() - 0.5) < 0.05
        assert torch.equal(labels, (ds.smile > 0).long())
    smile = dm.dataset("test").smile
    near = (smile.abs() < 0.3).float().mean()
    assert 0.02 < near < 0.25 and smile.abs().min() >= 0.1  # a hard minority, never exactly 0


def test_same_seed_same_images_other_seed_other_images(dm):
    again = small()
    other = small(seed=1)
    for split in ("train", "test"):
        assert torch.equal(again.dataset(split).images, dm.dataset(split).images)
        assert not torch.equal(other.dataset(split).images[:8], dm.dataset(split).images[:8])
    # splits come from disjoint streams
    assert not torch.equal(dm.dataset("train").images[:32], dm.dataset("val").images[:32])


def test_renderer_flip_changes_only_the_mouth_and_is_batch_independent():
    g = torch.Generator().manual_seed(3)
    params, smile = sample_params(40, g), sample_smile(40, g)
    a = render_faces(params, smile)
    b = render_faces(params, -smile)
    m = attribute_mask(a, b, dilation=0)
    assert m.float().mean() < 0.08 and m.flatten(1).any(1).all()
    one = render_faces({k: v[7:8] for k, v in params.items()}, smile[7:8])
    assert torch.equal(one[0], a[7])


def test_96_pixels_works():
    dm96 = small(image_size=96, n_train=8, n_val=4, n_test=8)
    item = dm96.dataset("test")[3]
    assert item["image"].shape == (3, 96, 96)
    cf, masks = dm96.ground_truth("test", torch.tensor([0, 3, 5]))
    assert cf.shape == (3, 3, 96, 96) and masks.shape == (3, 1, 96, 96)
    assert 0 < masks.float().mean() < 0.1


def test_class_index_by_name_index_and_errors(dm):
    assert dm.class_names == ["not_smiling", "smiling"] and dm.num_classes == 2
    assert dm.class_index("smiling") == 1 and dm.class_index("Not_Smiling") == 0
    assert dm.class_index(1) == 1 and dm.class_index("0") == 0
    with pytest.raises(ValueError, match="not_smiling.*smiling"):
        dm.class_index("frowning")
    with pytest.raises(ValueError, match="range"):
        dm.class_index(2)
    assert (dm.default_query_source, dm.default_query_target) == ("not_smiling", "smiling")
    with pytest.raises(ValueError, match="train, val, test"):
        dm.dataset("validation")
    with pytest.raises(IndexError):
        dm.ground_truth("test", [10_000])


def test_dataloaders_follow_the_item_contract(dm):
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.long
    assert torch.equal(batch["index"], torch.arange(16))  # val is not shuffled
    train = next(iter(dm.train_dataloader()))
    assert not torch.equal(train["index"], torch.arange(16))  # train is
    ds = dm.dataset("train")
    for img, idx in zip(train["image"], train["index"]):
        assert torch.equal(img, ds[int(idx)]["image"])
    assert dm.has_ground_truth


def test_setup_is_idempotent_and_fingerprint_is_plain(dm):
    before = dm.dataset("train")
    dm.setup("fit")
    assert dm.dataset("train") is before
    fp = dm.fingerprint()
    assert fp["name"] == "synthetic_faces" and fp["seed"] == 0 and fp["n_test"] == 200
    assert fp != small(seed=1).fingerprint()
    import json
    json.dumps(fp)


def test_config_composes():
    cfg = OmegaConf.load(CONF / "synthetic_faces.yaml")
    cfg.n_train, cfg.n_val, cfg.n_test = 8, 4, 4
    dm = instantiate(cfg)
    dm.setup()
    assert dm.name == "synthetic_faces" and dm.image_size == 32 and len(dm.dataset("val")) == 4
    assert dm.class_index(cfg.default_query_target) == 1
