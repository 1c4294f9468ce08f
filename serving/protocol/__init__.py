"""What the model client and the model server share, so neither imports the other: TF Serving's
``models.config`` (``models_config``), TensorProto <-> numpy (``tensors``) and the errors with
their gRPC status codes (``errors``)."""
