"""BatchPipeline: one polled batch in, the records to publish out. No I/O.

``decode → state → engine → forecast stages → encode``: the pure part of the worker's loop,
kept apart from Kafka so it can be tested and benchmarked on its own. The worker decodes the
records of one poll (:meth:`BatchPipeline.decode`), brings their devices into memory
(``bring_in.py``: load, evict, re-warm), applies them (:meth:`BatchPipeline.apply`), and
publishes what comes back (forecasts, alerts, dead letters) in one unit with the offsets to
commit. :meth:`BatchPipeline.handle` is decode and apply, for devices all in memory.

Every consumed reading ends in exactly one bucket of :class:`BatchCounts`: ``forecasts``,
``warmup``, ``late``, ``duplicate`` or ``dlq`` (dead letters, including late readings when
``STREAM_LSTM_LATE_POLICY=dlq``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stream_lstm import alerts
from stream_lstm.config import Settings
from stream_lstm.encoding import dead_letter, dlq_headers, encode_forecast
from stream_lstm.engine import BatchedEngine
from stream_lstm.forecast import assemble, interval_quantile
from stream_lstm.messages import ErrorCode, InvalidReading, ReadingDecoder
from stream_lstm.signals import raise_if_interrupted
from stream_lstm.stages import stages_for
from stream_lstm.state.ingest import DUPLICATE, LATE, StepBatch, ingest
from stream_lstm.state.table import DeviceTable


class SourceRecord(Protocol):
    """What the pipeline needs of a consumed record (kafka-python's ConsumerRecord fits).

    Parameters
    ----------
    topic, partition, offset
        Where the record was read (dead letters name it).
    key, value
        The device id's UTF-8 bytes and the reading (either may be ``None``).

    Examples
    --------
    >>> from collections import namedtuple
    >>> Rec = namedtuple("Rec", "topic partition offset key value")
    >>> rec = Rec("sensor-readings", 0, 7, b"a", b'{"device_id": "a", "ts": 1, "value": 2.0}')
    >>> decode_records(ReadingDecoder(Settings()), [rec], now=1.0).sources[0].offset
    7
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


# (topic, key, value, headers)
OutRecord = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]


@dataclass
class BatchCounts:
    """Where the readings of a batch went; ``consumed`` equals the sum of the others.

    Parameters
    ----------
    consumed
        Records read; each is counted once more in ``forecasts``, ``warmup``, ``late``,
        ``duplicate`` or ``dlq``.
    anomalies, resets
        Forecasts flagged anomalous; readings whose gap reset the device's h/c.
    alerts_opened, alerts_closed
        Alert events of the batch.
    dlq_by_reason
        Dead letters by error code.

    Examples
    --------
    >>> total = BatchCounts(consumed=2, forecasts=1, dlq=1, dlq_by_reason={"not_json": 1})
    >>> total.add(BatchCounts(consumed=1, duplicate=1))
    >>> total.consumed, total.duplicate, total.dlq_by_reason
    (3, 1, {'not_json': 1})
    """

    consumed: int = 0
    forecasts: int = 0
    warmup: int = 0
    late: int = 0
    duplicate: int = 0
    dlq: int = 0
    anomalies: int = 0
    resets: int = 0
    alerts_opened: int = 0
    alerts_closed: int = 0
    dlq_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, other: BatchCounts) -> None:
        for name in ("consumed", "forecasts", "warmup", "late", "duplicate", "dlq", "anomalies",
                     "resets", "alerts_opened", "alerts_closed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, k in other.dlq_by_reason.items():
            self.dlq_by_reason[reason] = self.dlq_by_reason.get(reason, 0) + k


@dataclass
class BatchOutput:
    """What one batch produced: records to publish, counts, and the slots it touched.

    Parameters
    ----------
    records
        ``(topic, key, value, headers)`` to publish, in order.
    counts
        Where the batch's readings went.
    touched
        Slots whose state changed (for the changelog).
    oldest_ts
        Oldest event time that was forecast (the latency metric); ``inf`` when none.
    moved
        ``(device id, old partition)`` of the devices whose readings moved partitions.

    Examples
    --------
    >>> out = BatchOutput([("sensor-forecasts", b"a", b"{}", None)], BatchCounts(1, 1), np.array([0]))
    >>> out.counts.forecasts, len(out.records), out.oldest_ts
    (1, 1, inf)
    """

    records: list[OutRecord]
    counts: BatchCounts
    touched: np.ndarray  # slots whose state changed (for the changelog)
    oldest_ts: float = float("inf")  # oldest reading ts that was forecast (latency metric)
    moved: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Decoded:
    """A batch's readings, decoded: the valid ones (columns, in batch order) and the dead.

    Parameters
    ----------
    consumed
        Records decoded.
    ids, ts, values, partitions, sources
        Per valid reading: device id, event time, channel values, partition and record.
    dead
        ``(record, error code, reason)`` per invalid one.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from stream_lstm.encoding import encode_reading
    >>> reading = encode_reading("a", 1.0, [2.0])
    >>> good = SimpleNamespace(topic="t", partition=0, offset=0, key=b"a", value=reading)
    >>> bad = SimpleNamespace(topic="t", partition=0, offset=1, key=b"a", value=b"oops")
    >>> d = decode_records(ReadingDecoder(Settings()), [good, bad], now=1.0)
    >>> d.consumed, d.ids, d.values, [code for _, code, _ in d.dead]
    (2, ['a'], [(2.0,)], ['not_json'])
    """

    consumed: int = 0
    ids: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    values: list[tuple[float, ...]] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    sources: list[SourceRecord] = field(default_factory=list)
    dead: list[tuple[SourceRecord, str, str]] = field(default_factory=list)


def decode_records(decoder: ReadingDecoder, records: Iterable[SourceRecord], now: float) -> Decoded:
    """Decode records in order: the valid readings as columns, the invalid ones as dead letters
    with their reason. The worker and the trainer service decode alike.

    A reading's far-future check is against its record's Kafka timestamp: a replay after a
    restart then decides as the live pass did, where the clock of the moment would accept a
    reading once sent to the DLQ. A Kafka record without a timestamp (CreateTime 0 or -1, which
    no client writes unless told to) cannot be checked alike twice: once dead-lettered live, its
    reading was taken in on a replay, and the device's later readings counted late. It is a
    dead letter (``no_record_time``) on every pass. (``now``: records with no timestamp field
    at all, as the offline tools make them.)"""
    d = Decoded()
    decode = decoder.decode
    for rec in records:
        d.consumed += 1
        stamp = getattr(rec, "timestamp", None)
        untimed = stamp is not None and stamp <= 0
        try:
            r = decode(rec.value, rec.key, math.inf if untimed else now if stamp is None else stamp / 1000.0)
            if untimed:
                raise InvalidReading(ErrorCode.NO_RECORD_TIME, f"its Kafka record has no timestamp "
                                     f"({stamp}), so its ts cannot be checked against when it was sent")
        except InvalidReading as exc:
            d.dead.append((rec, str(exc.code), exc.reason))
            continue
        d.ids.append(r.device_id)
        d.ts.append(r.ts)
        d.values.append(r.values)
        d.partitions.append(rec.partition)
        d.sources.append(rec)
    return d


class BatchPipeline:
    """Decodes, applies state, steps the engine and encodes one batch.

    Parameters
    ----------
    settings
        All settings (topics, event-time rules, warm-up, intervals, anomaly threshold).
    table
        The in-memory device state.
    engine
        The batched engine over ``table``.
    version
        Callable returning the served model version: a device with no h/c yet starts under
        it. Each forecast and alert event carries its own device's version
        (``table.model_version``): after a hot swap, the model that made it.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from stream_lstm.encoding import encode_reading
    >>> from stream_lstm.models.lstm import SimpleLSTM
    >>> table = DeviceTable(max_devices=8, window=4, n_features=1, num_layers=1, hidden_size=4)
    >>> engine = BatchedEngine(SimpleLSTM(n_features=1, hidden_size=4, num_layers=1, horizon=2), table)
    >>> pipe = BatchPipeline(Settings(min_history=1, window=4, hidden_size=4), table, engine, lambda: "v1")
    >>> reading = encode_reading("a", 1.0, [2.0])
    >>> rec = SimpleNamespace(topic="t", partition=0, offset=0, key=b"a", value=reading)
    >>> out = pipe.handle([rec, rec], now=1.0)  # the second is a duplicate
    >>> out.counts.forecasts, out.counts.duplicate, [topic for topic, *_ in out.records]
    (1, 1, ['sensor-forecasts'])
    """

    def __init__(self, settings: Settings, table: DeviceTable, engine: BatchedEngine,
                 version: Any) -> None:
        self.settings = settings
        self.table = table
        self.engine = engine
        self.version = version
        self.decoder = ReadingDecoder(settings)
        self.target = settings.target_channel
        self.stages = stages_for(settings, q=interval_quantile(settings.interval_coverage))
        # Per partition, the offset below which every reading was applied: the group's offsets
        # moved back (the worker's StateManager.marker_floor). One re-read there is a duplicate.
        self.applied_below: dict[int, int] = {}

    def handle(self, records: Iterable[SourceRecord], now: float) -> BatchOutput:
        """Decode and apply one batch whose devices need nothing brought in."""
        return self.apply(self.decode(records, now), now)

    def decode(self, records: Iterable[SourceRecord], now: float) -> Decoded:
        """Decode a batch (records in partition order); invalid readings become dead letters."""
        return decode_records(self.decoder, records, now)

    def apply(self, d: Decoded, now: float) -> BatchOutput:
        """Apply decoded readings to state, step the engine, and encode what to publish.

        A device not in memory starts afresh: bring the batch's devices in first
        (``bring_in.py``) where they may have state elsewhere."""
        raise_if_interrupted()  # (an offline command's stop lost where it was raised: bench, evaluate)
        s = self.settings
        counts = BatchCounts(consumed=d.consumed)
        ids, ts, sources = d.ids, d.ts, d.sources
        dead = list(d.dead)
        out: list[OutRecord] = []
        touched = np.zeros(0, np.int64)
        oldest, moved = float("inf"), []
        if ids:
            batch = ingest(
                self.table, ids, ts, np.asarray(d.values, np.float64), d.partitions, now,
                self.target, s.max_gap_s,
            )
            late, below = np.flatnonzero(batch.outcome == LATE), self.applied_below
            again = np.array([sources[i].offset < below.get(sources[i].partition, -1) for i in late.tolist()], bool)
            counts.duplicate = int((batch.outcome == DUPLICATE).sum()) + int(again.sum())
            late = late[~again]
            if s.late_policy == "dlq":
                last, index = self.table.last_ts, self.table.index
                for i in late.tolist():
                    dead.append((sources[i], "late", f"ts {ts[i]} is older than {ids[i][:48]!r}'s last "
                                 f"applied ts, {last[index[ids[i]]]}"))
            else:
                counts.late = len(late)
            oldest = self._forecast(batch, ids, ts, sources, counts, out)
            touched = np.unique(batch.slots)
            moved = [(self.table.ids[slot], old) for slot, old in batch.moved]
        for rec, code, reason in dead:
            key, value, changed = dead_letter(rec.key, rec.value, s.max_message_bytes)
            headers = dlq_headers(code, reason, rec.topic, rec.partition, rec.offset) + changed
            out.append((s.dlq_topic, key, value, headers))
            counts.dlq_by_reason[code] = counts.dlq_by_reason.get(code, 0) + 1
        counts.dlq = len(dead)
        return BatchOutput(out, counts, touched, oldest, moved)

    def _forecast(
        self,
        batch: StepBatch,
        ids: list[str],
        ts: list[float],
        sources: list[SourceRecord],
        counts: BatchCounts,
        out: list[OutRecord],
    ) -> float:
        s = self.settings
        # A new device starts under the served model; every other keeps the version its h/c
        # came from until it is re-warmed (the engine steps it under those weights).
        mv, served = self.table.model_version, self.version()
        for slot in np.unique(batch.slots).tolist():
            if not mv[slot]:
                mv[slot] = served
        mu, log_b = self.engine.step(batch.slots, batch.z, batch.rounds, batch.reset)
        fb = assemble(
            batch, mu, log_b, self.table, coverage=s.interval_coverage,
            min_history=s.min_history, anomaly_warmup=s.anomaly_warmup, stages=self.stages,
        )
        batch_ts = np.asarray(ts, np.float64)[batch.rows]
        events = alerts.judge(batch, fb, self.table, false_alarm_rate=s.anomaly_false_alarm_rate,
                              hold_s=s.alert_hold_s, ts=batch_ts)
        version = [mv[slot] for slot in batch.slots.tolist()]  # per row: the model that made it
        out_topic, alerts_topic = s.output_topic, s.alerts_topic
        # Plain Python lists: element access is several times faster than numpy scalars.
        fc, lo, up = fb.forecast.tolist(), fb.lower.tolist(), fb.upper.tolist()
        res, score, drift = fb.residual.tolist(), fb.anomaly_score.tolist(), fb.drift_score.tolist()
        publish, anomaly = fb.publish.tolist(), fb.is_anomaly.tolist()
        lik, corroborated = fb.anomaly_likelihood.tolist(), fb.corroborated.tolist()
        step_s, reset = batch.step_s.tolist(), batch.reset.tolist()
        level = batch.x_target.tolist()
        counts.resets = int(batch.reset.sum())
        oldest = float("inf")
        for j, row in enumerate(batch.rows.tolist()):
            if not publish[j]:
                counts.warmup += 1
                continue
            src = sources[row]
            record = {
                "device_id": ids[row], "ts": ts[row], "value": level[j], "forecast": fc[j], "lower": lo[j],
                "upper": up[j], "step_s": step_s[j], "model_version": version[j],
                "partition": src.partition, "offset": src.offset, "residual": res[j],
                "anomaly_score": score[j], "drift_score": drift[j], "anomaly_likelihood": lik[j],
                "is_anomaly": anomaly[j], "corroborated": corroborated[j], "reset": reset[j],
            }
            key = src.key
            out.append((out_topic, key, encode_forecast(record), None))
            counts.forecasts += 1
            counts.anomalies += anomaly[j]
            if ts[row] < oldest:
                oldest = ts[row]
        # Alert events whatever the warm-up: a device's likelihood is published past its own.
        for j, kind, state in events:
            row = batch.rows[j]
            counts.alerts_opened += kind == "open"
            counts.alerts_closed += kind == "close"
            if alerts_topic:
                src = sources[row]
                event = alert_event(kind, state, ids[row], ts[row], version[j], src.partition,
                                    src.offset)
                out.append((alerts_topic, src.key, encode_forecast(event), None))
        return oldest

    def farewell(self, devices: list[str], stored: Sequence[Any] = ()) -> list[OutRecord]:
        """Close events for the open alerts of devices about to be forgotten (TTL), in memory
        or (``stored``: their snapshots) only in the store: the pager must not keep an incident
        open for a device that will never send again."""
        topic, t = self.settings.alerts_topic, self.table
        gone = [(dev, t.alert[s], t.last_ts[s], t.model_version[s], t.partition[s])
                for dev in devices for s in (t.index[dev],)]
        gone += [(snap.device_id, alert, snap.last_ts, snap.model_version, snap.partition) for snap in stored
                 # (a column of another width reads as its fill, none open, as a restore reads it)
                 if (alert := np.asarray(snap.alert, np.float64)).shape == (len(alerts.FIELDS),)]
        out: list[OutRecord] = []
        for dev, state, ts, version, partition in gone:
            if topic and alerts.is_open(state[None])[0]:
                event = alert_event("close", state, dev, float(ts), version, int(partition), None, reason="expired")
                out.append((topic, dev.encode(), encode_forecast(event), None))
        return out


def alert_event(kind: str, state: np.ndarray, device_id: str, ts: float, version: str,
                partition: int, offset: int | None, reason: str = "recovered") -> dict:
    """An alert event (docs/wire-contract.md): ``open`` at the second flagged reading in a row
    or at one sure alone (``alerts.step``), ``close`` at the first reading after ``STREAM_LSTM_ALERT_HOLD_S`` below it
    (``reason`` "recovered") or when the device is forgotten after its TTL ("expired").
    Both carry the stable ``alert_id``, the start, and the peak so far: its likelihood, time,
    value and the range that value was expected in."""
    since = float(state[alerts.SINCE])
    return {
        "event": kind, "alert_id": alerts.alert_id(device_id, since), "device_id": device_id,
        "start_ts": since, "ts": ts, "peak_likelihood": float(state[alerts.PEAK]),
        "peak_ts": float(state[alerts.PEAK_TS]), "value": float(state[alerts.VALUE]),
        "expected_low": float(state[alerts.LOW]), "expected_high": float(state[alerts.HIGH]),
        "last_above_ts": float(state[alerts.LAST_ABOVE]), "model_version": version,
        "partition": partition, "offset": offset, **({"reason": reason} if kind == "close" else {}),
    }
