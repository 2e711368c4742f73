"""The planted-shortcut benchmark (issue 28): the cue's rendering and mask, its assignment, the
reliance figures on analytic classifiers, the per-counterfactual cue figures, and one toy run."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from disc_pl.data.synthetic import SyntheticFacesDataModule, cue_alpha, render_faces
from disc_pl.errors import ConfigError
from disc_pl.metrics import shortcut as S
from disc_pl.shortcut import add_shortcut_figures, wanted

CONF = Path(__file__).resolve().parents[1] / "conf"
MARK = {"kind": "mark", "rate": 1.0}


def faces(shortcut=None, **kw) -> SyntheticFacesDataModule:
    args = dict(n_train=200, n_val=40, n_test=60, seed=0, batch_size=32, shortcut=shortcut)
    args.update(kw)
    dm = SyntheticFacesDataModule(**args)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def clean():
    return faces()


@pytest.fixture(scope="module")
def marked():
    return faces(MARK)


# ---------------------------------------------------------------- rendering and mask


def test_cue_renders_with_an_exact_mask(clean, marked):
    mask = marked.cue_mask(dilation=0)[0, 0]
    cue = marked.cue_present("train")
    assert cue.any() and (~cue).any()
    a, b = marked.dataset("train").images.float(), clean.dataset("train").images.float()
    diff = (a - b).abs().amax(dim=1)  # [N, H, W]
    assert diff[:, ~mask].max() == 0, "the cue changed a pixel outside its mask"
    assert (diff[cue][:, mask] > 0).all(), "every pixel of the mask differs on a face with the cue"
    assert diff[~cue].max() == 0, "a face without the cue is the clean face"
    # re-rendered with / without it: the stored test faces outside the mask, bit for bit
    ids = list(range(10))
    stored = torch.stack([marked.dataset("test")[i]["image"] for i in ids])
    on, off = marked.with_cue("test", ids, True), marked.with_cue("test", ids, False)
    assert torch.equal(off, stored) and torch.equal(on[..., ~mask], stored[..., ~mask])
    assert ((on - stored).abs().amax(1)[:, mask] > 0).all()


def test_cue_mask_is_the_support_grown_like_the_attribute_masks(marked):
    exact = marked.cue_mask(dilation=0)
    assert exact.shape == (1, 1, 32, 32) and exact.dtype == torch.bool
    assert torch.equal(exact[0, 0], cue_alpha(32)[0] > 0)
    assert exact.sum() == 25  # a 4-pixel square off the pixel grid: 5 x 5 pixels touched
    assert marked.cue_mask().sum() == 49  # mask_dilation=1 (the default): 7 x 7
    assert not exact[0, 0, 16:].any() and not exact[0, 0, :, :16].any()  # top right


def test_default_images_are_bit_identical(clean):
    off = faces({"kind": None, "rate": 1.0})
    for split in ("train", "val", "test"):
        ds = clean.dataset(split)
        assert torch.equal(off.dataset(split).images, ds.images)
        assert torch.equal(render_faces(ds.params, ds.smile, 32, as_uint8=True), ds.images)
        assert "cue" not in ds.params and not clean.cue_present(split).any()
    assert "shortcut" not in clean.fingerprint() and off.fingerprint() == clean.fingerprint()
    assert not clean.has_shortcut and not off.has_shortcut


def test_fingerprint_keys_the_shortcut_so_models_never_collide(clean, marked):
    fp = marked.fingerprint()
    assert fp["shortcut"] == {"kind": "mark", "rate": 1.0, "cue_version": 1}
    assert faces({"kind": "mark", "rate": 0.95}).fingerprint() != fp != clean.fingerprint()
    # Hydra hands a DictConfig: the hparams a checkpoint stores stay plain (weights_only loading)
    dm = SyntheticFacesDataModule(n_train=4, n_val=4, n_test=4, shortcut=OmegaConf.create({"kind": "mark", "rate": 1}))
    assert dm.hparams["shortcut"] == {"kind": "mark", "rate": 1.0} and type(dm.hparams["shortcut"]) is dict


def test_the_faces_are_the_clean_ones_with_a_cue_flag(clean, marked):
    for split in ("train", "test"):
        p, q = marked.dataset(split).params, clean.dataset(split).params
        assert set(p) == set(q) | {"cue"} and all(torch.equal(p[k], q[k]) for k in q)
        assert torch.equal(marked.dataset(split).smile, clean.dataset(split).smile)


def test_ground_truth_keeps_the_cue_and_flips_the_mouth_only(marked):
    ds = marked.dataset("train")
    ids = torch.nonzero(marked.cue_present("train")).squeeze(1)[:8].tolist()
    cf, masks = marked.ground_truth("train", ids)
    cue = marked.cue_mask(0)[0, 0]
    x = ds.images[ids].float() / 255
    assert torch.equal(cf[..., cue], x[..., cue])  # the mark stays, as every nuisance
    assert not (masks[:, 0] & cue).any()  # and the mouth's mask never reaches it


# ---------------------------------------------------------------- assignment


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_rate_decides_which_train_faces_carry_the_cue(rate):
    dm = faces({"kind": "mark", "rate": rate})
    for split in ("train", "val"):
        smiling = dm.dataset(split).labels == 1
        assert torch.equal(dm.cue_present(split), smiling if rate == 1.0 else ~smiling)
    assert not dm.cue_present("test").any()  # clean queries: a counterfactual can add it


def test_rate_half_is_independent_of_the_label():
    dm = faces({"kind": "mark", "rate": 0.5}, n_train=2000)
    cue, smiling = dm.cue_present("train"), dm.dataset("train").labels == 1
    for group in (smiling, ~smiling):
        assert 0.45 < cue[group].float().mean() < 0.55


def test_bad_shortcut_values_are_one_config_error():
    with pytest.raises(ConfigError) as err:
        SyntheticFacesDataModule(shortcut={"kind": "tint", "rate": 1.5})
    assert [p.key for p in err.value.problems] == ["dataset.shortcut.kind", "dataset.shortcut.rate"]
    assert "mark" in str(err.value) and "[0, 1]" in str(err.value)
    for bad, key in (({"kind": "mark"}, "dataset.shortcut.rate"), ({"kind": "mark", "rate": 1, "rat": 1},
                                                                    "dataset.shortcut.rat"),
                     ({"kind": "mark", "rate": True}, "dataset.shortcut.rate"), ("mark", "dataset.shortcut")):
        with pytest.raises(ConfigError) as err:
            SyntheticFacesDataModule(shortcut=bad)
        assert err.value.key == key


def test_the_yaml_defaults_to_no_cue_and_accepts_a_mark():
    cfg = OmegaConf.load(CONF / "dataset" / "synthetic_faces.yaml")
    assert cfg.shortcut.kind is None and cfg.shortcut.rate == 1.0
    cfg.n_train, cfg.n_val, cfg.n_test = 20, 10, 10
    assert not instantiate(cfg).has_shortcut
    cfg.shortcut.kind = "mark"
    assert instantiate(cfg).has_shortcut


# ---------------------------------------------------------------- reliance on analytic classifiers


class CueReader(nn.Module):
    """Reads only the fully covered pixels of the mark: 'smiling' when they are magenta
    (min(R, B) - G above 0.6), whatever the mouth does."""

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.register_buffer("full", cue_alpha(size)[0] == 1)

    def forward(self, x):
        v = x[:, :, self.full]
        score = (torch.minimum(v[:, 0], v[:, 2]) - v[:, 1]).mean(1)
        return torch.stack([torch.zeros_like(score), score - 0.6], 1)


class Constant(nn.Module):
    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.cls), 2).float()


def test_reliance_of_a_classifier_that_reads_only_the_cue():
    dm = faces(MARK, n_test=120, seed=5)
    ids = list(range(120))
    reader = CueReader()
    # precondition (not the code under test): on these faces the reader sees the cue exactly
    assert (reader(dm.with_cue("test", ids, True)).argmax(1) == 1).all()
    assert (reader(dm.with_cue("test", ids, False)).argmax(1) == 0).all()
    # test faces carry no cue, half are smiling: it calls all of them not smiling
    assert S.reliance(reader, dm) == {
        "shortcut/acc_clean": 0.5, "shortcut/acc_cue_aligned": 1.0, "shortcut/acc_cue_flipped": 0.0,
        "shortcut/acc_target_cue": 1.0, "shortcut/acc_target_no_cue": 0.0,
        "shortcut/acc_other_cue": 0.0, "shortcut/acc_other_no_cue": 1.0, "shortcut/n_test": 120}
    assert S.reliance(reader, dm, limit=10)["shortcut/n_test"] == 10


def test_reliance_of_a_classifier_that_ignores_the_cue(marked):
    out = S.reliance(Constant(0), marked, batch=7)  # batches that do not divide the split
    assert out["shortcut/acc_clean"] == out["shortcut/acc_cue_aligned"] == out["shortcut/acc_cue_flipped"] == 0.5
    assert out["shortcut/acc_other_cue"] == out["shortcut/acc_other_no_cue"] == 1.0
    assert out["shortcut/acc_target_cue"] == out["shortcut/acc_target_no_cue"] == 0.0


# ---------------------------------------------------------------- per-counterfactual figures


def test_on_cue_is_the_share_of_the_change_on_the_mask():
    x = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :2] = True
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] = 0.3         # inside: 0.3
    x_cf[0, :, 3, 3] = 0.1         # outside: 3 x 0.1
    x_cf[1, 1, 1, 1] = 0.5         # all inside
    got = S.on_cue(x, x_cf, mask)
    assert got.tolist() == pytest.approx([0.3 / 0.6, 1.0])
    assert math.isnan(float(S.on_cue(x, x, mask)[0]))  # no change: nothing to attribute


def test_cue_added_pastes_only_the_mask():
    class MeanReader(nn.Module):  # target when the mean of channel 0 exceeds 0.05
        def forward(self, x):
            m = x[:, 0].mean((1, 2))
            return torch.stack([torch.zeros_like(m), m - 0.05], 1)

    x = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, 0] = True
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] = 1.0       # inside alone: mean 1/16 > 0.05 -> flips
    x_cf[1, 0, 0, 0] = 0.5       # inside: 0.5/16 < 0.05; with the outside change it would flip
    x_cf[1, 0, 3, :] = 1.0
    assert S.cue_added(MeanReader(), x, x_cf, mask, target=1).tolist() == [True, False]
    assert S.cue_added(MeanReader(), x, x_cf, mask, target=1, margin=0.2).tolist() == [False, False]


def test_cue_corr_is_the_cosine_with_the_rendered_cue_on_the_mask():
    x = torch.zeros(3, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2, :2] = True
    cue = torch.zeros(3, 3, 4, 4)
    cue[:, 0, :2, :2], cue[:, 1, :2, :2] = 1.0, -1.0
    x_cf = torch.zeros(3, 3, 4, 4)
    x_cf[0] = 0.5 * cue[0]
    x_cf[0, :, 3, 3] = 0.9          # outside the mask: not counted
    x_cf[1, 0, 0, 0] = 1.0          # one of 8 non-zero cue entries: 1 / sqrt(8)
    got = S.cue_corr(x, x_cf, cue, mask)  # query 2: no change at all
    assert got.tolist() == pytest.approx([1.0, 1 / math.sqrt(8), 0.0])


def _cfg(**extra):
    return OmegaConf.create({"query": {"split": "test"}, "inversion": {"target_margin": 0.0},
                             "validity": {"reference": {"pgd": False, "gt": True}}, **extra})


def test_add_shortcut_figures_on_true_cue_and_mouth_counterfactuals():
    dm = faces(MARK, n_test=120, seed=5)
    data = dm.dataset("test")
    ids = [i for i in range(len(data)) if int(data[i]["label"]) == 0][:4]
    x = torch.stack([data[i]["image"] for i in ids])
    x_cf = torch.cat([dm.with_cue("test", ids[:2], True), dm.ground_truth("test", ids[2:])[0]])
    rows = [{"query_id": q, "status": "flipped"} for q in ids]
    tensors = {"query_id": torch.tensor(ids), "query": x, "counterfactual": x_cf}
    m = add_shortcut_figures(_cfg(), dm, CueReader(), rows, tensors, ids, target=1)
    assert [r["on_cue"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["cue_added"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert [r["cue_corr"] for r in rows] == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert m["cf/on_cue"] == 0.5 and m["cf/cue_added"] == 0.5 and m["cf/on_cue_std"] == 0.5
    assert m["shortcut/acc_cue_flipped"] == 0.0 and m["shortcut/cue_area_share"] == 49 / 1024
    # the ground-truth reference row: all on the mouth, nothing on the cue
    assert m["reference/gt/on_cue"] == 0.0 and m["reference/gt/cue_added"] == 0.0
    assert m["reference/gt/in_mask"] == 1.0 and "reference/pgd/on_cue" not in m


def test_shortcut_figures_only_when_planted_or_asked(clean):
    rows = [{"query_id": 0, "status": "flipped"}]
    tensors = {"query_id": torch.tensor([0]), "query": torch.zeros(1, 3, 32, 32),
               "counterfactual": torch.zeros(1, 3, 32, 32)}
    assert add_shortcut_figures(_cfg(), clean, Constant(0), rows, tensors, [0], 1) == {}
    assert "on_cue" not in rows[0]
    asked = _cfg(evaluate={"shortcut": True})  # the clean arm of experiment=shortcut
    m = add_shortcut_figures(asked, clean, Constant(0), rows, tensors, [0], 1)
    assert m["shortcut/acc_clean"] == 0.5 and math.isnan(m["cf/on_cue"])  # no change: NaN, skipped
    assert rows[0]["cue_added"] == 0.0

    class Other:  # a dataset that cannot draw a cue
        name = "folder"

    with pytest.raises(ConfigError, match="evaluate.shortcut"):
        wanted(asked, Other())


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_shortcut_experiment_runs_end_to_end_at_toy_size(tmp_path):
    out = tmp_path / "sweep" / "job"
    args = ["experiment=shortcut", "dataset.shortcut.kind=mark", "manifold=dep",
            "dataset.n_train=600", "dataset.n_val=100", "dataset.n_test=200", "models.classifier.width=8",
            "models.classifier.fit.trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger=none",
            "prior=tv", "inversion.steps_per_stage=8", "inversion.min_steps=1", "prior.lr=0.02",
            "query.count=3", "query.batch_size=3", "query.require_correct=false",
            "judge=none",  # the judges have their own end-to-end test (test_validity.py)
            "validity.pgd.steps=3", "validity.cout_steps=4", f"cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "disc_pl.evaluate", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("shortcut/acc_clean", "shortcut/acc_cue_flipped", "shortcut/acc_cue_aligned",
                "shortcut/cue_area_share", "reference/pgd/on_cue", "reference/pgd/in_mask",
                "reference/gt/on_cue", "reference/gt/in_mask"):
        assert key in m and math.isfinite(m[key]), key
    assert m["reference/gt/on_cue"] == 0.0 and m["shortcut/cue_area_share"] == 49 / 1024
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 and all(0.0 <= float(r["on_cue"]) <= 1.0 for r in rows)
    assert all(r["cue_added"] in ("0.0", "1.0") for r in rows)
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert cfg.dataset.shortcut.kind == "mark" and cfg.query.count == 3 and cfg.cd.enabled is False
    from disc_pl import report as report_lib

    files = report_lib.report(tmp_path / "sweep", tmp_path / "report")
    assert "Where the change went" in files["markdown"].read_text()
    page = files["html"].read_text()
    assert 'class="where"' in page and "cue" in page
