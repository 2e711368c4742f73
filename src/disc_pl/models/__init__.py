"""LightningModules that train networks, the model cache and bring-your-own classifiers.

- ``classifier.ClassifierModule``: ResNet-18 + DEP loss predictor (CE + ranking loss).
- ``duq.DUQModule``: ResNet-18 trunk + DUQ RBF head (BCE + gradient penalty, EMA centroids).
- ``cache.ensure_model`` / ``load_classifier`` / ``load_duq``: content-addressed checkpoints,
  loaded with ``weights_only=True``.
- ``byo``: wrap a user's torchvision / TorchScript classifier, fit a post-hoc DEP head.

Submodules are imported on use (``from disc_pl.models.cache import ensure_model``), so
importing one does not pull in the others.
"""
