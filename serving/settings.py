"""All gateway settings, in one place, by group: models, the embedded backend, TF Serving,
the servers (ports, connections, deadlines, drain), request limits, batching and admission,
security, logs, payload logging.

Read from environment variables prefixed ``CLASSIFIER_`` (e.g.
``CLASSIFIER_REST_PORT=8080``), or from a ``.env``-style file named by
``CLASSIFIER_SETTINGS_FILE``. Defaults are what a single node should run with.
The limits and batching settings can be overridden per model (``model_settings``, as
MLServer's ``ModelSettings``): :meth:`Settings.limits` and :meth:`Settings.batching` give
a model's effective values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.whole_text import MAX_WINDOWS

ROOT = Path(__file__).resolve().parent.parent


class Limits(BaseModel):
    """What one request may ask for; per model in ``model_settings`` (see :meth:`Settings.limits`)."""

    max_items_per_request: int = Field(1024, ge=1)
    max_text_chars: int = Field(20_000, ge=1)
    # Whole-text scoring (request option whole_text): each text is scored on its maxlen-token
    # windows, at most max_windows_per_text of them (the last ones); every window is a row
    # for the batcher's limits, and one request may send at most max_windows_per_request.
    max_windows_per_text: int = Field(MAX_WINDOWS, ge=1)
    max_windows_per_request: int = Field(4096, ge=1)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # one decoded base64 / encoded image

    max_image_pixels: int = Field(4_000_000, ge=784)  # one encoded image's width x height (read from its header)
    max_request_pixels: int = Field(16_000_000, ge=784)  # all encoded images of one request together


class Batching(BaseModel):
    """Dynamic batching and admission, per model version; per model in ``model_settings``
    (see :meth:`Settings.batching`)."""

    max_batch_size: int = Field(256, ge=1)
    # Adaptive batching: a model with no batch in flight gets what is queued at once; while
    # it is busy, rows collect and wait at most max_batch_wait_us for more to join.
    # batch_wait_when_idle=true waits max_batch_wait_us even when the model is idle (fixed delay).
    max_batch_wait_us: int = Field(2000, ge=0)
    batch_wait_when_idle: bool = False
    max_queue_items: int = Field(8192, ge=1)
    # Batches in flight at once per model version; 0 = by backend (embedded 2: two model calls
    # of one thread each, see tf_intra_op_threads; tfserving 4: keep TF Serving's batch
    # threads busy while the gateway encodes the next batch).
    max_concurrent_batches: int = Field(0, ge=0)
    # A request is refused at once (429 + Retry-After / RESOURCE_EXHAUSTED + pushback) when its
    # model's queue would hold more than max_queue_items rows or its estimated wait would exceed
    # max_queue_wait_s.
    max_queue_wait_s: float = Field(0.1, gt=0)
    # The wait a refusal asks for is the work ahead, stretched by how many requests are refused
    # for each one admitted (serving/batching.py), at most this long.
    max_retry_after_s: float = Field(5.0, gt=0)


class ModelsGroup(BaseModel):
    backend: Literal["embedded", "tfserving"] = "embedded"
    model_base_path: Path = ROOT / "models"
    models: list[str] = ["digits", "sentiment_lstm", "sentiment_bilstm"]
    default_sentiment_model: str = "sentiment_lstm"
    # TF Serving's model configuration (text-format ModelServerConfig), read by both backends:
    # which versions to serve and their labels (stable, canary, ...). A request without a
    # version goes to the `stable` label when the model defines one, else to the newest
    # AVAILABLE version. Empty: every model's newest version, no labels.
    models_config_file: Path | None = ROOT / "serving" / "tfserving" / "models.config"
    # Per model, the share of requests naming no version that go to the `canary` label's version
    # (by routing key: x-routing-key, else the request id) and the share also scored by the canary
    # in the shadow (JSON; serving/model_config.py). A relative path is taken from models.config's
    # folder (the default: traffic.json beside it, in the same ConfigMap). Empty: no split.
    traffic_file: Path | None = Path("traffic.json")
    # How often both files are checked for changes (a new version is loaded, labels and splits move).
    models_config_poll_s: float = Field(1.0, gt=0)
    warmup: bool = True
    # The default model of each kind (text, image: serving/kinds/) for requests that name none;
    # a kind not listed here: default_sentiment_model for text, else the first configured model of the kind.
    default_models: dict[str, str] = {"image": "digits"}
    # Per-model overrides of the Limits and Batching settings, e.g. (environment variable
    # CLASSIFIER_MODEL_SETTINGS, JSON): {"sentiment_bilstm": {"max_batch_size": 64, "max_items_per_request": 256}}
    model_settings: dict[str, dict[str, Any]] = {}


class EmbeddedGroup(BaseModel):
    # TensorFlow thread pools of the embedded backend (0 = TensorFlow's default: one per core).
    # Default 1 thread per op, with 2 batches in flight (max_concurrent_batches): each model call
    # keeps one core busy instead of splitting every op across cores that the event loop also
    # needs. On 2 cores (bench/gateway.py) single-text REST at 64 clients went from 0.33 to 0.49
    # of the raw batched call and gRPC batches of 256 from 0.75 to 1.14.
    tf_intra_op_threads: int = Field(1, ge=0)
    tf_inter_op_threads: int = Field(0, ge=0)
    # Embedded backend: call each signature through XLA (tf.function(jit_compile=True)). Batches are
    # padded to the next power of two (at most max_batch_size), each size compiled once at load.
    # Faster on CPU (bench/model_options.py), but its probabilities differ from the plain call's by
    # float rounding (~1e-7), so it is off by default. The SavedModels are unchanged.
    tf_jit_compile: bool = False


class TFServingGroup(BaseModel):
    # TF Serving backend (backend="tfserving"): its gRPC address, per-call deadline,
    # retries (only on UNAVAILABLE, exponential backoff) and model-status polling.
    tfserving_address: str = "localhost:8500"
    # How the gateway spreads Predict calls when the address resolves to several TF Serving
    # pods (e.g. dns:///tfserving-headless:8500 in Kubernetes): round_robin over all of them,
    # or pick_first (one connection).
    tfserving_lb_policy: Literal["round_robin", "pick_first"] = "round_robin"
    tfserving_timeout_s: float = Field(5.0, gt=0)
    tfserving_retries: int = Field(2, ge=0)
    tfserving_backoff_s: float = Field(0.05, ge=0)
    tfserving_poll_s: float = Field(2.0, gt=0)
    tfserving_signature: str = "serving_default"
    # Circuit breaker toward TF Serving: after this many calls in a row that time out or find it
    # unavailable, fail fast (503 with Retry-After) for tfserving_breaker_open_s, then let one
    # probe call through; it closes on success. Readiness fails while it is open. 0: off.
    tfserving_breaker_failures: int = Field(5, ge=0)
    tfserving_breaker_open_s: float = Field(5.0, gt=0)


class ServerGroup(BaseModel):
    host: str = "0.0.0.0"
    rest_port: int = 8000
    grpc_port: int = 50051
    grpc_max_message_bytes: int = 16 * 1024 * 1024
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # How long a thread holding the GIL (tokenising, decoding a large body) may keep the event
    # loop waiting for it: Python's default is 5 ms, paid at every turn of the loop while such a
    # thread runs, which made refusals take tens of ms at high overload (bench/overload.py).
    gil_switch_interval_s: float = Field(0.0005, gt=0, le=0.1)
    # Nice value added to the threads that compute (model calls, preprocessing, TensorFlow's
    # pools) so that the event loop and gRPC's I/O threads run first when CPU is short
    # (serving/priority.py). 0: all at the process's priority.
    worker_nice: int = Field(10, ge=0, le=19)
    # After loading: a full garbage collection on the event loop every this many seconds instead of
    # Python's automatic collections in whichever thread allocates (serving/priority.py). 0: automatic.
    gc_interval_s: float = Field(2.0, ge=0)
    # FastAPI's native OpenTelemetry hooks (traces/metrics/logs through the global
    # OTel providers). Off by default: Prometheus covers metrics, and when on,
    # every request looks the providers up even if none is configured (about 4 %
    # of py-spy's samples of the gateway under REST load).
    otel_telemetry: bool = False
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # REST bodies / gRPC messages up to this size are decoded on the event loop (msgspec
    # decodes 1 MiB of texts in ~0.2 ms, cheaper than a thread hop); larger ones in a thread.
    inline_parse_bytes: int = Field(1024 * 1024, ge=0)
    # Queued work past its deadline (request_timeout_s; gRPC: the client's deadline when
    # shorter) or of a client that disconnected is dropped, never computed.
    request_timeout_s: float = Field(30.0, gt=0)

    # Per-port resource limits (README "Resource limits"). REST: a connection must send its
    # request head within http_header_timeout_s, at most http_max_header_bytes in all (request
    # line included), http_max_headers fields, http_max_header_line_bytes per line (431 and
    # close beyond); each body chunk within http_body_timeout_s, the whole body within
    # http_body_deadline_s and, after its first http_body_rate_grace_s, at no less than
    # http_min_body_bytes_per_s on average (408 and close); an idle keep-alive connection is
    # closed after http_keepalive_timeout_s; at most max_connections are open (more are closed
    # at once). gRPC: at most grpc_max_connections open (more are refused); a connection that has
    # not finished its HTTP/2 handshake within grpc_handshake_timeout_s is closed, an idle one
    # after grpc_max_connection_idle_s, any one after grpc_max_connection_age_s (+ the grace
    # for its calls; 0: never); at most grpc_max_concurrent_streams calls at once per
    # connection (more are refused with REFUSED_STREAM, which clients see as UNAVAILABLE:
    # open more connections). Both caps are lowered at start to fit the file-descriptor limit
    # (ulimit -n), with a warning.
    http_header_timeout_s: float = Field(10.0, gt=0)
    http_max_header_bytes: int = Field(64 * 1024, ge=1024)
    http_max_headers: int = Field(100, ge=8)
    http_max_header_line_bytes: int = Field(16 * 1024, ge=256)
    http_body_timeout_s: float = Field(30.0, gt=0)
    http_body_deadline_s: float = Field(60.0, gt=0)
    http_min_body_bytes_per_s: float = Field(1024.0, ge=0)
    http_body_rate_grace_s: float = Field(5.0, ge=0)
    http_keepalive_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(2048, ge=1)
    grpc_max_connections: int = Field(1024, ge=1)
    grpc_handshake_timeout_s: float = Field(5.0, gt=0)
    grpc_max_connection_idle_s: float = Field(30.0, gt=0)
    grpc_max_connection_age_s: float = Field(0.0, ge=0)
    grpc_max_connection_age_grace_s: float = Field(30.0, ge=0)
    grpc_max_concurrent_streams: int = Field(256, ge=1)
    # /metrics is rendered off the event loop, one render at a time; a text is reused for up to
    # this long by scrapes that come while no counter, gauge or the readiness changed.
    metrics_cache_s: float = Field(0.5, ge=0)

    # Shutdown (SIGTERM/SIGINT): /readyz 503 and gRPC health NOT_SERVING at once;
    # new work is still taken for drain_settle_s (while load balancers notice), then
    # refused with 503/UNAVAILABLE; work in flight and queued is finished within
    # drain_timeout_s, then the process exits.
    drain_settle_s: float = Field(5.0, ge=0)
    drain_timeout_s: float = Field(30.0, gt=0)

    # POSTs to the two /v1 predict endpoints skip FastAPI's routing (same middlewares, code,
    # errors; serving/api/rest/hot_path.py); false: every request goes through FastAPI.
    rest_hot_path: bool = True
    # The console at / (serving/console/: models, live charts, try sentiment and digits).
    # Its page and assets hold no data and need no API key; everything it shows comes from
    # the API with the key the user types in.
    console: bool = True


class SecurityGroup(BaseModel):
    # Authentication (off unless keys are given): API keys, comma-separated in
    # CLASSIFIER_API_KEYS and/or one per line in api_keys_file (re-read when it
    # changes, no restart). REST: "Authorization: Bearer <key>" or "x-api-key: <key>";
    # gRPC: the same metadata. public_paths / public_grpc_methods need no key.
    api_keys: str = ""
    api_keys_file: Path | None = None
    public_paths: list[str] = ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]
    # The API docs (/docs, /redoc, /openapi.json and their packaged assets) need no key: they
    # describe the API's shape and hold no data, and a team reading them should not need a
    # credential first. With keys on, the docs get an Authorize button (Bearer or x-api-key)
    # for trying calls. false: they need a key like everything outside public_paths.
    docs_public: bool = True
    public_grpc_methods: list[str] = ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                                      "/inference.GRPCInferenceService/ServerLive",
                                      "/inference.GRPCInferenceService/ServerReady"]
    # TLS for both servers (off unless both files are given).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # CORS for browser apps on other origins (none allowed by default).
    cors_allow_origins: list[str] = []
    cors_allow_methods: list[str] = ["GET", "POST"]
    cors_allow_headers: list[str] = ["authorization", "content-type", "x-api-key", "x-request-id"]
    cors_max_age_s: int = Field(600, ge=0)


class LogsGroup(BaseModel):
    # Logs: one JSON object per line (or plain text), an access log line per request.
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    access_log: bool = True
    # Log lines are written in one write per interval (warnings and errors at once).
    log_flush_interval_s: float = Field(0.1, gt=0, le=5)


class PayloadLogGroup(BaseModel):
    # Payload logging (serving/payload_log.py, README "Payload logging"; off by default): each
    # sampled request that reached a model's handler, answered or failed, becomes one JSON line:
    # request id, API, model, the version that served it, inputs (texts, or digests with
    # payload_log_redact_texts; images always as digests), labels and probabilities, latency,
    # outcome. Never a header or a credential. payload_log_sample_rate: the share of request ids
    # logged, decided by a hash of the request id (the same id is always in or out).
    # payload_log_destination: a file path (appended to) or "stdout". Records wait in a queue of
    # at most payload_log_queue_records records and payload_log_queue_bytes bytes (estimated:
    # texts' characters, model inputs' bytes) for a writer thread; a record that does not fit is
    # dropped and counted (classifier_payload_log_dropped_total), never waited for.
    payload_log: bool = False
    payload_log_sample_rate: float = Field(1.0, ge=0, le=1)
    payload_log_destination: str = Field("stdout", min_length=1)
    payload_log_redact_texts: bool = False
    payload_log_queue_records: int = Field(1000, ge=1)
    payload_log_queue_bytes: int = Field(64 * 1024 * 1024, ge=1024)


class Settings(ModelsGroup, EmbeddedGroup, TFServingGroup, ServerGroup, Limits, Batching, SecurityGroup, LogsGroup,
               PayloadLogGroup, BaseSettings):
    """Every setting, by group (each group a class above; environment variables ``CLASSIFIER_<NAME>``)."""

    model_config = SettingsConfigDict(
        env_prefix="CLASSIFIER_", env_file=os.environ.get("CLASSIFIER_SETTINGS_FILE"), extra="ignore"
    )

    @field_validator("models_config_file", "traffic_file", "api_keys_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if v == "" else v

    @model_validator(mode="after")
    def _traffic_beside_models_config(self):
        if self.traffic_file is not None and not self.traffic_file.is_absolute():
            base = self.models_config_file.parent if self.models_config_file else Path.cwd()
            self.traffic_file = base / self.traffic_file
        return self

    @model_validator(mode="after")
    def _check_model_settings(self):
        allowed = set(Limits.model_fields) | set(Batching.model_fields)
        for model, overrides in self.model_settings.items():
            unknown = sorted(set(overrides) - allowed)
            if unknown:
                raise ValueError(f"model_settings[{model!r}]: {unknown} cannot be set per model; "
                                 f"these can: {sorted(allowed)}")
            try:
                self.limits(model), self.batching(model)  # noqa: B018 - validates the values
            except ValidationError as e:
                problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                raise ValueError(f"model_settings[{model!r}]: {problems}") from None
        return self

    def limits(self, model: str | None = None) -> Limits:
        """The request limits of ``model`` (the global ones, with its overrides)."""
        return self._group(Limits, model)

    def batching(self, model: str | None = None) -> Batching:
        """The batching settings of ``model``; ``max_concurrent_batches`` 0 resolved by backend
        (embedded 2: two model calls of one thread each, see tf_intra_op_threads; tfserving 4:
        keep TF Serving's batch threads busy while the gateway encodes the next batch)."""
        return self._group(Batching, model)

    def default_model(self, kind: str) -> str | None:
        """The model of ``kind`` that a request naming none gets (None: see the core)."""
        if kind in self.default_models:
            return self.default_models[kind]
        return self.default_sentiment_model if kind == "text" else None

    def _group(self, cls, model: str | None):
        values = {name: getattr(self, name) for name in cls.model_fields}
        values.update(self.model_settings.get(model, {}) if model else {})
        group = cls(**values)
        if cls is Batching and not group.max_concurrent_batches:
            group = group.model_copy(update={"max_concurrent_batches": 2 if self.backend == "embedded" else 4})
        return group
