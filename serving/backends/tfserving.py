"""TF Serving backend: the gateway forwards to TensorFlow Serving over gRPC.

No TensorFlow here: the lean, wire-compatible messages of ``protos/`` do.

- One channel, reused, with fast reconnects (so the gateway recovers by itself
  when TF Serving comes back); with ``tfserving_lb_policy=round_robin`` (default)
  its calls are spread over every address the target resolves to, so several TF
  Serving pods behind a headless Service all get work.
- Model versions come from TF Serving (``ModelService.GetModelStatus``, polled
  every ``tfserving_poll_s`` in a background thread). For each AVAILABLE
  version the vocabulary and card are read from the model repository
  (``<model_base_path>/<name>/<version>/assets.extra/``), and every request is
  pinned to the version whose vocabulary tokenised it (ModelSpec.version), so
  a new version can never be fed ids made with an older vocabulary.
- ``Predict`` with a deadline of ``tfserving_timeout_s``; retried with
  exponential backoff only on UNAVAILABLE; then 503 (UNAVAILABLE) or 504
  (DEADLINE_EXCEEDED) to the client.
- Ready only when TF Serving reports every configured model AVAILABLE (its
  REST status endpoint answers 200 while models still load, so it is not used).
  The status poll has a deadline of at most 1 s (``STATUS_TIMEOUT_S``), so a TF
  Serving that hangs is noticed within ``tfserving_poll_s`` + 1 s; it is retried on
  UNAVAILABLE like Predict, and a poll that fails leaves the versions' states as they
  were until the breaker opens (readiness fails at once).
- A circuit breaker (:class:`Breaker`; ``tfserving_breaker_failures``, 0: off, and
  ``tfserving_breaker_open_s``): after that many TF Serving calls in a row ended
  DEADLINE_EXCEEDED or UNAVAILABLE (Predict after its retries, or a status poll),
  every Predict fails at once with 503 and a Retry-After, and readiness fails,
  for ``tfserving_breaker_open_s``; then one probe Predict goes through.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
import time

import grpc
import numpy as np

from serving import tracing
from serving.errors import DeadlineExceeded, ServiceError, Unavailable
from serving.gen.tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from contract.repository import ModelVersion, read_version
from serving.settings import Settings
from serving.backends.breaker import Breaker
from serving.backends.tensors import dtype_name, from_tensor_proto, to_tensor_proto

log = logging.getLogger("serving.tfserving")
State = get_model_status_pb2.ModelVersionStatus.State
OUTPUT = "probabilities"
# The codes that say TF Serving is not answering (the breaker counts them); any other
# answer, an error included, says it is.
UNREACHABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
# The status poll's deadline (or tfserving_timeout_s when shorter). GetModelStatus only reads
# TF Serving's servable states (no model work, not behind its batch queue): it answers in
# milliseconds even under load, so 1 s is a wide margin, and a hang is noticed in
# tfserving_poll_s + 1 s rather than + tfserving_timeout_s. Not tied to tfserving_poll_s: the
# polls run one after another (no pile-up), and a deadline as short as a fast poll interval
# (0.1 s in tests) would count a busy CPU's hiccups as TF Serving failures.
STATUS_TIMEOUT_S = 1.0


class TFServingBackend:
    def __init__(self, settings: Settings):
        self.settings = settings
        limit = settings.grpc_max_message_bytes
        self._channel = grpc.insecure_channel(
            settings.tfserving_address,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                # One channel, but calls spread over every address the target resolves to
                # (dns:///tfserving-headless:8500 -> every TF Serving pod); a pod that goes
                # away is skipped, and the calls it failed are retried (UNAVAILABLE).
                ("grpc.lb_policy_name", settings.tfserving_lb_policy),
            ],
        )
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._versions: dict[str, dict[int, ModelVersion]] = {name: {} for name in settings.models}
        # Versions read from the repository (assets.extra/ of a version never changes),
        # and those whose signature TF Serving confirmed.
        self._known: dict[tuple[str, int], ModelVersion] = {}
        self._checked: set[tuple[str, int]] = set()
        self._problems: dict[str, str] = {name: "not polled yet" for name in settings.models}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        s = settings
        self.breaker = Breaker(s.tfserving_breaker_failures, s.tfserving_breaker_open_s,
                               probe_s=s.tfserving_timeout_s, address=s.tfserving_address)

    # -- model status ---------------------------------------------------------
    def load(self, config=None) -> None:
        """First status poll, then keep polling in the background."""
        self.poll()
        self._thread = threading.Thread(target=self._poll_forever, name="tfserving-status", daemon=True)
        self._thread.start()

    def sync(self, config) -> list[ModelVersion]:
        """TF Serving follows models.config itself; its version states come from the status poll."""
        return []

    def unload(self, v: ModelVersion) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        self._channel.close()

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.settings.tfserving_poll_s):
            self.poll()

    def poll(self) -> None:
        """Every model's versions and states from TF Serving.

        A status call that finds TF Serving UNAVAILABLE is retried as a Predict is
        (``tfserving_retries``, backoff): behind a headless Service one pod that just went away
        fails the call, the next address answers. A poll that still fails, or times out, counts
        as one failure for the breaker (the models not asked yet are not asked this round: they
        would wait the same) and makes readiness fail, but the versions keep their last known
        states until the breaker opens: one lost poll (a pod killed, a CPU stall) must not fail
        every request that the Predicts would have served. Once it is open, the versions are
        UNAVAILABLE and requests are refused before the backend."""
        timeout = min(self.settings.tfserving_timeout_s, STATUS_TIMEOUT_S)
        down: str | None = None
        for name in self.settings.models:
            try:
                if down is not None:
                    self._problems[name] = down
                    self._unreachable(name)
                    continue
                resp = self._status(name, timeout)
            except grpc.RpcError as e:
                self._problems[name] = f"TF Serving at {self.settings.tfserving_address}: {e.code().name}: {e.details()}"
                if e.code() in UNREACHABLE:
                    down = self._problems[name]
                    self.breaker.failed(_describe(e, f"GetModelStatus({name})", timeout), poll=True)
                    self._unreachable(name)
                else:
                    for v in self._versions[name].values():
                        v.state = "UNAVAILABLE"
                continue
            previous = self._versions[name]
            seen = {st.version: v for st in resp.model_version_status
                    if (v := self._version(name, st, previous.get(st.version))) is not None}
            self._versions[name] = seen
            if any(v.state == "AVAILABLE" for v in seen.values()):
                self._problems.pop(name, None)
            else:
                states = ", ".join(f"{k}: {v.state}" + (f" ({v.error})" if v.error else "") for k, v in sorted(seen.items()))
                self._problems[name] = f"no AVAILABLE version in TF Serving; versions {{{states}}}"
        if down is None:
            self.breaker.poll_answered()

    def _status(self, name: str, timeout: float):
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=name))
        s = self.settings
        for attempt in range(s.tfserving_retries + 1):
            try:
                return self._models.GetModelStatus(request, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == s.tfserving_retries or self._stop.is_set():
                    raise
                time.sleep(s.tfserving_backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _unreachable(self, name: str) -> None:
        """A poll found TF Serving unreachable: the versions are UNAVAILABLE once the breaker is
        open (or at once, with the breaker off); until then they keep their last states."""
        if self.breaker.threshold and self.breaker.state() == "closed":
            return
        for v in self._versions[name].values():
            v.state = "UNAVAILABLE"

    def _version(self, name: str, st, previous: ModelVersion | None) -> ModelVersion | None:
        """One version TF Serving reports, as the repository describes it, in TF Serving's state.

        Its signature is checked against the model card once it is AVAILABLE; a
        version that fails is read and checked again at the next poll (the
        deployment may be fixed), and is logged once per distinct error.
        """
        key = (name, st.version)
        v = self._known.get(key)
        if v is None:
            try:
                v = self._known[key] = read_version(self.settings.model_base_path, name, st.version)
            except (OSError, ValueError, KeyError) as e:
                log.error("%s/%s is served by TF Serving but its assets.extra/ is unreadable: %s", name, st.version, e)
                return None
        if st.state == State.AVAILABLE and key not in self._checked:
            mismatch = self._signature_mismatch(v)
            if mismatch is not None:
                del self._known[key]
                if previous is None or previous.error != mismatch:
                    log.error("%s/%s: %s", name, st.version, mismatch)
                v.state, v.error = "FAILED", mismatch
                return v
            self._checked.add(key)
        v.state = State.Name(st.state)
        v.error = st.status.error_message or None
        return v

    def versions(self) -> dict[str, dict[int, ModelVersion]]:
        return self._versions

    def status(self) -> tuple[bool, str]:
        refusal = self.breaker.refusal()
        if refusal is not None:
            return False, refusal
        if self._problems:
            name = sorted(self._problems)[0]
            return False, f"model {name!r}: {self._problems[name]}"
        return True, "every model AVAILABLE in TF Serving"

    def metadata(self, model: str, version: int) -> get_model_metadata_pb2.SignatureDefMap:
        """The version's signatures as TF Serving reports them (GetModelMetadata)."""
        spec = model_pb2.ModelSpec(name=model)
        spec.version.value = version
        resp = self._predict.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"]),
            timeout=self.settings.tfserving_timeout_s,
        )
        out = get_model_metadata_pb2.SignatureDefMap()
        resp.metadata["signature_def"].Unpack(out)
        return out

    def _signature_mismatch(self, v: ModelVersion) -> str | None:
        """None when TF Serving's signature is the one the repository's model card describes.

        Guards against a gateway reading another repository (or another export of the
        same version number) than TF Serving serves: the ids would go to the wrong model.
        """
        try:
            sig = self.metadata(v.name, v.version).signature_def[self.settings.tfserving_signature]
        except grpc.RpcError as e:
            return f"GetModelMetadata failed: {e.code().name}: {e.details()}"
        except KeyError:
            return f"TF Serving has no signature {self.settings.tfserving_signature!r}"

        def described(infos):
            return {k: (dtype_name(t.dtype), [d.size for d in t.tensor_shape.dim])
                    for k, t in infos.items()}

        served = {"inputs": described(sig.inputs), "outputs": described(sig.outputs)}
        card = {part: {k: (t["dtype"], list(t["shape"])) for k, t in v.signature[part].items()} for part in ("inputs", "outputs")}
        if served != card:
            return f"TF Serving's signature {served} differs from the model card's {card} in {v.path}"
        return None

    # -- inference ------------------------------------------------------------
    def predict(self, model: str, version: int, batch: np.ndarray, request_ids: Sequence[str] = ()) -> np.ndarray:
        """Predict pinned to ``version``; the batch's request ids go along as ``x-request-id``
        metadata (comma-separated, at most 1,000 characters) for TF Serving's side of a trace, and,
        with tracing on, the batch span's W3C ``traceparent`` (serving/tracing.py)."""
        v = self._known[(model, version)]
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.version.value = version
        request.model_spec.signature_name = self.settings.tfserving_signature
        request.inputs[v.input_name].CopyFrom(to_tensor_proto(batch))
        request.output_filter.append(OUTPUT)
        s = self.settings
        ids = ",".join(dict.fromkeys(i for i in request_ids if i))[:1000]
        metadata = (("x-request-id", ids),) if ids else ()
        if (parent := tracing.traceparent()) is not None:
            metadata += (("traceparent", parent),)
        probe = self.breaker.before_call()  # raises while the breaker is open
        try:
            for attempt in range(s.tfserving_retries + 1):
                try:
                    response = self._predict.Predict(request, timeout=s.tfserving_timeout_s, metadata=metadata or None)
                except grpc.RpcError as e:
                    code = e.code()
                    if code == grpc.StatusCode.UNAVAILABLE and attempt < s.tfserving_retries:
                        time.sleep(s.tfserving_backoff_s * 2**attempt)
                        continue
                    if code in UNREACHABLE:
                        self.breaker.failed(_describe(e, f"Predict {model}/{version}", s.tfserving_timeout_s), probe)
                    else:
                        self.breaker.answered(probe)
                    probe = 0
                    raise _to_service_error(e, model, version, s) from None
                self.breaker.answered(probe)
                probe = 0
                return from_tensor_proto(response.outputs[OUTPUT]).astype(np.float32, copy=False)
            raise AssertionError("unreachable")
        finally:
            if probe:
                self.breaker.release(probe)


def _describe(e: grpc.RpcError, call: str, timeout: float) -> str:
    """One failure, for the breaker's messages."""
    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"DEADLINE_EXCEEDED: {call} got no answer within {timeout:g} s"
    return f"{e.code().name}: {call}: {e.details()}"


def _to_service_error(e: grpc.RpcError, model: str, version: int, s: Settings) -> ServiceError:
    code, details = e.code(), e.details()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TF Serving did not answer {model}/{version} within tfserving_timeout_s={s.tfserving_timeout_s}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TF Serving at {s.tfserving_address} is unavailable ({s.tfserving_retries} retries): {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        # The version was tokenised for but unloaded before the call: its ids must
        # not go to another version, so the request fails instead (retrying is safe).
        return Unavailable(f"TF Serving no longer serves {model} version {version}; retry: {details}")
    return Unavailable(f"TF Serving failed {model}/{version}: {code.name}: {details}")
