"""``python -m disc_pl.bench --quick`` end to end (no timing assertions: CI machines vary), and
the fused SIREN layer the bench motivated."""
from __future__ import annotations

import json

import pytest
import torch

from disc_pl import bench
from disc_pl.nets.siren import _SineAffine

PRIORS = {"tv", "dip", "inr", "warp"}


@pytest.mark.slow
def test_quick_bench_writes_every_field(tmp_path, capsys):
    report = bench.main(["--quick", "--threads", "1", "--device", "cpu", "--sizes", "32", "64", "--out", str(tmp_path)])
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
    # the reference matmul runs in the engine's precision (inversion.precision=auto: the CPU's)
    assert saved["matmul"]["dtype"] == {"32": "float32", "bf16-mixed": "bfloat16"}[saved["precision"]]
    assert saved["matmul"]["flops_per_s"] > 0 and saved["matmul"]["float32_flops_per_s"] > 0
    assert [z["image_size"] for z in saved["sizes"]] == [32, 64] and saved["sizes"][0]["throughput"] == saved["throughput"]
    for z in saved["sizes"]:
        assert {(t["prior"], t["batch_size"]) for t in z["throughput"]} == {(p, b) for p in PRIORS for b in (1, 2)}
        assert {f["prior"] for f in z["flops"]} == PRIORS and z["precision"] == saved["precision"]
        assert all(t["memory_per_query_mb"] is None or t["memory_per_query_mb"] >= 0 for t in z["throughput"])
    flops = {f["prior"]: f for f in saved["flops"]}
    assert set(flops) == PRIORS
    # The generator's FLOPs are counted: INR (an MLP per pixel) costs more than free pixels (tv).
    assert flops["inr"]["flops_per_step"] > flops["tv"]["flops_per_step"] > 0
    assert all(f["fraction_of_matmul"] > 0 for f in flops.values())
    assert set(saved["targets_met"]) == {"batched_over_sequential", "flops_fraction_of_matmul",
                                         "batched_over_sequential_cpu", "flops_fraction_of_matmul_cpu"}
    assert seq["ratio_cpu"] > 0 and all(f["fraction_of_matmul_cpu"] > 0 for f in flops.values())


@pytest.mark.slow
def test_end_to_end_times_a_cached_run_of_the_cli(tmp_path, toy_overrides):
    """bench.end_to_end: two ``disc_pl.run`` child processes (the first fills the model cache),
    the second timed; its figures come from that run's results.csv."""
    overrides = [o for o in toy_overrides if not o.startswith(("query.count=", "cache_dir="))]
    cache = next(o.split("=", 1)[1] for o in toy_overrides if o.startswith("cache_dir="))
    e = bench.end_to_end(3, 32, overrides, tmp_path, threads=1, cache_dir=cache)
    assert e["queries"] == 3 and e["image_size"] == 32 and "prior.hparams.sigma" not in e["command"]
    assert e["seconds"] > 0 and e["seconds_per_cf"] == pytest.approx(e["seconds"] / 3)
    # the engine's share is part of the command's time (the rest: start-up, loading, writing)
    assert 0 < e["engine_seconds_per_cf"] < e["seconds_per_cf"]
    assert e["precision"] in ("32", "bf16-mixed") and 0 <= e["flip_rate"] <= 1
    assert (tmp_path / "e2e_timed" / "results.csv").is_file() and (tmp_path / "e2e_first" / "results.csv").is_file()
    md = bench.markdown({**_minimal_report(), "end_to_end": e})
    assert "s per counterfactual** end to end" in md
    with pytest.raises(RuntimeError, match="end-to-end run failed"):
        bench.end_to_end(1, 32, [*overrides, "query.count=abc"], tmp_path / "bad", threads=1, cache_dir=cache)


def _minimal_report() -> dict:
    """The fields bench.markdown reads, with placeholder values (layout checks only)."""
    return {"device_name": "cpu", "threads": 1, "time": "t", "load_average_start": 0.0, "load_average_end": 0.0,
            "seconds": 1.0, "env": {"OMP_WAIT_POLICY": None}, "classifier": "c", "method": {}, "overrides": [],
            "recon_steps": 1, "stage_steps": 1, "precision_note": "p", "image_size": 32, "sizes": [],
            "batched_vs_sequential": {"queries": 1, "prior": "inr", "batched_s": 1.0, "sequential_s": 1.0,
                                      "ratio": 1.0, "batched_cpu_s": 1.0, "sequential_cpu_s": 1.0,
                                      "ratio_cpu": 1.0, "max_abs_diff": 0.0},
            "matmul": {"n": 2, "dtype": "float32", "flops_per_s": 1.0, "flops_per_cpu_s": 1.0,
                       "float32_flops_per_s": 1.0}, "memory_kind": "m"}


def test_fused_sine_layer_matches_autograd():
    """nets.siren._SineAffine: same forward as sin(omega * baddbmm) (omega folded into W and b,
    so equal up to round-off), same gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 3, generator=g, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 3, 4, generator=g, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 1, 4, generator=g, dtype=torch.double, requires_grad=True)
    assert torch.allclose(_SineAffine.apply(h, w, b, 30.0), torch.sin(30.0 * torch.baddbmm(b, h, w)),
                          rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: _SineAffine.apply(*t, 3.0), (h, w, b))
    # A frozen input (the Fourier features, a cached prefix) gets no gradient computed.
    out = _SineAffine.apply(h.detach(), w, b, 3.0)
    out.sum().backward()
    assert w.grad is not None and h.grad is None


def test_sine_layer_in_bf16_rounds_the_argument_once_and_returns_float32_gradients():
    """Under bf16 autocast the layer's output stays within the bf16 rounding of its argument of
    the float32 layer (|z| ~ 1 for SIREN init: 2^-8 relative), and the weight and bias gradients
    come back in float32, close to the float32 ones."""
    from disc_pl.nets.siren import BatchedLinear

    g = torch.Generator().manual_seed(0)
    layer = BatchedLinear(3, 64, 32, weight_bound=(6.0 / 64) ** 0.5 / 30.0, omega=30.0)
    for row in range(3):
        layer.reset_row(row, g)
    h = torch.rand(3, 200, 64, generator=g) * 2 - 1
    ref = layer(h)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in (layer.weight, layer.bias)]
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(h)
    assert low.dtype == torch.bfloat16
    low.float().square().sum().backward()
    assert (low.float() - ref).abs().max() < 0.05 and (low.float() - ref).abs().mean() < 0.01
    for p, r in zip((layer.weight, layer.bias), ref_grads):
        assert p.grad.dtype == torch.float32
        assert torch.linalg.vector_norm(p.grad - r) < 0.05 * torch.linalg.vector_norm(r)


def _cxx_available() -> bool:
    import shutil

    return shutil.which("g++") is not None


@pytest.mark.skipif(not _cxx_available(), reason="torch.compile on a CPU needs a C++ compiler (g++) here")
def test_compiled_sine_layers_equal_eager_ones_and_follow_a_shrinking_batch():
    """prior.hparams.compile=true: the INR's sine layers through torch.compile give the eager
    layers' output and parameter gradients (float32 round-off), also when rows are selected
    (the batch shrinks as queries finish: dynamic shapes, no wrong reuse of a compiled graph)."""
    from disc_pl.nets.siren import BatchedLinear

    g = torch.Generator().manual_seed(1)
    eager = BatchedLinear(4, 16, 8, weight_bound=(6.0 / 16) ** 0.5 / 30.0, omega=30.0)
    for row in range(4):
        eager.reset_row(row, g)
    fused = BatchedLinear(4, 16, 8, weight_bound=eager.weight_bound, omega=30.0, compile=True)
    fused.load_state_dict(eager.state_dict())
    h = torch.rand(4, 50, 16, generator=g) * 2 - 1
    for idx in (None, torch.tensor([0, 2, 3]), torch.tensor([1])):
        hs = h if idx is None else h[idx]
        outs = []
        for layer in (eager, fused):
            layer.zero_grad()
            out = layer(hs, idx)
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            outs.append((out.detach(), layer.weight.grad.clone(), layer.bias.grad.clone()))
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        rows = torch.arange(4) if idx is None else idx
        untouched = torch.ones(4, dtype=torch.bool)
        untouched[rows] = False
        assert torch.all(outs[1][1][untouched] == 0)  # rows not selected get no gradient


def test_inr_compile_option_is_validated_and_reaches_every_sine_layer():
    from disc_pl.cf.priors import INRPrior

    images = torch.rand(2, 3, 8, 8)
    prior = INRPrior(images, [0, 1], n_frequencies=4, hidden=8, depth=2, compile=True)
    sines = [m for m in prior.net.blocks.values() if m.omega is not None]
    assert len(sines) == 2 and all(m.compile for m in sines)
    assert not any(m.compile for m in INRPrior(images, [0, 1], n_frequencies=4, hidden=8, depth=2).net.blocks.values())
    with pytest.raises(ValueError, match="compile"):
        INRPrior(images, [0, 1], n_frequencies=4, hidden=8, depth=2, compile="yes")


def test_a_compile_that_cannot_build_stops_with_the_fix(monkeypatch):
    """No working C++ compiler: the first compiled step raises one error naming the option and
    the fix, instead of inductor's traceback (or a silent fall back to eager)."""
    import torch._inductor.config as inductor_config

    from disc_pl.nets.siren import BatchedLinear

    torch._dynamo.reset()  # no graph compiled by an earlier test may be reused
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    layer = BatchedLinear(2, 4, 3, weight_bound=0.1, omega=30.0, compile=True)
    with pytest.raises(RuntimeError, match=r"prior\.hparams\.compile=false"):
        layer(torch.rand(2, 5, 4)).sum().backward()
    torch._dynamo.reset()
