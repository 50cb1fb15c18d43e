"""The circuit breaker toward TF Serving (serving/backends/tfserving.py uses it): after
``failures`` calls in a row that find TF Serving not answering, calls fail fast for ``open_s``,
then one probe call decides."""

from __future__ import annotations

import logging
import threading
import time

from serving.errors import Unavailable

log = logging.getLogger("serving.tfserving")


class Breaker:
    """The circuit breaker toward TF Serving; thread-safe (Predict runs in several worker threads).

    - closed: calls go through. Calls in a row that end DEADLINE_EXCEEDED or UNAVAILABLE are
      counted: Predicts (after their retries) and status polls. A Predict that TF Serving
      answered (even with an error) resets the count; an answered poll resets only the polls'
      part of it (TF Serving may answer GetModelStatus while its Predicts hang). ``failures``
      in a row: open.
    - open, for ``open_s``: :meth:`before_call` raises :class:`Unavailable` (503,
      Retry-After: the time left) and :meth:`refusal` gives readiness its reason. A poll that
      fails meanwhile starts the ``open_s`` again (TF Serving is still down: no client call is
      spent on a probe).
    - half-open, after ``open_s``: the next call goes through as the probe; calls meanwhile
      fail at once. The probe answered: closed; the probe failed: open again. Readiness
      holds in half-open (a gateway that a load balancer took out of rotation would else get
      no call to probe with, and stay out).

    ``failures`` 0: off (calls always go through, nothing is counted).
    """

    def __init__(self, failures: int, open_s: float, probe_s: float, address: str, clock=time.monotonic):
        self.threshold, self.open_s, self.probe_s, self.address = failures, open_s, probe_s, address
        self._clock = clock
        self._lock = threading.Lock()
        self._calls = 0  # Predicts in a row that failed (DEADLINE_EXCEEDED/UNAVAILABLE)
        self._polls = 0  # status polls in a row that failed
        self._last = ""  # the last failure, for the messages
        self._opened: float | None = None  # when it (last) opened; None: closed
        self._probe = 0  # the id of the probe in flight; 0: none
        self._probes = 0

    @property
    def failures(self) -> int:
        return self._calls + self._polls

    def state(self) -> str:
        """closed, open or half_open (for metrics and logs)."""
        with self._lock:
            if self._opened is None:
                return "closed"
            return "open" if self._clock() < self._opened + self.open_s else "half_open"

    def before_call(self) -> int:
        """Before a Predict: 0 (go ahead), a probe id (go ahead as the half-open probe: give it
        back to :meth:`answered`/:meth:`failed`/:meth:`release`), or raise Unavailable."""
        if not self.threshold:
            return 0
        with self._lock:
            if self._opened is None:
                return 0
            left = self._opened + self.open_s - self._clock()
            if left > 0:
                raise Unavailable(f"{self._why_open()}; retrying in {left:.1f} s", retry_after_s=left,
                                  reason="backend_unavailable")
            if self._probe:
                why = f"{self._why_open('half-open')}; one probe call to TF Serving is in flight"
                raise Unavailable(why, retry_after_s=self.probe_s, reason="backend_unavailable")
            self._probes += 1
            self._probe = self._probes
            log.info("circuit breaker half-open: probing TF Serving at %s with one call", self.address)
            return self._probe

    def refusal(self) -> str | None:
        """Why readiness fails while open; None when closed or half-open."""
        if not self.threshold:
            return None
        with self._lock:
            if self._opened is None:
                return None
            left = self._opened + self.open_s - self._clock()
            return f"{self._why_open()}; retrying in {left:.1f} s" if left > 0 else None

    def answered(self, probe: int = 0) -> None:
        """TF Serving answered a Predict (a result, or an error of its own): closed."""
        if not self.threshold:
            return
        with self._lock:
            self._end_probe(probe)
            if self._opened is not None:
                log.warning("circuit breaker closed: TF Serving at %s answers again", self.address)
            self._calls = self._polls = 0
            self._opened = None

    def poll_answered(self) -> None:
        """TF Serving answered every status poll of a round."""
        with self._lock:
            self._polls = 0

    def failed(self, reason: str, probe: int = 0, poll: bool = False) -> None:
        """A Predict (after its retries) or a status poll ended DEADLINE_EXCEEDED or UNAVAILABLE."""
        if not self.threshold:
            return
        with self._lock:
            self._end_probe(probe)
            if poll:
                self._polls += 1
            else:
                self._calls += 1
            self._last = reason
            if self._opened is None:
                if self.failures >= self.threshold:
                    self._opened = self._clock()
                    log.error("%s; failing fast for %s s", self._why_open(), self.open_s)
            elif probe or poll:  # still down (a Predict begun before it opened tells nothing new)
                self._opened = self._clock()
                if probe:
                    log.error("circuit breaker open again for %s s: the probe failed: %s", self.open_s, reason)

    def release(self, probe: int) -> None:
        """The probe ended without telling whether TF Serving answers (an error of the gateway's own)."""
        with self._lock:
            self._end_probe(probe)

    def _end_probe(self, probe: int) -> None:
        if probe and probe == self._probe:
            self._probe = 0

    def _why_open(self, state: str = "open") -> str:
        return (f"circuit breaker {state}: {self.failures} consecutive TF Serving failures "
                f"at {self.address} (last: {self._last})")
