"""StateStore: the local on-disk store of encoded device snapshots (stdlib SQLite).

It holds the state of the assigned partitions beyond what fits in memory, and per changelog
partition the next changelog offset it already reflects (its *checkpoint*), so a restart only
replays newer changelog records. A ``clean`` flag is set only by a clean close: a store
opened after a crash reports ``opened_clean = False`` and the caller wipes and rebuilds it.

>>> import tempfile, pathlib
>>> d = tempfile.mkdtemp()
>>> st = StateStore(pathlib.Path(d) / "s.sqlite")
>>> st.put_many([("a", 0, b"x"), ("b", 1, b"y")])
>>> st.get("a"), st.count(), st.device_ids({1})
(b'x', 2, ['b'])
>>> st.close(clean=True); StateStore(pathlib.Path(d) / "s.sqlite").opened_clean
True
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path


class StateStore:
    """Encoded snapshots by device id, with changelog checkpoints.

    Parameters
    ----------
    path
        The SQLite file (created if missing).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection, used from the worker thread only.
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (device_id TEXT PRIMARY KEY, "
                        "partition INTEGER NOT NULL, data BLOB NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS state_partition ON state(partition)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        row = self.db.execute("SELECT value FROM meta WHERE key='clean'").fetchone()
        self.opened_clean = row is None or bool(row[0])
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 0)")

    def put_many(self, rows: Iterable[tuple[str, int, bytes]]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", rows)

    def get(self, device_id: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM state WHERE device_id=?", (device_id,)).fetchone()
        return row[0] if row else None

    def delete_many(self, device_ids: Iterable[str]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM state WHERE device_id=?", ((d,) for d in device_ids))

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        parts = list(partitions)
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM state WHERE partition=?", ((p,) for p in parts))
            self.db.executemany("DELETE FROM meta WHERE key=?", ((f"cp:{p}",) for p in parts))

    def device_ids(self, partitions: set[int] | None = None) -> list[str]:
        rows = self.db.execute("SELECT device_id, partition FROM state ORDER BY device_id")
        return [d for d, p in rows if partitions is None or p in partitions]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM state").fetchone()[0])

    def checkpoint(self, partition: int) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (f"cp:{partition}",)).fetchone()
        return None if row is None else int(row[0])

    def set_checkpoints(self, offsets: dict[int, int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                ((f"cp:{p}", o) for p, o in offsets.items()))

    def wipe(self) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM state")
            self.db.execute("DELETE FROM meta WHERE key LIKE 'cp:%'")

    def close(self, clean: bool) -> None:
        if clean:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 1)")
        self.db.close()
