"""Serving: the recommendation API (``serving.api``), the TF Serving client (``serving.model_client``
on ``serving.model_rpc``), a local TF-Serving-compatible model server (``serving.model_server``),
what the client and that server share (``serving.protocol``) and the A/B evaluator that moves the
labels (``serving.rollout``).

Importing this package is cheap; TensorFlow is only imported by the modules that need it.
"""
