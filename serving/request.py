"""One request as the core sees it, whatever the protocol: its id, what it asks for
(:class:`Predict`), what it gets (:class:`Result`) and what the access log says of it (:class:`Call`)."""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass

import numpy as np

# The request id of the request being handled (REST header / gRPC metadata x-request-id).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# What a weighted canary splits by (REST header / gRPC metadata x-routing-key, e.g. a user id):
# one key always gets the same version. None: the request id.
routing_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("routing_key", default=None)


def begin_request_id(client_value: str | None, client_routing_key: str | None = None) -> str:
    """The request id of a new request, set for its logs: the client's ``x-request-id`` when it is
    ASCII (cut to 128 characters), else a new random one (32 hex digits). Also sets its routing key."""
    rid = client_value[:128] if client_value and client_value.isascii() else secrets.token_hex(16)
    request_id.set(rid)
    routing_key.set(client_routing_key[:256] if client_routing_key else None)
    return rid


@dataclass
class Predict:
    """A prediction request, decoded from any protocol: which kind of model (``text``,
    ``image``: see serving/kinds/), the kind's own inputs, and which model version."""

    kind: str
    inputs: object  # the kind's input type (serving.kinds.text.Texts, serving.kinds.image.Images, ...)
    model: str | None = None  # None: the kind's default model (settings.default_model)
    version: int | None = None  # None: the default version (the 'stable' label, else the newest)
    label: str | None = None  # a version label instead of a version
    explain: bool = False
    timeout_s: float | None = None  # the client's own deadline, when it gives one in the request


@dataclass
class Result:
    model: str
    version: int
    predictions: list
    probabilities: np.ndarray | None = None  # [n, classes] float32: the predictions' probabilities, as one array
    rows: np.ndarray | None = None  # whole-text mode: every window's probabilities, before combining


@dataclass
class Call:
    """What the access log, the statistics (serving/statistics.py) and the payload log
    (serving/payload_log.py) say about one request; filled in as it is handled."""

    protocol: str
    endpoint: str
    model: str | None = None
    version: int | None = None
    items: int = 0
    outcome: str = "ok"
    # For the payload log (serving/payload_log.py): the parsed request, the rows the model got, the answer.
    request: Predict | None = None
    rows: np.ndarray | None = None
    result: Result | None = None
    # Seconds spent preparing its inputs, waiting in the batcher, in backend calls (added by the
    # batcher for each call that carried its rows), and making its answer and response.
    prepare_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
