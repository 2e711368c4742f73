"""A new objective term is one class and one yaml (issue 30): nothing else in disc_pl changes."""
from __future__ import annotations

import analytic
import torch

from conftest import compose_cfg
from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals
from disc_pl.job import inversion_options
from disc_pl.validate import validate_run_config

TERM = '''
import torch
from disc_pl.cf.objective import Term


class Brightness(Term):
    """How far the counterfactual's mean brightness is from ``level``."""

    name = "brightness"

    def __init__(self, weight=1.0, level=0.5):
        super().__init__(weight)
        if not 0 <= level <= 1:
            from disc_pl.errors import ConfigError
            raise ConfigError.one("term.brightness.level", level, "must be in [0, 1]")
        self.level = level

    def __call__(self, step, state):
        return (step.x.float().mean((1, 2, 3)) - self.level).abs()
'''


def test_a_new_term_is_one_class_and_one_yaml(tmp_path, monkeypatch):
    (tmp_path / "my_terms.py").write_text(TERM)
    (tmp_path / "conf" / "term").mkdir(parents=True)
    (tmp_path / "conf" / "term" / "brightness.yaml").write_text(
        "brightness:\n  _target_: my_terms.Brightness\n  weight: 2.0\n  level: 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose_cfg(["term=[brightness,palette]", search, "term.brightness.level=0.25"])
    validate_run_config(cfg)
    options, _ = inversion_options(cfg)
    brightness = options.terms[0]
    assert [t.name for t in options.terms] == ["brightness", "palette"]
    assert (brightness.weight, brightness.level) == (2.0, 0.25)
    # its own argument check surfaces at start-up like every other key's
    bad = compose_cfg(["term=[brightness]", search, "term.brightness.level=3"])
    try:
        validate_run_config(bad)
        raise AssertionError("term.brightness.level=3 was accepted")
    except ValueError as err:
        assert "term.brightness.level=3: must be in [0, 1]" in str(err)

    # the engine sums it with its weight and logs it by name
    x, t = analytic.patch_queries(2)
    opts = InversionOptions(space="iso", lambda_sem=10.0, lr=1e-3, recon_steps=0, target_confidence=None,
                            fallback=None, retry_hparams=(), gate=None, stages=[Stage(["pixels"], 20, 3)], log_every=1,
                            terms=[brightness])
    logged: list[dict] = []
    out = generate_counterfactuals(analytic.PatchReader(), x, t, prior="tv", options=opts, on_log=logged.append)
    assert "cf/loss_brightness" in logged[0] and "brightness" in out.losses
    expected = (out.images.mean((1, 2, 3)) - 0.25).abs()
    torch.testing.assert_close(out.losses["brightness"], expected, atol=1e-6, rtol=0)
