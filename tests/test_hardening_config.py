"""Hardening, config: every bad value fails at start-up, before data or models are built, with
one message naming the key, the bad value and what is allowed (disc_pl.validate)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from disc_pl import run as run_lib
from disc_pl.errors import ConfigError

from conftest import TOY_MODEL, compose_cfg
from hardening_support import entries, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models on one thread


def run_fails(tmp_path, overrides: list[str]) -> ConfigError:
    """run.run raises ConfigError and trained nothing (the cache dir stays empty)."""
    cache = tmp_path / "cache"
    cfg = compose_cfg([*TOY_MODEL, *overrides, f"cache_dir={cache}"])
    with pytest.raises(ConfigError) as info:
        run_lib.run(cfg, out_dir=tmp_path / "out")
    assert entries(cache) == [], "a model was trained before the config error"
    return info.value


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["prior=gan"])
    msg = str(info.value)
    assert "prior/gan" in msg and "Available options in 'prior'" in msg
    assert all(name in msg for name in ("dip", "inr", "tv"))


def test_misspelled_key_is_rejected_by_struct_config_and_by_validation(tmp_path):
    assert OmegaConf.is_struct(compose_cfg([]))
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["inversion.stepz_per_stage=5"])
    assert "inversion.stepz_per_stage" in str(info.value)
    # added with `+`, Hydra accepts it: validation rejects it and lists the real keys
    err = run_fails(tmp_path, ["+inversion.stepz_per_stage=5"])
    assert err.key == "inversion.stepz_per_stage" and err.value == 5
    assert "unknown key" in str(err) and "steps_per_stage" in err.allowed
    err = run_fails(tmp_path, ["+quary.count=3"])
    assert err.key == "quary" and "query" in err.allowed


@pytest.mark.parametrize("overrides, key, shown, allowed", [
    (["query.count=abc"], "query.count", "'abc'", "must be an integer >= 1"),
    (["query.batch_size=0"], "query.batch_size", "0", "must be an integer >= 1"),
    (["query.split=training"], "query.split", "'training'", "must be one of train, val, test"),
    (["inversion.steps_per_stage=0"], "inversion.steps_per_stage", "0", "must be an integer >= 1"),
    (["prior.lr=0"], "prior.lr", "0", "must be a number > 0"),
    (["prior.lr=-1e-3"], "prior.lr", "-0.001", "must be a number > 0"),
    (["inversion.target_margin=1.5"], "inversion.target_margin", "1.5", "< 1"),
    (["inversion.target_confidence=0.1"], "inversion.target_confidence", "0.1", "must be >= inversion.target_margin"),
    (["inversion.target_confidence=1.0"], "inversion.target_confidence", "1.0", "must be null or a number in [0, 1)"),
    (["term=[eot]", "term.eot.views=0"], "term.eot.views", "0", "must be an integer >= 1"),
    (["term=[eot]", "term.eot.hflip=maybe"], "term.eot.hflip", "'maybe'", "must be true or false"),
    (["query.source=smiling", "query.target=smiling"], "query.target", "'smiling'",
     "must differ from query.source='smiling'"),
    (["seed=-1"], "seed", "-1", "must be an integer in 0..4294967295"),
    (["cpu_allocator=jemalloc"], "cpu_allocator", "'jemalloc'", "must be one of retain, system"),
    (["models.classifier.use_dep=false"], "models.classifier.use_dep", "false",
     "manifold=robust needs the classifier's DEP loss predictor: set models.classifier.use_dep=true"),
    (["manifold=dep", "models.classifier.use_dep=false"], "models.classifier.use_dep", "false",
     "manifold=dep needs the classifier's DEP loss predictor: set models.classifier.use_dep=true"),
    (["localize.grid=64"], "localize.grid", "64", "cannot be finer than the 32x32 image"),
    (["localize.grid=0"], "localize.grid", "0", "must be an integer >= 1"),
    (["localize.lambda_area=-1"], "localize.lambda_area", "-1", "must be a number >= 0"),
    (["localize=none", "+localize.grid=8"], "localize.grid", "8", "unknown key (a typo?); arguments of "
     "disc_pl.cf.gate.no_gate: _target_, name"),
    (["space.layers=[]"], "space.layers", "[]", "must be a non-empty list of feature-map indices"),
    (["space.layers=[0,4]"], "space.layers", "[0, 4]", "the classifier exposes 4 feature maps"),
    (["manifold=duq", "manifold.margin=-1"], "manifold.margin", "-1", "must be a number >= 0"),
    (["manifold.lambda_mc=-0.1"], "manifold.lambda_mc", "-0.1", "must be a number >= 0"),
    (["query.memory_fraction=1.5"], "query.memory_fraction", "1.5", "must be a number > 0 and <= 1 (or null)"),
    (["inversion.precision=bf16"], "inversion.precision", "'bf16'", "must be one of auto, 32, bf16-mixed, 16-mixed"),
    (["inversion.precision=16-mixed"], "inversion.precision", "'16-mixed'", "needs a CUDA device"),
])
def test_bad_value_fails_before_any_work(tmp_path, overrides, key, shown, allowed):
    err = run_fails(tmp_path, overrides)
    assert err.key == key
    assert f"{key}={shown}" in str(err) and allowed in str(err)


def test_all_problems_are_reported_at_once(tmp_path):
    err = run_fails(tmp_path, ["query.count=abc", "inversion.steps_per_stage=-2", "prior.lr=0"])
    assert [p.key for p in err.problems] == ["query.count", "inversion.steps_per_stage", "prior.lr"]
    assert str(err).startswith("invalid config (3 problems):")


def test_image_size_the_prior_cannot_handle_names_size_and_valid_sizes(tmp_path):
    err = run_fails(tmp_path, ["prior=dip", "prior.hparams.scales=5", "dataset.image_size=24"])
    assert err.key == "prior.hparams.scales" and err.value == 5
    msg = str(err)
    assert "24x24" in msg
    assert "multiples of 32 and at least 64" in msg and "64, 96, 128" in msg
    assert "1 <= scales <= 3" in msg  # what fits 24 px instead


def test_stage_groups_the_prior_does_not_have(tmp_path):
    err = run_fails(tmp_path, ["prior=inr", "prior.hparams.depth=2"])  # inr's stages name hidden2
    assert err.key == "prior.stages[1]" and err.value == ["hidden2", "out"]
    assert "hidden0, hidden1, out" in err.allowed


@pytest.mark.parametrize("overrides, key, hint", [
    (["prior=tv", "+prior.recon.sizes=[16]"], "prior.recon.sizes", "full size only"),
    (["prior=dip", "+prior.sizes=[16,null,null]"], "prior.sizes", "full size only"),
    (["prior=inr", "prior.early_size=null", "prior.sizes=[16,null]"], "prior.sizes", "one entry per stage"),
    (["prior=inr", "prior.sizes=[16,null,null]"], "prior.early_size", "must be null when prior.sizes"),
    (["prior=dip", "+prior.early_size=16"], "prior.early_size", "full size only"),
    (["prior=inr", "prior.early_size=2"], "prior.early_size", ">= 4"),
    (["prior=inr", "prior.recon.sizes=[2]"], "prior.recon.sizes", ">= 4"),
])
def test_coarse_to_fine_grids_the_prior_cannot_render(tmp_path, overrides, key, hint):
    err = run_fails(tmp_path, overrides)
    assert err.key == key and hint in str(err)


@pytest.mark.parametrize("fallback", ["inr", 3])
def test_prior_fallback_must_be_a_composed_prior_config(tmp_path, fallback):
    """prior.fallback is a prior config composed by Hydra (+prior@prior.fallback=inr): a name or a
    number set as a value is refused with the way to choose one."""
    err = run_fails(tmp_path, ["prior=inr", f"+prior.fallback={fallback}"])
    assert err.key == "prior.fallback" and err.value == fallback
    assert "+prior@prior.fallback=<dip|inr|tv|warp>" in err.allowed


def test_a_fallback_priors_settings_are_checked_like_the_priors(tmp_path):
    err = run_fails(tmp_path, ["prior=warp", "prior.fallback.lr=0", "prior.fallback.hparams.depth=-1"])
    assert [p.key for p in err.problems][:1] == ["prior.fallback.lr"]
    err = run_fails(tmp_path, ["prior=inr", "+prior@prior.fallback=warp"])  # warp brings its own INR fallback
    assert err.key == "prior.fallback.fallback" and "prior.fallback.fallback=null" in err.allowed


def test_prior_semantic_weight_must_be_a_non_negative_number(tmp_path):
    err = run_fails(tmp_path, ["prior.lambda_sem=-1"])  # space.lambda_sem, which defaults to it, too
    bad = {p.key: p for p in err.problems}
    assert bad["prior.lambda_sem"].value == -1 and ">= 0" in bad["prior.lambda_sem"].allowed


def test_unknown_generator_hparam_lists_the_parameters(tmp_path):
    err = run_fails(tmp_path, ["prior=inr", "+prior.hparams.hiden=3"])
    assert err.key == "prior.hparams.hiden" and "hidden" in err.allowed and "n_frequencies" in err.allowed


@pytest.mark.parametrize("overrides, key, value, allowed", [
    (["query.target=frowning"], "query.target", "frowning", "allowed: 0=not_smiling, 1=smiling"),
    (["query.source=7"], "query.source", 7, "allowed: 0=not_smiling, 1=smiling"),
    (["query.source=1", "query.target=smiling"], "query.target", "smiling", "same class as query.source"),
    (["query.indices=[3,100000]"], "query.indices", [100000], "must be in 0..299"),
])
def test_query_classes_and_indices_are_checked_against_the_data_before_training(
        tmp_path, overrides, key, value, allowed):
    err = run_fails(tmp_path, overrides)
    assert (err.key, err.value) == (key, value) and allowed in str(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is visible")
def test_gpu_trainer_without_a_gpu(tmp_path):
    err = run_fails(tmp_path, ["trainer=gpu"])
    assert err.key == "trainer.accelerator" and "use trainer=cpu" in str(err)


@pytest.mark.slow
def test_cli_shows_the_message_and_exits_nonzero(tmp_path):
    """What the user sees on the command line (without HYDRA_FULL_ERROR)."""
    cache = tmp_path / "cache"
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "disc_pl.run", "query.count=abc", f"cache_dir={cache}",
                           f"hydra.run.dir={tmp_path / 'out'}", "logger=none"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one message, usage status
    assert "invalid config: query.count='abc': must be an integer >= 1" in proc.stderr
    assert entries(cache) == []


def test_config_error_survives_pickling(tmp_path):
    """Sweep launchers (joblib, submitit) send a job's exception to the parent process."""
    import pickle

    err = run_fails(tmp_path, ["query.count=abc", "prior.lr=0"])
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.problems == err.problems and again.key == "query.count"


def test_unknown_key_added_to_a_group_option(tmp_path):
    err = run_fails(tmp_path, ["manifold=duq", "+manifold.margn=1"])
    assert err.key == "manifold.margn" and "lambda_mc, margin, name" in err.allowed


def test_every_shipped_option_and_experiment_passes_validation():
    """The checks must never reject what the repository ships (options, experiments, evaluate)."""
    from pathlib import Path

    from disc_pl.validate import validate_run_config, validate_train_config

    conf = Path(run_lib.CONF_DIR)
    gpu = {"gpu"} if not torch.cuda.is_available() else set()  # refused without a GPU (tested above)
    overrides = [[f"{group}={p.stem}"] for group in ("dataset", "prior", "manifold", "space", "trainer", "logger")
                 for p in sorted((conf / group).glob("*.yaml")) if not (group == "trainer" and p.stem in gpu)]
    overrides += [["prior=dip", "dataset=celeba"], ["manifold=duq", "dataset=folder"]]
    for ov in overrides:
        validate_run_config(compose_cfg([*ov, "cache_dir=/unused"]))
    for p in sorted((conf / "experiment").glob("*.yaml")):
        for name in ("run", "evaluate"):
            validate_run_config(compose_cfg([f"experiment={p.stem}", "cache_dir=/unused"], name))
    for model in ("classifier", "duq"):
        validate_train_config(compose_cfg([f"model={model}", "cache_dir=/unused"], "train"))


def test_localize_none_has_no_gate_keys_to_set():
    """localize=none builds no gate: its grid cannot be set (no `grid 0 = off` twin of the option)."""
    with pytest.raises(ConfigCompositionException, match="grid"):
        compose_cfg(["localize=none", "localize.grid=8"])


def test_a_prior_without_its_reconstruction_settings_is_refused(tmp_path):
    err = run_fails(tmp_path, ["~prior.recon.psnr_target"])
    assert err.key == "prior.recon.psnr_target" and "must be set" in err.allowed


@pytest.mark.parametrize("value, key, hint", [
    ("[{alpha_smooth:-1}]", "prior.retry_hparams[0]", "alpha_smooth"),
    ("[{smoothness:0.1}]", "prior.retry_hparams[0]", "smoothness"),
    ("[3]", "prior.retry_hparams", "mappings"),
])
def test_a_priors_relaxations_are_checked_against_its_hparams(tmp_path, value, key, hint):
    """prior.retry_hparams: each entry must still build the prior (probed), so a bad change is
    refused before any training, naming the entry."""
    err = run_fails(tmp_path, ["prior=warp", f"prior.retry_hparams={value}"])
    assert err.key == key and hint in str(err)
