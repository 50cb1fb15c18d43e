"""Flow control of a batch run, shared by the gRPC stream (classifier_client.stream.StreamRun) and
the unary/REST path (``ordered_calls``): how many chunks may be in flight, when a failed chunk may
be sent again, when a chunk is cut in two, and when the run gives up.

:class:`Flow` is a plain state machine (no I/O, no event loop), one per run, shared by every
stream or call of the run, so that the total in flight adapts:

- **AIMD window** of chunks in flight: starts at ``window`` (the CLI's ``--window``); each
  RESOURCE_EXHAUSTED (gRPC) / 429 (REST) halves it (at least 1), at most once per window's worth
  of sends (the refusals of chunks sent before the cut are the same congestion, not a new one);
  each window's worth of answered chunks adds 1, up to ``cap`` (``window``: the user's ceiling,
  and the gateway admits only ~max_queue_wait_s of queued work, which a few chunks fill).
- **Pushback**: a refused chunk is not sent again before the server's ``grpc-retry-pushback-ms`` /
  ``Retry-After`` (times 1.0-1.2, so that clients told the same time do not come back together);
  other failures back off exponentially with full jitter.
- **Retried**: only UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED; any other status ends
  the run at once (0 retries), except a refusal for size, which splits the chunk in two.
- **Split**: a chunk refused for a per-request size limit (INVALID_ARGUMENT / 413 naming
  max_windows_per_request, max_items_per_request, max_request_pixels, max_body_bytes, or gRPC's
  message size; or RESOURCE_EXHAUSTED because its own rows exceed max_queue_items, which no wait
  can fix) is cut in two halves, sent again in order (several times if need be, down to one item).
  Whole text also: a chunk refused RESOURCE_EXHAUSTED three times while nothing else of the run
  was in flight, or four times in all (its own windows can be what the gateway refuses: see
  :meth:`Flow.failed`); its halves still wait the pushback. After a split for size,
  :class:`Chunker` cuts the next chunks no larger (and lets them grow back slowly); after a split
  for refusals it does not (the refusals may have been for others' work: a client that cut all
  its chunks smaller for them would get less of the gateway than a client beside it).
- **Giving up** only when no progress is made: after ``retries`` failed attempts (UNAVAILABLE,
  DEADLINE_EXCEEDED, or a refusal without pushback) with no chunk answered in between, or when no
  chunk has been answered for ``give_up_s`` seconds. Before the first answer, a gateway that
  cannot be connected to at all (connection refused, name not resolved) gets only
  ``connect_retries`` more attempts (a wrong port or host is reported in well under a second, not
  after ``retries`` backoffs); once the run has been answered, a lost connection is retried as
  any UNAVAILABLE (a gateway restarting). A refusal with pushback is the server pacing
  the run, not a failure: it counts only toward the time limit. While failures are unanswered,
  one chunk at a time goes out (a probe), so ``retries`` counts attempts, not streams.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import grpc

from classifier_client.errors import ClientError, backoff_s

# Per-request limits: a smaller request passes. (The gateway's messages name the setting; grpc's own
# "Received message larger than max (N vs. M)" is the message size limit of either side.)
SIZE_LIMIT = re.compile(r"max_windows_per_request|max_items_per_request|max_request_pixels|max_body_bytes"
                        r"|message larger than max")
# "queue for M is full (W rows waiting + N > max_queue_items=Q)": with N > Q, never admitted as it is.
QUEUE_ITEMS = re.compile(r"\+ (\d+) > max_queue_items=(\d+)")
PUSHBACK_JITTER = (1.0, 1.2)
# Whole text: a chunk refused (RESOURCE_EXHAUSTED) this many times while nothing else of the run was
# in flight, or this many times in all, is cut in two (see Flow.failed).
SPLIT_AFTER_ALONE_REFUSALS = 3
SPLIT_AFTER_REFUSALS = 4


def too_large(err: ClientError) -> bool:
    """Whether ``err`` refused a request for its own size: as it is, no wait lets it pass."""
    sized = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    if err.code in sized and SIZE_LIMIT.search(err.message):
        return True
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and (m := QUEUE_ITEMS.search(err.message)):
        return int(m.group(1)) > int(m.group(2))
    return False


def needs_split(err: ClientError, items: int) -> bool:
    """Whether ``err`` refused a chunk of ``items`` items for its size, so that halves may pass."""
    return items >= 2 and too_large(err)


@dataclass
class FlowStats:
    """The window's history: its value, the lowest it went, cuts and raises, and every change
    as ``(seconds since the run started, new window, "cut" | "raise")``."""

    window: int = 0
    window_min: int = 0
    window_max: int = 0
    cuts: int = 0
    raises: int = 0
    changes: list = field(default_factory=list)


class Retry(NamedTuple):
    """:meth:`Flow.failed`'s verdict: wait ``delay`` seconds, then send the chunk again, or its two
    halves when ``split``."""

    delay: float
    split: bool = False
    too_large: bool = False  # split for a size limit (not for refusals): later chunks are cut smaller


class Flow:
    """AIMD window, pushback, retry, split and give-up policy of one run (see the module's docstring).

    The caller (one event loop) asks :meth:`can_send`, calls :meth:`sent` when a chunk goes out
    (a ticket), then :meth:`answered` or :meth:`failed` with that ticket. ``stats`` (a StreamStats)
    gets the retries by status name and the window's history."""

    def __init__(self, window: int, *, cap: int | None = None, retries: int = 10, give_up_s: float = 120.0,
                 backoff_base_s: float = 0.1, backoff_cap_s: float = 5.0, stats=None, split_refused: bool = False,
                 connect_retries: int = 2, clock: Callable[[], float] = time.monotonic):
        self.connect_retries = connect_retries
        self.ever_answered = False
        self.split_refused = split_refused  # whole text: split a chunk refused SPLIT_AFTER_REFUSALS times
        self.cap = max(1, cap if cap is not None else window)
        self.limit = max(1, min(window, self.cap))
        self.retries, self.give_up_s = retries, give_up_s
        self.base, self.backoff_cap = backoff_base_s, backoff_cap_s
        self.stats, self.clock = stats, clock
        self.t0 = clock()
        self.inflight = 0
        self.failures = 0  # failed attempts since the last answer
        self.last_answer = self.t0
        self._sent = 0  # tickets handed out
        self._cut_at = 0  # tickets up to this one were sent before the last cut
        self._acked = 0  # answers since the window last grew
        self._alone: set[int] = set()  # tickets of chunks sent while nothing else of the run was in flight
        self.window = FlowStats(self.limit, self.limit, self.limit)
        if stats is not None:
            stats.flow = self.window

    def can_send(self) -> bool:
        # After a failure nobody answered yet, probe with one chunk at a time.
        return self.inflight < (1 if self.failures else self.limit)

    def sent(self) -> int:
        self._sent += 1
        if not self.inflight:
            self._alone.add(self._sent)
        self.inflight += 1
        return self._sent

    def abandoned(self, ticket: int = 0) -> None:
        """A chunk in flight whose answer will not be read (the run ends)."""
        self.inflight -= 1
        self._alone.discard(ticket)

    def answered(self, ticket: int) -> None:
        self.inflight -= 1
        self._alone.discard(ticket)
        self.failures = 0
        self.ever_answered = True
        self.last_answer = self.clock()
        self._acked += 1
        if self._acked >= self.limit:
            self._acked = 0
            if self.limit < self.cap:
                self._set(self.limit + 1, "raise")

    def failed(self, ticket: int, err: ClientError, chunk) -> Retry:
        """After ``chunk`` (``.items``; ``.strikes`` and ``.refusals``: its refusals while alone in
        flight and in all, so far) sent with ``ticket`` failed with ``err``: when and how to send it
        again. Raises ``err`` (annotated when the run gives up) when it is final."""
        self.inflight -= 1
        alone = ticket in self._alone
        self._alone.discard(ticket)
        items = len(chunk.items)
        if needs_split(err, items):  # too large as it is: no wait, no cut of the window can help
            if self.stats is not None:
                self.stats.chunks_split += 1
                if err.retryable:  # RESOURCE_EXHAUSTED (queue or message size): counted as a refusal
                    self.stats.retries[err.label] += 1
            return Retry(0.0, True, True)
        if not err.retryable:
            raise err
        if too_large(err):  # one item, too large for the queue by itself: never admitted
            raise ClientError(err.code, f"{err.message} (one item alone is over the limit: not retried)",
                              err.pushback_s, err.label) from None
        now = self.clock()
        overload = err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        if overload and ticket > self._cut_at:
            self._cut_at = self._sent
            self._acked = 0
            self._set(max(1, self.limit // 2), "cut")
        paced = overload and err.pushback_s is not None
        if not paced:
            self.failures += 1
        if err.unreached and not self.ever_answered and self.failures > self.connect_retries:
            raise ClientError(err.code, f"{err.message} (giving up: {self.failures} attempts could not connect, "
                                        "nothing answered yet: is the address right, is the gateway up?)",
                              err.pushback_s, err.label) from None
        if self.failures > self.retries:
            raise ClientError(err.code, f"{err.message} (giving up: {self.failures} failed attempts in a row, "
                                        f"no chunk answered in between)", err.pushback_s, err.label) from None
        if now - self.last_answer > self.give_up_s:
            raise ClientError(err.code, f"{err.message} (giving up: no chunk answered for "
                                        f"{now - self.last_answer:.0f}s)", err.pushback_s, err.label) from None
        if self.stats is not None:
            self.stats.retries[err.label] += 1
            self.stats.last_error = str(err)
        if not paced:
            return Retry(backoff_s(max(1, self.failures), self.base, self.backoff_cap, err.pushback_s))
        delay = err.pushback_s * random.uniform(*PUSHBACK_JITTER)
        # The same chunk refused again while nothing else of the run was in flight (or again and
        # again): the work ahead may be its own. The gateway admits a whole-text request on an
        # estimate of its windows, then the windows it makes past that estimate against a queue
        # that holds its own: a chunk of more than max_queue_wait_s of work whose texts make more
        # windows than estimated is refused by itself, every time, even alone. Halves of it may
        # pass (and later chunks are cut smaller); they still wait the pushback.
        chunk.refusals += 1
        chunk.strikes += alone
        if self.split_refused and items >= 2 and (chunk.strikes >= SPLIT_AFTER_ALONE_REFUSALS
                                                   or chunk.refusals >= SPLIT_AFTER_REFUSALS):
            if self.stats is not None:
                self.stats.chunks_split += 1
            return Retry(delay, True)
        return Retry(delay)

    def _set(self, limit: int, why: str) -> None:
        if limit == self.limit:
            return
        self.limit = limit
        w = self.window
        w.window = limit
        w.window_min, w.window_max = min(w.window_min, limit), max(w.window_max, limit)
        if why == "cut":
            w.cuts += 1
        else:
            w.raises += 1
        w.changes.append((round(self.clock() - self.t0, 3), limit, why))


# Whole text: a prior for the windows a text makes per character (IMDB reviews: ~207 characters a
# window with the served models' 20-token windows), corrected by the answers' window counts.
CHARS_PER_WINDOW = 200.0
# After a split, chunks are cut no larger than the halves; every GROW_AFTER answers without a split
# they may grow by an eighth again, up to the configured size (the server's load may have dropped).
GROW_AFTER = 32
MIN_ROWS = 32.0  # a whole-text chunk is not shrunk below about this many windows by refusals


class Chunker:
    """Cuts ``items`` into chunks, in order, of at most ``size`` items; with ``rows`` (whole text:
    the windows the gateway makes of the texts, each one a model row), also of at most about
    ``rows`` rows, a text's windows estimated from its length at the rate learned from the answers
    (:meth:`learn`), so that a whole-text chunk costs the model about one batch instead of ~6x
    what a last-20 chunk does. A split (:meth:`split`) makes later chunks no larger
    than the halves; they grow back slowly (:meth:`answered`)."""

    def __init__(self, items: Iterator, size: int, rows: int | None = None):
        self.it = items
        self.max_size, self.max_rows = size, rows
        self.size, self.rows = float(size), float(rows) if rows else None
        self._peek: list = []
        self.windows, self.chars = 0.0, 0.0  # learned from answers
        self._since_split = 0

    def rows_of(self, text) -> float:
        if not isinstance(text, str):
            return 1.0
        rate = self.windows / self.chars if self.chars > 20_000 else 1 / CHARS_PER_WINDOW
        return max(1.0, len(text) * rate)

    def cut(self) -> list:
        size = max(1, int(self.size))
        if not self.rows:
            head, self._peek = self._peek[::-1], []
            return head + [x for _, x in zip(range(size - len(head)), self.it)]
        chunk: list = []
        rows = 0.0
        while len(chunk) < size:
            if self._peek:
                x = self._peek.pop()
            else:
                try:
                    x = next(self.it)
                except StopIteration:
                    break
            r = self.rows_of(x)
            if chunk and rows + r > self.rows:
                self._peek.append(x)
                break
            chunk.append(x)
            rows += r
        return chunk

    def split(self, items: Sequence, shrink: bool = True) -> tuple[list, list]:
        """The two halves of a chunk that was refused as it was; with ``shrink`` (refused for its
        size), later chunks are cut no larger."""
        h = len(items) // 2
        first, second = list(items[:h]), list(items[h:])
        if not shrink:
            return first, second
        self.size = min(self.size, float(max(1, len(second))))
        if self.rows:
            self.rows = max(MIN_ROWS, min(self.rows, max(sum(map(self.rows_of, first)),
                                                          sum(map(self.rows_of, second)))))
        self._since_split = 0
        return first, second

    def answered(self) -> None:
        self._since_split += 1
        if self._since_split >= GROW_AFTER:
            self._since_split = 0
            self.size = min(float(self.max_size), self.size * 1.125)
            if self.rows:
                self.rows = min(float(self.max_rows), self.rows * 1.125)

    def learn(self, texts: Sequence, windows: Sequence[int]) -> None:
        """The answer's windows per text (``SentimentPrediction.windows``) for these texts."""
        if self.rows and len(texts) == len(windows):
            self.windows += sum(windows)
            self.chars += sum(len(t) for t in texts if isinstance(t, str))
