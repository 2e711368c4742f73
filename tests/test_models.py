"""Lightning models: DEP ranking loss, DUQ gradient penalty, learning, checkpoints, safe loading."""

import math
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from disc_pl.data.base import ImageDataModule
from disc_pl.errors import UnsafeCheckpointError
from disc_pl.models.cache import load_classifier, load_duq
from disc_pl.models.classifier import ClassifierModule, dep_ranking_loss
from disc_pl.models.duq import DUQModule, corrupt, gradient_penalty, kernel_bce
from conftest import TEST_SEED


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread (conftest.py)


def test_ranking_loss_on_hand_made_values():
    pred = torch.tensor([0.5, 2.0, 1.0, 0.0])
    true = torch.tensor([3.0, 1.0, 2.0, 0.5])
    # pairs (0, 3) and (1, 2): s_0 > s_3 -> I = +1, loss max(0, -(0.5 - 0.0) + 1) = 0.5
    #                           s_1 < s_2 -> I = -1, loss max(0, +(2.0 - 1.0) + 1) = 2.0
    assert dep_ranking_loss(pred, true, margin=1.0).item() == pytest.approx((0.5 + 2.0) / 2)
    # a correct ranking by more than the margin costs nothing
    assert dep_ranking_loss(torch.tensor([5.0, 0.0]), torch.tensor([2.0, 1.0]), 1.0).item() == 0.0
    # odd batch: the middle sample pairs with itself and is left out
    # (pair (0, 2): s_0 < s_2 -> I = -1, max(0, (3 - 0) + 1) = 4; a self-pair would add margin 1)
    odd = dep_ranking_loss(torch.tensor([3.0, 9.0, 0.0]), torch.tensor([1.0, 0.0, 2.0]), 1.0)
    assert odd.item() == pytest.approx(4.0)


def test_ranking_loss_gradient_never_reaches_the_true_losses():
    pred = torch.tensor([0.0, 0.0], requires_grad=True)
    true = torch.tensor([1.0, 0.0], requires_grad=True)
    dep_ranking_loss(pred, true).backward()
    assert true.grad is None or torch.all(true.grad == 0)
    # d/dpred of max(0, -(p0 - p1) + 1) / 1 = (-1, +1)
    torch.testing.assert_close(pred.grad, torch.tensor([-1.0, 1.0]))


def test_gradient_penalty_hand_made():
    # sum_c K_c = 0.5 ||x||^2 -> gradient x, so the penalty is (||x|| - 1)^2 per sample.
    def kernel(x):
        return 0.5 * x.pow(2).sum(1, keepdim=True)

    on_sphere = torch.tensor([[0.6, 0.8], [0.0, 1.0]], requires_grad=True)
    assert gradient_penalty(on_sphere, kernel(on_sphere)).item() == pytest.approx(0.0, abs=1e-12)
    x = torch.tensor([[1.2, 1.6]], requires_grad=True)  # ||x|| = 2 -> (2 - 1)^2 = 1
    gp = gradient_penalty(x, kernel(x))
    assert gp.item() == pytest.approx(1.0)
    # create_graph: the penalty is differentiable, d/dx (||x|| - 1)^2 = 2 (||x|| - 1) x / ||x||
    (grad,) = torch.autograd.grad(gp, x)
    torch.testing.assert_close(grad, torch.tensor([[1.2, 1.6]]))
    # gradient w.r.t. the normalised input z = (x - mean) / std is dK/dx * std: ||.|| = 2 * 0.5
    assert gradient_penalty(x, kernel(x), scale=torch.tensor(0.5)).item() == pytest.approx(0.0, abs=1e-12)


def test_kernel_bce_is_bce_and_keeps_its_gradient_when_the_kernel_underflows():
    log_k = torch.tensor([[-0.1, -2.0], [-1.0, -0.5]])
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(kernel_bce(log_k, onehot), F.binary_cross_entropy(log_k.exp(), onehot))
    far = torch.tensor([[-200.0, -300.0]], requires_grad=True)  # exp() underflows to 0
    kernel_bce(far, torch.tensor([[1.0, 0.0]])).backward()
    # d/dlogK_0 of -log K_0 / 2 = -1/2: the true class is still pulled in
    torch.testing.assert_close(far.grad, torch.tensor([[-0.5, 0.0]]))


def test_corruptions_are_seeded_per_image_and_different_from_the_input():
    images = torch.rand(4, 3, 8, 8)
    idx = torch.tensor([10, 11, 12, 13])
    a_noise, a_shuf = corrupt(images, idx, seed=0)
    b_noise, b_shuf = corrupt(images[2:], idx[2:], seed=0)  # other batching, same images
    torch.testing.assert_close(a_noise[2:], b_noise)
    torch.testing.assert_close(a_shuf[2:], b_shuf)
    assert (a_noise - images).abs().mean() > 0.1
    # a patch shuffle keeps the pixel values, moves them
    torch.testing.assert_close(a_shuf.flatten(1).sort(1).values, images.flatten(1).sort(1).values)
    assert not torch.equal(a_shuf, images)


class ToyDataModule(ImageDataModule):
    """A task a tiny net learns in seconds: a bright 3x3 square in the top (class 0) or the
    bottom (class 1) half of a noisy 12x12 image."""

    def __init__(self, n: int = 256, image_size: int = 12, batch_size: int = 32, seed: int = 0):
        super().__init__("toy", image_size, batch_size)
        self.n, self.seed = n, seed

    def _load_splits(self):
        g, s = torch.Generator().manual_seed(self.seed), self.image_size
        splits = {}
        for split, n in (("train", self.n), ("val", self.n // 2), ("test", self.n // 2)):
            y = torch.arange(n) % 2
            x = 0.4 * torch.rand(n, 3, s, s, generator=g)
            rows = torch.randint(0, s // 2 - 2, (n,), generator=g) + y * (s // 2)
            cols = torch.randint(0, s - 2, (n,), generator=g)
            for i in range(n):
                x[i, :, rows[i] : rows[i] + 3, cols[i] : cols[i] + 3] = 0.7 + 0.3 * torch.rand(1, generator=g)
            splits[split] = [{"image": x[i], "label": y[i], "index": i} for i in range(n)]
        return ["top", "bottom"], splits

    def _fingerprint_args(self):
        return {"n": self.n, "seed": self.seed}


def _tiny_data():
    dm = ToyDataModule()
    dm.setup()
    return dm


def _trainer(tmp_path, epochs):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
        enable_checkpointing=False,
    )


def _data_args(dm):
    return dict(num_classes=dm.num_classes, in_channels=dm.channels, image_size=dm.image_size,
                class_names=dm.class_names)


@pytest.mark.slow
def test_tiny_classifier_learns_and_round_trips_without_hydra(tmp_path):
    pl.seed_everything(TEST_SEED, verbose=False)
    dm = _tiny_data()
    model = ClassifierModule(**_data_args(dm), width=4, mean=[0.5] * 3, std=[0.25] * 3, lr=1e-2)
    trainer = _trainer(tmp_path, epochs=4)
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/acc"] > 0.8, result  # chance is 0.5
    assert math.isfinite(result["test/dep_spearman"])
    assert torch.isfinite(model.dep_target)  # set from the val split during fit

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    x = torch.stack([dm.dataset("test")[i]["image"] for i in range(8)])
    model.eval()
    reloaded = ClassifierModule.load_from_checkpoint(path, weights_only=True).eval()
    torch.testing.assert_close(reloaded(x), model(x))
    assert reloaded.dep_target.item() == model.dep_target.item()
    assert reloaded.class_names == ["top", "bottom"]
    safe = load_classifier(path)
    torch.testing.assert_close(safe(x), model(x))
    assert not safe.training and not any(p.requires_grad for p in safe.parameters())
    _, feats = safe.forward_features(x)
    assert safe.has_loss_predictor and safe.predict_loss(feats).shape == (8,)


@pytest.mark.slow
def test_tiny_duq_learns_and_reports_the_ood_auroc_of_its_certainty(tmp_path):
    pl.seed_everything(TEST_SEED, verbose=False)
    dm = _tiny_data()
    model = DUQModule(**_data_args(dm), width=4, mean=[0.5] * 3, std=[0.25] * 3, embedding_size=16,
                      gamma=0.99, lr=1e-2, gp_warmup_epochs=1)
    centroids_before = model.net.head.centroids.clone()
    trainer = _trainer(tmp_path, epochs=4)
    trainer.fit(model, datamodule=dm)
    assert not torch.allclose(model.net.head.centroids, centroids_before)  # EMA steps happened
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/acc"] > 0.75, result  # chance is 0.5
    # test/ood_auroc = AUROC of max_c K_c, clean test images (1) vs their two corruptions (0)
    test = dm.dataset("test")
    x = torch.stack([d["image"] for d in test])
    idx = torch.tensor([d["index"] for d in test])
    noisy, shuffled = corrupt(x, idx, seed=0, noise_std=0.5)
    with torch.no_grad():
        certainty = torch.cat([model.eval()(v).max(1).values for v in (x, noisy, shuffled)])
    clean = torch.cat([torch.ones(len(x)), torch.zeros(2 * len(x))]).long()
    assert result["test/ood_auroc"] == pytest.approx(binary_auroc(certainty, clean).item(), abs=1e-4)
    path = tmp_path / "duq.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    torch.testing.assert_close(load_duq(path)(x[:4]), model(x[:4]))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_classifier(path)
    with pytest.raises(UnsafeCheckpointError):
        load_duq(path)
    assert not marker.exists()
