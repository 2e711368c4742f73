"""``python -m disc_pl.run prior=inr manifold=dep`` — the main job: counterfactuals for the
queries of one dataset split (what it does and writes: ``disc_pl.job``)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from disc_pl import tracking
from disc_pl.job import (build_logger, build_manifold, inversion_options, load_run_classifier,  # noqa: F401
                         run, select_queries, summarize)
from disc_pl.utils import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
def main(cfg: DictConfig) -> float:
    return tracking.tracked_figure(cfg, run, "cf/flip_rate")


if __name__ == "__main__":
    from disc_pl import cli

    cli.hydra_entry(main)  # a user error: its message and exit status 2
