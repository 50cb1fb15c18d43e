"""REST clients (sync :class:`RestClient`, async :class:`AsyncRestClient`) over httpx.

Same retry policy as gRPC: 429 (``Retry-After`` honoured: seconds, fractional or not, or an
HTTP-date), 503 and 504 are retried with exponential backoff and jitter; other errors raise
:class:`ClientError` with the server's message. A batch run (the CLI's ``--rest``) calls
:meth:`AsyncRestClient.once` through ``ordered_calls``, which shares one flow control over the run
(classifier_client.flow: AIMD window, pushback, splitting, giving up).
Responses are the gateway's JSON (dicts).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from typing import Sequence

import grpc

from classifier_client.errors import HTTP_TO_GRPC, ClientError, retry_delay


def _body(kind: str, items: Sequence, model: str, version: int, version_label: str, whole_text: bool = False) -> dict:
    body: dict = {}
    if kind == "sentiment":
        body["texts"] = list(items)
    else:
        body["images_b64"] = [base64.b64encode(bytes(i)).decode() for i in items]
    if model:
        body["model"] = model
    if version:
        body["version"] = version
    if version_label:
        body["version_label"] = version_label
    if whole_text and kind == "sentiment":
        body["whole_text"] = True
    return body


def _error(r) -> ClientError:
    try:
        message = r.json()["error"]["message"]
    except Exception:  # noqa: BLE001
        message = r.text[:500]
    code = getattr(grpc.StatusCode, HTTP_TO_GRPC.get(r.status_code, "UNKNOWN"))
    return ClientError(code, f"HTTP {r.status_code}: {message}", retry_after_s(r.headers.get("retry-after")))


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds (fractional accepted) or an HTTP-date; None if absent
    or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _transport_error(e) -> ClientError:
    """A request that got no HTTP answer: DEADLINE_EXCEEDED when it timed out waiting for one,
    else UNAVAILABLE (not connected, connection lost)."""
    import httpx

    if isinstance(e, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in time ({type(e).__name__}: {e})")
    return ClientError(grpc.StatusCode.UNAVAILABLE, str(e) or type(e).__name__)


class _Base:
    def __init__(self, urls: str | Sequence[str] = "http://127.0.0.1:8000", *, model: str = "", version: int = 0,
                 version_label: str = "", api_key: str | None = None, headers: Sequence[tuple[str, str]] = (),
                 ca: str | None = None, timeout_s: float = 30.0, retries: int = 10, backoff_base_s: float = 0.1,
                 backoff_cap_s: float = 5.0, whole_text: bool = False):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.model, self.version, self.version_label = model, version, version_label
        self.whole_text = whole_text
        self.headers = dict(headers)
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.verify = ca or True
        self.timeout, self.retries, self.base, self.cap = timeout_s, retries, backoff_base_s, backoff_cap_s
        self._next = itertools.count()

    def _url(self, kind: str) -> str:
        return self.urls[next(self._next) % len(self.urls)].rstrip("/") + f"/v1/{kind}:predict"


class RestClient(_Base):
    def __init__(self, *a, **kw):
        import httpx

        super().__init__(*a, **kw)
        self.http = httpx.Client(headers=self.headers, verify=self.verify, timeout=self.timeout)

    def _post(self, kind: str, items: Sequence) -> dict:
        import httpx

        body, failures = _body(kind, items, self.model, self.version, self.version_label, self.whole_text), 0
        while True:
            try:
                r = self.http.post(self._url(kind), json=body)
                if r.status_code == 200:
                    return r.json()
                err = _error(r)
            except httpx.TransportError as e:
                err = _transport_error(e)
            failures += 1
            time.sleep(retry_delay(err, failures, self.retries, self.base, self.cap))

    def sentiment(self, texts: Sequence[str]) -> dict:
        return self._post("sentiment", texts)

    def digits(self, images: Sequence[bytes]) -> dict:
        """PNG/JPEG bytes per image."""
        return self._post("digits", images)

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRestClient(_Base):
    def __init__(self, *a, **kw):
        import httpx

        super().__init__(*a, **kw)
        self.http = httpx.AsyncClient(headers=self.headers, verify=self.verify, timeout=self.timeout)

    async def once(self, kind: str, items: Sequence) -> dict:
        """One attempt (the next URL): the JSON answer, or :class:`ClientError` (no retry). What
        ``ordered_calls`` calls: it does the retries, pushback and splitting of a batch run."""
        import httpx

        body = _body(kind, items, self.model, self.version, self.version_label, self.whole_text)
        try:
            r = await self.http.post(self._url(kind), json=body)
        except httpx.TransportError as e:
            raise _transport_error(e) from None
        if r.status_code == 200:
            return r.json()
        raise _error(r)

    async def _post(self, kind: str, items: Sequence) -> dict:
        failures = 0
        while True:
            try:
                return await self.once(kind, items)
            except ClientError as err:
                failures += 1
                delay = retry_delay(err, failures, self.retries, self.base, self.cap)
            await asyncio.sleep(delay)

    async def sentiment(self, texts: Sequence[str]) -> dict:
        return await self._post("sentiment", texts)

    async def digits(self, images: Sequence[bytes]) -> dict:
        return await self._post("digits", images)

    async def close(self):
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
