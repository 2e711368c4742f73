"""What a user sees on the console (``disc_pl.console``, ``disc_pl.cf.progress``): a run ends
with its summary, third-party noise stays off unless ``debug=true``, and generation reports
progress inside a batch (stage, step, flipped so far, ETA) without flooding the console."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import analytic
import pytest
import torch
from conftest import FAST_TV, TOY_MODEL

from disc_pl import console
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals
from disc_pl.cf.progress import QueryProgress

# The figures of a finished run (what disc_pl.job.run returns), without judges.
RUN = {"cf/queries": 16, "cf/flip_rate": 0.9375, "cf/n_flipped": 15, "cf/n_not_flipped": 1, "cf/n_diverged": 0,
       "cf/seconds": 12.345, "cf/seconds_std": 1.0, "cf/mse": 0.01, "env/cpu": "some cpu"}
JUDGED = {**RUN, "cf/judge_flip_rate": 0.83, "cf/judge_flip_rate_std": 0.02, "cf/judge_target_prob": 0.8,
          "cf/judge_target_prob_std": 0.05, "judge/acc": 0.95, "judge/k": 3, "judge/query_flip_rate": 0.0}
NOISE = ("Tip", "litlogger", "DeprecationWarning", "FutureWarning", "deprecated", "GPU available", "TPU available",
         "will save all targets and predictions", "wandb:")


def test_summary_says_flip_rate_time_and_the_files_that_exist(tmp_path):
    for name in ("grid.png", "results.csv", "metrics.json"):
        (tmp_path / name).write_text("x")
    text = console.summary(RUN, tmp_path)
    lines = text.splitlines()
    assert "16" in lines[0]  # the title counts the queries
    assert "flip rate       0.938  (15 of 16 flipped, 1 not flipped)" in lines
    assert "time            12.35 s per counterfactual" in lines
    for name in ("grid.png", "results.csv", "metrics.json"):
        assert any(line.endswith(str(tmp_path / name)) for line in lines), name
    assert "judge" not in text and "report" not in text and "discrepancy" not in text  # not judged, no report
    assert "diverged" not in text  # a zero count is not worth a word

    (tmp_path / "report.html").write_text("x")
    judged = console.summary(JUDGED, tmp_path)
    assert "judges agree    0.830 ± 0.020  (target prob 0.800 ± 0.050; 3 judges' clean accuracy 0.950; " \
           "on the unchanged queries 0.000)" in judged.splitlines()
    assert judged.splitlines()[-1].endswith(str(tmp_path / "report.html"))
    robust = console.summary({**JUDGED, "cf/judge_robust_flip_rate": 0.25, "cf/judge_robust_target_prob": 0.3}, None)
    assert "robust judges   0.250  (target prob 0.300)" in robust.splitlines()  # another panel of judges


def test_summary_says_how_to_retry_what_no_localized_edit_flipped():
    gated = console.summary({**RUN, "cf/n_not_flipped_localized": 1}, None)
    assert "localize.fallback=true" in gated  # a gated run left a query unflipped: the way to retry it
    assert "localize.fallback" not in console.summary(RUN, None)  # no gate: nothing to retry
    none_flipped = {**RUN, "cf/n_not_flipped_localized": 16, "cf/n_not_flipped": 16, "cf/n_flipped": 0,
                    "cf/flip_rate": 0.0}
    assert "localize.fallback=true" in console.summary(none_flipped, None)  # also when nothing flipped
    all_flipped = {**RUN, "cf/n_not_flipped_localized": 0, "cf/n_not_flipped": 0, "cf/n_flipped": 16, "cf/flip_rate": 1.0}
    assert "localize.fallback" not in console.summary(all_flipped, None)


def test_summary_of_an_evaluation_and_of_nothing(tmp_path):
    evaluated = console.summary({**RUN, "cd/mean": 0.12, "cd/std": 0.03, "cd/acc_real": 0.9, "cd/acc_cf": 0.78}, None)
    assert "discrepancy     0.120 ± 0.030  (classifier accuracy real 0.900, counterfactual 0.780)" in evaluated
    assert console.summary({}, tmp_path) == ""  # a rank > 0 of a DDP job: nothing to say
    nan = console.summary({"cf/queries": 2, "cf/flip_rate": float("nan")}, None)
    assert "flip rate       n/a" in nan


def test_quiet_silences_known_noise_for_the_job_only(monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    lightning = logging.getLogger("pytorch_lightning")
    before = lightning.level

    def emit() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with console.quiet(False):
                warnings.warn("Metric `SpearmanCorrcoef` will save all targets and predictions in the buffer.",
                              UserWarning, stacklevel=1)
                warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="torch.utils._pytree")
                warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module="pytorch_lightning.utilities")
                warnings.warn("disc_pl's own warning", UserWarning, stacklevel=1)
                assert os.environ["WANDB_SILENT"] == "true"
                assert not lightning.isEnabledFor(logging.INFO)  # GPU/TPU lines and tips are INFO
        return [str(w.message) for w in caught]

    assert emit() == ["disc_pl's own warning"]  # ours still show
    assert lightning.level == before and "WANDB_SILENT" not in os.environ  # restored after the job

    monkeypatch.setenv("WANDB_SILENT", "false")  # the user's own choice is kept
    with console.quiet(False):
        assert os.environ["WANDB_SILENT"] == "false"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with console.quiet(True):  # debug=true: everything as it comes
            warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="torch.utils._pytree")
    assert len(caught) == 1


def test_the_engine_reports_where_each_step_stands():
    """PatchReader's evidence is local but the gate's area weight here too high: the gated pass
    flips nothing, the ungated retry (a second pass, its steps counted from 1 again) flips all."""
    x, t = analytic.patch_queries(3)
    opts = InversionOptions(space="iso", lambda_sem=10.0, lr=1e-3, recon_steps=0, target_margin=0.2,
                            target_confidence=None, fallback=None,
                            retry_hparams=(), gate=GateOptions(lambda_area=50.0, fallback=True),
                            stages=[Stage(["pixels"], 30, 3), Stage(["pixels"], 30, 3)], log_every=1)
    logged: list[dict] = []
    out = generate_counterfactuals(analytic.PatchReader(), x, t, prior="tv", options=opts, on_log=logged.append)
    first = logged[0]
    assert (first["cf/stage"], first["cf/stages"], first["cf/step"], first["cf/stage_steps"]) == (0, 2, 1, 30)
    assert first["cf/global_step"] == 1 and first["cf/steps_left"] == 59 and first["cf/pass_queries"] == 3
    steps = [s["cf/global_step"] for s in logged]
    assert steps[:61] == [*range(1, 61), 1]  # the gated pass ran its budget; the retry starts again
    assert {(s["cf/stage"], s["cf/step"], s["cf/steps_left"]) for s in logged[:60]} == \
        {(g // 30, g % 30 + 1, 59 - g) for g in range(60)}
    assert all(s["cf/flipped"] == 0 for s in logged[:60]) and out.status == ["flipped"] * 3
    retry = [s["cf/flipped"] for s in logged[60:]]
    assert retry == sorted(retry) and retry[-1] == 3  # flipped so far: never fewer, all by the last step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _stats(global_step: int, flipped: int, per_stage: int = 100, stages: int = 3) -> dict:
    return {"cf/stage": (global_step - 1) // per_stage, "cf/stages": stages,
            "cf/step": (global_step - 1) % per_stage + 1, "cf/stage_steps": per_stage, "cf/global_step": global_step,
            "cf/steps_left": per_stage * stages - global_step, "cf/flipped": flipped, "cf/pass_queries": 4,
            "cf/loss_total": 1.0}


def test_progress_inside_a_batch_logs_stage_step_flipped_and_eta_every_few_seconds(caplog):
    clock = Clock()
    progress = QueryProgress(8, clock=clock, log_seconds=15.0)
    trainer = SimpleNamespace(is_global_zero=True, num_predict_batches=[2], progress_bar_callback=None,
                              world_size=1, logger=None)
    caplog.set_level(logging.INFO, logger="disc_pl.cf.progress")
    progress.on_predict_start(trainer, None)
    progress.on_predict_batch_start(trainer, None, {"query_id": [0, 1, 2, 3]}, 0)
    for i, step in enumerate(range(10, 180, 10)):  # a logged step every second: 0.1 s per step
        clock.now = 20.0 + i
        progress.on_inversion_step(trainer, None, _stats(step, flipped=min(3, i // 4)))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "cf/progress batch 1/2: fitting the generators to 4 queries"
    assert lines[1] == "cf/progress batch 1/2: stage 1/3 step 10/100, 0/4 flipped, ETA ?"  # no rate yet
    # 15 s later: 140 steps left at 0.1 s, then one more batch as long as this one (35 s + 14 s)
    assert lines[2] == "cf/progress batch 1/2: stage 2/3 step 60/100, 3/4 flipped, ETA 1m03s"
    assert len(lines) == 3  # 17 steps in 16 s, one line per 15 s


def test_progress_inside_a_batch_goes_to_the_bar_at_most_once_a_second():
    from pytorch_lightning.callbacks import TQDMProgressBar

    class Bar:
        def __init__(self) -> None:
            self.postfix: list[str] = []

        def set_postfix_str(self, text: str) -> None:
            self.postfix.append(text)

    bar = TQDMProgressBar()
    bar._predict_progress_bar = Bar()
    clock = Clock()
    trainer = SimpleNamespace(is_global_zero=True, num_predict_batches=[1], progress_bar_callback=bar,
                              world_size=1, logger=None)
    progress = QueryProgress(4, clock=clock)
    progress.on_predict_start(trainer, None)
    progress.on_predict_batch_start(trainer, None, {"query_id": [0, 1, 2, 3]}, 0)
    for step in range(10, 310, 10):  # a logged step every 0.25 s
        clock.now += 0.25
        progress.on_inversion_step(trainer, None, _stats(step, flipped=1))
    shown = bar._predict_progress_bar.postfix
    assert shown[0] == "batch 1/1: fitting the generators to 4 queries"
    assert 7 <= len(shown) - 1 <= 8  # 7.5 s of steps
    assert shown[-1].startswith("batch 1/1: stage 3/3 step ") and ", 1/4 flipped, ETA 0m0" in shown[-1]


@pytest.mark.slow
def test_a_run_ends_with_its_summary_and_prints_no_third_party_noise(tmp_path, cache_dir):
    """The default run (bar on, the default manifold) at toy size, as a user's console sees it."""
    out = tmp_path / "run"
    overrides = [o for o in [*TOY_MODEL, *FAST_TV] if not o.startswith(("query.count=", "trainer.enable_progress_bar"))]
    cmd = [sys.executable, "-m", "disc_pl.run", *overrides, "query.count=4", "query.batch_size=4",
           f"cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, env=env)
    text = proc.stdout
    assert proc.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if line.startswith("── disc_pl"))
    summary = lines[start:]
    assert len(summary) <= 8, summary  # short, and nothing after it
    assert summary[1].startswith("flip rate ")
    assert summary[-1] == f"metrics         {out / 'metrics.json'}"
    assert f"results         {out / 'results.csv'}" in summary
    for word in NOISE:
        assert word not in text, word
    assert torch.load(out / "counterfactuals.pt", weights_only=True)["counterfactual"].shape[0] == 4
