"""A TF Serving stand-in for tests: the official servicer classes + real TensorFlow.

Built on ``tensorflow_serving.apis`` (PredictionServiceServicer,
ModelServiceServicer) and the real exported SavedModels, it answers Predict,
GetModelMetadata and GetModelStatus the way TensorFlow Serving does: latest
version by default, a pinned version or a version label, NOT_FOUND for unknown
models and versions, ``output_filter``. Faults for tests: ``delay_s`` (a slow
server) and ``stop()`` / ``start()`` on the same port (a server that goes away
and comes back).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow.core.protobuf import meta_graph_pb2

from contract.layout import existing_versions

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_CACHE: dict[Path, object] = {}


def load(path: Path):
    """``tf.saved_model.load``, once per path per test session (loading is the slow part)."""
    path = path.resolve()
    if path not in _CACHE:
        _CACHE[path] = tf.saved_model.load(str(path))
    return _CACHE[path]


class StandIn(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, base_path: Path, models: list[str], labels: dict[str, dict[str, int]] | None = None,
                 config: Path | None = None):
        """Serves every version on disk, or, with ``config`` (a models.config), the versions its
        policy lists and its labels, as TF Serving does with --model_config_file."""
        self.base_path, self.models = base_path, models
        self.config = None
        self.loaded: dict[str, dict[int, object]] = {}
        if config is not None:
            from serving.model_config import ModelsConfig

            self.config = ModelsConfig(config)
            self._apply()
            labels = labels or self.labels
        else:
            self.loaded = {name: {v: load(base_path / name / str(v)) for v in existing_versions(base_path / name)}
                           for name in models}
        self.labels = labels or {}
        self._following: threading.Thread | None = None
        self._stop_following = threading.Event()
        self.delay_s = 0.0
        # What GetModelStatus reports, per model or (model, version): AVAILABLE unless a test says otherwise.
        self.state: dict = {}
        # Every Predict: (model, version, {input name: ndarray}).
        self.calls: list[tuple[str, int, dict]] = []
        self.request_ids: list[str | None] = []  # the x-request-id metadata of each Predict
        self.traceparents: list[str | None] = []  # the W3C traceparent metadata of each Predict
        self.port = 0
        self.server: grpc.Server | None = None

    # -- life cycle -------------------------------------------------------------
    def start(self, port: int = 0, options: list[tuple[str, int]] | None = None) -> int:
        """Serve on ``port`` (0: a free one; later starts reuse it); ``options`` are gRPC server arguments,
        e.g. TF Serving's --grpc_channel_arguments."""
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port or self.port}")
        self.server.start()
        return self.port

    def stop(self) -> None:
        self._stop_following.set()
        if self.server:
            self.server.stop(grace=None).wait()
            self.server = None

    def _apply(self) -> None:
        """Serve what the models.config's policies choose, with its labels (TF Serving loads new
        versions before it serves them, and unloads removed ones)."""
        chosen = {name: self.config.policy(name).choose(existing_versions(self.base_path / name)) for name in self.models}
        self.loaded = {name: {v: self.loaded.get(name, {}).get(v) or load(self.base_path / name / str(v)) for v in vs}
                       for name, vs in chosen.items()}
        self.labels = {name: self.config.labels(name) for name in self.models}

    def follow(self, poll_s: float = 0.2) -> None:
        """Re-read the models.config every ``poll_s`` in a thread, as --model_config_file_poll_wait_seconds."""
        def run():
            while not self._stop_following.wait(poll_s):
                if self.config.refresh():
                    self._apply()

        self._following = threading.Thread(target=run, name="standin-config", daemon=True)
        self._following.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- servable lookup, as TF Serving's ServerCore does ---------------------------
    def _servable(self, spec, context):
        versions = self.loaded.get(spec.name)
        if not versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            v = spec.version.value
            if v not in versions:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {v})")
        elif choice == "version_label":
            v = self.labels.get(spec.name, {}).get(spec.version_label)
            if v is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}")
        else:
            v = max(versions)
        return v, versions[v]

    # -- PredictionService ------------------------------------------------------------
    def Predict(self, request, context):
        if self.delay_s:
            time.sleep(self.delay_s)
        version, model = self._servable(request.model_spec, context)
        name = request.model_spec.signature_name or "serving_default"
        if name not in model.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{name}\" not found in signature def")
        sig = model.signatures[name]
        expected = set(sig.structured_input_signature[1])
        if set(request.inputs) != expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input keys {sorted(request.inputs)} != {sorted(expected)}")
        inputs = {k: tf.make_ndarray(t) for k, t in request.inputs.items()}
        self.calls.append((request.model_spec.name, version, inputs))
        metadata = dict(context.invocation_metadata())
        self.request_ids.append(metadata.get("x-request-id"))
        self.traceparents.append(metadata.get("traceparent"))
        outputs = sig(**{k: tf.constant(v) for k, v in inputs.items()})
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = name
        for key, value in outputs.items():
            if not request.output_filter or key in request.output_filter:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response

    def GetModelMetadata(self, request, context):
        version, model = self._servable(request.model_spec, context)
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        for name, sig in model.signatures.items():
            sd = sigmap.signature_def[name]
            sd.method_name = "tensorflow/serving/predict"
            for key, spec in sig.structured_input_signature[1].items():
                info = sd.inputs[key]
                info.name, info.dtype = f"{name}_{key}:0", spec.dtype.as_datatype_enum
                info.tensor_shape.CopyFrom(spec.shape.as_proto())
            for key, spec in sig.structured_outputs.items():
                info = sd.outputs[key]
                info.name, info.dtype = f"StatefulPartitionedCall:{key}", spec.dtype.as_datatype_enum
                info.tensor_shape.CopyFrom(spec.shape.as_proto())
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(sigmap)
        return response

    # -- ModelService -----------------------------------------------------------------
    def GetModelStatus(self, request, context):
        spec = request.model_spec
        versions = self.loaded.get(spec.name)
        if not versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
        if spec.WhichOneof("version_choice") == "version":
            if spec.version.value not in versions:
                context.abort(grpc.StatusCode.NOT_FOUND, f"Could not find version {spec.version.value} of model {spec.name}")
            wanted = [spec.version.value]
        else:
            wanted = sorted(versions)
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in wanted:
            response.model_version_status.add(version=v, state=self.state.get((spec.name, v), self.state.get(spec.name, AVAILABLE)))
        return response


assert meta_graph_pb2  # the stand-in fills tensorflow.SignatureDef through SignatureDefMap
