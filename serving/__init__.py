"""Serving: the recommendation API (``serving.api``), the TF Serving client (``serving.model_client``)
and a local TF-Serving-compatible model server (``serving.model_server``).

Importing this package is cheap; TensorFlow is only imported by the modules that need it.
"""
