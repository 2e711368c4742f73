"""Counterfactual metrics against hand-computed values (SPEC section 6)."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disc_pl.metrics import (
    Concentration,
    CounterfactualMetrics,
    CounterfactualMSE,
    FlipRate,
    InMaskFraction,
    MaskIoU,
    RelativeGTDistance,
    accuracy,
    classifier_discrepancy,
    concentration,
    dilate_mask,
    flipped,
    in_mask_fraction,
    make_logistic_trainer,
    mask_iou,
    mse,
    relative_gt_distance,
)


def _pair(h: int = 6, w: int = 10, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random query in [0.2, 0.8] (so +-0.2 edits stay in [0, 1]) and an unchanged copy."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(1, c, h, w, generator=g)
    return x, x.clone()


# ---------------------------------------------------------------- concentration


def test_concentration_nothing_changed_is_zero():
    x, x_cf = _pair()
    assert concentration(x, x_cf).tolist() == [0.0]


def test_concentration_single_pixel_is_one_over_area():
    x, x_cf = _pair(h=6, w=10)
    x_cf[0, :, 3, 5] += 0.2
    assert concentration(x, x_cf).item() == pytest.approx(1 / 60)


def test_concentration_two_far_pixels_is_inclusive_box_area():
    x, x_cf = _pair(h=6, w=10)
    x_cf[0, 0, 1, 2] += 0.2
    x_cf[0, 0, 4, 8] -= 0.2
    # rows 1..4 -> 4, cols 2..8 -> 7: a 4 x 7 box out of 6 x 10.
    assert concentration(x, x_cf).item() == pytest.approx(28 / 60)
    x_cf[0, 0, 0, 0] += 0.2
    x_cf[0, 0, 5, 9] += 0.2  # opposite corners -> the whole image
    assert concentration(x, x_cf).item() == pytest.approx(1.0)


def test_concentration_counts_a_change_in_one_channel_only():
    x, x_cf = _pair(h=6, w=10)
    x_cf[0, 2, 0, 0] += 0.2
    x_cf[0, 2, 1, 1] += 0.2  # channel 2 only: 2 x 2 box
    assert concentration(x, x_cf).item() == pytest.approx(4 / 60)


def test_concentration_threshold_is_strict():
    x = torch.full((1, 1, 4, 4), 0.5)
    x_cf = x.clone()
    x_cf[0, 0, 0, 0] = 0.75  # change exactly 0.25 (exact in binary): not counted at threshold 0.25
    x_cf[0, 0, 3, 3] = 0.625  # below
    assert concentration(x, x_cf, threshold=0.25).item() == 0.0
    x_cf[0, 0, 3, 3] = 0.875  # above: counted, one pixel
    assert concentration(x, x_cf, threshold=0.25).item() == pytest.approx(1 / 16)
    # Default threshold 0.05.
    small = x.clone()
    small[0, 0, 1, 1] += 0.04
    assert concentration(x, small).item() == 0.0
    small[0, 0, 2, 2] += 0.06
    assert concentration(x, small).item() == pytest.approx(1 / 16)


def test_concentration_batch_of_mixed_cases_matches_per_sample():
    x, _ = _pair(h=6, w=10)
    x = x.repeat(4, 1, 1, 1)
    x_cf = x.clone()
    x_cf[1, 1, 2, 3] += 0.2  # one pixel
    x_cf[2, 0, 1, 2] += 0.2  # box 4 x 7
    x_cf[2, 2, 4, 8] += 0.2
    x_cf[3, :, 0:3, 5] -= 0.2  # column strip 3 x 1
    values = concentration(x, x_cf)
    assert values.shape == (4,)
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / 60, 28 / 60, 3 / 60]))
    singles = torch.cat([concentration(x[i : i + 1], x_cf[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(values, singles)


# ---------------------------------------------------------------- mse


def test_mse_matches_hand_computation():
    x = torch.zeros(2, 2, 2, 2)
    x_cf = torch.zeros(2, 2, 2, 2)
    x_cf[0, 0, 0, 0] = 0.5
    x_cf[0, 1, 1, 1] = 1.0  # (0.25 + 1) / 8 values
    x_cf[1] = 0.5  # every value 0.25
    torch.testing.assert_close(mse(x, x_cf), torch.tensor([1.25 / 8, 0.25]))


# ---------------------------------------------------------------- ground truth metrics


def _mask(h: int, w: int, *pixels: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(1, 1, h, w, dtype=torch.bool)
    for r, c in pixels:
        m[0, 0, r, c] = True
    return m


def test_in_mask_fraction_all_inside_is_one():
    x, x_cf = _pair(h=8, w=8)
    x_cf[0, :, 2:4, 2:4] += 0.1
    mask = _mask(8, 8, (2, 2), (2, 3), (3, 2), (3, 3))
    for d in (0, 1, 2):
        assert in_mask_fraction(x, x_cf, mask, dilate=d).item() == pytest.approx(1.0)


def test_in_mask_fraction_half_inside_sums_over_channels():
    x, x_cf = _pair(h=8, w=8)
    x_cf[0, 0, 1, 1] += 0.1
    x_cf[0, 1, 1, 1] += 0.1  # inside: 0.1 + 0.1 over channels
    x_cf[0, 0, 6, 6] += 0.2  # outside, far beyond the dilation
    mask = _mask(8, 8, (1, 1))
    # A max over channels would give 0.1 / 0.3 instead of 0.2 / 0.4.
    assert in_mask_fraction(x, x_cf, mask, dilate=1).item() == pytest.approx(0.5)


def test_in_mask_fraction_dilation_extends_by_exactly_one_pixel():
    x, x_cf = _pair(h=8, w=8)
    x_cf[0, 0, 4, 4] += 0.2  # diagonal neighbour of the mask pixel (Chebyshev distance 1)
    x_cf[0, 0, 3, 5] += 0.2  # two columns away (distance 2)
    mask = _mask(8, 8, (3, 3))
    assert in_mask_fraction(x, x_cf, mask, dilate=0).item() == pytest.approx(0.0)
    assert in_mask_fraction(x, x_cf, mask, dilate=1).item() == pytest.approx(0.5)
    assert in_mask_fraction(x, x_cf, mask, dilate=2).item() == pytest.approx(1.0)
    # The structuring element is a 3 x 3 square, clipped at the border.
    grown = dilate_mask(torch.cat([mask, _mask(8, 8, (0, 0))])[:, 0], 1)
    assert grown.sum(dim=(1, 2)).tolist() == [9, 4]
    assert grown[0, 2:5, 2:5].all()


def test_in_mask_fraction_no_change_is_nan():
    x, x_cf = _pair(h=8, w=8)
    assert math.isnan(in_mask_fraction(x, x_cf, _mask(8, 8, (1, 1))).item())


def test_mask_iou_hand_case():
    x = torch.full((1, 3, 4, 4), 0.5)
    x_cf = x.clone()
    x_cf[0, 1, 0, 0:3] = 0.9  # changed: (0,0) (0,1) (0,2)
    x_cf[0, 0, 3, 3] = 0.52  # below threshold: ignored
    mask = _mask(4, 4, (0, 0), (0, 1), (1, 0), (1, 1))  # 2 x 2 block
    # intersection 2, union 4 + 1 = 5
    assert mask_iou(x, x_cf, mask).item() == pytest.approx(0.4)
    assert math.isnan(mask_iou(x, x.clone(), torch.zeros_like(mask)).item())


def test_relative_gt_distance():
    x = torch.zeros(1, 1, 2, 2)
    x_gt = torch.ones(1, 1, 2, 2)  # ||x - x_gt|| = 2
    assert relative_gt_distance(x, x_gt.clone(), x_gt).item() == 0.0
    assert relative_gt_distance(x, x.clone(), x_gt).item() == pytest.approx(1.0)
    half = torch.full((1, 1, 2, 2), 0.5)  # ||half - x_gt|| = 1
    assert relative_gt_distance(x, half, x_gt).item() == pytest.approx(0.5)
    assert math.isnan(relative_gt_distance(x, half, x.clone()).item())  # x == x_gt: undefined


# ---------------------------------------------------------------- flip


def test_flipped_argmax_and_margin():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert flipped(logits, torch.tensor([1, 1, 0])).tolist() == [False, True, True]  # tie -> index 0
    assert flipped(logits, 1).tolist() == [False, True, False]
    # p = [0.5, 0.3, 0.2]: target 0 wins by 0.2.
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert flipped(probs, 0, margin=0.1).tolist() == [True]
    assert flipped(probs, 0, margin=0.3).tolist() == [False]
    assert flipped(probs, 1, margin=0.0).tolist() == [False]


def test_flip_rate_metric_with_margin():
    logits = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]).log()
    target = torch.tensor([0, 1, 2])  # margins 0.2, 0.5, 0.7
    rates = {}
    for margin in (0.0, 0.3, 0.6):
        metric = FlipRate(margin=margin)
        metric.update(logits, target)
        rates[margin] = metric.compute().item()
    assert rates == pytest.approx({0.0: 1.0, 0.3: 2 / 3, 0.6: 1 / 3})


# ---------------------------------------------------------------- metric accumulation


def _batch(n: int, seed: int, h: int = 8, w: int = 8):
    """Queries with local edits, ground truth, masks, logits; sample 0 is unchanged (NaN in_mask)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, 3, h, w, generator=g)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    x_gt = x.clone()
    x_cf = x.clone()
    for i in range(n):
        r, c = (int(v) for v in torch.randint(0, h - 3, (2,), generator=g))
        mask[i, 0, r : r + 3, c : c + 3] = True
        x_gt[i, :, r : r + 3, c : c + 3] += 0.15
        x_cf[i] += 0.3 * (torch.rand(3, h, w, generator=g) - 0.5) * (torch.rand(1, h, w, generator=g) > 0.7)
    x_cf[0] = x[0]
    logits = torch.randn(n, 4, generator=g)
    target = torch.randint(0, 4, (n,), generator=g)
    return x, x_cf.clamp(0, 1), logits, target, x_gt, mask


def _per_sample(x, x_cf, logits, target, x_gt, mask) -> dict[str, torch.Tensor]:
    return {
        "flip_rate": flipped(logits, target).double(),
        "mse": mse(x, x_cf).double(),
        "concentration": concentration(x, x_cf).double(),
        "gt_distance": relative_gt_distance(x, x_cf, x_gt).double(),
        "in_mask": in_mask_fraction(x, x_cf, mask).double(),
        "mask_iou": mask_iou(x, x_cf, mask).double(),
    }


def test_metric_over_two_batches_equals_one_batch_and_matches_torch_std():
    data = _batch(10, seed=1)
    values = mse(data[0], data[1]).double()
    whole, split = CounterfactualMSE(), CounterfactualMSE()
    whole.update(data[0], data[1])
    split.update(data[0][:3], data[1][:3])
    split.update(data[0][3:], data[1][3:])
    torch.testing.assert_close(split.compute(), whole.compute())
    torch.testing.assert_close(split.compute_std(), whole.compute_std())
    torch.testing.assert_close(split.compute(), values.mean())
    # Population std (unbiased=False), differs from the sample std for n = 10.
    torch.testing.assert_close(split.compute_std(), values.std(unbiased=False))
    assert not torch.allclose(split.compute_std(), values.std(unbiased=True))


def test_metric_skips_nan_samples_and_counts_them():
    x, x_cf, _, _, _, mask = _batch(6, seed=2)  # sample 0 unchanged -> NaN
    x_cf[3] = x[3]  # a second NaN in another batch
    values = in_mask_fraction(x, x_cf, mask).double()
    assert values.isnan().tolist() == [True, False, False, True, False, False]
    metric = InMaskFraction()
    metric.update(x[:2], x_cf[:2], mask[:2])
    metric.update(x[2:], x_cf[2:], mask[2:])
    stats = metric.compute_stats()
    kept = values[~values.isnan()]
    assert (stats["count"].item(), stats["nan_count"].item()) == (4, 2)
    torch.testing.assert_close(metric.compute(), kept.mean())
    torch.testing.assert_close(stats["std"], kept.std(unbiased=False))
    only_nan = InMaskFraction()
    only_nan.update(x[:1], x_cf[:1], mask[:1])
    assert math.isnan(only_nan.compute().item())


def test_each_metric_class_matches_its_function():
    x, x_cf, logits, target, x_gt, mask = _batch(5, seed=3)
    cases = [
        (CounterfactualMSE(), (x, x_cf), mse(x, x_cf)),
        (Concentration(threshold=0.1), (x, x_cf), concentration(x, x_cf, 0.1)),
        (RelativeGTDistance(), (x, x_cf, x_gt), relative_gt_distance(x, x_cf, x_gt)),
        (MaskIoU(threshold=0.1), (x, x_cf, mask), mask_iou(x, x_cf, mask, 0.1)),
        (InMaskFraction(dilate=0), (x, x_cf, mask), in_mask_fraction(x, x_cf, mask, 0)),
    ]
    for metric, args, values in cases:
        metric.update(*args)
        torch.testing.assert_close(metric.compute(), values.double().nanmean(), msg=type(metric).__name__)


def test_counterfactual_metrics_keys_and_values():
    data = _batch(8, seed=4)
    suite = CounterfactualMetrics(ground_truth=True)
    suite.update(*(t[:5] for t in data[:4]), x_gt=data[4][:5], mask=data[5][:5])
    suite.update(*(t[5:] for t in data[:4]), x_gt=data[4][5:], mask=data[5][5:])
    out = suite.compute()
    stems = ["mse", "concentration", "gt_distance", "in_mask", "mask_iou"]
    assert set(out) == {"cf/flip_rate"} | {f"cf/{s}" for s in stems} | {f"cf/{s}_std" for s in stems}
    for name, values in _per_sample(*data).items():
        kept = values[~values.isnan()]
        torch.testing.assert_close(out[f"cf/{name}"], kept.mean(), msg=name)
        if name != "flip_rate":
            torch.testing.assert_close(out[f"cf/{name}_std"], kept.std(unbiased=False), msg=name)
    plain = CounterfactualMetrics(ground_truth=False)
    plain.update(*data[:4])
    assert set(plain.compute()) == {"cf/flip_rate", "cf/mse", "cf/mse_std", "cf/concentration", "cf/concentration_std"}
    with pytest.raises(ValueError, match="x_gt and mask"):
        suite.update(*data[:4])
    with pytest.raises(ValueError, match="ground_truth=False"):
        plain.update(*data[:4], x_gt=data[4], mask=data[5])
    suite.reset()
    assert suite.metrics["mse"].count.item() == 0


# ---------------------------------------------------------------- multi-process sync


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        data = _batch(9, seed=5)
        # Uneven halves (5 / 4 samples), sample 0 (a NaN for in_mask) only on rank 0, two updates on rank 0.
        lo, hi = (0, 5) if rank == 0 else (5, 9)
        suite = CounterfactualMetrics(ground_truth=True)
        for a, b in ((lo, lo + 2), (lo + 2, hi)) if rank == 0 else ((lo, hi),):
            part = [t[a:b] for t in data]
            suite.update(*part[:4], x_gt=part[4], mask=part[5])
        out = suite.compute()
        out["local_mse_count"] = suite.metrics["mse"].count.clone()  # states are unsynced afterwards
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_process_sync_equals_single_process(tmp_path):
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    data = _batch(9, seed=5)
    single = CounterfactualMetrics(ground_truth=True)
    single.update(*data[:4], x_gt=data[4], mask=data[5])
    expected = single.compute()
    for rank, local_count in ((0, 5), (1, 4)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.pop("local_mse_count").item() == local_count
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=f"rank {rank} {key}")


# ---------------------------------------------------------------- classifier discrepancy


def _blobs(n: int, label: int, g: torch.Generator) -> torch.Tensor:
    """Tiny 1x4x4 images whose brightness is 0.3 (class 0) or 0.7 (class 1) plus noise."""
    return (0.3 + 0.4 * label + 0.1 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    x0, x1 = _blobs(64, 0, g), _blobs(64, 1, g)
    x_test = torch.cat([_blobs(100, 0, g), _blobs(100, 1, g)])
    y_test = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    return x0, x1, x_test, y_test


def test_cd_is_exactly_zero_when_counterfactuals_are_the_real_images(blobs):
    x0, x1, x_test, y_test = blobs
    out = classifier_discrepancy(make_logistic_trainer(epochs=20), x0, x1, x1.clone(), x_test, y_test)
    assert out["cd_mean"] == 0.0 and out["cd_std"] == 0.0
    assert [row["cd"] for row in out["per_seed"]] == [0.0, 0.0, 0.0]
    assert out["acc_real"] == out["acc_cf"] > 0.95


def test_cd_is_large_when_counterfactuals_are_class_zero_copies(blobs):
    x0, x1, x_test, y_test = blobs
    out = classifier_discrepancy(make_logistic_trainer(epochs=20), x0, x1, x0.clone(), x_test, y_test)
    assert out["acc_real"] > 0.95
    assert out["acc_cf"] < 0.65  # nothing to learn: chance on the balanced test set
    assert out["cd_mean"] > 0.3
    assert out["cd_mean"] == pytest.approx(out["acc_real"] - out["acc_cf"])


def test_cd_training_protocol_and_population_std():
    """A fake train_fn checks what it is given and returns models of known accuracy."""
    x0, x1, x1_cf = torch.zeros(3, 1, 2, 2), torch.ones(2, 1, 2, 2), torch.full((3, 1, 2, 2), 0.5)
    x_test, y_test = torch.zeros(4, 1, 2, 2), torch.ones(4).long()
    calls = []

    def train_fn(images, labels, seed):
        assert torch.equal(images[:3], x0)
        is_cf = len(images) == 6
        assert torch.equal(images[3:], x1_cf if is_cf else x1)
        assert labels.tolist() == [0, 0, 0] + [1] * (3 if is_cf else 2)
        calls.append((seed, is_cf))
        wrong = seed if is_cf else 0  # the cf model misclassifies the first `seed` test images

        def model(batch):
            pred = torch.ones(len(batch)).long()
            pred[:wrong] = 0
            return torch.nn.functional.one_hot(pred, 2).float()

        return model

    out = classifier_discrepancy(train_fn, x0, x1, x1_cf, x_test, y_test, seeds=(0, 1, 2))
    assert calls == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]
    assert [row["cd"] for row in out["per_seed"]] == [0.0, 0.25, 0.5]
    assert out["acc_real"] == 1.0 and out["acc_cf"] == pytest.approx(0.75)
    assert out["cd_mean"] == pytest.approx(0.25)
    assert out["cd_std"] == pytest.approx(math.sqrt(2 * 0.25**2 / 3))  # population std over seeds


def test_logistic_trainer_is_deterministic_per_seed(blobs):
    x0, x1, x_test, y_test = blobs
    images, labels = torch.cat([x0, x1]), torch.cat([torch.zeros(64), torch.ones(64)]).long()
    train = make_logistic_trainer(epochs=20)
    a, b, c = train(images, labels, 7), train(images, labels, 7), train(images, labels, 8)
    assert torch.equal(a(x_test), b(x_test))
    assert not torch.equal(a(x_test), c(x_test))
    assert accuracy(a, x_test, y_test) > 0.9
    # A single logit per sample is thresholded at 0.
    assert accuracy(lambda t: t.flatten(1).mean(1) - 0.5, x_test, y_test) > 0.9
