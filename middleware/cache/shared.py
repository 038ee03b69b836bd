"""Invalidations shared by the worker processes of one gateway (`serve --workers N`).

The memory store lives in one process, so an admin invalidation reaches only the worker that
received it. For it to hold on every worker, the supervisor gives its workers a directory
(`$SLUICEGATE_SHARED_DIR`, gateway/supervisor.py) and each memory store maps one small file
there: a generation counter, then a ring of the last `RING_SLOTS` invalidations (their time
and tags). The invalidating worker writes its record, then counts it, under an exclusive
flock, before it answers. Every lookup compares the mapped counter (a memory read, no system
call) with the generation it last read and, when it moved, reads the new records (under a
shared flock, which also orders the reads after the writer's) before it answers. A reader
that fell more than half a ring behind takes every entry older than the newest record as
invalidated, which drops more than asked but never less; so does a record it cannot read.

The file lives in the serve's own directory (`tempfile.mkdtemp`: this user's alone) and is
never made shorter: a file cut short under a worker's mapping would end the worker with
SIGBUS on its next lookup. A cleaner that deletes it leaves the mapping working.
"""
from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["FILE_NAME", "InvalidationLog"]

FILE_NAME = "cache-invalidations"
RING_SLOTS = 1024
SLOT_BYTES = 512
_HEADER_BYTES = 64  # the generation (8 bytes), then room
_RECORD = struct.Struct("<dH")  # epoch seconds, bytes of tags text (_EVERY_ENTRY: none)
_EVERY_ENTRY = 0xFFFF
_TEXT_MAX = SLOT_BYTES - _RECORD.size
FILE_BYTES = _HEADER_BYTES + RING_SLOTS * SLOT_BYTES

Record = tuple[tuple[str, ...] | None, float]  # (tags, None for every entry; time)


class InvalidationLog:
    """One process's view of the shared file (opened at the store's startup)."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < FILE_BYTES:  # (zeros: generation 0)
                    os.ftruncate(fd, FILE_BYTES)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, FILE_BYTES)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.generation = memoryview(self._map)[:8].cast("Q")  # [0]: records ever written
        self.read_up_to = self.generation[0]  # a new process has no entry to drop

    def close(self) -> None:
        self.generation.release()
        self._map.close()
        os.close(self._fd)

    def append(self, tags: Sequence[str], at: float) -> None:
        """Adds an invalidation of the entries carrying all `tags`, made at `at`."""
        text = "\n".join(tags).encode()
        with self._locked(fcntl.LOCK_EX):
            generation = self.generation[0]
            offset = _HEADER_BYTES + generation % RING_SLOTS * SLOT_BYTES
            # (a record that cannot be written as it is drops more, never less)
            fits = len(text) <= _TEXT_MAX and not any("\n" in tag for tag in tags)
            size = len(text) if fits else _EVERY_ENTRY
            _RECORD.pack_into(self._map, offset, at, size)
            if size != _EVERY_ENTRY:
                start = offset + _RECORD.size
                self._map[start:start + size] = text
            self.generation[0] = generation + 1
            if self.read_up_to == generation:  # its own record: applied by its writer
                self.read_up_to = generation + 1

    def read_new(self) -> list[Record]:
        """The records written since the last call (by any process)."""
        with self._locked(fcntl.LOCK_SH):
            generation, start = self.generation[0], self.read_up_to
            if generation - start > RING_SLOTS // 2:  # overwritten meanwhile: everything
                records: list[Record] = [(None, self._record(generation - 1)[1])]
            else:
                records = [self._record(number) for number in range(start, generation)]
        self.read_up_to = generation
        return records

    def _record(self, number: int) -> Record:
        offset = _HEADER_BYTES + number % RING_SLOTS * SLOT_BYTES
        at, size = _RECORD.unpack_from(self._map, offset)
        if not math.isfinite(at):  # (damaged: everything up to now is invalidated)
            return None, time.time()
        if size == _EVERY_ENTRY or size > _TEXT_MAX:
            return None, at
        start = offset + _RECORD.size
        try:
            return tuple(bytes(self._map[start:start + size]).decode().split("\n")), at
        except UnicodeDecodeError:  # (damaged: it drops more than asked, never less)
            return None, at

    @contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fcntl.flock(self._fd, how)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
