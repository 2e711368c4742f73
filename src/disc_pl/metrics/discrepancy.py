"""Classifier discrepancy (CD), SPEC section 6 / paper section 5.

For a binary task: X0 = N training images of class 0, X1 = N training images of class 1,
X1' = counterfactuals of X0 towards class 1. F is trained on [X0 (label 0), X1 (label 1)];
F_cf with the same recipe and seed on [X0 (label 0), X1' (label 1)]. Then

    CD = Acc(F; X_test) - Acc(F_cf; X_test)     (per seed; lower is better)

If the counterfactuals carry the class-1 evidence, F_cf learns the same decision rule and CD ~ 0.
If they are class-0 images in disguise, F_cf cannot separate the classes and CD ~ Acc(F) - 0.5.

The training recipe is a parameter (``train_fn``) so the evaluation job can plug in the real
classifier training; ``make_logistic_trainer`` is a small deterministic default for tests and
toy runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrainFn", "accuracy", "classifier_discrepancy", "make_logistic_trainer"]

# train_fn(images [N, ...], labels long [N], seed) -> model; model(images) -> logits [N, K]
TrainFn = Callable[[Tensor, Tensor, int], Callable[[Tensor], Tensor]]


@torch.no_grad()
def accuracy(model: Callable[[Tensor], Tensor], images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` whose prediction equals ``labels``.

    The prediction is ``argmax`` of ``[N, K]`` logits; a single logit per sample (``[N]`` or
    ``[N, 1]``) is read as a binary classifier and thresholded at 0. ``nn.Module`` models are put
    in eval mode first.
    """
    if isinstance(model, nn.Module):
        model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        if logits.dim() == 1 or logits.shape[1] == 1:
            pred = (logits.reshape(-1) > 0).long()
        else:
            pred = logits.argmax(dim=1)
        correct += int((pred.cpu() == labels[start : start + batch_size].cpu()).sum())
    return correct / len(images)


def classifier_discrepancy(
    train_fn: TrainFn,
    x0: Tensor,
    x1: Tensor,
    x1_cf: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 256,
) -> dict[str, Any]:
    """CD of counterfactuals ``x1_cf`` (made from ``x0``) against real class-1 images ``x1``.

    x0, x1, x1_cf, x_test: ``[N, ...]`` images (any N each, one sample shape); y_test: ``[M]``
    labels in {0, 1}. For each seed, F = ``train_fn(cat[x0, x1], [0.., 1..], seed)`` and
    F_cf = ``train_fn(cat[x0, x1_cf], [0.., 1..], seed)``; both are scored on the test set.

    Returns ``{"cd_mean", "cd_std", "acc_real", "acc_cf", "per_seed"}``: floats, ``acc_*`` the
    means over seeds, ``cd_std`` the population std over seeds (``correction=0``, like the metric
    classes; 0 for one seed), and ``per_seed`` a list of
    ``{"seed", "acc_real", "acc_cf", "cd"}`` in the order of ``seeds``.
    """
    if not seeds:
        raise ValueError("seeds must not be empty")
    for name, t in (("x0", x0), ("x1", x1), ("x1_cf", x1_cf), ("x_test", x_test)):
        if len(t) == 0:
            raise ValueError(f"{name} is empty")
        if t.shape[1:] != x0.shape[1:]:
            raise ValueError(f"{name} has sample shape {tuple(t.shape[1:])}, x0 has {tuple(x0.shape[1:])}")
    if len(y_test) != len(x_test):
        raise ValueError(f"x_test has {len(x_test)} samples but y_test has {len(y_test)}")

    def labelled(neg: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        labels = torch.cat([torch.zeros(len(neg)), torch.ones(len(pos))]).long().to(neg.device)
        return torch.cat([neg, pos]), labels

    real = labelled(x0, x1)
    cf = labelled(x0, x1_cf)
    per_seed = []
    for seed in seeds:
        acc_real = accuracy(train_fn(*real, int(seed)), x_test, y_test, batch_size)
        acc_cf = accuracy(train_fn(*cf, int(seed)), x_test, y_test, batch_size)
        per_seed.append({"seed": int(seed), "acc_real": acc_real, "acc_cf": acc_cf, "cd": acc_real - acc_cf})

    def column(key: str) -> Tensor:
        return torch.tensor([row[key] for row in per_seed], dtype=torch.float64)

    cds = column("cd")
    return {
        "cd_mean": float(cds.mean()),
        "cd_std": float(cds.std(correction=0)),
        "acc_real": float(column("acc_real").mean()),
        "acc_cf": float(column("acc_cf").mean()),
        "per_seed": per_seed,
    }


def make_logistic_trainer(
    epochs: int = 50,
    lr: float = 0.05,
    batch_size: int = 64,
    num_classes: int = 2,
    init_std: float = 0.01,
) -> TrainFn:
    """A ``train_fn`` for ``classifier_discrepancy``: multinomial logistic regression on flat pixels.

    Plain PyTorch, CPU-friendly. Deterministic for a seed: the initial weights (normal with
    ``init_std``, zero bias) and the minibatch order come from a ``torch.Generator`` seeded with
    ``seed``, never from the global RNG, so equal data and seed give bit-identical models.
    Trained with Adam on cross-entropy for ``epochs`` passes over shuffled minibatches.
    """

    def train(images: Tensor, labels: Tensor, seed: int) -> nn.Module:
        gen = torch.Generator().manual_seed(seed)
        # Outside inference mode so that tensors from a Lightning test/predict step can be trained on.
        with torch.inference_mode(False), torch.enable_grad():
            images = images.detach().clone().flatten(1).float()
            labels = labels.detach().clone().long()
            dim = images.shape[1]
            model = nn.Linear(dim, num_classes)
            with torch.no_grad():
                model.weight.copy_(torch.randn(num_classes, dim, generator=gen) * init_std)
                model.bias.zero_()
            model.to(images.device)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            for _ in range(epochs):
                order = torch.randperm(len(images), generator=gen).to(images.device)
                for start in range(0, len(images), batch_size):
                    idx = order[start : start + batch_size]
                    loss = F.cross_entropy(model(images[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return nn.Sequential(nn.Flatten(), model).eval()

    return train
