"""Results that mean what they say: config-stamped parts, aggregates over flipped queries,
precision set once per job, stale locks of dead hosts broken."""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from disc_pl import job, tracking
from disc_pl.cf.results import check_config_stamp, write_config_stamp, write_part
from disc_pl.errors import ConfigError
from disc_pl.models.cache import file_lock


def _row(status: str, mse: float, steps: int = 10) -> dict:
    return {"status": status, "flipped": status == "flipped", "mse": mse, "target_prob": 0.9 if status == "flipped" else 0.3,
            "initial_prob": 0.1, "steps": steps, "seconds": 1.0}


def test_summary_figures_are_over_flipped_queries_and_the_rest_is_counted():
    rows = [_row("flipped", 0.02), _row("flipped", 0.04), _row("not_flipped", 0.5, 30),
            _row("diverged", 0.0, 3)]  # a diverged query comes back as itself: mse 0
    m = job.summarize(rows)
    assert m["cf/queries"] == 4 and m["cf/flip_rate"] == 0.5
    assert (m["cf/n_flipped"], m["cf/n_not_flipped"], m["cf/n_diverged"]) == (2, 1, 1)
    assert m["cf/mse"] == pytest.approx(0.03) and m["cf/mse_std"] == pytest.approx(0.01)
    assert m["cf/target_prob"] == pytest.approx(0.9)
    assert m["cf/steps"] == pytest.approx((10 + 10 + 30 + 3) / 4)  # cost: over every query
    none_flipped = job.summarize([_row("not_flipped", 0.5)])
    assert "cf/mse" not in none_flipped and none_flipped["cf/n_not_flipped"] == 1


def test_unflipped_queries_the_gate_left_are_counted():
    rows = [{**_row("flipped", 0.02), "localized": True}, {**_row("not_flipped", 0.5), "localized": True},
            {**_row("not_flipped", 0.5), "localized": False}, {**_row("diverged", 0.0), "localized": True}]
    m = job.summarize(rows)
    assert m["cf/n_not_flipped_localized"] == 1  # the ungated retry's attempt and a divergence are not
    assert "cf/n_not_flipped_localized" not in job.summarize([{**_row("not_flipped", 0.5), "localized": ""}])


def test_ground_truth_recovery_has_a_median_beside_the_mean():
    """One query with a tiny true change (recovery -17) drags the mean below 0; the median
    shows where most counterfactuals are. Over the flipped queries only, NaN skipped."""
    rec = [0.2, 0.4, -17.0, float("nan"), 0.1]
    rows = [{**_row("flipped", 0.01), "gt_recovery": r} for r in rec] + [{**_row("not_flipped", 0.5), "gt_recovery": 0.9}]
    m = job.summarize(rows)
    assert m["cf/gt_recovery"] == pytest.approx((0.2 + 0.4 - 17.0 + 0.1) / 4)
    assert m["cf/gt_recovery_median"] == pytest.approx((0.1 + 0.2) / 2)
    assert m["cf/gt_recovery_positive"] == pytest.approx(3 / 4)
    assert "cf/mse_median" not in m


def test_result_config_ignores_what_does_not_change_a_result():
    base = compose_cfg(["cache_dir=/a", "logger=none"])
    same = compose_cfg(["cache_dir=/b", "logger=csv", "query.count=3", "query.batch_size=1",
                        "trainer.enable_progress_bar=false", "output.grid_max=2"])
    assert job.result_config(base) == job.result_config(same)
    other = job.result_config(compose_cfg(["cache_dir=/a", "inversion.relax=0.9"]))
    assert {k for k in other if other[k] != job.result_config(base)[k]} == {"inversion.relax"}


def test_parts_made_under_another_config_are_refused_naming_the_keys(tmp_path):
    made = {"inversion.relax": 0.5, "prior.name": "inr", "seed": 0}
    write_config_stamp(tmp_path, made)
    check_config_stamp(tmp_path, {"prior.name": "tv", "inversion.relax": 0.9, "seed": 0})  # no parts yet: fine
    write_part(tmp_path, 0, [{"query_id": 1}], torch.tensor([1]), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    check_config_stamp(tmp_path, dict(made))  # the same config resumes
    with pytest.raises(ConfigError) as info:
        check_config_stamp(tmp_path, {"prior.name": "tv", "inversion.relax": 0.9, "seed": 0})
    assert [p.key for p in info.value.problems] == ["inversion.relax", "prior.name"]
    assert "were made with prior.name=\"inr\"" in str(info.value) and "hydra.run.dir=" in str(info.value)


@pytest.mark.slow
def test_rerun_with_other_overrides_refuses_before_any_work(tmp_path, toy_overrides, monkeypatch):
    from disc_pl.cf import module as module_lib

    job.run(compose_cfg([*toy_overrides, "query.count=2"]), out_dir=tmp_path)
    calls: list[int] = []
    real = module_lib.generate_counterfactuals
    monkeypatch.setattr(module_lib, "generate_counterfactuals", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with pytest.raises(ConfigError, match="inversion.relax"):
        job.run(compose_cfg([*toy_overrides, "query.count=4", "inversion.relax=0.9"]), out_dir=tmp_path)
    assert calls == []
    metrics = job.run(compose_cfg([*toy_overrides, "query.count=4"]), out_dir=tmp_path)  # same config: resumes
    assert metrics["cf/queries"] == 4 and len(calls) == 1


def test_precision_is_set_once_at_the_start_of_every_job(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    with tracking.tracked_job(OmegaConf.create({"threads_per_job": None})):
        assert calls == ["high"]  # before the job's work, whether or not a model gets trained
    assert calls == ["high"]


def test_lock_of_a_dead_host_is_broken_by_its_age(tmp_path):
    lock = tmp_path / ".entry.lock"
    lock.write_text("some-other-host 4242\n")
    with pytest.raises(TimeoutError):  # fresh: its holder may be alive on the other host
        with file_lock(lock, timeout_s=0.3, poll_s=0.05, stale_after_s=60):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))  # nobody refreshed it for 2 minutes: that host is gone
    with file_lock(lock, timeout_s=5, poll_s=0.05, stale_after_s=60):
        assert lock.read_text().split() == [socket.gethostname(), str(os.getpid())]
    assert not lock.exists()


def test_a_held_lock_keeps_its_age_fresh(tmp_path):
    lock = tmp_path / ".entry.lock"
    with file_lock(lock, poll_s=0.05, stale_after_s=0.2):  # refreshed every 0.05 s
        old = time.time() - 3600
        os.utime(lock, (old, old))
        deadline = time.monotonic() + 30
        while lock.stat().st_mtime < time.time() - 60:  # wait for the refresh (a state, not a time)
            assert time.monotonic() < deadline, "the holder never refreshed its lock"
            time.sleep(0.02)
