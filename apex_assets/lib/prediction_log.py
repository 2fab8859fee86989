"""Asynchronous prediction log: every prediction to PostgreSQL, without slowing the answer.

Why a background writer: the line waits for the inspection answer (a part every 2.5 s), so the
request path may not wait for PostgreSQL, and a PostgreSQL outage may not lose the record that
monitoring, shadow comparison and the inspectors' queue depend on. The service calls
:meth:`PredictionLogger.submit`, which only puts the record on an in-memory queue (a few
microseconds). One daemon thread drains that queue in batches and writes each batch in one
transaction to ``inspection.predictions`` and, for production cases that need an inspector,
``inspection.human_review_queue``.

Why a spool on disk: when a write fails (PostgreSQL down, slow, restarted) the batch is appended
as JSON lines to ``spool_dir/predictions-<UTC date>.jsonl`` (fsync'ed), and replayed once a
connection succeeds again. Both inserts are ``ON CONFLICT (pk) DO NOTHING`` and the review id is
derived from the prediction id, so a replay after a partial failure (or a replay of a record
that did reach PostgreSQL) never duplicates a row.

Why file locks: several serving worker processes share one spool folder. Appends and the
replayer's rename of a live file to ``.claimed-<pid>-<token>`` both happen under a short lock on
``spool_dir/.lock`` (``flock``), so no append lands in a file that is being replayed and
deleted, and a spooling request never waits for a replay. The replayer also holds a ``flock``
on the claimed file while it works; a claimed file whose lock can be taken belongs to a writer
that died, and is replayed by the next writer that finds it.

Nothing is lost silently: a spool line that cannot be parsed, or a record that PostgreSQL rejects
for its content (e.g. a NUL byte in a text), goes to ``spool_dir/rejected.jsonl`` with the error;
a record is counted as ``dropped`` (and logged as an error) only when even the spool write fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

try:  # POSIX; the spool still works without it in a single process
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PREDICTION_VALUES",
    "REVIEW_NAMESPACE",
    "PredictionLogger",
    "PredictionRecord",
    "needs_review",
    "review_id_for",
]

log = logging.getLogger(__name__)

#: Decisions the serving contract allows (ARCHITECTURE section 7).
PREDICTION_VALUES = frozenset({"PASS", "FAIL", "HUMAN_REVIEW"})

#: Namespace of ``review_id = uuid5(REVIEW_NAMESPACE, str(prediction_id))``: a replay of the same
#: prediction always targets the same review row, so ON CONFLICT keeps it single.
REVIEW_NAMESPACE = uuid.UUID("b7c1f0e2-5a4d-4f3b-8e61-2d9a7c3e5f10")

#: A statement that hangs longer than this fails the batch, which is then spooled (slow PG).
STATEMENT_TIMEOUT_MS = 30_000

REJECTED_FILE = "rejected.jsonl"
_SPOOL_RE = re.compile(r"^predictions-(\d{4}-\d{2}-\d{2})\.jsonl(\.claimed-[A-Za-z0-9-]+)?$")

_PREDICTION_SQL = """
INSERT INTO inspection.predictions (
    prediction_id, request_id, image_id, camera_id, model_version, is_shadow, prediction,
    predicted_class, recommended_action, defects, probabilities, overall_confidence,
    inference_time_ms, predicted_at
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s)
ON CONFLICT (prediction_id) DO NOTHING
"""

_REVIEW_SQL = """
INSERT INTO inspection.human_review_queue (
    review_id, prediction_id, request_id, image_id, camera_id, model_version, predicted_class,
    overall_confidence, defects, probabilities, image_path, status
) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, 'OPEN')
ON CONFLICT (review_id) DO NOTHING
"""

_FIELDS = (
    "prediction_id",
    "request_id",
    "image_id",
    "camera_id",
    "model_version",
    "is_shadow",
    "prediction",
    "predicted_class",
    "recommended_action",
    "defects",
    "probabilities",
    "overall_confidence",
    "inference_time_ms",
    "predicted_at",
    "review_image_path",
)


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictionRecord:
    """One model's answer to one request: a ``predictions`` row (and maybe a review row).

    ``predicted_at`` must be timezone-aware; it is stored converted to UTC so the spool and the
    database agree whatever zone the caller used.
    """

    prediction_id: uuid.UUID
    request_id: uuid.UUID
    image_id: uuid.UUID
    camera_id: str
    model_version: str
    is_shadow: bool
    prediction: str
    predicted_class: str
    recommended_action: str
    defects: list[dict]
    probabilities: dict[str, float]
    overall_confidence: float
    inference_time_ms: float
    predicted_at: datetime
    review_image_path: str | None = None

    def __post_init__(self) -> None:
        if self.predicted_at.tzinfo is None or self.predicted_at.utcoffset() is None:
            raise ValueError("predicted_at must be timezone-aware (UTC)")
        if self.prediction not in PREDICTION_VALUES:
            raise ValueError(
                f"prediction must be one of {sorted(PREDICTION_VALUES)}, got {self.prediction!r}"
            )
        object.__setattr__(self, "predicted_at", self.predicted_at.astimezone(UTC))

    def to_json(self) -> str:
        """One JSON line (no newline inside) for the spool; :meth:`from_json` reverses it."""
        return json.dumps(
            {
                "prediction_id": str(self.prediction_id),
                "request_id": str(self.request_id),
                "image_id": str(self.image_id),
                "camera_id": self.camera_id,
                "model_version": self.model_version,
                "is_shadow": self.is_shadow,
                "prediction": self.prediction,
                "predicted_class": self.predicted_class,
                "recommended_action": self.recommended_action,
                "defects": self.defects,
                "probabilities": self.probabilities,
                "overall_confidence": self.overall_confidence,
                "inference_time_ms": self.inference_time_ms,
                "predicted_at": self.predicted_at.isoformat(),
                "review_image_path": self.review_image_path,
            },
            separators=(",", ":"),
            default=_json_default,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> PredictionRecord:
        """Parse and type-check a spool line; raises ``ValueError`` on anything malformed."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("a spool line must be a JSON object")
        missing = [name for name in _FIELDS[:-1] if name not in data]
        if missing:
            raise ValueError(f"missing fields: {', '.join(missing)}")
        for name in ("camera_id", "model_version", "prediction", "predicted_class"):
            _expect(data, name, str)
        _expect(data, "recommended_action", str)
        _expect(data, "is_shadow", bool)
        _expect(data, "defects", list)
        _expect(data, "probabilities", dict)
        if not all(isinstance(d, dict) for d in data["defects"]):
            raise ValueError("defects must be a list of objects")
        for name in ("overall_confidence", "inference_time_ms"):
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
        probabilities = {}
        for key, value in data["probabilities"].items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"probability of {key!r} must be a number")
            probabilities[key] = float(value)
        review_path = data.get("review_image_path")
        if review_path is not None and not isinstance(review_path, str):
            raise ValueError("review_image_path must be a string or null")
        try:
            ids = {n: uuid.UUID(str(data[n])) for n in ("prediction_id", "request_id", "image_id")}
            predicted_at = datetime.fromisoformat(str(data["predicted_at"]))
        except ValueError as exc:
            raise ValueError(f"bad id or timestamp: {exc}") from exc
        return cls(
            **ids,
            camera_id=data["camera_id"],
            model_version=data["model_version"],
            is_shadow=data["is_shadow"],
            prediction=data["prediction"],
            predicted_class=data["predicted_class"],
            recommended_action=data["recommended_action"],
            defects=data["defects"],
            probabilities=probabilities,
            overall_confidence=float(data["overall_confidence"]),
            inference_time_ms=float(data["inference_time_ms"]),
            predicted_at=predicted_at,
            review_image_path=review_path,
        )


def _expect(data: dict, name: str, kind: type) -> None:
    if not isinstance(data[name], kind):
        raise ValueError(f"{name} must be {kind.__name__}, got {type(data[name]).__name__}")


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and other ``.tolist()``-able values a model output may carry."""
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    """Replace NaN/inf by null: PostgreSQL jsonb rejects them, and the row matters more."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonb(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, default=_json_default)
    except ValueError:  # NaN / inf somewhere
        return json.dumps(_finite(value), allow_nan=False, default=_json_default)


def review_id_for(prediction_id: uuid.UUID) -> uuid.UUID:
    """The review row's id: a function of the prediction id, so replays are idempotent."""
    return uuid.uuid5(REVIEW_NAMESPACE, str(prediction_id))


def needs_review(record: PredictionRecord) -> bool:
    """A production record goes to the inspectors when it kept an image or asks for review.

    Shadow records never do: the shadow model only observes.
    """
    if record.is_shadow:
        return False
    return record.review_image_path is not None or record.prediction == "HUMAN_REVIEW"


def _prediction_params(r: PredictionRecord) -> tuple:
    return (
        r.prediction_id,
        r.request_id,
        r.image_id,
        r.camera_id,
        r.model_version,
        r.is_shadow,
        r.prediction,
        r.predicted_class,
        r.recommended_action,
        _jsonb(r.defects),
        _jsonb(r.probabilities),
        float(r.overall_confidence),
        float(r.inference_time_ms),
        r.predicted_at,
    )


def _review_params(r: PredictionRecord) -> tuple:
    return (
        review_id_for(r.prediction_id),
        r.prediction_id,
        r.request_id,
        r.image_id,
        r.camera_id,
        r.model_version,
        r.predicted_class,
        float(r.overall_confidence),
        _jsonb(r.defects),
        _jsonb(r.probabilities),
        r.review_image_path,
    )


# --------------------------------------------------------------------------------------------
# Spool files
# --------------------------------------------------------------------------------------------
def _flock(fh: BinaryIO, *, blocking: bool = True) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fh.fileno(), flags)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder/.lock``: appends and claims (renames) never interleave.

    Held only for one append or one rename, so a submit that has to spool never waits for a
    replay. ``flock`` also excludes other threads of this process (separate open files).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("ab") as fh:
        _flock(fh)
        yield


def _same_file(fh: BinaryIO, path: Path) -> bool:
    """Is the open file still the one at ``path`` (not renamed away or deleted)?"""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino) and own.st_nlink > 0


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append + flush + fsync, under the folder lock.

    A last line left without newline by a crash gets one first, so it cannot swallow ours.
    """
    payload = "".join(line + "\n" for line in lines).encode()
    with _dir_lock(path.parent), path.open("a+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size and os.pread(fh.fileno(), 1, size - 1) != b"\n":
            fh.write(b"\n")
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
        if size == 0:
            _fsync_dir(path.parent)


@dataclass
class _Claim:
    """A spool file taken for replay: its path and the open handle whose flock marks it ours."""

    path: Path
    handle: BinaryIO


# --------------------------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------------------------
_STOP = object()


@dataclass
class _FlushMarker:
    done: threading.Event = field(default_factory=threading.Event)
    all_in_db: bool = False


class PredictionLogger:
    """Queue + one writer thread + disk spool. See the module docstring for the guarantees.

    ``stats()`` counters: ``submitted`` (calls to submit), ``written`` (records committed from
    the queue), ``review_rows`` (review rows committed, queue and replay), ``spooled`` (records
    appended to the spool), ``replayed`` (records committed from the spool), ``queue_depth``,
    ``write_errors`` (failed connects, writes and replays), ``dropped`` (lost: even the spool
    write failed) and ``rejected`` (sent to ``rejected.jsonl``: unparseable spool lines and rows
    PostgreSQL refuses for their content).
    """

    def __init__(
        self,
        uri: str,
        spool_dir: Path,
        *,
        batch_size: int = 256,
        flush_interval_s: float = 0.2,
        max_queue: int = 100_000,
        retry_interval_s: float = 5.0,
        connect_timeout_s: float = 2.0,
    ) -> None:
        if batch_size < 1 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be >= 1")
        self.uri = uri
        self.spool_dir = Path(spool_dir)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.connect_timeout_s = connect_timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection | None = None
        self._next_connect = 0.0
        self._inflight: list[PredictionRecord] = []
        self._losses_at_last_flush = 0
        self._refused = 0  # records refused by PostgreSQL or unencodable (not corrupt lines)
        self._counts = dict.fromkeys(
            (
                "submitted",
                "written",
                "review_rows",
                "spooled",
                "replayed",
                "write_errors",
                "dropped",
                "rejected",
            ),
            0,
        )

    # -- public API ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the one daemon writer thread (idempotent); it connects and replays the spool."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError("this PredictionLogger is closed")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="prediction-log-writer", daemon=True
            )
            self._thread.start()

    def submit(self, record: PredictionRecord) -> None:
        """Queue a record for the writer; never blocks and never raises on database trouble.

        A full queue (PostgreSQL slower than the line for a long time) or a closed logger
        spools the record synchronously instead: slower (an fsync), but nothing waits forever
        and nothing is lost.
        """
        with self._count_lock:
            self._counts["submitted"] += 1
        if not self._closed:
            try:
                self._queue.put_nowait(record)
                return
            except queue.Full:
                pass
        self._spool([record])

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is in PostgreSQL or in the spool.

        Returns True when it all is in PostgreSQL: the writer is connected, no spool file is
        pending (after a replay attempt) and no record was dropped or refused by PostgreSQL
        since the previous flush (corrupt spool lines moved to rejected.jsonl do not count:
        they were not submitted here). Without a running writer the queued records are spooled and False is returned.
        """
        if not self._writer_alive():
            self._spool(self._drain_queue())
            return False
        marker = _FlushMarker()
        try:
            self._queue.put(marker, timeout=timeout_s)
        except queue.Full:
            return False
        return marker.done.wait(timeout_s) and marker.all_in_db

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, stop the writer thread, close the connection; leftovers go to the spool.

        When the writer cannot finish within ``timeout_s`` (PostgreSQL hanging), the queued
        records and the batch in flight are spooled: at worst a replay re-inserts rows that did
        reach PostgreSQL, which ON CONFLICT ignores.
        """
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._spool(self._drain_queue())
            return
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):  # then the join times out and we spool
            self._queue.put(_STOP, timeout=timeout_s)
        thread.join(max(0.0, deadline - time.monotonic()))
        leftovers = self._drain_queue()
        if thread.is_alive():
            log.warning("prediction log writer did not stop in %.1f s; spooling", timeout_s)
            leftovers = list(self._inflight) + leftovers
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
        self._spool(leftovers)

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and tests (see the class docstring)."""
        with self._count_lock:
            out = dict(self._counts)
        out["queue_depth"] = self._queue.qsize()
        return out

    def spool_files_pending(self) -> int:
        """Spool files waiting for a replay (any worker's): 0 when the log is all in PostgreSQL.

        Why not in :meth:`stats`: the spool folder is shared by every worker process, so this is
        one number for the service, not a count of this logger's own.
        """
        return len(self._pending_spool_files())

    # -- helpers shared by both sides ---------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self._counts[name] += n

    def _writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _drain_queue(self) -> list[PredictionRecord]:
        items: list[PredictionRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if isinstance(item, _FlushMarker):
                item.done.set()  # all_in_db stays False
            elif item is not _STOP:
                items.append(item)

    def _spool_path(self) -> Path:
        return self.spool_dir / f"predictions-{datetime.now(UTC):%Y-%m-%d}.jsonl"

    def _spool(self, records: Sequence[PredictionRecord]) -> None:
        """Append records to today's spool file; a record that cannot be written is dropped."""
        if not records:
            return
        lines: list[str] = []
        for record in records:
            try:
                lines.append(record.to_json())
            except Exception as exc:
                self._count("dropped")
                log.error("prediction %r dropped: cannot serialise it (%s)", record, exc)
        if not lines:
            return
        try:
            _append_lines(self._spool_path(), lines)
        except Exception as exc:
            self._count("dropped", len(lines))
            log.error(
                "%d predictions dropped: spool write to %s failed: %s",
                len(lines),
                self.spool_dir,
                exc,
            )
            return
        self._count("spooled", len(lines))

    def _reject(self, source: str, line: str, error: str, *, refused: bool = True) -> None:
        """Keep what cannot be written where a person will find it, with the reason.

        ``refused``: a record PostgreSQL (or the encoder) refused, as opposed to a spool line
        that was corrupt on disk; only the former makes :meth:`flush` report a loss. A corrupt
        spool line whose rejection cannot be written raises (its file is kept); a refused
        record is then counted as dropped and logged with its content.
        """
        entry = {
            "rejected_at": datetime.now(UTC).isoformat(),
            "source": source,
            "error": error,
            "line": line,
        }
        try:
            _append_lines(self.spool_dir / REJECTED_FILE, [json.dumps(entry)])
        except Exception as exc:
            if not refused:
                raise OSError(f"cannot write {REJECTED_FILE}: {exc}") from exc
            self._count("dropped")
            log.error("rejected prediction lost (%s): %s; line %s", exc, error, line)
            return
        with self._count_lock:
            self._counts["rejected"] += 1
            self._refused += int(refused)
        log.error("prediction rejected to %s: %s", REJECTED_FILE, error)

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._connect_if_due()
        except Exception:
            log.exception("prediction log writer error at start")
        stop = False
        while not stop:
            try:
                stop = self._step()
            except Exception:  # never let the writer die; its batch was already spooled
                log.exception("prediction log writer error")
        try:  # items put after the sentinel (a submit racing close)
            self._write_or_spool(self._drain_queue())
        finally:
            self._disconnect()

    def _step(self) -> bool:
        """One batch: wait for a first item, gather up to batch_size/flush_interval, write it."""
        try:
            # Wake up now and then (not a busy wait) to retry a lost connection and to replay
            # spool files that other worker processes left behind.
            item = self._queue.get(timeout=self.retry_interval_s)
        except queue.Empty:
            if self._conn is None:
                self._connect_if_due()
            elif self._pending_spool_files():
                self._replay_spool()
            return False
        batch: list[PredictionRecord] = []
        control = None
        deadline = time.monotonic() + self.flush_interval_s
        while True:
            if item is _STOP or isinstance(item, _FlushMarker):
                control = item
                break
            batch.append(item)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.batch_size or remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
        self._inflight = batch
        try:
            self._write_or_spool(batch)
        finally:
            self._inflight = []
        if isinstance(control, _FlushMarker):
            try:
                control.all_in_db = self._settle()
            finally:
                control.done.set()
        return control is _STOP

    def _settle(self) -> bool:
        """For flush: replay what can be replayed now, then say whether all is in PostgreSQL."""
        if self._pending_spool_files():
            if self._conn is None:
                self._connect_if_due()  # replays on success
            else:
                self._replay_spool()
        with self._count_lock:
            losses = self._counts["dropped"] + self._refused
        clean = losses == self._losses_at_last_flush
        self._losses_at_last_flush = losses
        return self._conn is not None and not self._pending_spool_files() and clean

    def _write_or_spool(self, batch: list[PredictionRecord]) -> None:
        if not batch:
            return
        conn = self._conn if self._conn is not None else self._connect_if_due()
        if conn is not None:
            try:
                committed, reviews = self._insert(conn, batch, source="queue")
            except Exception as exc:  # connection trouble, a missing table, ...: retry later
                self._count("write_errors")
                log.warning(
                    "prediction log: writing %d rows failed (%s); spooling", len(batch), exc
                )
                self._disconnect()
            else:
                self._count("written", committed)
                self._count("review_rows", reviews)
                return
        self._spool(batch)

    def _insert(
        self, conn: psycopg.Connection, records: Sequence[PredictionRecord], *, source: str
    ) -> tuple[int, int]:
        """Insert records in one transaction; returns (records committed, review rows).

        A record whose content PostgreSQL refuses (DataError, IntegrityError) or that cannot
        be encoded would fail every retry forever and hold back the rest of its spool file,
        so then each record is tried alone and the refused ones go to rejected.jsonl.
        Everything else (connection lost, statement timeout, missing table) propagates, and
        the caller spools the batch for a later retry.
        """
        rows: list[tuple[PredictionRecord, tuple, tuple | None]] = []
        for r in records:
            try:
                review = _review_params(r) if needs_review(r) else None
                rows.append((r, _prediction_params(r), review))
            except Exception as exc:
                self._reject(source, _safe_json(r), f"cannot encode: {exc}")
        try:
            return self._insert_rows(conn, rows)
        except _ROW_ERRORS:
            _raise_if_connection_lost(conn)
        committed = reviews = 0
        for row in rows:
            try:
                c, v = self._insert_rows(conn, [row])
            except _ROW_ERRORS as exc:
                _raise_if_connection_lost(conn)
                self._reject(source, _safe_json(row[0]), f"refused by PostgreSQL: {exc}")
                continue
            committed += c
            reviews += v
        return committed, reviews

    @staticmethod
    def _insert_rows(
        conn: psycopg.Connection, rows: Sequence[tuple[PredictionRecord, tuple, tuple | None]]
    ) -> tuple[int, int]:
        if not rows:
            return 0, 0
        reviews = [rv for _, _, rv in rows if rv is not None]
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(_PREDICTION_SQL, [p for _, p, _ in rows])
            if reviews:
                cur.executemany(_REVIEW_SQL, reviews)
        return len(rows), len(reviews)

    # -- connection ---------------------------------------------------------------------------
    def _connect_if_due(self) -> psycopg.Connection | None:
        """Open the connection unless a retry is not due yet; replay the spool on success."""
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now < self._next_connect:
            return None
        self._next_connect = now + self.retry_interval_s
        conn = None
        try:
            conn = psycopg.connect(
                self.uri,
                autocommit=True,
                connect_timeout=max(1, math.ceil(self.connect_timeout_s)),
            )
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),)
            )
        except Exception as exc:  # psycopg.Error, or a malformed URI
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._count("write_errors")
            log.warning(
                "prediction log: cannot connect (%s); spooling, retry in %.0f s",
                exc,
                self.retry_interval_s,
            )
            return None
        self._conn = conn
        log.info("prediction log: connected")
        self._replay_spool()
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        self._next_connect = time.monotonic() + self.retry_interval_s

    # -- replay -------------------------------------------------------------------------------
    def _pending_spool_files(self) -> list[Path]:
        """Spool files to replay, oldest first (date in the name, claimed before live)."""
        try:
            names = [p.name for p in self.spool_dir.iterdir()]
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            m = _SPOOL_RE.match(name)
            if m:
                found.append((m.group(1), 0 if m.group(2) else 1, name))
        return [self.spool_dir / name for *_, name in sorted(found)]

    def _replay_spool(self) -> None:
        """Replay every spool file; on a connection error keep the rest for the next try."""
        for path in self._pending_spool_files():
            if self._conn is None:
                return
            try:
                self._replay_file(path)
            except OSError as exc:  # the file, not the database
                log.warning("prediction log: cannot replay %s (%s)", path.name, exc)
            except Exception as exc:
                self._count("write_errors")
                log.warning("prediction log: replay of %s failed (%s)", path.name, exc)
                self._disconnect()
                return

    def _replay_file(self, path: Path) -> None:
        claim = self._claim(path)
        if claim is None:
            return
        try:
            self._quarantine_corrupt_lines(claim)
            batch: list[PredictionRecord] = []
            for record in _read_records(claim.path):
                batch.append(record)
                if len(batch) >= self.batch_size:
                    self._replay_batch(batch, claim.path.name)
                    batch = []
            self._replay_batch(batch, claim.path.name)
            claim.path.unlink()  # every row is committed
            _fsync_dir(self.spool_dir)
            log.info("prediction log: replayed and removed %s", claim.path.name)
        finally:
            claim.handle.close()  # releases the claim; a kept file is retried later

    def _replay_batch(self, batch: list[PredictionRecord], source: str) -> None:
        if not batch:
            return
        if self._conn is None:
            raise psycopg.OperationalError("connection lost during replay")
        committed, reviews = self._insert(self._conn, batch, source=source)
        self._count("replayed", committed)
        self._count("review_rows", reviews)

    def _claim(self, path: Path) -> _Claim | None:
        """Take a spool file for replay, or None when another live writer has it.

        A live file is renamed to a ``.claimed-`` name under the folder lock, so no append can
        land in it afterwards. A claimed file is ours while we hold its flock; one whose lock
        can be taken belongs to a writer that died, and is replayed by us.
        """
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            return None
        try:
            if not _flock(fh, blocking=False) or not _same_file(fh, path):
                fh.close()
                return None
            if ".claimed-" in path.name:
                return _Claim(path, fh)
            claimed = path.with_name(f"{path.name}.claimed-{_token()}")
            with _dir_lock(self.spool_dir):
                if not _same_file(fh, path):
                    fh.close()
                    return None
                os.rename(path, claimed)
            _fsync_dir(self.spool_dir)
            return _Claim(claimed, fh)
        except BaseException:
            fh.close()
            raise

    def _quarantine_corrupt_lines(self, claim: _Claim) -> None:
        """Move unparseable lines to rejected.jsonl; ``claim`` then holds only valid lines.

        The cleaned copy is written and locked under a hidden temporary name before it gets a
        claimed name, so no other writer can take it; the corrupt lines are fsync'ed to
        rejected.jsonl before the original is removed: a crash in between duplicates, never
        loses.
        """
        with claim.path.open("rb") as fh:
            if all(_parse_line(raw)[1] is None for raw in fh):
                return
        base = claim.path.name.split(".claimed-")[0]
        token = _token()
        tmp = claim.path.with_name(f".{base}.{token}.tmp")
        cleaned = claim.path.with_name(f"{base}.claimed-{token}")
        out = tmp.open("wb")
        try:
            _flock(out)
            with claim.path.open("rb") as src:
                for lineno, raw in enumerate(src, 1):
                    text, error = _parse_line(raw)
                    if error is not None:
                        self._reject(f"{claim.path.name}:{lineno}", text, error, refused=False)
                    elif text:
                        out.write(text.encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
            os.rename(tmp, cleaned)
            claim.path.unlink()
            _fsync_dir(self.spool_dir)
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        claim.handle.close()
        claim.path, claim.handle = cleaned, out


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


#: Errors caused by a record's content rather than by the database being unavailable.
_ROW_ERRORS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError, OverflowError)


def _raise_if_connection_lost(conn: psycopg.Connection) -> None:
    """A row error on a broken connection is connection trouble: let the caller spool."""
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection lost")


def _parse_line(raw: bytes) -> tuple[str, str | None]:
    """(text of the line, error or None); a blank line is valid and empty."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return "", None
    try:
        PredictionRecord.from_json(raw.strip())
    except Exception as exc:  # ValueError mostly; OverflowError for absurd numbers
        return text, str(exc)
    return text, None


def _read_records(path: Path) -> Iterator[PredictionRecord]:
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                yield PredictionRecord.from_json(raw.strip())


def _safe_json(record: Any) -> str:
    try:
        return record.to_json()
    except Exception:
        return repr(record)
