"""StateStore: the local on-disk store of encoded device snapshots (stdlib SQLite).

It holds the state of the assigned partitions beyond what fits in memory, and, per changelog
partition, the next changelog offset whose effect it already holds (its *checkpoint*), so a
restart only replays newer changelog records. Values are opaque bytes (the codec's output):
the store decodes none on its hot paths, which keeps restore and eviction cheap.

One row a device, under the partition it was written for. After partitions are added to the
input topic a device's readings move to another partition, and its old row stays in the old
partition's changelog; a worker that restores both keeps the row with the later last reading,
whichever it reads first (:meth:`restore_chunk`: the one place the store decodes, and only for
such a pair), and a tombstone deletes only its own partition's row.

A ``clean_shutdown`` flag is set only by ``close(clean=True)`` and cleared on open. Under
exactly-once a store opened after a crash (``opened_clean`` is False) may hold state of a
batch whose transaction never committed, so the caller wipes it and rebuilds it from the
changelog.

A write the disk refuses (full, or an I/O error) must not stop the worker: the rows of
:meth:`put_many` and :meth:`delete_many` (evictions and commits) then wait in memory, where
:meth:`get` finds them, and go with the next write (:attr:`write_error` says why meanwhile,
for readiness). The changelog holds everything they hold, so a store that could not write
them is not closed clean, and the next start rebuilds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from stream_lstm.checkpointing.codec import later_state
from stream_lstm.config import SettingsError

log = logging.getLogger("stream_lstm.checkpointing")

_CLEAN = "clean_shutdown"
_CHANGELOG_ID = "changelog_topic_id"  # (checkpointing/identity.py)


def _cp_key(partition: int) -> str:
    return f"checkpoint:{partition}"


def _replay_key(partition: int) -> str:
    return f"replay:{partition}"


def _of_partitions(partitions: Iterable[int] | None) -> tuple[str, list[int]]:
    """A ``WHERE`` clause (and its parameters) for the rows of ``partitions``; none for None."""
    if partitions is None:
        return "", []
    parts = sorted({int(p) for p in partitions})
    return f" WHERE partition IN ({','.join('?' * len(parts))})", parts


def _released_key(partition: int) -> str:
    return f"released:{partition}"


_PUT = "INSERT OR REPLACE INTO state VALUES (?, ?, ?)"
_DELETE = "DELETE FROM state WHERE device_id=?"
_DELETE_OF_PARTITION = "DELETE FROM state WHERE device_id=? AND partition=?"
# A changelog row replaces the store's row of its device when both are of one partition (the
# later offset wins, as compaction keeps it), or when it is the later state of a device that
# moved partitions. SQLite evaluates the function only when the partitions differ.
_RESTORED_PUT = ("INSERT INTO state VALUES (?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                 "partition=excluded.partition, data=excluded.data "
                 "WHERE state.partition = excluded.partition OR later_state(excluded.data, state.data)")


def _refused_write(exc: sqlite3.Error) -> bool:
    """SQLite's answer for a full or read-only volume (not damage, nor a passing lock)."""
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_FULL", "SQLITE_READONLY"))


class StateStoreFull(RuntimeError):
    """The state store's volume is full at start: transient (``run`` exits 3, restarted)."""


class StateStore:
    """Encoded snapshots by device id, with per-partition changelog checkpoints.

    Parameters
    ----------
    path
        The SQLite file (created, with its parent directory, if missing).

    Every write method runs in one transaction, so a batch is applied entirely or not at all.
    One connection, used by one thread at a time (the worker loop).

    Examples
    --------
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "state.sqlite"
    >>> st = StateStore(path)
    >>> st.put_many([("a", 0, b"x"), ("b", 1, b"y")])
    >>> st.set_checkpoints({0: 10})
    >>> st.get("a"), st.count(), st.device_ids({1}), st.checkpoint(0), st.checkpoint(1)
    ((0, b'x'), 2, ['b'], 10, None)
    >>> st.close(clean=True)
    >>> st = StateStore(path); st.opened_clean
    True
    >>> st.close(clean=False)
    >>> st = StateStore(path); st.opened_clean
    False
    >>> st.close(clean=True); tmp.cleanup()
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # (room can come back: see StateStoreFull)
                raise StateStoreFull(f"cannot open the state store {self.path}: {exc.strerror} "
                                     "(make room on its volume; restarted, it goes on)") from None
            raise SettingsError(f"invalid setting STREAM_LSTM_STATE_DIR: cannot write the state "
                                f"store there: {exc.strerror}: {self.path.parent}") from None
        try:
            # One holder at a time: a second worker with the same instance id and state
            # directory would wipe this one's store and fence its producer, back and forth.
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SettingsError(f"the state store {self.path} is held by another worker (two "
                                "workers with the same STREAM_LSTM_INSTANCE_ID and "
                                "STREAM_LSTM_STATE_DIR?)") from None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if getattr(self, "db", None) is not None:
                self.db.close()
            if _refused_write(exc):
                # A full or read-only volume, not damage: the file is left as it is (setting it
                # aside would lose a good store and keep its bytes on the full disk).
                self._lock.close()
                if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_FULL"):
                    # Room can come back: exit 3, restarted with backoff (as 2, a refusal, a
                    # crashed child's restart on a full disk stopped every worker of its host).
                    raise StateStoreFull(f"cannot open the state store {self.path}: {exc} (make room "
                                         "on its volume; restarted, it goes on: the store is kept)") from None
                raise SettingsError(f"invalid setting STREAM_LSTM_STATE_DIR: cannot write the state "
                                    f"store {self.path}: {exc} (make it writable; the store is kept)") from None
            # The store is a cache of the changelog: a damaged file is set aside and rebuilt.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("the state store is damaged; set aside, rebuilding from the changelog",
                        extra={"path": str(self.path), "aside": str(aside), "error": str(exc)})
            with contextlib.suppress(FileNotFoundError):
                self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._open()
        self._closed = False
        # Rows the file refused (device -> (partition, data), None to delete), and why.
        self.unwritten: dict[str, tuple[int, bytes] | None] = {}
        self.write_error: str | None = None
        self._refused_meta = False  # a release stamp went unwritten: not clean at close

    def _open(self) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        # check_same_thread=False only because the worker may open the store on one thread
        # and run its loop on another; it is never used by two threads at once.
        self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db.create_function("later_state", 2, later_state, deterministic=True)
        # WAL + synchronous=NORMAL: a commit is an append to the WAL without fsync. A power
        # loss may lose the last commits but never corrupts the file; and losing them is
        # harmless because such a store was not closed cleanly and is rebuilt anyway.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache (restore bursts)
        # The WAL shrinks back to this after each checkpoint instead of keeping its largest size.
        self.db.execute("PRAGMA journal_size_limit=67108864")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (device_id TEXT PRIMARY KEY, "
                        "partition INTEGER NOT NULL, data BLOB NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS state_partition ON state(partition)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (_CLEAN,)).fetchone()
        # A new file is clean (nothing in it can be wrong); an existing one only if the last
        # holder said so on close. Clear the flag now, before any write: from here on a
        # crash must read as unclean.
        fresh = row is None and self._empty()
        self.opened_clean: bool = fresh or (row is not None and bool(row[0]))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, 0)", (_CLEAN,))

    def _empty(self) -> bool:
        return self.db.execute("SELECT 1 FROM state LIMIT 1").fetchone() is None

    # ---- writes ----------------------------------------------------------------------------
    def put_many(self, rows: Iterable[tuple[str, int, bytes]]) -> None:
        """Insert or replace ``(device_id, partition, data)`` rows, in one transaction (kept in
        memory if the disk refuses them: see the module's docstring)."""
        rows = list(rows)
        try:
            self.apply(puts=rows)
        except sqlite3.OperationalError as exc:
            self._refused(exc)
            self.unwritten.update((d, (p, data)) for d, p, data in rows)

    def delete_many(self, device_ids: Iterable[str]) -> None:
        """Remove devices (missing ones are ignored), in one transaction (as :meth:`put_many`)."""
        device_ids = list(device_ids)
        try:
            self.apply(deletes=device_ids)
        except sqlite3.OperationalError as exc:
            self._refused(exc)
            self.unwritten.update(dict.fromkeys(device_ids))

    def write_unwritten(self) -> bool:
        """Write the rows the disk refused before (any write does); whether none is left."""
        if self.unwritten:
            try:
                self.apply()
            except sqlite3.OperationalError as exc:
                self._refused(exc)
        return not self.unwritten

    def _refused(self, exc: sqlite3.Error) -> None:
        if self.write_error is None:
            log.error("the state store cannot write; its rows wait in memory (the changelog has "
                      "them) and are written once it can", extra={"path": str(self.path), "error": str(exc)})
        self.write_error = str(exc)

    def set_checkpoints(self, offsets: dict[int, int]) -> None:
        """Record, per changelog partition, the next offset whose effect the store holds."""
        self.apply(checkpoints=offsets)

    def apply(
        self,
        puts: Iterable[tuple[str, int, bytes]] = (),
        deletes: Iterable[str] = (),
        checkpoints: dict[int, int] | None = None,
        replay_from: dict[int, int] | None = None,
    ) -> None:
        """Deletes, then puts, then checkpoints and replay positions, atomically. Rows the disk
        refused before go first, in the same transaction: they are older."""
        self._transaction(_DELETE, ((d,) for d in deletes), _PUT, puts, checkpoints, replay_from)

    def restore_chunk(
        self,
        puts: Iterable[tuple[str, int, bytes]],
        deletes: Iterable[tuple[str, int]],
        checkpoints: dict[int, int],
        replay_from: dict[int, int],
    ) -> None:
        """A chunk of changelog records, atomically as :meth:`apply` writes (so a checkpoint is
        never ahead of the rows it vouches for), but as records of their partitions: a row
        replaces another partition's row of its device only if it is the later state
        (:func:`later_state`), and a tombstone ``(device_id, partition)`` deletes only its
        partition's row (see the module's docstring)."""
        self._transaction(_DELETE_OF_PARTITION, deletes, _RESTORED_PUT, puts, checkpoints, replay_from)

    def _transaction(self, delete_sql: str, deletes: Iterable[tuple], put_sql: str,
                     puts: Iterable[tuple[str, int, bytes]], checkpoints: dict[int, int] | None,
                     replay_from: dict[int, int] | None) -> None:
        held = self.unwritten
        with self.db:  # commits on success, rolls back on an exception
            self.db.execute("BEGIN")
            if held:
                self.db.executemany(_DELETE, ((d,) for d, v in held.items() if v is None))
                self.db.executemany(_PUT, ((d, *v) for d, v in held.items() if v is not None))
            self.db.executemany(delete_sql, deletes)
            self.db.executemany(put_sql, puts)
            if checkpoints:
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                    ((_cp_key(p), int(o)) for p, o in checkpoints.items()))
            if replay_from:
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                    ((_replay_key(p), int(o)) for p, o in replay_from.items()))
        if held or self.write_error:
            log.info("the state store writes again", extra={"rows": len(held)})
            self.unwritten, self.write_error = {}, None

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget every device of ``partitions``, their checkpoints and replay positions."""
        parts = [(int(p),) for p in partitions]
        dropped = {p for (p,) in parts}
        self.unwritten = {d: v for d, v in self.unwritten.items() if v is None or v[0] not in dropped}
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM state WHERE partition=?", parts)
            self.db.executemany("DELETE FROM meta WHERE key=?", ((_cp_key(p),) for (p,) in parts))
            self.db.executemany("DELETE FROM meta WHERE key=?",
                                ((_replay_key(p),) for (p,) in parts))

    def release(self, partitions: Iterable[int], when: float) -> None:
        """Note that ``partitions`` stopped being kept current at ``when`` (epoch seconds), at
        a revocation or a clean stop. Once closed, it has nothing to note: closing the
        consumer after the store (a worker's stop) revokes every partition, which the clean
        stop has already stamped."""
        if self._closed:
            return
        try:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                    ((_released_key(p), int(when)) for p in partitions))
        except sqlite3.OperationalError as exc:  # (in a revocation: never raise there)
            log.warning("the state store could not note a release", extra={"error": str(exc)})
            self._refused_meta = True  # without the stamp, rows could be trusted however old

    def forget_stale(self, partitions: Iterable[int], now: float, max_age_s: float) -> list[int]:
        """Drop ``partitions`` released more than ``max_age_s`` before ``now`` (the changelog's
        cleaner may have removed tombstones their rows predate: a device deleted meanwhile
        would come back); the rest are held again. Returns those dropped."""
        stale = []
        for p in partitions:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (_released_key(p),)).fetchone()
            if row is not None and now - row[0] > max_age_s:
                stale.append(p)
        self.drop_partitions(stale)
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM meta WHERE key=?", ((_released_key(p),) for p in partitions))
        return stale

    def wipe(self) -> None:
        """Forget everything (after an unclean shutdown): a new file. Deleting its rows read
        them, and a file damaged past its header (which opening does not read, and a crash
        found) stopped every restart here, a crash loop; a new file also gives its space back."""
        self.unwritten, opened_clean = {}, self.opened_clean
        self.db.close()
        for stale in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            stale.unlink(missing_ok=True)
        self._open()
        self.opened_clean = opened_clean

    def set_changelog_id(self, topic_id: str) -> None:
        """Record the id of the changelog topic the rows come from (identity.py)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_CHANGELOG_ID, topic_id))

    # ---- reads -----------------------------------------------------------------------------
    def changelog_id(self) -> str | None:
        """The id :meth:`set_changelog_id` recorded; None before one was (or after a wipe)."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (_CHANGELOG_ID,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, device_id: str) -> tuple[int, bytes] | None:
        """``(partition, encoded snapshot)`` of ``device_id``, or None."""
        if device_id in self.unwritten:
            return self.unwritten[device_id]
        row = self.db.execute("SELECT partition, data FROM state WHERE device_id=?", (device_id,)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def device_ids(self, partitions: Iterable[int] | None = None) -> list[str]:
        """Device ids, sorted; only those of ``partitions`` when given."""
        where, parts = _of_partitions(partitions)
        return [d for (d,) in self.db.execute(f"SELECT device_id FROM state{where} ORDER BY device_id", parts)]

    def scan(self, after: str, limit: int) -> list[tuple[str, int, bytes]]:
        """Up to ``limit`` rows ``(device_id, partition, data)`` with ids after ``after``, in
        id order (a cursor over the store: pass the last id read)."""
        return self.db.execute("SELECT device_id, partition, data FROM state WHERE device_id > ? "
                               "ORDER BY device_id LIMIT ?", (after, int(limit))).fetchall()

    def count(self, partitions: Iterable[int] | None = None) -> int:
        """Number of devices stored; only those of ``partitions`` when given."""
        where, parts = _of_partitions(partitions)
        return int(self.db.execute(f"SELECT COUNT(*) FROM state{where}", parts).fetchone()[0])

    def checkpoint(self, partition: int) -> int | None:
        """Next changelog offset of ``partition`` the store already reflects; None if unknown."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (_cp_key(partition),)).fetchone()
        return None if row is None else int(row[0])

    def replay_from(self, partition: int) -> int | None:
        """The input offset from which readings must be replayed over the stored state of
        ``partition`` (the changelog's last replay marker); None if it never had one."""
        row = self.db.execute("SELECT value FROM meta WHERE key=?",
                              (_replay_key(partition),)).fetchone()
        return None if row is None else int(row[0])

    # ---- lifecycle -------------------------------------------------------------------------
    def close(self, clean: bool) -> None:
        """Close; ``clean=True`` vouches that the contents are committed state (see module)."""
        if self._closed:
            return
        try:
            if clean and (not self.write_unwritten() or self._refused_meta):
                clean = False  # (the store lacks what the changelog has: rebuilt next start)
                log.warning("the state store could not write everything; it is rebuilt at the next start")
            if clean:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, 1)", (_CLEAN,))
                # Fold the WAL into the main file so the next open starts with a small WAL.
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a full disk, say: the next start rebuilds, if need be
            log.warning("the state store did not close cleanly", extra={"error": str(exc)})
        finally:
            self.db.close()
            self._lock.close()  # (releases the lock)
            self._closed = True
