"""The core: what computes a score, the same online, in batch and in training.

Events and their columns (:mod:`~app.core.events`), the event-type vocabulary
(:mod:`~app.core.vocabulary`), the featurizer and the windowing rules
(:mod:`~app.core.features`), the bundle (:mod:`~app.core.bundle`), the ONNX Runtime
scorer (:mod:`~app.core.scorer`), the batch engine that scores whole logs
(:mod:`~app.core.batch_engine`), decisions and thresholds (:mod:`~app.core.decisions`),
progress and logs (:mod:`~app.core.progress`, :mod:`~app.core.logs`).

The core imports no web framework, no Redis client and no PyTorch (import-linter contract
``core`` in pyproject.toml): the service (the rest of :mod:`app`) and the offline
pipeline (:mod:`model_export`) both build on it.
"""
