"""Mixed precision of the inversion (disc_pl.cf.precision, inversion.precision)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from disc_pl.cf import precision as amp
from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals, is_flipped

SMALL_INR = dict(n_frequencies=32, sigma=3.0, first_omega0=3.0, hidden=32, depth=2)


class LinearReader(nn.Module):
    """Class-1 logit = a fixed linear read-out of the pixels (an ``F.linear``, which autocast
    runs in bf16, unlike an elementwise product): the analytic classifier for mixed precision."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        w = torch.full((1, 3 * size * size), 1.0 / (3 * size * size))
        self.register_buffer("w", w)

    def forward_features(self, x):
        s = nn.functional.linear(x.flatten(1) - 0.5, self.w).squeeze(1) * 200.0 - 2.0
        return torch.stack([torch.zeros_like(s), s], 1), [x]

    def forward(self, x):
        return self.forward_features(x)[0]


def _queries(n: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(0)
    x = (0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, torch.ones(n, dtype=torch.long)


def _opts(precision: str) -> InversionOptions:
    return InversionOptions(space="iso", lambda_sem=1.0, lr=1e-3, recon_steps=60, psnr_target=30.0,
                            stages=[Stage(["out"], 60, 2), Stage(["all"], 60, 2)], gate=None,
                            target_margin=0.2, target_confidence=None, fallback=None, retry_hparams=(), precision=precision)


def test_choices_are_checked_and_auto_follows_the_hardware(monkeypatch):
    assert amp.normalize(32) == amp.normalize("32-true") == "32"
    with pytest.raises(ValueError, match="inversion.precision='bf16' is not one of auto, 32, bf16-mixed"):
        amp.normalize("bf16")
    with pytest.raises(ValueError, match="16-mixed needs a CUDA device .*use bf16-mixed or 32 on a CPU"):
        amp.resolve("16-mixed", "cpu")
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    assert amp.resolve("auto", "cpu") == "bf16-mixed"
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    assert amp.resolve("auto", "cpu") == "32"
    assert amp.resolve("bf16-mixed", "cpu") == "bf16-mixed"  # asked for: emulated where not native
    with pytest.raises(ValueError, match="inversion.precision"):
        InversionOptions(precision="fp8")


def test_bf16_inversion_flips_an_analytic_classifier_judged_in_float32():
    """bf16-mixed runs the INR and the classifier in bf16 (the sine layers' bf16 path and the
    classifier's bf16 linear), keeps the result in float32, and counts a query as flipped only
    when the float32 classifier agrees on the returned image."""
    model = LinearReader()
    x, t = _queries()
    ref = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR, options=_opts("32"))
    low = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR, options=_opts("bf16-mixed"))
    assert ref.precision == "32" and low.precision == "bf16-mixed"
    assert low.images.dtype == torch.float32 and low.target_prob.dtype == torch.float32
    assert low.status == ref.status == ["flipped"] * 3
    with torch.no_grad():
        assert is_flipped(model(low.images), t, 0.2).all()
    # the bf16 fit reaches the PSNR target like the float32 one (a stale autocast weight cache
    # once froze the output layer inside the reconstruction: 27 dB against 30)
    assert (low.recon_psnr - ref.recon_psnr).abs().max() < 1.0, (low.recon_psnr, ref.recon_psnr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed runs on CUDA only (no CUDA device here)")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_cuda_mixed_precision_flips_an_analytic_classifier(precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this CUDA device has no bf16")
    model = LinearReader().cuda()
    x, t = (v.cuda() for v in _queries())
    out = generate_counterfactuals(model, x, t, prior="inr", prior_hparams=SMALL_INR, options=_opts(precision))
    assert out.precision == precision and out.status == ["flipped"] * 3
    with torch.no_grad():
        assert is_flipped(model(out.images.cuda()), t, 0.2).all()
