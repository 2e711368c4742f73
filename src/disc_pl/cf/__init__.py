"""The counterfactual engine: priors, per-query optimiser, losses, engine, persistence.

The Python API (no Hydra needed)::

    from disc_pl.cf import generate_counterfactuals, InversionOptions, Stage, DEPManifold
"""
from disc_pl.cf.engine import (CounterfactualBatch, InversionOptions, PriorFallback, Stage,
                               generate_counterfactuals, is_flipped)
from disc_pl.cf.gate import GateOptions
from disc_pl.cf.losses import (DEPManifold, DUQManifold, LatentSpace, PixelSpace, SemanticLoss, SemanticSpace,
                               functional_loss)
from disc_pl.cf.objective import (AreaTerm, FunctionalTerm, ManifoldTerm, PriorTerm, SemanticTerm, Step, Term,
                                  default_objective)
from disc_pl.cf.priors import DIPPrior, INRPrior, Prior, TVPrior, build_prior

__all__ = ["CounterfactualBatch", "InversionOptions", "PriorFallback", "Stage", "generate_counterfactuals", "is_flipped",
           "DEPManifold", "DUQManifold", "SemanticLoss", "functional_loss", "Prior", "TVPrior", "DIPPrior",
           "INRPrior", "build_prior", "Term", "Step", "SemanticTerm", "ManifoldTerm", "FunctionalTerm",
           "PriorTerm", "AreaTerm", "default_objective", "GateOptions", "SemanticSpace", "LatentSpace",
           "PixelSpace"]
