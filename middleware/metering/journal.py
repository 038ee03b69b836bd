"""The metering layer's local outbox: an append-only journal of usage records on disk.

Every usage record is appended here before it is written to PostgreSQL, so neither a crash
nor a PostgreSQL outage loses it: the writer acknowledges a position once PostgreSQL holds
every record up to it, and after a restart `pending()` hands back the records that were not.
Delivery is at-least-once (a record written to PostgreSQL just before a crash, but not yet
acknowledged, comes back; the writer's inserts are idempotent), and a torn or damaged record
is never delivered: every record carries the CRC-32 of its payload.

On disk, one directory holds:

- segment files `00000001.sgj`, `00000002.sgj`, ...: the header `SGJ1`, then records, each a
  4-byte big-endian payload length, the payload's 4-byte big-endian CRC-32, and the payload.
  Only the last segment is appended to; segments wholly acknowledged are deleted.
- `checkpoint`: the acknowledged position, replaced atomically (temporary file, fsync, rename).
  One that cannot be written (a full disk) holds in memory until it can (`acknowledge`).
- `lock`: held with flock(2) while the journal is open, so that a second journal (another
  process) cannot append to the same segments.

A reader (`Journal(directory, read_only=True)`, for `sluicegate usage --journal`) changes
nothing on disk: it takes no lock, so it can read a journal a running gateway holds, and it
reads around a torn tail instead of cutting it (the tail may be an append in progress).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

logger = logging.getLogger("sluicegate.metering")

FSYNC_POLICIES = ("always", "batch", "never")
MAX_RECORD_BYTES = 64 * 1024 * 1024     # a longer length field is damage, not a record
MIN_SEGMENT_BYTES = 64

_MAGIC = b"SGJ1"
_HEADER_BYTES = len(_MAGIC)
_FRAME = struct.Struct(">II")           # payload length, CRC-32 of the payload
_CHECKPOINT = struct.Struct(">4sQQ")    # magic, segment, offset; followed by their CRC-32
_CHECKPOINT_MAGIC = b"SGC1"
_CRC = struct.Struct(">I")
_SEGMENT_NAME = re.compile(r"(\d{8,})\.sgj")

_Buffer: TypeAlias = bytes | mmap.mmap


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the journal: just after one record, as (segment number, byte offset)."""

    segment: int
    offset: int


class JournalError(Exception):
    """The journal cannot be used: its directory is unusable, taken, or not a journal's."""


class Journal:
    """An append-only, crash-safe outbox of opaque records, acknowledged by position.

    `fsync` says when appended records reach the disk: "always" before `append` returns;
    "batch" at the first append once `fsync_interval_s` has passed since the last fsync (call
    `sync()` from a timer too, or a quiet journal's last records wait for the next append);
    "never" when the OS decides. A killed process loses nothing under any policy (its writes
    are in the page cache); a power loss loses what was not fsynced yet.

    `append` may be called from several threads; the journal serialises them.

    `read_only=True` opens a reader (module docstring): `open` neither locks, cuts nor
    creates anything, `pending` reads the records as they were at `open`, and `append` and
    `acknowledge` raise JournalError.
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 segment_bytes: int = 64 * 1024 * 1024, fsync: str = "batch",
                 fsync_interval_s: float = 0.05, read_only: bool = False) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be at least {MIN_SEGMENT_BYTES}")
        if fsync_interval_s < 0:
            raise ValueError("fsync_interval_s must not be negative")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.read_only = read_only
        if not read_only:
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise JournalError(f"cannot keep a journal in {self.directory}: {exc}") from exc
        self._lock = threading.Lock()           # the open segment, its offset, the checkpoint
        self._ack_lock = threading.Lock()       # checkpoint writes, without blocking appends
        self._lock_fd: int | None = None
        self._fd: int | None = None             # the open segment (None when read-only)
        self._open = False
        self._segment = 0
        self._offset = 0
        self._segments: list[int] = []
        self._checkpoint = Position(0, 0)      # acknowledged: `pending` reads on after it
        self._saved = Position(0, 0)           # the checkpoint on disk (a restart's)
        self._unsynced = False
        self._synced_at = 0.0
        self._reported: set[tuple[int, int]] = set()

    def open(self) -> None:
        """Take the directory, recover from a crash, and get ready to append.

        Segments wholly before the checkpoint are deleted (a crash can come between writing
        the checkpoint and deleting them), and the last segment loses its torn tail (a partial
        record, or records failing their checksum, after the last good one), so that new
        records follow the last good record. A reader does none of this: it only notes where
        the last good record ends.
        """
        with self._lock:
            if self._open:
                raise JournalError(f"the journal in {self.directory} is already open")
            if self.read_only:
                self._open_reader()
                self._open = True
                return
            self._lock_fd = self._lock_directory()
            try:
                self._recover()
            except BaseException:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._release_directory()
                raise
            self._open = True

    def append(self, payloads: Sequence[bytes]) -> Position:
        """Append records in order; return the position just after the last one.

        The records go in one write(2) when they fit in the open segment; otherwise the
        segment is closed at a record boundary and the rest go to the next one. A record
        longer than `segment_bytes` gets a segment of its own. A payload must hold 1 to
        MAX_RECORD_BYTES bytes (ValueError, and nothing is written, if one does not).
        """
        if isinstance(payloads, bytes | bytearray | memoryview):
            raise TypeError("append() takes a sequence of payloads, not one payload")
        sizes = list(map(len, payloads))
        if sizes and (min(sizes) < 1 or max(sizes) > MAX_RECORD_BYTES):
            # An empty record is refused so that zeros (a file grown but not yet written when
            # the power went) can never read as records: length 0 with CRC 0 would check out.
            bad = next(size for size in sizes if not 0 < size <= MAX_RECORD_BYTES)
            raise ValueError(f"a journal record holds 1 to {MAX_RECORD_BYTES} bytes, not {bad}")
        pack, crc32 = _FRAME.pack, zlib.crc32
        headers = [pack(size, crc32(payload)) for size, payload in zip(sizes, payloads,
                                                                        strict=True)]
        with self._lock:
            self._require_writable()
            if self._fd is None:  # (its last start failed: `_replace_open_segment`)
                self._start_segment(self._segment + 1)
            batch_bytes = _FRAME.size * len(sizes) + sum(sizes)
            if self._offset + batch_bytes <= self.segment_bytes:  # the usual case: one write
                self._write([*itertools.chain.from_iterable(zip(headers, payloads, strict=True))])
                self._sync_if_due()
                return self._tail()
            parts: list[bytes] = []
            end = self._offset
            for header, payload in zip(headers, payloads, strict=True):
                size = len(header) + len(payload)
                if end + size > self.segment_bytes and end > _HEADER_BYTES:
                    self._write(parts)
                    self._rotate()
                    parts, end = [], self._offset
                parts += (header, payload)
                end += size
            self._write(parts)
            self._sync_if_due()
            return self._tail()

    def _sync_if_due(self) -> None:
        if self.fsync == "always" or self.sync_due():
            self._sync_locked()

    @property
    def unsynced(self) -> bool:
        """Whether something was written since the last fsync (the open segment's records)."""
        return self._unsynced and self._fd is not None

    def sync_due(self) -> bool:
        """With fsync="batch": whether what was appended since the last fsync has waited
        `fsync_interval_s` (a writer's timer then calls `sync()`, so that a quiet journal's
        last records reach the disk too). `append` asks it under the lock; the timer without
        it, as a hint."""
        return self.fsync == "batch" and self.unsynced and \
            time.monotonic() - self._synced_at >= self.fsync_interval_s

    def sync(self) -> None:
        """fsync the open segment now; nothing to do if nothing was written since the last."""
        with self._lock:
            if self._fd is not None:
                self._sync_locked()

    @property
    def checkpoint_saved(self) -> bool:
        """Whether the acknowledged position is the one on disk (`acknowledge`)."""
        return self._saved == self._checkpoint

    def acknowledge(self, position: Position) -> None:
        """Record that everything up to and including `position` is safely elsewhere.

        The checkpoint is persisted first, then the segments wholly before it are deleted
        (the open segment stays). An older position than the checkpoint changes nothing, but
        saves the checkpoint if it is not saved yet.

        A checkpoint that cannot be written (a full disk, a directory that takes no new file)
        raises OSError, and the position holds even so: `pending` reads on after it (else a
        replay would send the same records for ever), the segments it passed are deleted,
        and on a full disk so is a wholly acknowledged open segment (a new one is started),
        which frees the room to try once more; otherwise the next `acknowledge` (or `close`)
        tries. Until it is saved, a restart delivers again the records after the checkpoint
        on disk (at-least-once, as after any crash).
        """
        with self._ack_lock:
            with self._lock:
                self._require_writable()
                if position > self._tail():
                    raise ValueError(f"{position} is past the end of the journal")
                position = max(position, self._checkpoint)
                if position == self._saved:
                    return
            try:
                self._write_checkpoint(position)
            except OSError as exc:
                self._let_go(position, disk_full=exc.errno in (errno.ENOSPC, errno.EDQUOT))
                self._write_checkpoint(position)
            else:
                self._let_go(position)
            self._saved = position

    def _let_go(self, position: Position, *, disk_full: bool = False) -> None:
        """Moves the acknowledged position to `position` and deletes the segments before it."""
        with self._lock:
            self._checkpoint = position
            done = self._forget_acknowledged_segments()
            if disk_full and self._fd is not None and position == self._tail() \
                    and self._offset > _HEADER_BYTES:
                self._replace_open_segment()
        for number in done:
            with contextlib.suppress(FileNotFoundError):
                self._segment_path(number).unlink()

    def _replace_open_segment(self) -> None:
        """Deletes the open segment (wholly acknowledged) and starts the next. If that start
        fails too, the next append tries it again."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        self._segments.remove(self._segment)
        self._segment_path(self._segment).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._start_segment(self._segment + 1)

    def pending(self, *, limit: int | None = None) -> list[tuple[Position, bytes]]:
        """The unacknowledged records, oldest first, each with the position just after it.

        Read from disk and checked against their checksums; a damaged record is skipped
        (and logged once), never raised.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        with contextlib.closing(self._unacknowledged()) as records:
            return list(itertools.islice(records, limit))

    def pending_count(self) -> int:
        """How many unacknowledged records there are (reads them from disk)."""
        return sum(1 for _ in self._unacknowledged())

    def disk_bytes(self) -> int:
        """The total size of the segment files on disk."""
        return sum(_file_size(self._segment_path(n)) for n in _segment_numbers(self.directory))

    def close(self) -> None:
        """fsync and close the open segment and let go of the directory; idempotent."""
        if self._open and not self.read_only and not self.checkpoint_saved:
            with contextlib.suppress(OSError):  # (said by whoever acknowledged)
                self.acknowledge(self._checkpoint)
        with self._lock:
            if not self._open:
                return
            self._open = False
            if self.read_only:          # a reader holds nothing
                return
            try:
                self._sync_locked()
            finally:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._release_directory()

    # -- opening and recovery

    def _lock_directory(self) -> int:
        try:
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot keep a journal in {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"{self.directory} is in use by another journal") from None
        return fd

    def _release_directory(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)     # closing the descriptor drops the flock
            self._lock_fd = None

    def _recover(self) -> None:
        self._checkpoint = self._saved = self._read_checkpoint()
        self._segments = self._existing_segments()
        self._unsynced, self._synced_at = False, time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "checkpoint.tmp").unlink()    # a checkpoint write cut short
        last = self._segments[-1] if self._segments else 0
        end = self._repair_tail(last) if last else 0
        # Appending where the checkpoint has already been would make new records look
        # acknowledged: that happens if acknowledged records were lost (power loss, "never").
        if last and Position(last, end) >= self._checkpoint and end < self.segment_bytes:
            self._fd = os.open(self._segment_path(last), os.O_WRONLY | os.O_CLOEXEC)
            self._segment, self._offset = last, end
        else:
            self._start_segment(max(last, self._checkpoint.segment) + 1)
        for number in self._forget_acknowledged_segments():
            self._segment_path(number).unlink()

    def _open_reader(self) -> None:
        """The checkpoint, the segments, and the end of the last good record of the last one
        (where reading stops), all as they are now; nothing on disk changes."""
        if not self.directory.is_dir():
            raise JournalError(f"there is no journal in {self.directory}")
        self._checkpoint = self._read_checkpoint()
        try:
            self._segments = self._existing_segments()
        except OSError as exc:
            raise JournalError(f"cannot read the journal in {self.directory}: {exc}") from exc
        last = self._segments[-1] if self._segments else 0
        self._segment, self._offset = last, self._last_good_end(last) if last else 0
        self._forget_acknowledged_segments()

    def _read_checkpoint(self) -> Position:
        try:
            data = (self.directory / "checkpoint").read_bytes()
        except FileNotFoundError:
            return Position(0, 0)
        body = data[:_CHECKPOINT.size]
        if len(data) == _CHECKPOINT.size + _CRC.size and (
                _CRC.unpack_from(data, _CHECKPOINT.size)[0] == zlib.crc32(body)):
            magic, segment, offset = _CHECKPOINT.unpack(body)
            if magic == _CHECKPOINT_MAGIC:
                return Position(segment, offset)
        # Written atomically, so this is damage from outside: delivering everything again is
        # safe (replays are idempotent), losing records is not.
        logger.error("journal checkpoint in %s is damaged; every record on disk is pending",
                     self.directory)
        return Position(0, 0)

    def _existing_segments(self) -> list[int]:
        numbers = _segment_numbers(self.directory)
        for number in list(numbers):
            try:
                with open(self._segment_path(number), "rb") as file:
                    head = file.read(_HEADER_BYTES)
            except FileNotFoundError:   # a reader's race with a writer's acknowledge
                numbers.remove(number)
                continue
            if head != _MAGIC and not _MAGIC.startswith(head):    # short: a crash at creation
                raise JournalError(f"{self._segment_path(number)} is not a journal segment "
                                   f"(version 1)")
        return numbers

    def _repair_tail(self, number: int) -> int:
        """Cut the last segment just after its last good record; return that offset."""
        path = self._segment_path(number)
        size = path.stat().st_size
        if size < _HEADER_BYTES:        # the crash came between creating it and its header
            _write_durably(path, _MAGIC)
            return _HEADER_BYTES
        end = self._last_good_end(number)
        if end < size:
            logger.warning("journal segment %s: cut a torn tail of %d bytes at offset %d",
                           path.name, size - end, end)
            with open(path, "r+b") as segment:
                segment.truncate(end)
                os.fsync(segment.fileno())
        return end

    def _last_good_end(self, number: int) -> int:
        """The offset just after the segment's last good record (the header's end if none)."""
        try:
            fd = os.open(self._segment_path(number), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:       # a reader's race with a writer's acknowledge
            return _HEADER_BYTES
        try:
            with self._contents(fd, os.fstat(fd).st_size) as buf:
                return max((end for _, end, _ in _good_records(buf, _HEADER_BYTES, len(buf))),
                           default=_HEADER_BYTES)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _contents(self, fd: int, size: int) -> Iterator[_Buffer]:
        """The first `size` bytes of a segment (fewer if it is shorter now). A reader takes a
        copy: the writer may shorten the file (cutting a torn tail, undoing a failed write),
        and touching a mapping past the end of its file is SIGBUS."""
        if self.read_only:
            yield os.pread(fd, size, 0)
        else:
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as buf:
                yield buf

    # -- appending

    def _require_open(self) -> None:
        if not self._open:
            raise JournalError(f"the journal in {self.directory} is not open")

    def _require_writable(self) -> None:
        if self.read_only:
            raise JournalError(f"the journal in {self.directory} is open read-only")
        self._require_open()

    def _tail(self) -> Position:
        return Position(self._segment, self._offset)

    def _write(self, parts: list[bytes]) -> None:
        if not parts:
            return
        assert self._fd is not None
        data = b"".join(parts)
        try:
            _pwrite_all(self._fd, data, self._offset)
        except OSError:
            # Disk full, say: leave no partial record for the next append to follow.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._offset)
            raise
        self._offset += len(data)
        self._unsynced = True

    def _rotate(self) -> None:
        if self.fsync != "never":
            self._sync_locked()         # no older segment may end in unsynced records
        self._start_segment(self._segment + 1)

    def _start_segment(self, number: int) -> None:
        path = self._segment_path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_all(fd, _MAGIC, 0)
            if self.fsync != "never":
                _fsync_directory(self.directory)    # the new name must survive a power loss
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment, self._offset = fd, number, _HEADER_BYTES
        self._segments.append(number)
        self._unsynced = True

    def _sync_locked(self) -> None:
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = False
            self._synced_at = time.monotonic()

    # -- acknowledging and reading

    def _write_checkpoint(self, position: Position) -> None:
        body = _CHECKPOINT.pack(_CHECKPOINT_MAGIC, position.segment, position.offset)
        temporary = self.directory / "checkpoint.tmp"
        _write_durably(temporary, body + _CRC.pack(zlib.crc32(body)))
        os.replace(temporary, self.directory / "checkpoint")
        _fsync_directory(self.directory)        # the rename itself must survive a power loss

    def _forget_acknowledged_segments(self) -> list[int]:
        """Drop, from the list, the segments the checkpoint has passed; return them."""
        checkpoint = self._checkpoint
        done = [n for n in self._segments if n < checkpoint.segment or (
            n == checkpoint.segment and n != self._segment
            and checkpoint.offset >= _file_size(self._segment_path(n)))]
        self._segments = [n for n in self._segments if n not in done]
        return done

    def _unacknowledged(self) -> Generator[tuple[Position, bytes], None, None]:
        with self._lock:
            self._require_open()
            checkpoint, tail, segments = self._checkpoint, self._tail(), list(self._segments)
        for number in segments:
            if number < checkpoint.segment:
                continue
            start = checkpoint.offset if number == checkpoint.segment else 0
            # The open segment is read only up to the tail seen above: past it, an append
            # may be half written.
            stop = tail.offset if number == tail.segment else None
            yield from self._segment_records(number, max(start, _HEADER_BYTES), stop)

    def _segment_records(self, number: int, start: int,
                         stop: int | None) -> Iterator[tuple[Position, bytes]]:
        try:
            fd = os.open(self._segment_path(number), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return                      # acknowledged and deleted since the snapshot
        try:
            size = os.fstat(fd).st_size
            stop = size if stop is None else min(stop, size)
            if stop <= start:
                return
            with self._contents(fd, stop) as buf:
                stop = min(stop, len(buf))
                expected = start
                for record_start, end, payload in _good_records(buf, start, stop):
                    if record_start != expected:
                        self._report_damage(number, expected, record_start)
                    yield Position(number, end), payload
                    expected = end
                if expected != stop:
                    self._report_damage(number, expected, stop)
        finally:
            os.close(fd)

    def _report_damage(self, number: int, start: int, end: int) -> None:
        if (number, start) not in self._reported:       # pending() reads it again and again
            self._reported.add((number, start))
            logger.warning("journal segment %s: skipped %d damaged bytes at offset %d",
                           self._segment_path(number).name, end - start, start)

    def _segment_path(self, number: int) -> Path:
        return self.directory / f"{number:08d}.sgj"


def _good_records(buf: _Buffer, start: int, stop: int) -> Iterator[tuple[int, int, bytes]]:
    """(start, end, payload) of each record in buf[start:stop] that checks out, in order."""
    offset = start
    while offset + _FRAME.size <= stop:
        payload = _record_at(buf, offset, stop)
        if payload is None:
            offset = _next_record_start(buf, offset, stop)
            continue
        end = offset + _FRAME.size + len(payload)
        yield offset, end, payload
        offset = end


def _record_at(buf: _Buffer, offset: int, stop: int) -> bytes | None:
    length, checksum = _FRAME.unpack_from(buf, offset)
    end = offset + _FRAME.size + length
    if not 0 < length <= MAX_RECORD_BYTES or end > stop:
        return None
    payload = buf[offset + _FRAME.size:end]
    return payload if zlib.crc32(payload) == checksum else None


def _next_record_start(buf: _Buffer, damaged: int, stop: int) -> int:
    """Where the first good record after a damaged one starts, or `stop` if none does."""
    length: int = _FRAME.unpack_from(buf, damaged)[0]
    after = damaged + _FRAME.size + length
    # Usually only the payload is damaged and its length leads to the next record; trusting
    # it then also keeps a payload's own bytes from being mistaken for a record.
    if 0 < length <= MAX_RECORD_BYTES and (after == stop or (
            after + _FRAME.size <= stop and _record_at(buf, after, stop) is not None)):
        return after
    for offset in range(damaged + 1, stop - _FRAME.size + 1):
        if _record_at(buf, offset, stop) is not None:
            return offset
    return stop


def _segment_numbers(directory: Path) -> list[int]:
    with os.scandir(directory) as entries:
        found = (_SEGMENT_NAME.fullmatch(entry.name) for entry in entries)
        return sorted(int(match.group(1)) for match in found if match)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:                         # a regular file takes it all in one call, or fails
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


__all__ = ["FSYNC_POLICIES", "Journal", "JournalError", "Position"]
