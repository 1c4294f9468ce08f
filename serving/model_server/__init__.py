"""A local model server that speaks TF Serving's gRPC API.

``PredictionService`` (Predict, GetModelMetadata) and ``ModelService`` (GetModelStatus,
HandleReloadConfigRequest) from the ``tensorflow-serving-api`` protos, over the same
``models.config`` text format and ``<base_path>/<version>/`` layout, so every client and every
test can be pointed at the real ``tensorflow/serving`` image unchanged.

Modules, one job each:

* ``config``   models.config parsing, validation and atomic writing
* ``tensors``  TensorProto <-> numpy, fast paths for the dtypes the project uses
* ``errors``   errors that carry their gRPC status code and TF Serving's wording
* ``versions`` one loaded version: load, warm-up, signature cache, in-flight accounting
* ``manager``  one model: version policy over the polled base path, loads/unloads, labels
* ``service``  the gRPC servicers
* ``server``   wiring: gRPC server, health service, pollers, graceful stop
"""
