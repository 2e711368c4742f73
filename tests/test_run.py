"""``python -m disc_pl.run`` end to end at toy size: outputs, resume after interruption."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import TOY_INR, TOY_MODEL, compose_cfg

from disc_pl import run as run_lib

# Toy sizes (conftest.py): tiny data and models, a short INR schedule; the session's model cache.
# The toy INR schedule is too short to flip a query inside the gate: these tests check the
# run's plumbing, so they keep the ungated retry (off by default) to have flipped rows.
TOY = [*TOY_MODEL, *TOY_INR, "query.count=6", "query.batch_size=3", "localize.fallback=true"]


@pytest.mark.slow
def test_cli_writes_results(tmp_path, cache_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "disc_pl.run", *TOY, f"cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 == metrics["cf/queries"]
    assert {r["status"] for r in rows} <= {"flipped", "not_flipped", "diverged"}
    assert metrics["cf/flip_rate"] == sum(r["flipped"] == "True" for r in rows) / 6
    assert metrics["cf/flip_rate"] >= 0.5
    assert all(r["source"] == "not_smiling" and r["target"] == "smiling" for r in rows)
    assert "in_mask" in rows[0] and "gt_distance" in rows[0]  # synthetic data has ground truth
    saved = torch.load(out / "counterfactuals.pt", weights_only=True)
    assert saved["counterfactual"].shape == (6, 3, 32, 32)
    assert (out / "grid.png").stat().st_size > 0


@pytest.mark.slow
def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, cache_dir, monkeypatch):
    from disc_pl.cf import module as module_lib

    cfg = compose_cfg([*TOY, f"cache_dir={cache_dir}"])
    real = module_lib.generate_counterfactuals
    calls = []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(module_lib, "generate_counterfactuals", dies_on_second_batch)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_lib.run(cfg, out_dir=tmp_path)
    parts = list((tmp_path / "parts").glob("part-*.pt"))
    assert len(parts) == 1  # the first batch survived the kill, nothing half-written
    assert not list((tmp_path / "parts").glob(".*tmp"))

    calls.clear()
    monkeypatch.setattr(module_lib, "generate_counterfactuals", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    metrics = run_lib.run(cfg, out_dir=tmp_path)
    assert calls == [3]  # only the unfinished batch was recomputed
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    ids = [int(r["query_id"]) for r in rows]
    assert len(ids) == 6 and len(set(ids)) == 6 and metrics["cf/queries"] == 6
