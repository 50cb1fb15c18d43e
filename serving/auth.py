"""Optional API-key authentication for both servers (off unless keys are configured).

Keys come from ``api_keys`` (comma-separated) and/or ``api_keys_file`` (UTF-8, a byte-order
mark allowed; one key per line, surrounding spaces and tabs ignored; blank lines and ``#``
comments ignored). A key is printable ASCII without spaces (what an ``Authorization`` or
``x-api-key`` header and gRPC metadata can carry): any other key is refused when loaded, by
its line (or item) number, never shown. They are held only as SHA-256 digests and compared in
constant time. The file is re-read when it changes (checked at most once per
``reload_interval_s``), so keys can be added or revoked without a restart: a file that is
deleted revokes its keys (the ``api_keys`` ones stay); a changed file with an invalid line is
not applied (the previous keys stay, with an ERROR naming the line); a file that cannot be read
keeps the last keys (a WARNING). At start, a configured file that is missing, unreadable or
invalid is an error. Clients send ``Authorization: Bearer <key>`` or ``x-api-key: <key>``
(HTTP headers or gRPC metadata). Keys are never logged.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from serving.errors import Unauthenticated, error_body

log = logging.getLogger(__name__)

MISSING = "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
INVALID = "invalid API key"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class InvalidKeys(ValueError):
    """A key source holds something that cannot be a key; the message names where, never the key."""


def _flaw(key: str) -> str | None:
    """What makes ``key`` unusable as an API key (None: nothing). A key must be printable ASCII
    without spaces: a header value is read as Latin-1 and gRPC metadata must be ASCII, so a
    non-ASCII key could never be presented as stored; whitespace and control characters are
    stripped or refused on the way."""
    for c in key:
        if not "!" <= c <= "~":
            if ord(c) > 0x7F:
                return "a non-ASCII character"
            return "a space or tab inside" if c in " \t" else "a control character"
    return None


def _read_keys_file(path: Path) -> tuple[bytes, ...]:
    """The digests of the keys in ``path``. Raises OSError when it cannot be read, InvalidKeys
    when a line is not valid UTF-8 or not a possible key (the first such line is named)."""
    data = path.read_bytes()
    data = data.removeprefix(codecs.BOM_UTF8)  # a byte-order mark at the start is dropped
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidKeys(f"line {line} is not valid UTF-8") from None
    digests = []
    for number, line in enumerate(text.split("\n"), 1):  # only \n ends a line (not \x85, \u2028...)
        key = line.strip(" \t\r")
        if not key or key.startswith("#"):
            continue
        if (flaw := _flaw(key)) is not None:
            raise InvalidKeys(f"line {number}: the key has {flaw}; keys are printable ASCII without spaces")
        digests.append(_digest(key))
    return tuple(digests)


class ApiKeys:
    """The accepted keys, as SHA-256 digests; ``check`` tells whether a presented key is one."""

    def __init__(self, keys: Iterable[str] = (), file: Path | None = None, reload_interval_s: float = 1.0):
        static = [k.strip(" \t\r\n") for k in keys]
        for i, key in enumerate(static, 1):
            if key and (flaw := _flaw(key)) is not None:
                raise RuntimeError(f"api_keys: key {i} (of the comma-separated list) has {flaw}; "
                                   "keys are printable ASCII without spaces")
        self._static = tuple(_digest(k) for k in static if k)
        self._file = Path(file) if file is not None else None
        self._interval = reload_interval_s
        self._from_file: tuple[bytes, ...] = ()
        self._stamp: tuple[int, int, int] | None = None  # of the file version last read (applied or not)
        self._next_check = 0.0
        self._warned = False  # "cannot be read" logged, until it reads again
        if self._file is not None:
            try:  # misconfiguration must fail loudly, not silently disable auth
                self._load(os.stat(self._file))
            except OSError as e:
                raise RuntimeError(f"api_keys_file {self._file} cannot be read: {e}") from e
            except InvalidKeys as e:
                raise RuntimeError(f"api_keys_file {self._file}: {e}") from None

    @classmethod
    def from_settings(cls, settings) -> ApiKeys:
        return cls(settings.api_keys.split(","), settings.api_keys_file)

    @property
    def enabled(self) -> bool:
        """True when any key is configured, or a keys file (even an empty one: then nobody gets in)."""
        return bool(self._static) or self._file is not None

    def _load(self, st: os.stat_result) -> None:
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        try:
            keys = _read_keys_file(self._file)
        except InvalidKeys:
            self._stamp = stamp  # this version is not read again; the next change is
            raise
        self._from_file, self._stamp, self._warned = keys, stamp, False
        log.info("API keys loaded from %s: %d key(s)", self._file, len(self._from_file))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._file is None or now < self._next_check:
            return
        self._next_check = now + self._interval
        try:
            st = os.stat(self._file)
            if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                self._load(st)
        except FileNotFoundError:  # deleted: its keys are revoked (until it is back)
            if self._stamp is not None:
                log.warning("api_keys_file %s is gone: its %d key(s) are revoked%s", self._file, len(self._from_file),
                            f", the {len(self._static)} key(s) of api_keys stay" if self._static else "")
                self._from_file, self._stamp, self._warned = (), None, False
        except InvalidKeys as e:  # keep the keys of the last valid version
            log.error("api_keys_file %s is not applied, keeping the previous %d key(s): %s",
                      self._file, len(self._from_file), e)
        except OSError as e:  # keep the last good keys; warn once until the file reads again
            if not self._warned:
                self._warned = True
                log.warning("api_keys_file %s cannot be read, keeping the last %d key(s): %s",
                            self._file, len(self._from_file), e)

    def check(self, presented: str | None) -> bool:
        """Whether ``presented`` is an accepted key. Compares digests with every stored one (no early exit)."""
        self._maybe_reload()
        if not presented:
            return False
        digest = _digest(presented)
        found = False
        for stored in self._static + self._from_file:
            found |= hmac.compare_digest(stored, digest)
        return found


def key_from_pairs(pairs: Iterable[tuple[str, str]]) -> str | None:
    """The key in ``Authorization: Bearer <key>`` (preferred) or ``x-api-key`` among lower-case (name, value) pairs."""
    api_key = None
    for name, value in pairs:
        if name == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == "x-api-key" and api_key is None:
            api_key = value.strip() or None
    return api_key


def key_from_headers(headers) -> str | None:
    """The presented key from ASGI headers ((bytes, bytes) pairs) or gRPC metadata ((str, str) pairs)."""
    def text(s):
        return s.decode("latin-1") if isinstance(s, bytes) else s
    return key_from_pairs((text(n).lower(), text(v)) for n, v in headers or ())


class ApiKeyMiddleware:
    """ASGI middleware: 401 for HTTP requests outside ``public_paths`` without a valid key."""

    def __init__(self, app, keys: ApiKeys, public_paths: Iterable[str] = (),
                 on_reject: Callable[[str], None] | None = None):
        self.app, self.keys, self.public = app, keys, frozenset(public_paths)
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if (scope["type"] not in ("http", "websocket") or not self.keys.enabled
                or scope["path"] in self.public or scope.get("method") == "OPTIONS"):
            return await self.app(scope, receive, send)  # OPTIONS: CORS preflights carry no credentials
        key = key_from_headers(scope["headers"])
        if self.keys.check(key):
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject(scope["path"])
        if scope["type"] == "websocket":  # closing before accept: the server answers 403
            return await send({"type": "websocket.close", "code": 1008})
        body = error_body(Unauthenticated(INVALID if key else MISSING), scope["path"])
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: calls to methods outside ``public_methods`` without a valid key end with UNAUTHENTICATED."""

    def __init__(self, keys: ApiKeys, public_methods: Iterable[str] = ()):
        self.keys, self.public = keys, frozenset(public_methods)

    async def intercept_service(self, continuation, details):
        if not self.keys.enabled or details.method in self.public:
            return await continuation(details)
        key = key_from_headers(details.invocation_metadata)
        if self.keys.check(key):
            return await continuation(details)
        # The method's handler only tells its kind and (de)serializers; an unknown method gets
        # UNAUTHENTICATED too, so callers without a key learn nothing about which methods exist.
        handler = await continuation(details) or grpc.unary_unary_rpc_method_handler(None)

        async def abort(request_or_iterator, context):
            await context.abort(Unauthenticated.grpc_status, INVALID if key else MISSING)

        kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        return kind[handler.request_streaming, handler.response_streaming](
            abort, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
