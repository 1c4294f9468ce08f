"""A local model server that speaks TF Serving's gRPC API.

``PredictionService`` (Predict, GetModelMetadata) and ``ModelService`` (GetModelStatus,
HandleReloadConfigRequest) from the ``tensorflow-serving-api`` protos, over the same
``models.config`` text format and ``<base_path>/<version>/`` layout, so every client and every
test can be pointed at the real ``tensorflow/serving`` image unchanged.

Modules, one job each:

* ``versions`` one loaded version: load, warm-up, signature cache, in-flight accounting
* ``manager``  one model: version policy over the polled base path, loads/unloads, labels
* ``core``     all models: config reloads and label checks (TF Serving's ``ServerCore``)
* ``service``  the gRPC servicers
* ``server``   wiring: gRPC server, health service, pollers, graceful stop
* ``cli``      ``streamrec model-server``, with ``tensorflow_model_server``'s flags

What the model client shares with it (models.config, TensorProto conversion, errors with their
gRPC codes) lives in ``serving.protocol``.
"""
