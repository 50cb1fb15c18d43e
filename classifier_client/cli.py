"""``classifier-client``: classify a file of texts or images through the gateway.

    classifier-client sentiment reviews.jsonl --field text -o out.jsonl --evaluate label
    classifier-client digits ./pngs/ -o digits.csv --target pod-a:50051 --target pod-b:50051

Sentiment goes over the bidirectional stream (StreamClassifySentiment) in chunks, one chunk in
flight per stream; digits (and ``--unary`` / ``--rest``) over unary calls. The chunks in flight in
the whole run adapt to the gateway (classifier_client.flow): the window halves on each refusal
(RESOURCE_EXHAUSTED / 429), grows back as chunks are answered, and a refused chunk waits the
server's pushback before it is sent again; a chunk refused for its size is cut in two. Output rows
(jsonl or csv) are in input order; ``--resume`` continues an interrupted run from its output file.
Exit status: 0 done, 1 the server refused (the message says why: no retry for NOT_FOUND,
INVALID_ARGUMENT and the like), could not be reached, or no chunk was answered for --retries failed
attempts / --give-up-after seconds, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter

from classifier_client.errors import ClientError
from classifier_client.grpc_client import AsyncClient
from classifier_client.io import (InputError, Writer, columns, image_bytes, input_format, normalise_label,
                                  output_format, read_records, rows_done, rows_of)
from classifier_client.flow import Flow
from classifier_client.protocol import MAX_ITEMS, Options, StreamStats
from classifier_client.stream import ordered_calls


class Progress:
    """Progress on stderr: rows, percent, rate and ETA. On a terminal one line, redrawn at most 5
    times a second; otherwise (a log, a CI job, ``2> file``) a plain line every ``every`` seconds
    (0: none), which log collectors keep as they are."""

    def __init__(self, total: int, done: int, enabled: bool, tty: bool = True, every: float = 10.0):
        self.total, self.start_done, self.done, self.enabled = total, done, done, enabled and (tty or every > 0)
        self.tty, self.every = tty, every
        self.t0 = self.last = time.monotonic()
        self.retries = 0

    def update(self, n: int, retries: int = 0, force: bool = False):
        self.done += n
        self.retries = retries
        now = time.monotonic()
        if not self.enabled or (now - self.last < (0.2 if self.tty else self.every) and not force):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = self.total - self.done
        eta = f"{int(left / rate) // 60}:{int(left / rate) % 60:02d}" if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100
        figures = f"{self.done}/{self.total} {pct:5.1f}% {rate:,.0f} rows/s ETA {eta}" + (f" retries {retries}" if retries else "")
        if self.tty:
            width = 30
            bar = "#" * int(width * pct / 100)
            sys.stderr.write(f"\r[{bar:<{width}}] {figures}\x1b[K")
        else:
            sys.stderr.write(f"classifier-client: progress {figures.replace('  ', ' ')}\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            self.update(0, self.retries, force=True)
            sys.stderr.write("\n")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--target", action="append", help="gateway gRPC address host:port (repeat for several pods: "
                   "round-robin), or dns:///host:port (every address, round_robin); with --rest, base URLs "
                   "(default 127.0.0.1:50051, REST http://127.0.0.1:8000)")
    g.add_argument("--rest", action="store_true", help="use the REST API instead of gRPC")
    g.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    g.add_argument("--ca", help="TLS, trusting this CA (PEM file)")
    g.add_argument("--api-key", help="sent as 'authorization: Bearer KEY'")
    g.add_argument("--header", action="append", default=[], metavar="K=V", help="extra metadata / header (repeat)")
    g = common.add_argument_group("model")
    g.add_argument("--model", default="", help="model name (default: the gateway's default of the kind)")
    g.add_argument("--version", type=int, default=0, help="pin a version number")
    g.add_argument("--version-label", default="", help='a version label from models.config ("stable", "canary")')
    g.add_argument("--whole-text", action="store_true", help="sentiment: score every 20-token window of each text "
                   "and combine them, instead of the last 20 tokens (slower: one row per window)")
    g = common.add_argument_group("input and output")
    g.add_argument("--format", default="auto", choices=["auto", "txt", "jsonl", "csv", "dir"], help="input format")
    g.add_argument("--field", help="jsonl field / csv column of the text (default text) or image (default image)")
    g.add_argument("-o", "--output", help="output file (default stdout)")
    g.add_argument("--output-format", default="auto", choices=["auto", "jsonl", "csv"],
                   help="default: csv when the output ends in .csv, else jsonl")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run: keep the output file's "
                   "rows, skip as many inputs, append the rest")
    g.add_argument("--keep", action="append", default=[], metavar="FIELD",
                   help="copy this jsonl field / csv column of each input record into its output row (an id "
                   "to join on, a timestamp, ...; repeat, or comma-separated)")
    g.add_argument("--evaluate", metavar="LABEL_FIELD", help="true labels in this field/column: print accuracy "
                   "and the confusion matrix at the end")
    g = common.add_argument_group("flow")
    g.add_argument("--chunk-size", type=int, default=512, help=f"items per request (1..{MAX_ITEMS}, the server's "
                   "limit); a chunk the gateway refuses for its size (too many windows, items or bytes) is cut in two")
    g.add_argument("--chunk-windows", type=int, default=256, help="with --whole-text, also about this many "
                   "windows (model rows) per chunk, estimated from the texts' lengths: about one model batch, "
                   "well under the gateway's max_queue_wait_s of work (a review makes ~6 windows: a 512-text "
                   "chunk would be ~0.8 s of work, admitted only when nothing else waits)")
    g.add_argument("--window", type=int, default=4, help="chunks in flight in the whole run (all streams, or unary "
                   "calls), at most: it starts there, halves on each refusal (RESOURCE_EXHAUSTED / 429; the "
                   "refused chunk waits the server's grpc-retry-pushback-ms / Retry-After) and grows back by "
                   "one per window's worth of answered chunks")
    g.add_argument("--streams", type=int, default=0, help="streams at once, one chunk in flight each (default: "
                   "enough for --window and every target)")
    g.add_argument("--deadline", type=float, default=30.0, help="seconds for each chunk's answer")
    g.add_argument("--retries", type=int, default=10, help="give up after this many failed attempts "
                   "(UNAVAILABLE, DEADLINE_EXCEEDED) with no chunk answered in between; refusals that "
                   "come with a pushback (the server pacing the run) are waited out, not counted. Any "
                   "other status (NOT_FOUND, INVALID_ARGUMENT, ...) ends the run at once")
    g.add_argument("--give-up-after", type=float, default=120.0, metavar="SECONDS",
                   help="give up when no chunk has been answered for this long (refusals included)")
    g.add_argument("--connect-retries", type=int, default=2, help="before anything was answered, give up "
                   "after this many more attempts that could not connect (refused, name not resolved)")
    g.add_argument("--unary", action="store_true", help="sentiment over unary calls instead of the stream")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    g.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="when stderr is not a terminal: a progress line this often (0: none)")

    p = argparse.ArgumentParser(prog="classifier-client", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    s = sub.add_parser("sentiment", parents=[common], help="texts: txt (one per line), jsonl or csv")
    s.add_argument("input", help="file ('-' = stdin, txt)")
    d = sub.add_parser("digits", parents=[common], help="images: a directory of PNG/JPEG, or jsonl/csv")
    d.add_argument("input", help="directory or file")
    return p


def _headers(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for h in values:
        k, sep, v = h.partition("=")
        if not sep or not k:
            raise InputError(f"--header {h!r}: expected KEY=VALUE")
        out.append((k.strip(), v))
    return out


async def _run(a, records, start: int, writer: Writer, progress: Progress, stats_out: list) -> None:
    kind = a.kind
    items = records.items[start:]
    if kind == "digits":
        items = (image_bytes(x) for x in items)
    if a.rest:
        from classifier_client.rest import AsyncRestClient

        client = AsyncRestClient(a.target or ["http://127.0.0.1:8000"], model=a.model, version=a.version,
                                 version_label=a.version_label, api_key=a.api_key, headers=_headers(a.header),
                                 ca=a.ca, timeout_s=a.deadline, retries=a.retries, whole_text=a.whole_text)

        async def call(chunk):
            return await client.once(kind, chunk)
        stats = StreamStats()
        stats_out.append(stats)
        whole = kind == "sentiment" and a.whole_text
        flow = Flow(a.window, retries=a.retries, give_up_s=a.give_up_after, stats=stats, split_refused=whole,
                    connect_retries=a.connect_retries)
        try:
            async for s, chunk, resp in ordered_calls(
                    call, items, a.chunk_size, flow, start, chunk_rows=a.chunk_windows if whole else None,
                    windows_of=(lambda r: [p.get("windows", 1) for p in r["predictions"]]) if whole else None):
                writer.write(rows_of(kind, s, _Json(resp), records.ids, records.kept))
                progress.update(len(chunk), stats.total_retries)
        finally:
            await client.close()
        return
    o = Options(targets=a.target or ["127.0.0.1:50051"], tls=a.tls, ca=a.ca, api_key=a.api_key, headers=_headers(a.header),
                model=a.model, version=a.version, version_label=a.version_label, whole_text=a.whole_text,
                chunk_size=a.chunk_size, chunk_windows=a.chunk_windows,
                window=a.window, streams=a.streams, deadline_s=a.deadline, retries=a.retries, give_up_s=a.give_up_after,
                connect_retries=a.connect_retries)
    async with AsyncClient(options=o) as client:
        stats_out.append(client.stats)
        if kind == "sentiment" and not a.unary:
            results = client.stream_sentiment(items, start)
        else:
            results = client.map_unary(kind, items, start)
        async for s, chunk, resp in results:
            writer.write(rows_of(kind, s, resp, records.ids, records.kept))
            progress.update(len(chunk), client.stats.total_retries)


class _Json:
    """A REST JSON answer seen like the protobuf one (``.predictions[i].label`` ...)."""

    class _P:
        def __init__(self, d):
            self.__dict__.update(d)
            self.tokens, self.unknown_tokens = d.get("tokens", 0), d.get("unknown_tokens", 0)
            self.windows = d.get("windows", 1)

    def __init__(self, d):
        self.predictions = [self._P(p) for p in d["predictions"]]


def evaluate(kind: str, truth: list, predicted: list) -> str:
    classes = ["negative", "positive"] if kind == "sentiment" else list(range(10))
    cm = Counter(zip(truth, predicted))
    right = sum(cm[(c, c)] for c in classes)
    n = len(truth)
    w = max(len(str(c)) for c in classes) + 1
    w = max(w, len(str(n)) + 1)
    lines = [f"accuracy: {right / n:.6f} ({right}/{n})" if n else "accuracy: n/a (no rows)",
             "confusion matrix (rows: true, columns: predicted):",
             " " * (w + 1) + "".join(f"{str(c):>{w}}" for c in classes)]
    for t in classes:
        lines.append(f"{str(t):>{w}} " + "".join(f"{cm[(t, p)]:>{w}}" for p in classes))
    return "\n".join(lines)


def _failure(a, e: ClientError, answered: bool) -> str:
    """The error line(s) of a failed run. UNAVAILABLE before any answer is no server's verdict:
    none was reached (connection refused, name not resolved, TLS handshake failed), and gRPC
    reports a TLS mismatch only as 'connections to all backends failing', so say what to check."""
    if e.code.name != "UNAVAILABLE" or answered:
        return f"classifier-client: the server refused: {e.code.name}: {e.message}"
    targets = ", ".join(a.target or ["http://127.0.0.1:8000" if a.rest else "127.0.0.1:50051"])
    line = f"classifier-client: could not reach the gateway at {targets}: {e.code.name}: {e.message}"
    if a.rest:
        return line  # httpx names the cause (certificate verify failed, connection refused, ...)
    if a.ca:
        return line + ("\nclassifier-client: over TLS: check that --ca is the CA that signed the gateway's "
                       "certificate and that the certificate names the target's host")
    if a.tls:
        return line + "\nclassifier-client: --tls trusts the system's CAs only: for a private CA, give --ca CA.pem"
    return line + "\nclassifier-client: if the gateway serves TLS, add --ca CA.pem (or --tls)"


def _load(a):
    """Checks the options and reads the input (and, with --resume, the rows already written):
    ``(records, output format, rows done, true labels or None)``; raises InputError."""
    if not 1 <= a.chunk_size <= MAX_ITEMS:
        raise InputError(f"--chunk-size must be 1..{MAX_ITEMS} (the server's limit per request)")
    if (a.chunk_windows < 1 or a.window < 1 or a.streams < 0 or a.retries < 0 or a.connect_retries < 0
            or a.give_up_after <= 0 or a.deadline <= 0 or a.progress_every < 0):
        raise InputError("--chunk-windows and --window must be >= 1, --streams, --retries, --connect-retries and "
                         "--progress-every >= 0, --deadline and --give-up-after > 0")
    if a.version and a.version_label:
        raise InputError("--version and --version-label: give one")
    if a.resume and not a.output:
        raise InputError("--resume needs -o/--output (the output file is the resume state)")
    fmt = input_format(a.input, a.format)
    field = a.field or ("text" if a.kind == "sentiment" else "image")
    keep = [k.strip() for value in a.keep for k in value.split(",") if k.strip()]
    if clash := set(keep) & set(columns(a.kind)):
        raise InputError(f"--keep {', '.join(sorted(clash))}: the output has such a column already")
    records = read_records(a.input, fmt, field, a.evaluate, keep)
    ofmt = output_format(a.output, a.output_format)
    done = rows_done(a.output, ofmt) if a.resume else []
    if len(done) > len(records.items):
        raise InputError(f"{a.output} has {len(done)} rows but the input only {len(records.items)}")
    truth = [normalise_label(a.kind, v) for v in records.labels] if records.labels is not None else None
    return records, ofmt, done, truth


def _collect_labels(writer: Writer, predicted: list) -> None:
    """Makes ``writer`` also append each written row's label to ``predicted`` (for --evaluate)."""
    inner_write = writer.write

    def write(rows):
        predicted.extend(r["label"] for r in rows)
        inner_write(rows)
    writer.write = write


def _execute(a, records, start: int, writer: Writer, progress: Progress, stats_out: list) -> tuple[int, str]:
    """Runs the classification; ``(exit status, error line(s))``. Closes the writer and progress bar."""
    code, error = 0, ""
    try:
        asyncio.run(_run(a, records, start, writer, progress, stats_out))
    except ClientError as e:
        code = 1
        error = _failure(a, e, answered=progress.done > start)
    except (InputError, OSError) as e:
        code = 2
        error = f"classifier-client: {e}"
    except KeyboardInterrupt:
        code = 130
        error = "classifier-client: interrupted (rerun with --resume to continue)"
    finally:
        writer.close()
        progress.close()
    return code, error


def _report(a, start: int, rows: int, dt: float, stats, code: int, error: str) -> None:
    """The summary line on stderr (unless --quiet and all went well), then the error, if any."""
    if not a.quiet or code:
        line = f"classifier-client: {rows} rows in {dt:.1f}s ({rows / max(dt, 1e-9):,.0f} rows/s)"
        if start:
            line += f", {start} kept from the earlier run"
        if stats is not None:
            line += f"; {stats.summary()}"
        print(line, file=sys.stderr)
    if code:
        print(error, file=sys.stderr)
        if a.output and rows + start:
            print(f"classifier-client: {rows + start} rows are in {a.output}; rerun with --resume to continue",
                  file=sys.stderr)


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        records, ofmt, done, truth = _load(a)
    except (InputError, OSError, UnicodeDecodeError) as e:
        print(f"classifier-client: {e}", file=sys.stderr)
        return 2

    start = len(done)
    predicted = [r["label"] if a.kind == "sentiment" else int(r["label"]) for r in done]
    writer = Writer(a.output, ofmt, a.kind, append=a.resume, keep=records.keep)
    progress = Progress(len(records.items), start, enabled=not a.quiet, tty=sys.stderr.isatty(), every=a.progress_every)
    stats_out: list = []
    t0 = time.monotonic()
    if truth is not None:
        _collect_labels(writer, predicted)

    code, error = _execute(a, records, start, writer, progress, stats_out)
    stats = stats_out[0] if stats_out else None
    _report(a, start, progress.done - start, time.monotonic() - t0, stats, code, error)
    if code:
        return code
    if truth is not None:
        print(evaluate(a.kind, truth, predicted), file=sys.stderr if a.output is None else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
