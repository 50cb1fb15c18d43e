"""What every gRPC call of classifier.v1.Classifier shares: the connection and model
:class:`Options` (targets, TLS, metadata, flow), the requests built from them, the method stubs
of a channel, and the :class:`StreamStats` of a run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc

from serving.gen.classifier.v1 import classifier_pb2 as pb

SERVICE = "/classifier.v1.Classifier/"
MAX_ITEMS = 1024  # the server's max_items_per_request (default)
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class Options:
    targets: Sequence[str] = ("127.0.0.1:50051",)
    tls: bool = False
    ca: str | Path | None = None  # PEM file of the CA to trust (implies TLS); None = the system roots
    api_key: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    lb_policy: str = "round_robin"
    model: str = ""
    version: int = 0
    version_label: str = ""
    whole_text: bool = False  # sentiment: score every window of each text (server option whole_text)
    chunk_size: int = 512
    # Whole text: also about this many windows (model rows) per chunk (about one model batch), at most
    # chunk_size texts (classifier_client.flow.Chunker).
    chunk_windows: int = 256
    # Chunks in flight in the whole run (all streams, or unary calls): the AIMD window's start and
    # ceiling (classifier_client.flow); it halves on each refusal and grows back on answers.
    window: int = 4
    streams: int = 0  # streams (one chunk in flight each); 0 = enough for the window and every target
    deadline_s: float = 30.0  # per chunk / per call
    retries: int = 10  # failed attempts with no chunk answered in between before giving up
    give_up_s: float = 120.0  # ... or this long with no chunk answered (refusals with pushback included)
    connect_retries: int = 2  # before anything was answered: attempts after a refused connection
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 5.0

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not self.targets:
            raise ValueError("at least one target")
        if not 1 <= self.chunk_size <= MAX_ITEMS:
            raise ValueError(f"chunk size must be 1..{MAX_ITEMS} (the server's limit per request)")
        if self.version and self.version_label:
            raise ValueError("give a version or a version label, not both")
        if (self.window < 1 or self.streams < 0 or self.retries < 0 or self.connect_retries < 0 or self.deadline_s <= 0
                or self.give_up_s <= 0):
            raise ValueError("window >= 1, streams >= 0, retries and connect retries >= 0, deadline > 0 and "
                             "give-up time > 0")
        if self.chunk_windows < 1:
            raise ValueError("chunk windows >= 1")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [(k.lower(), v) for k, v in self.headers]
        if self.api_key:
            md.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(md)

    def channel_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.lb_policy_name", self.lb_policy),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            # Reconnect quickly after a gateway restart (the default backoff grows to 2 minutes).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.ca):
            return None
        return grpc.ssl_channel_credentials(Path(self.ca).read_bytes() if self.ca else None)

    def sentiment_request(self, texts) -> pb.SentimentRequest:
        return pb.SentimentRequest(texts=texts, model=self.model, version=self.version, version_label=self.version_label,
                                   whole_text=self.whole_text)

    def digits_request(self, images) -> pb.DigitsRequest:
        return pb.DigitsRequest(images=[as_image(i) for i in images], model=self.model, version=self.version,
                                version_label=self.version_label)


def as_image(x) -> pb.Image:
    """784 raw bytes (28x28 uint8) or PNG/JPEG bytes, or a pb.Image."""
    if isinstance(x, pb.Image):
        return x
    x = bytes(x)
    return pb.Image(raw=x) if len(x) == 784 and not x.startswith((b"\x89PNG", b"\xff\xd8")) else pb.Image(encoded=x)


@dataclass
class StreamStats:
    """What a run cost: retries by status name (as the server gave it), streams (re)opened, chunks
    resent and split, and the window's history (``flow``: classifier_client.flow.FlowStats)."""

    retries: Counter = field(default_factory=Counter)
    streams_opened: int = 0
    chunks_resent: int = 0
    chunks_split: int = 0
    last_error: str = ""
    flow: object = None

    @property
    def total_retries(self) -> int:
        return sum(self.retries.values())

    def summary(self) -> str:
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.retries.items()))
        line = f"retries: {self.total_retries}"
        extra = [f"chunks resent {self.chunks_resent}"] if by else []
        if self.chunks_split:
            extra.append(f"chunks split {self.chunks_split}")
        if by or extra:
            line += " (" + "; ".join(x for x in [by] + extra if x) + ")"
        f = self.flow
        if f is not None and f.cuts:
            line += f"; window {f.window_min}..{f.window_max}, now {f.window} ({f.cuts} cuts, {f.raises} raises)"
        return line


def method_stubs(channel) -> dict:
    """The service's methods on ``channel`` (sync or grpc.aio), by name."""
    return {
        "ClassifySentiment": channel.unary_unary(SERVICE + "ClassifySentiment", request_serializer=pb.SentimentRequest.SerializeToString,
                                                 response_deserializer=pb.SentimentResponse.FromString),
        "ClassifyDigits": channel.unary_unary(SERVICE + "ClassifyDigits", request_serializer=pb.DigitsRequest.SerializeToString,
                                              response_deserializer=pb.DigitsResponse.FromString),
        "StreamClassifySentiment": channel.stream_stream(SERVICE + "StreamClassifySentiment",
                                                         request_serializer=pb.SentimentRequest.SerializeToString,
                                                         response_deserializer=pb.SentimentResponse.FromString),
    }
