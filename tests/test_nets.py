"""Networks: feature taps, normalisation inside, double backward, DUQ head maths."""

import math

import torch
import torch.nn.functional as F

from disc_pl.nets import DUQHead, DUQNet, LossPredictor, ResNet18


def test_resnet_taps_are_the_stage_outputs_and_feed_the_logits():
    torch.manual_seed(0)
    net = ResNet18(3, in_channels=3, width=4, small_input=True).eval()
    x = torch.rand(2, 3, 16, 16)
    logits, feats = net.forward_features(x)
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    # layer4 output, pooled through fc, is the logits; forward() agrees with forward_features().
    torch.testing.assert_close(net.fc(feats[-1].mean((2, 3))), logits)
    torch.testing.assert_close(net(x), logits)
    # torchvision stem (small_input=False) downsamples 4x before layer1.
    big = ResNet18(3, width=4, small_input=False).eval()
    assert big.forward_features(torch.rand(1, 3, 32, 32))[1][0].shape[-1] == 8


def test_normalisation_lives_inside_the_network():
    torch.manual_seed(0)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1]
    inner = ResNet18(2, width=4, mean=mean, std=std).eval()
    plain = ResNet18(2, width=4).eval()
    plain.load_state_dict(inner.state_dict() | {"mean": plain.mean, "std": plain.std})
    x = torch.rand(3, 3, 8, 8)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(inner(x), plain(normalised))
    assert "mean" in inner.state_dict() and "std" in inner.state_dict()


def test_double_backward_through_the_classifier():
    # DUQ's gradient penalty and the engine differentiate through input gradients.
    torch.manual_seed(0)
    net = ResNet18(2, width=4)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(net(x)[:, 1].sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(v).all() for v in grads)
    assert sum(v.abs().sum() for v in grads) > 0


def test_loss_predictor_pools_each_stage_then_combines():
    torch.manual_seed(0)
    pred = LossPredictor(in_channels=[2, 3], hidden=5)
    maps = [torch.rand(4, 2, 6, 6), torch.rand(4, 3, 3, 3)]
    out = pred(maps)
    assert out.shape == (4,)
    # Only the spatial means matter: flat [B, C] inputs give the same prediction.
    torch.testing.assert_close(pred([m.mean((2, 3)) for m in maps]), out)
    hand = pred.head(torch.cat([F.relu(b(m.mean((2, 3)))) for b, m in zip(pred.branches, maps)], 1)).squeeze(1)
    torch.testing.assert_close(out, hand)


def _identity_head(gamma: float) -> DUQHead:
    """2 classes, 2-d features, embedding 2, W_c = identity for both classes."""
    head = DUQHead(in_features=2, num_classes=2, embedding_size=2, length_scale=0.5, gamma=gamma)
    with torch.no_grad():
        head.W.copy_(torch.eye(2).unsqueeze(1).expand(2, 2, 2))  # W[e, c, i] = delta(e, i)
        head.N.fill_(1.0)
        head.m.zero_()  # centroids at the origin
    return head


def test_duq_centroid_ema_matches_the_formula():
    head = _identity_head(gamma=0.9)
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    onehot = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    head.update_centroids(feats, onehot)
    # N_c = 0.9 * 1 + 0.1 * n_c ; m_c = 0.9 * 0 + 0.1 * sum of class-c embeddings
    torch.testing.assert_close(head.N, torch.tensor([0.9 + 0.2, 0.9 + 0.1]))
    expected_m = torch.tensor([[0.1 * (1 + 3), 0.1 * 5], [0.1 * (2 + 4), 0.1 * 6]])  # [emb, K]
    torch.testing.assert_close(head.m, expected_m)
    torch.testing.assert_close(head.centroids, expected_m / torch.tensor([1.1, 1.0]))
    assert not head.m.requires_grad


def test_duq_kernel_matches_the_rbf_formula():
    head = _identity_head(gamma=0.9)
    with torch.no_grad():
        head.m.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # e_0 = (1, 1), e_1 = (0, 0)
    k = head(torch.tensor([[1.0, 1.0], [1.0, 3.0]]))
    # sample 0 sits on e_0: K_0 = 1; K_1 = exp(-mean(1, 1) / (2 * 0.25)) = exp(-2)
    # sample 1: K_0 = exp(-mean(0, 4) / 0.5) = exp(-4); K_1 = exp(-mean(1, 9) / 0.5) = exp(-10)
    expected = torch.tensor([[1.0, math.exp(-2)], [math.exp(-4), math.exp(-10)]])
    torch.testing.assert_close(k, expected)


def test_duq_net_outputs_kernel_values():
    torch.manual_seed(0)
    net = DUQNet(ResNet18(3, width=4), 3, embedding_size=8)
    k = net(torch.rand(2, 3, 8, 8))
    assert k.shape == (2, 3) and (k > 0).all() and (k <= 1).all()
