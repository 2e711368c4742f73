"""examples/own_classifier at toy size: the plain-PyTorch script trains a torchvision ResNet-18 on a
generated folder, then the one disc_pl command of its README explains it with the default method
(its models trained by disc_pl's recipes) and judges on a second folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose_cfg
from hardening_support import subprocess_env
from own_images import make_own_folder

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_classifier"
# The README's command, and what keeps it small here (sizes, schedules, ensemble sizes).
TOY = ["dataset.image_size=16", "dataset.num_workers=0", "dataset.batch_size=8", "logger=none",
       "trainer.enable_progress_bar=false", "prior=tv", "inversion.steps_per_stage=12", "inversion.min_steps=2",
       "prior.lr=0.02", "query.count=2", "query.batch_size=2", "query.require_correct=false", "manifold.k=1",
       "models.classifier.posthoc_dep.epochs=3", "judge.k=2", "judge.epochs=1", "judge.width=4", "judge.robust.k=0",
       "judge.realism.epochs=1", "cd.n_per_class=4", "cd.seeds=[0]", "cd.recipe.epochs=1", "cd.max_test=8",
       "validity.pgd.steps=2", "validity.cout_steps=4"]


def _readme_command() -> list[str]:
    """The disc_pl command of step 3 of the example's README, as arguments."""
    text = (EXAMPLE / "README.md").read_text()
    block = text.split("## 3. Explain", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ").split()


@pytest.mark.slow
def test_own_classifier_example_trains_and_is_explained(tmp_path):
    images, judge_images = tmp_path / "images", tmp_path / "judge_images"
    make_own_folder(images / "train", per_class=16, seed=0)
    make_own_folder(images / "test", per_class=4, seed=1)
    make_own_folder(judge_images, per_class=12, seed=2)
    env = subprocess_env()
    weights = tmp_path / "weights.pt"
    proc = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--root", str(images), "--epochs", "1",
                           "--image-size", "16", "--out", str(weights)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights.is_file() and "32 images of 2 classes ['cat', 'dog']" in proc.stdout  # images/train only

    command = _readme_command()
    assert command[:3] == ["python", "-m", "disc_pl.evaluate"]
    args = [a.replace("$PWD", str(tmp_path)) for a in command[3:]]
    assert "dataset.image_size=64" in args  # the README's size; the toy run overrides it below
    manifold = compose_cfg([]).manifold  # the default method: what its models are, at toy size
    toy = [*TOY, *(["manifold.recipe.epochs=2", "manifold.recipe.warmup_epochs=0", "manifold.recipe.ramp_epochs=1",
                    "manifold.recipe.steps=1"] if "recipe" in manifold else [])]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "disc_pl.evaluate", *args, *toy, f"cache_dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cf/queries"] == 2
    # the models the default manifold needs are trained by disc_pl's recipes, into the cache
    trained = {"surrogates": "classifier-*", "robust": "robust-*"}.get(str(manifold.name))
    if trained:
        assert len(list((tmp_path / "cache").glob(trained))) == 1  # manifold.k=1
    if manifold.name == "surrogates":
        assert metrics["manifold/surrogates_recipe"] == "disc_pl"
    assert "cf/judge_flip_rate" in metrics and "cd/mean" in metrics
    assert (out / "grid.png").is_file() and (out / "results.csv").is_file()
    judges = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("judge-*/config.json")]
    assert len(judges) == 2 and {j["data"]["root"] for j in judges} == {str(judge_images)}
