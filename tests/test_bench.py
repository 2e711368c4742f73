"""``python -m disc_pl.bench --quick`` end to end (no timing assertions: CI machines vary), and
the fused SIREN layer the bench motivated."""
from __future__ import annotations

import json

import pytest
import torch

from disc_pl import bench
from disc_pl.nets.siren import _SineAffine

PRIORS = {"tv", "dip", "inr"}


@pytest.mark.slow
def test_quick_bench_writes_every_field(tmp_path, capsys):
    report = bench.main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert str(tmp_path / "bench.json") in printed and "Batched vs sequential" in printed
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (tmp_path / "bench.md").read_text().startswith("# disc_pl bench")

    for key in ("device", "device_name", "threads", "torch", "classifier", "precision_note", "memory_kind",
                "recon_steps", "stage_steps", "peak_memory_mb", "targets", "targets_met", "seconds",
                "load_average_start", "load_average_end", "env"):
        assert key in saved, key
    assert saved["device"] == "cpu" and saved["threads"] == 1 and saved["quick"] is True
    assert {(t["prior"], t["batch_size"]) for t in saved["throughput"]} == {(p, b) for p in PRIORS for b in (1, 2)}
    for t in saved["throughput"]:
        assert t["cf_per_s"] > 0 and t["peak_memory_mb"] > 0 and t["cf_steps"] == 3  # 3 stages x 1 step

    seq = saved["batched_vs_sequential"]
    assert seq["prior"] == "inr" and seq["queries"] == 2 and seq["ratio"] > 0
    assert seq["max_abs_diff"] < 1e-4  # batched and one-at-a-time give the same counterfactuals

    assert {s["prior"] for s in saved["step_split"]} == PRIORS
    for s in saved["step_split"]:  # the real engine step, profiled: the gate of the run config included
        for part in (*bench.STEP_PARTS, "other"):
            assert s[f"{part}_ms"] >= 0 and 0 <= s[f"{part}_fraction"]
        assert s["gate"] is True and s["gate_ms"] > 0  # conf/run.yaml: localize=gate
        for part in ("generator", "classifier", "objective", "backward", "optimizer"):
            assert s[f"{part}_ms"] > 0, (s["prior"], part)
    assert saved["matmul"]["dtype"] == "float32" and saved["matmul"]["flops_per_s"] > 0
    flops = {f["prior"]: f for f in saved["flops"]}
    assert set(flops) == PRIORS
    # The generator's FLOPs are counted: INR (an MLP per pixel) costs more than free pixels (tv).
    assert flops["inr"]["flops_per_step"] > flops["tv"]["flops_per_step"] > 0
    assert all(f["fraction_of_matmul"] > 0 for f in flops.values())
    assert set(saved["targets_met"]) == {"batched_over_sequential", "flops_fraction_of_matmul",
                                         "batched_over_sequential_cpu", "flops_fraction_of_matmul_cpu"}
    assert seq["ratio_cpu"] > 0 and all(f["fraction_of_matmul_cpu"] > 0 for f in flops.values())


def test_fused_sine_layer_matches_autograd():
    """nets.siren._SineAffine: same forward as sin(omega * baddbmm), same gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 3, generator=g, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 3, 4, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 1, 4, generator=g, dtype=torch.double, requires_grad=True)
    assert torch.equal(_SineAffine.apply(h, w, b, 30.0), torch.sin(30.0 * torch.baddbmm(b, h, w)))
    assert torch.autograd.gradcheck(lambda *t: _SineAffine.apply(*t, 3.0), (h, w, b))
    # A frozen input (the Fourier features, a cached prefix) gets no gradient computed.
    out = _SineAffine.apply(h.detach(), w, b, 3.0)
    out.sum().backward()
    assert w.grad is not None and h.grad is None
