"""A state store whose disk refuses writes, for tests: full (SQLite answers SQLITE_FULL, as for
a full disk) or read-only (SQLITE_READONLY, as a volume remounted read-only after I/O errors)."""

from __future__ import annotations

import sqlite3
import uuid

from stream_lstm.checkpointing.store import StateStore


def fill(st: StateStore) -> None:
    """The file may grow no more, and its free pages are used up, so even a small write fails."""
    pages = st.db.execute("PRAGMA page_count").fetchone()[0]
    st.db.execute(f"PRAGMA max_page_count={pages}")
    for size in (200, 40, 0):
        try:
            for _ in range(10**6):
                st.db.execute("INSERT INTO meta VALUES (?, 0)", (f"{uuid.uuid4().hex[:8]}{'f' * size}",))
        except sqlite3.OperationalError:
            pass


def make_room(st: StateStore) -> None:
    st.db.execute("PRAGMA max_page_count=1073741823")


def read_only(st: StateStore) -> None:
    """Every write refused from now on. (A full file still takes a row that replaces one of the
    same size in place: under a worker that re-evicts the same devices, writes would fail and
    succeed by turns.)"""
    st.db.execute("PRAGMA query_only=ON")


def writable(st: StateStore) -> None:
    st.db.execute("PRAGMA query_only=OFF")

