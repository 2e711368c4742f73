"""LightningModules that train networks, the model cache and bring-your-own classifiers.

- ``classifier.ClassifierModule``: ResNet-18 + DEP loss predictor (CE + ranking loss).
- ``duq.DUQModule``: ResNet-18 trunk + DUQ RBF head (BCE + gradient penalty, EMA centroids).
- ``loading.load_classifier`` / ``load_duq`` / ``safe_load``: checkpoints loaded with
  ``weights_only=True``.
- ``fit.train_model``: training as a library (the train entry point and the cache use it).
- ``cache.ensure_model``: content-addressed checkpoints, filled by the ``train_fn`` it is handed.
- ``byo``: wrap a user's torchvision / TorchScript classifier, fit a post-hoc DEP head.

Submodules are imported on use (``from disc_pl.models.cache import ensure_model``), so
importing one does not pull in the others.
"""
