"""The Open Inference Protocol ("V2", KServe / Triton / MLServer) over the core.

Shared by the REST adapter (serving/api/rest/v2_endpoints.py) and the gRPC one
(serving/api/grpc/v2_servicer.py): each turns its wire format into
:class:`~serving.tensor.Tensor` values and back; the data plane here turns tensors into a
core request and a result into tensors, by the model's kind (which inputs it takes, their
checks, its outputs: serving/kinds/), and the work itself is the core's, so the limits,
admission and error messages are those of ``/v1``. A Triton-style ``timeout`` parameter
(microseconds) shortens the request's deadline on both protocols.

Inputs (exactly one per request):

- sentiment models: ``text`` BYTES ``[n]`` (or ``[n, 1]``) of UTF-8 texts, tokenised by
  the gateway as on ``/v1``; or ``token_ids`` INT32/INT64 ``[n, maxlen]`` for clients that
  tokenise themselves (ids below the vocabulary size).
- digits: ``image`` UINT8/FP32 (any integer or float type) ``[n, 28, 28]`` of pixels
  0..255 (white digit on black, as MNIST); or ``image_encoded`` BYTES ``[n]`` of PNG/JPEG
  of any size (made MNIST-like as on ``/v1``).

Outputs: ``probabilities`` FP32 ``[n, classes]`` and ``label`` (BYTES ``[n]`` for the
sentiment models, INT64 ``[n]`` for digits); all of them unless the request names some.
Request parameter ``whole_text: true`` (sentiment, ``text`` input): every window of each
text is scored and combined as on /v1; output ``windows`` INT32 ``[n]`` says how many.

Versions are strings in this protocol: a number, or a version label from
models.config (``stable``, ``canary``); none means the default version, as on ``/v1``.

Triton's extensions, the same on both protocols (shapes: Triton's JSON field names):

- model repository: the index lists every configured model's versions and their state
  (READY, LOADING, UNLOADING, UNAVAILABLE with the reason); *load* of a configured model
  succeeds without doing anything once it is ready (this gateway serves what its
  configuration names, loaded at start); *unload*, and *load* with a config or files, are
  :class:`~serving.errors.Unsupported` saying so; an unknown model is NotFound.
- statistics: per model version, counted by the core for every protocol (serving/statistics.py).
- model configuration: name, platform, max_batch_size (``max_items_per_request``), the inputs
  and outputs without their batch dimension, and the dynamic batcher's delay.
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

from contract.repository import ModelVersion
from serving import kinds
from serving.core import Classifier
from serving.errors import InvalidInput, NotFound, Unavailable, Unsupported
from serving.request import Predict, Result
from serving.tensor import ElementLimit, Tensor

SERVER_NAME = "classifier-gateway"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]
# The repository index's state of a version, by its backend state (TF Serving's, and the embedded
# backend's LOADING -> WARMING -> AVAILABLE | FAILED).
INDEX_STATES = {"AVAILABLE": "READY", "START": "LOADING", "LOADING": "LOADING", "WARMING": "LOADING",
                "UNLOADING": "UNLOADING", "END": "UNAVAILABLE", "FAILED": "UNAVAILABLE"}


@dataclass
class InferResponse:
    model: str
    version: int
    outputs: list[Tensor]


@functools.cache
def _package_version() -> str:
    """Read from the installed distribution's metadata once (it does not change while serving)."""
    try:
        return importlib.metadata.version("classifier-service")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


class DataPlane:
    def __init__(self, core: Classifier):
        self.core = core

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": _package_version(), "extensions": EXTENSIONS}

    @staticmethod
    def parse_version(version: str | None) -> tuple[int | None, str | None]:
        """A protocol version string: '' -> default, digits -> that version, else a version label."""
        if not version:
            return None, None
        if version.isdigit() and version.isascii():
            return int(version), None
        return None, version

    def _versions(self, name: str) -> dict[int, ModelVersion]:
        """A configured model's versions; NotFound naming the models for any other name."""
        versions = self.core.models().get(name)
        if versions is None:
            raise NotFound(f"unknown model {name[:100]!r}; models: {sorted(self.core.models())}")
        return versions

    def kind(self, name: str) -> str:
        """The kind of a configured model (its versions'), known before the request body is read."""
        versions = self._versions(name)
        if not versions:
            raise NotFound(f"model {name!r} has no version")
        return next(iter(versions.values())).kind

    def model_version(self, name: str, version: str | None) -> ModelVersion:
        """The version a request names (loaded or not), or NotFound naming what exists."""
        versions = self._versions(name)
        number, label = self.parse_version(version)
        if number == 0:
            raise NotFound(f"model {name!r} has no version 0; loaded versions: {sorted(versions)}")
        if number is None and label is None and not versions:
            raise NotFound(f"model {name!r} has no version")
        number = self.core.version_number(name, versions, number, label)
        if number not in versions:
            raise NotFound(f"model {name!r} has no version {number}; loaded versions: {sorted(versions)}")
        return versions[number]

    def model_ready(self, name: str, version: str | None) -> bool:
        v = self.model_version(name, version)
        return v.state == "AVAILABLE" and not self.core.draining

    def model_metadata(self, name: str, version: str | None) -> dict:
        v = self.model_version(name, version)
        versions = self.core.models()[name]
        inputs, outputs = kinds.get(v.kind).v2_io(v)
        return {
            "name": name,
            "versions": [str(n) for n in sorted(versions)] if not version else [str(v.version)],
            "platform": "tensorflow_savedmodel",
            "inputs": inputs,
            "outputs": outputs,
        }

    # -- Triton's extensions: model repository, statistics, model configuration ---------------
    def repository_index(self, ready_only: bool = False, repository: str = "") -> list[dict]:
        """Every configured model's versions with their state (``ready_only``: the READY ones)."""
        self._one_repository(repository)
        out = []
        for name, versions in sorted(self.core.models().items()):
            for number, v in sorted(versions.items()):
                state = INDEX_STATES.get(v.state, "UNAVAILABLE")
                if ready_only and state != "READY":
                    continue
                entry = {"name": name, "version": str(number), "state": state}
                reason = v.error or ("" if state == "READY" else f"version state {v.state}")
                if reason:
                    entry["reason"] = reason
                out.append(entry)
        return out

    def load(self, name: str, parameters: dict | None = None, repository: str = "") -> None:
        """Nothing to do for a configured model that is ready: this gateway serves what its
        configuration names. Unsupported with a config or files; NotFound for any other model;
        Unavailable while its default version is not ready yet."""
        self._one_repository(repository)
        versions = self._versions(name)
        if parameters:
            raise Unsupported(f"loading model {name[:100]!r} with parameters {sorted(parameters)[:10]} (a config or "
                              f"files) is not supported: {self._served_by()}")
        number = self.core.default_version(name, versions) if versions else None
        v = versions.get(number) if number is not None else None
        if v is None or v.state != "AVAILABLE":
            state = f"is {v.state}" + (f" ({v.error})" if v and v.error else "") if v else "is not loaded"
            raise Unavailable(f"model {name!r}: its default version {number} {state}; it is loaded as the "
                              f"gateway's configuration says, retry later")

    def unload(self, name: str, repository: str = "") -> None:
        """Unsupported for a configured model (saying why), NotFound for any other."""
        self._one_repository(repository)
        self._versions(name)
        raise Unsupported(f"unloading model {name!r} is not supported: {self._served_by()}")

    def _served_by(self) -> str:
        s = self.core.settings
        where = ("TF Serving loads their versions (its model config)" if s.backend == "tfserving"
                 else "their versions are chosen by models.config")
        return (f"this gateway serves the models its configuration names (setting models: {list(s.models)}; "
                f"{where}), loaded at start; it does not load or unload models on request")

    @staticmethod
    def _one_repository(repository: str) -> None:
        if repository:
            raise NotFound(f"unknown model repository {repository[:100]!r}: this gateway has one, "
                           f"leave repository_name empty")

    def statistics(self, name: str = "", version: str | None = None) -> dict:
        """``{"model_stats": [...]}``: every version of every model (no ``name``), every version of
        one model (no ``version``), or one version (a number or a label)."""
        if not name:
            if version:
                raise InvalidInput("statistics of a version need the model's name")
            pairs = [(n, number) for n, versions in sorted(self.core.models().items()) for number in sorted(versions)]
        elif version:
            pairs = [(name, self.model_version(name, version).version)]
        else:
            pairs = [(name, number) for number in sorted(self._versions(name))]
        return {"model_stats": [self.core.statistics.model_stats(n, number) for n, number in pairs]}

    def model_config(self, name: str, version: str | None = None) -> dict:
        """Triton's model configuration of a version (the default one when none is named)."""
        v = self.model_version(name, version)
        inputs, outputs = kinds.get(v.kind).v2_io(v)
        return {
            "name": name,
            "platform": "tensorflow_savedmodel",
            "backend": "tensorflow",
            "max_batch_size": self.core.limits(name).max_items_per_request,
            "input": [_config_tensor(t) for t in inputs],
            "output": [_config_tensor(t) for t in outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": self.core.settings.batching(name).max_batch_wait_us},
        }

    def element_limit(self, name: str) -> ElementLimit:
        """What one BYTES input of model ``name`` may declare (one element per item: the model's
        ``max_items_per_request``), checked against its shape before its data is read; NotFound
        for an unknown model, as for the rest of the request."""
        kind = kinds.get(self.kind(name))
        return ElementLimit(self.core.limits(name).max_items_per_request, kind.items)

    def check_inputs(self, name: str, names: list[str], n: int | None = None) -> None:
        """Exactly one input per request; ``names``: the first few inputs' names, of ``n`` in all."""
        n = len(names) if n is None else n
        if n != 1:
            kind = kinds.get(self.kind(name))
            names = [x[:100] for x in names[:10]]
            got = names if n <= 10 else f"{n} inputs, the first {names}"
            raise InvalidInput(f"give exactly one input, one of {list(kind.v2_inputs)}; got {got}")

    def request(self, name: str, version: str | None, inputs: list[Tensor], outputs: list[str] | None,
                parameters: dict | None) -> Predict:
        """The core request of an inference request: its one input tensor read by the model's kind,
        the outputs it names checked (before any work is done), its ``timeout`` parameter."""
        parameters = parameters or {}
        number, label = self.parse_version(version)
        if number == 0:
            self.model_version(name, version)  # NotFound naming the versions
        kind = kinds.get(self.kind(name))
        self.check_inputs(name, [t.name for t in inputs[:10]], len(inputs))
        data = kind.v2_parse(name, inputs[0], parameters, lambda: self.core.resolve(name, number, kind.name, label)[0])
        available = kind.v2_output_names(data)
        for wanted in outputs or ():
            if wanted not in available:
                raise InvalidInput(f"model {name!r} has no output {wanted[:100]!r}; outputs: {available}")
        timeout_us = parameters.get("timeout")
        timeout = timeout_us / 1e6 if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and timeout_us > 0 else None
        return Predict(kind.name, data, name, number, label, timeout_s=timeout)

    @staticmethod
    def response(req: Predict, r: Result, outputs: list[str] | None) -> InferResponse:
        """The result as the outputs the request asked for (all of them when it named none)."""
        available = kinds.get(req.kind).v2_outputs(r, req.inputs)
        chosen = [available[name] for name in dict.fromkeys(outputs)] if outputs else list(available.values())
        return InferResponse(r.model, r.version, chosen)


def _config_tensor(t: dict) -> dict:
    """A V2 metadata tensor as Triton's model config has it: ``data_type`` TYPE_*, ``dims`` without
    the batch dimension; one element per item is dims [1] reshaped to [] (Triton's idiom)."""
    dims = list(t["shape"][1:])
    out = {"name": t["name"], "data_type": "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}",
           "dims": dims or [1]}
    if not dims:
        out["reshape"] = {"shape": []}
    return out
