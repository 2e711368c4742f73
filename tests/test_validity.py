"""Validity (issue 11): COUT, ground-truth recovery, targeted PGD, the judges' independence and
verdicts, and dataset=fashion_mnist on generated IDX files (never the Debian package)."""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from fixtures_data import write_report_job

from disc_pl.cf.engine import is_flipped
from disc_pl.cf.pgd import targeted_pgd
from disc_pl.data.fashion_mnist import CLASS_NAMES, FashionMNISTDataModule
from disc_pl.data.synthetic import SyntheticFacesDataModule
from disc_pl.errors import ConfigError, DatasetError, DatasetNotFoundError
from disc_pl.metrics.judge import JudgeAgreement
from disc_pl.metrics.validity import COUT, GTRecovery, cout, gt_recovery, insertion_path
from disc_pl.models.judge import check_independent, ensure_judges, judge_dataset_config
from disc_pl.validity import cpu_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")


class SumLogit(nn.Module):
    """Two classes, logits [0, a * sum(x)]: p1 - p0 = tanh(a * sum(x) / 2)."""

    def __init__(self, a: float = 1.0) -> None:
        super().__init__()
        self.a = a

    def forward(self, x):
        z = self.a * x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z), z], 1)


class Constant(nn.Module):
    def __init__(self, cls: int, k: int = 2) -> None:
        super().__init__()
        self.cls, self.k = cls, k

    def forward(self, x):
        out = torch.zeros(len(x), self.k)
        out[:, self.cls] = 5.0
        return out


# ---------------------------------------------------------------- COUT


def test_insertion_path_inserts_largest_changes_first():
    x = torch.zeros(1, 1, 1, 3)
    x_cf = torch.tensor([[[[0.2, 1.0, 0.5]]]])
    path = insertion_path(x, x_cf, steps=3)
    assert path[0].flatten().tolist() == [0, 0, 0]
    assert path[1].flatten().tolist() == pytest.approx([0, 1.0, 0])
    assert path[2].flatten().tolist() == pytest.approx([0, 1.0, 0.5])
    assert path[3].flatten().tolist() == pytest.approx([0.2, 1.0, 0.5])


def test_cout_equals_hand_computed_trapezoid():
    x = torch.zeros(1, 1, 1, 2)
    x_cf = torch.tensor([[[[1.0, 0.5]]]])
    # path sums 0, 1, 1.5 -> p_target - p_source = tanh(s / 2); trapezoid over 2 equal steps
    d = [math.tanh(0.0), math.tanh(0.5), math.tanh(0.75)]
    expected = ((d[0] + d[1]) / 2 + (d[1] + d[2]) / 2) / 2
    assert cout(SumLogit(), x, x_cf, source=0, target=1, steps=2).item() == pytest.approx(expected, abs=1e-6)
    # towards class 0 the sign flips
    assert cout(SumLogit(), x, x_cf, source=1, target=0, steps=2).item() == pytest.approx(-expected, abs=1e-6)


def test_cout_metric_accumulates_mean_over_batches():
    x = torch.zeros(2, 1, 1, 2)
    x_cf = torch.tensor([[[[1.0, 0.5]]], [[[0.0, 0.0]]]])
    metric = COUT(SumLogit(), steps=2)
    metric.update(x[:1], x_cf[:1], 0, 1)
    metric.update(x[1:], x_cf[1:], 0, 1)
    one = cout(SumLogit(), x[:1], x_cf[:1], 0, 1, steps=2).item()
    assert metric.compute().item() == pytest.approx(one / 2, abs=1e-6)  # the unchanged query scores 0


def test_cout_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps >= 1"):
        cout(SumLogit(), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), 0, 1, steps=0)


# ---------------------------------------------------------------- ground-truth recovery


def test_gt_recovery_hand_computed():
    x, x_gt = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    x_cf = torch.stack([torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2), torch.full((1, 2, 2), 3.0)])
    # |x'-gt|^2 / |x-gt|^2 = 4*0.25/4, 4/4, 4*4/4
    assert gt_recovery(x, x_cf, x_gt).tolist() == pytest.approx([0.75, 0.0, -3.0])
    assert gt_recovery(x, x_gt, x_gt).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gt_recovery_nan_when_query_is_ground_truth_and_metric_skips_it():
    x = torch.zeros(2, 1, 2, 2)
    x_gt = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    x_cf = torch.full((2, 1, 2, 2), 0.5)
    values = gt_recovery(x, x_cf, x_gt)
    assert math.isnan(values[0].item()) and values[1].item() == pytest.approx(0.75)
    metric = GTRecovery()
    metric.update(x, x_cf, x_gt)
    stats = metric.compute_stats()
    assert stats["mean"].item() == pytest.approx(0.75) and int(stats["nan_count"]) == 1


# ---------------------------------------------------------------- PGD reference


def test_targeted_pgd_flips_a_linear_classifier_within_eps():
    clf = SumLogit(a=1.0)
    x = torch.full((3, 1, 4, 4), 0.4)
    x[:, :, 0, 0] = 0.0
    shifted = lambda t: clf(t) - torch.tensor([0.0, 7.0])  # noqa: E731  sum(x) = 6: class 0
    assert not is_flipped(shifted(x), torch.ones(3, dtype=torch.long), 0.2).any()
    eps = 0.1
    adv, ok = targeted_pgd(shifted, x, 1, margin=0.2, eps=eps, alpha=0.01, steps=200)
    assert ok.all()
    assert is_flipped(shifted(adv), torch.ones(3, dtype=torch.long), 0.2).all()
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_targeted_pgd_reports_failure_honestly():
    shifted = lambda t: SumLogit()(t) - torch.tensor([0.0, 100.0])  # noqa: E731  unreachable in eps
    adv, ok = targeted_pgd(shifted, torch.full((2, 1, 2, 2), 0.5), 1, eps=0.01, alpha=0.01, steps=5)
    assert not ok.any()


# ---------------------------------------------------------------- judge verdicts


def test_judge_agreement_mean_and_std_across_judges():
    x = torch.zeros(4, 1, 2, 2)
    metric = JudgeAgreement([Constant(1), Constant(0), Constant(1)])
    metric.update(x, 1)
    out = metric.compute()
    assert out["flip_rate"].item() == pytest.approx(2 / 3)
    assert out["flip_rate_std"].item() == pytest.approx(math.sqrt(2 / 9))
    p_hit = math.exp(5) / (math.exp(5) + 1)
    assert out["target_prob"].item() == pytest.approx((2 * p_hit + (1 - p_hit)) / 3, abs=1e-6)


# ---------------------------------------------------------------- fashion_mnist (generated IDX)


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fmnist(root: Path, n_train: int = 200, n_test: int = 40, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    root = make_fmnist(tmp_path / "fm", gz=gz)
    dm = FashionMNISTDataModule(root=str(root), val_fraction=0.1)
    dm.setup()
    assert dm.class_names == CLASS_NAMES and dm.class_names[2] == "Pullover" and dm.class_names[4] == "Coat"
    assert (dm.default_query_source, dm.default_query_target) == ("Pullover", "Coat")
    sizes = {s: len(dm.dataset(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 180, "val": 20, "test": 40}
    item = dm.dataset("test")[3]
    assert item["image"].shape == (1, 32, 32) and int(item["label"]) == 3
    # the 28x28 original sits zero-padded in the middle, values / 255
    suffix = ".gz" if gz else ""
    raw = gzip.open(root / f"t10k-images-idx3-ubyte{suffix}").read() if gz else \
        (root / "t10k-images-idx3-ubyte").read_bytes()
    first = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[3]
    assert torch.allclose(item["image"][0, 2:30, 2:30], torch.from_numpy(first.astype(np.float32)) / 255)
    assert item["image"][0, :2].abs().sum() == 0


def test_fashion_mnist_missing_files_name_the_apt_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere")).setup()
    root = make_fmnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        FashionMNISTDataModule(root=str(root)).setup()


def test_fashion_mnist_bad_idx_is_a_dataset_error(tmp_path):
    root = make_fmnist(tmp_path / "fm", gz=False)
    (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(DatasetError, match="magic"):
        FashionMNISTDataModule(root=str(root)).setup()


# ---------------------------------------------------------------- judge independence


def test_judge_part_is_disjoint_from_the_explained_part(tmp_path):
    root = make_fmnist(tmp_path / "fm")
    explained = FashionMNISTDataModule(root=str(root), judge_fraction=0.3)
    judge = FashionMNISTDataModule(root=str(root), judge_fraction=0.3, role="judge")
    whole = FashionMNISTDataModule(root=str(root))
    explained.setup(), judge.setup(), whole.setup()
    e, j = set(explained.train_positions), set(judge.train_positions)
    assert e and j and not (e & j) and len(e | j) == len(whole.dataset("train"))
    # no training image of the judges is a training image of the explained classifier
    ex = {explained.dataset("train")[i]["image"].numpy().tobytes() for i in range(len(e))}
    assert not any(judge.dataset("train")[i]["image"].numpy().tobytes() in ex for i in range(len(j)))
    assert explained.fingerprint()["train_role"] == "explained" and judge.fingerprint()["train_role"] == "judge"
    assert explained.fingerprint() != judge.fingerprint()
    check_independent(explained, judge)
    with pytest.raises(RuntimeError, match="overlap"):
        fake = FashionMNISTDataModule(root=str(root), judge_fraction=0.3, role="judge")
        fake.setup()
        fake.train_positions = explained.train_positions
        check_independent(explained, fake)


def test_judge_config_per_dataset_kind(tmp_path):
    judge_cfg = OmegaConf.create({"data_seed_offset": 1000})
    syn = OmegaConf.create({"_target_": "disc_pl.data.synthetic.SyntheticFacesDataModule", "seed": 3})
    sub = judge_dataset_config(syn, SyntheticFacesDataModule(n_train=8, n_val=4, n_test=4), judge_cfg)
    assert sub.seed == 1003 and syn.seed == 3
    a = SyntheticFacesDataModule(n_train=64, n_val=4, n_test=4, seed=3)
    b = SyntheticFacesDataModule(n_train=64, n_val=4, n_test=4, seed=1003)
    a.setup(), b.setup()
    check_independent(a, b)
    shared = {img.numpy().tobytes() for img in a.dataset("train").images}
    assert not any(img.numpy().tobytes() in shared for img in b.dataset("train").images)
    with pytest.raises(RuntimeError, match="seed"):
        check_independent(a, a)
    fm = OmegaConf.create({"_target_": "disc_pl.data.fashion_mnist.FashionMNISTDataModule", "judge_fraction": 0.0})
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(ConfigError, match="judge_fraction"):
        judge_dataset_config(fm, dm, judge_cfg)
    fm.judge_fraction = 0.2
    assert judge_dataset_config(fm, dm, judge_cfg).role == "judge"


def test_role_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="dataset.role"):
        FashionMNISTDataModule(root=str(tmp_path), role="teacher")
    with pytest.raises(ConfigError, match="judge_fraction"):
        FashionMNISTDataModule(root=str(tmp_path), role="judge", judge_fraction=0.0)
    with pytest.raises(ConfigError, match="judge_fraction"):
        FashionMNISTDataModule(root=str(tmp_path), judge_fraction=1.0)


def test_ensure_judges_trains_k_distinct_cached_models(tmp_path):
    root = make_fmnist(tmp_path / "fm", n_train=120, n_test=20)
    cfg = OmegaConf.create({
        "cache_dir": str(tmp_path / "cache"),
        "dataset": {"_target_": "disc_pl.data.fashion_mnist.FashionMNISTDataModule", "root": str(root),
                    "judge_fraction": 0.5, "role": "explained", "seed": 0},
        "judge": {"name": "ensemble", "k": 2, "seed": 10, "data_seed_offset": 1000, "width": 4, "epochs": 1,
                  "lr": 1e-3, "batch_size": 16, "weight_decay": 0.0, "hflip": True, "max_shift": 1,
                  "noise": 0.01, "max_train": None}})
    dm = FashionMNISTDataModule(root=str(root), judge_fraction=0.5)
    judges, jdm = ensure_judges(cfg, dm)
    assert len(judges) == 2 and jdm.role == "judge"
    entries = sorted((tmp_path / "cache").glob("judge-*/judge.pt"))
    assert len(entries) == 2
    stamps = [p.stat().st_mtime_ns for p in entries]
    again, _ = ensure_judges(cfg, dm)  # reused, not retrained
    assert [p.stat().st_mtime_ns for p in entries] == stamps
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(judges[0](x), again[0](x)) and not torch.equal(judges[0](x), judges[1](x))
    with pytest.raises(ConfigError, match="judge.k"):
        ensure_judges(OmegaConf.merge(cfg, {"judge": {"k": 0}}), dm)


# ---------------------------------------------------------------- report rows


def _job(root: Path, name: str, seed: int, metrics: dict, rows: list[dict]) -> None:
    write_report_job(root, name, [f"seed={seed}"], "inr", metrics, rows, experiment="validity")


def test_report_has_judge_columns_reference_rows_and_cpu(tmp_path):
    from disc_pl import report as report_lib

    for seed, judge, pgd in ((0, 0.2, 0.0), (1, 0.6, 0.1)):
        metrics = {"cf/queries": 2, "cf/judge_flip_rate": judge, "cf/judge_flip_rate_std": 0.05,
                   "env/cpu": "AMD EPYC", "reference/pgd/flip_rate": 1.0, "reference/pgd/mse": 0.001,
                   "reference/pgd/judge_flip_rate": pgd, "reference/gt/flip_rate": 1.0,
                   "reference/gt/judge_flip_rate": 1.0, "reference/gt/gt_recovery": 1.0}
        rows = [{"query_id": i, "flipped": "True", "mse": 0.01, "concentration": 0.5, "cout": 0.5 + 0.1 * i,
                 "gt_recovery": -1.0 + i} for i in range(2)]
        _job(tmp_path, str(seed), seed, metrics, rows)
    files = report_lib.report(tmp_path, tmp_path / "out")
    text = files["markdown"].read_text()
    # judge over the two classifier seeds: mean 0.4, std 0.2; COUT / GT rec. over the 4 queries
    assert "| LSO+INR+DEP | 0.01 ± 0 | 0.5 ± 0 | – | 1 | – | – | 0.4 ± 0.2 | 0.55 ± 0.05 | -0.5 ± 0.5 | 4 |" in text
    assert "| reference: targeted PGD (pixels, no prior) | 0.001 ± 0 | – | – | 1 ± 0 | – | – | 0.05 ± 0.05 |" in text
    assert "| reference: ground-truth counterfactual |" in text and "CPU: AMD EPYC" in text


# ---------------------------------------------------------------- configs and environment


def test_evaluate_has_judges_and_references_run_does_not():
    with initialize_config_dir(CONF, version_base="1.3"):
        ev, run = compose("evaluate"), compose("run")
        off = compose("evaluate", overrides=["judge=none"])
        on = compose("run", overrides=["judge=ensemble"])
    assert ev.judge.name == "ensemble" and ev.judge.k == 3
    assert ev.validity.reference.pgd is True and ev.validity.reference.gt is True
    assert run.judge.name == "none" and run.validity.reference.pgd is False
    assert off.judge.name == "none" and on.judge.name == "ensemble"


def test_cpu_model_is_named():
    assert isinstance(cpu_model(), str) and cpu_model()


# ---------------------------------------------------------------- expectation over transformations


def test_random_views_identity_without_shift_and_noise_and_bounded_shift():
    from disc_pl.cf.objective import random_views

    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(random_views(x, 0.0, 0.0), x, atol=1e-6)
    # a horizontal ramp shifted by at most 1 px changes each interior pixel by at most one step
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(4, 1, 8, 8).contiguous()
    out = random_views(ramp, 1.0, 0.0)
    step = 1 / 7
    assert (out - ramp)[..., 1:-1].abs().max() <= step + 1e-5 and out.min() >= 0 and out.max() <= 1


def test_random_views_with_hflip_mirror_some_images_exactly():
    from disc_pl.cf.objective import random_views

    torch.manual_seed(0)
    x = torch.rand(64, 3, 6, 6)
    out = random_views(x, 0.0, 0.0, hflip=True)
    same = (out - x).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | mirrored).all())          # each view is the image or its mirror, nothing else
    assert 10 < int(mirrored.sum()) < 54          # about half are mirrored (binomial, p = 0.5)
    assert torch.allclose(random_views(x, 0.0, 0.0, hflip=False), x, atol=1e-6)


def test_eot_options_are_validated():
    from disc_pl.cf.objective import EOTTerm

    with pytest.raises(ValueError, match="term.eot.views"):
        EOTTerm(views=0)
    assert EOTTerm(views=2).views == 2
    with pytest.raises(ValueError, match="term.eot.hflip"):
        EOTTerm(hflip="yes")  # a truthy string is not silently taken as true
    assert EOTTerm(hflip=True).hflip is True


def test_eot_objective_runs_and_status_matches_the_unviewed_image(toy_classifier, toy_queries):
    from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals

    images, targets, _ = toy_queries
    from disc_pl.cf.objective import EOTTerm

    opts = InversionOptions(lr=3e-3, recon_steps=0, target_margin=0.2, target_confidence=None, fallback=None,
                            retry_hparams=(),
                            lambda_sem=1.0, gate=None, terms=[EOTTerm(views=2)],
                            stages=[Stage(["all"], 20, 5)])
    out = generate_counterfactuals(toy_classifier, images[:2], targets[:2], prior="tv", options=opts)
    assert out.images.shape == images[:2].shape and out.images.min() >= 0 and out.images.max() <= 1
    with torch.no_grad():  # success is judged on x' itself, not on a random view
        really = is_flipped(toy_classifier(out.images), targets[:2], 0.2)
    assert really.tolist() == [s == "flipped" for s in out.status]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_evaluate_writes_judge_cout_gt_recovery_and_reference_rows(tmp_path):
    import csv
    import json
    import subprocess
    import sys

    out = tmp_path / "eval"
    args = ["dataset.n_train=600", "dataset.n_val=100", "dataset.n_test=200", "models.classifier.width=8",
            "models.classifier.fit.trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "prior=inr", "prior.recon.max_steps=20", "prior.recon.psnr_target=25", "inversion.steps_per_stage=5",
            "inversion.min_steps=1", "prior.hparams.hidden=32", "prior.hparams.depth=2",
            "prior.stages=[[all]]", "logger=none", "cd.enabled=false", "query.count=3",
            "query.require_correct=false", "judge.k=2", "judge.epochs=1", "judge.width=4", "judge.max_train=200",
            "validity.pgd.steps=3", "validity.cout_steps=4", f"cache_dir={tmp_path / 'cache'}",
            "judge.robust.k=1", "judge.robust.epochs=1", "judge.robust.warmup_epochs=0", "judge.robust.steps=1",
            "judge.robust.min_acc=0", "judge.realism.epochs=1", "judge.realism.max_per_class=50",
            "manifold=surrogates", "manifold.k=1",  # DEP + one surrogate: adds the surrogate PGD reference
            f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "disc_pl.evaluate", *args], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("cf/judge_flip_rate", "cf/judge_flip_rate_std", "cf/judge_target_prob", "cf/judge_target_prob_std",
                "judge/acc", "judge/acc_0", "judge/acc_1", "judge/query_flip_rate",
                "reference/pgd/flip_rate", "reference/pgd/judge_flip_rate", "reference/gt/judge_flip_rate",
                "reference/gt/gt_recovery", "reference/pgd_surrogates/flip_rate",
                "reference/pgd_surrogates/judge_flip_rate", "cf/judge_robust_flip_rate", "judge_robust/acc_0",
                "judge_robust/query_flip_rate", "judge_robust/ceiling_real", "judge/ceiling_real",
                "reference/pgd/judge_robust_flip_rate", "reference/gt/judge_robust_flip_rate",
                "realism/im1_real_target", "realism/im1_queries", "reference/pgd/im1", "reference/gt/im1",
                "realism/ae_gap_real_target", "reference/pgd/ae_gap", "realism/im1_noise",
                "realism/im1_blur", "realism/nn_margin_blur", "realism/blur_sigma",
                "realism/nn_margin_real_target", "realism/nn_margin_queries", "realism/nn_margin_noise",
                "reference/pgd/nn_margin", "reference/gt/nn_margin",
                "reference/gt/gt_recovery_median", "reference/gt/gt_recovery_positive"):
        assert key in m and math.isfinite(m[key]), key
    # quality figures: over the flipped queries only
    for key in ("cf/cout", "cf/gt_recovery", "cf/im1", "cf/ae_gap", "cf/nn_margin"):
        assert (key in m and math.isfinite(m[key])) == (m["cf/n_flipped"] > 0), key
    assert m["reference/gt/gt_recovery"] == pytest.approx(1.0) and m["judge/k"] == 2 and m["env/cpu"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3
    assert all(math.isfinite(float(r["cout"])) and math.isfinite(float(r["gt_recovery"])) for r in rows)  # per query
    flips = [float(r["judge_flip"]) for r in rows]
    assert all(v in (0.0, 0.5, 1.0) for v in flips)  # the share of 2 judges
    assert statistics_mean(flips) == pytest.approx(m["cf/judge_flip_rate"])
    assert len(list((tmp_path / "cache").glob("judge-*/judge.pt"))) == 2
    assert len(list((tmp_path / "cache").glob("rjudge-*/rjudge.pt"))) == 1
    assert len(list((tmp_path / "cache").glob("realism_ae-*/realism_ae.pt"))) == 3  # source, target, every class
    assert all(math.isfinite(float(r["judge_robust_flip"])) and float(r["im1"]) > 0 for r in rows)
    assert len(list((tmp_path / "cache").glob("classifier-*"))) == 2  # the explained one and its surrogate


def statistics_mean(values):
    return sum(values) / len(values)


def test_palette_term_equals_the_hand_computed_nearest_colour_distance():
    from disc_pl.cf.engine import InversionOptions
    from disc_pl.cf.objective import PaletteTerm, Step, default_objective, farthest_colours

    query = torch.zeros(2, 3, 2, 2)
    query[:, :, 0, 0] = 1.0  # palette: black and white
    x = query.clone()
    x[0, :, 1, 1] = 0.5      # row 0: one grey pixel, 3 * 0.5^2 from either colour
    x[1, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # row 1: one red pixel, 1 from black
    term = PaletteTerm(weight=1.0, colours=2)
    state = term.prepare(query, [])
    step = Step(x=x, logits=torch.zeros(2, 2), feats=[], query=query, source=torch.zeros(2, dtype=torch.long),
                target=torch.ones(2, dtype=torch.long), idx=torch.arange(2), prior=None, mask=None)
    torch.testing.assert_close(term(step, state), torch.tensor([0.75 / 4, 1.0 / 4]))
    # a change drawn in the query's own colours costs nothing; rows index the batch's palettes
    step.x, step.idx = query.flip(-1)[1:], torch.tensor([1])
    torch.testing.assert_close(term(step, state), torch.zeros(1))
    # a pixel the palette misses costs nothing while it keeps its colour
    odd = query.clone()
    odd[:, :, 1, 1] = 0.4    # a third colour: the palette has 2 of the 3
    st = term.prepare(odd, [])
    step.x, step.query, step.idx = odd, odd, torch.arange(2)
    torch.testing.assert_close(term(step, st), torch.zeros(2))
    # farthest-point sampling keeps a rare distinct colour: 1 red pixel among 63 greys
    img = torch.full((1, 3, 8, 8), 0.5)
    img[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0])
    pal = farthest_colours(img, 2)
    assert pal.shape == (1, 2, 3) and torch.allclose(pal[0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert "palette" not in [t.name for t in default_objective(InversionOptions())]
    assert "palette" in [t.name for t in default_objective(InversionOptions(terms=[PaletteTerm(3.0)]))]
    with pytest.raises(ValueError, match="term.palette.weight"):
        PaletteTerm(-1.0)


def test_change_l1_term_equals_the_hand_computed_mean_absolute_change():
    from disc_pl.cf.engine import InversionOptions
    from disc_pl.cf.objective import ChangeL1Term, Step, default_objective

    q = torch.zeros(2, 1, 2, 3)
    x = q.clone()
    x[0, 0, 0, 0], x[0, 0, 1, 2] = 0.3, -0.6
    step = Step(x=x, logits=torch.zeros(2, 2), feats=[], query=q, source=torch.zeros(2, dtype=torch.long),
                target=torch.ones(2, dtype=torch.long), idx=torch.arange(2), prior=None, mask=None)
    torch.testing.assert_close(ChangeL1Term()(step, None), torch.tensor([0.9 / 6, 0.0]))
    assert "change_l1" in [t.name for t in default_objective(InversionOptions(terms=[ChangeL1Term(1.0)]))]


def test_change_tv_term_equals_the_hand_computed_total_variation_of_the_change():
    from disc_pl.cf.engine import InversionOptions
    from disc_pl.cf.objective import ChangeTVTerm, Step, default_objective

    query = torch.rand(2, 1, 3, 3)
    x = query.clone()
    x[0, 0, 1, 1] += 0.3  # one changed pixel: 4 neighbour differences of 0.3, over 6 + 6 pairs
    x[1] += 0.2           # a constant shift of the whole image has no variation
    step = Step(x=x, logits=torch.zeros(2, 2), feats=[], query=query, source=torch.zeros(2, dtype=torch.long),
                target=torch.ones(2, dtype=torch.long), idx=torch.arange(2), prior=None, mask=None)
    torch.testing.assert_close(ChangeTVTerm()(step, None), torch.tensor([2 * 0.3 / 6 + 2 * 0.3 / 6, 0.0]))
    assert "change_tv" in [t.name for t in default_objective(InversionOptions(terms=[ChangeTVTerm(1.0)]))]
    assert "change_tv" not in [t.name for t in default_objective(InversionOptions())]


def test_gate_sharp_term_is_zero_for_a_decided_gate_and_one_where_it_is_half_open():
    from disc_pl.cf.objective import GateSharpTerm, Step

    q = torch.zeros(3, 1, 2, 2)
    mask = torch.stack([torch.tensor([[0.0, 1.0], [1.0, 0.0]]),     # decided: shut or open
                        torch.full((2, 2), 0.5),                     # half open everywhere
                        torch.tensor([[0.25, 0.0], [0.0, 0.0]])])[:, None]  # 4 * 0.25 * 0.75 on one pixel of 4

    def step(m):
        return Step(x=q, logits=torch.zeros(3, 2), feats=[], query=q, source=torch.zeros(3, dtype=torch.long),
                    target=torch.ones(3, dtype=torch.long), idx=torch.arange(3), prior=None, mask=m)
    torch.testing.assert_close(GateSharpTerm()(step(mask), None), torch.tensor([0.0, 1.0, 0.75 / 4]))
    torch.testing.assert_close(GateSharpTerm()(step(None), None), torch.zeros(3))  # no gate, no cost
