"""The metering journal: records survive crashes, torn records never come back, acks free disk.

Crashes are simulated by cutting or damaging segment files between a close and an open, and
once for real: a child process appending with fsync="always" is killed with SIGKILL, and
every position it reported is then found in `pending()`.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from middleware.metering.journal import FSYNC_POLICIES, Journal, JournalError, Position

REPO = Path(__file__).resolve().parents[2]
FRAME_BYTES = 8         # length and CRC-32 before each payload
HEADER_BYTES = 4        # b"SGJ1" at the start of each segment


def records(count: int, *, tag: str = "r", size: int = 400) -> list[bytes]:
    return [f"{tag}-{i:06d}-".encode().ljust(size, b".") for i in range(count)]


def segment_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.sgj"))


def opened(directory: Path, **options: object) -> Journal:
    journal = Journal(directory, **options)  # type: ignore[arg-type]
    journal.open()
    return journal


def append_each(journal: Journal, payloads: list[bytes]) -> list[Position]:
    return [journal.append([payload]) for payload in payloads]


def damage(path: Path, offset: int, value: bytes | None = None) -> None:
    """Overwrite bytes at `offset` (default: flip the one byte there)."""
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value or b"x")] = value or bytes([data[offset] ^ 0xFF])
    path.write_bytes(bytes(data))


@pytest.fixture
def damage_warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.WARNING, logger="sluicegate.metering")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "sluicegate.metering"]


# -- the basics


def test_append_then_pending_returns_the_records_in_order(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    first = journal.append(records(3, tag="a"))
    last = journal.append(records(2, tag="b"))
    found = journal.pending()
    assert [payload for _, payload in found] == records(3, tag="a") + records(2, tag="b")
    assert found[2][0] == first and found[4][0] == last
    assert journal.pending_count() == 5
    assert journal.pending(limit=2) == found[:2]
    assert journal.pending(limit=0) == []
    journal.close()


def test_a_position_is_the_offset_just_after_its_record(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    payload = b"x" * 100
    assert journal.append([payload]) == Position(1, HEADER_BYTES + FRAME_BYTES + 100)
    assert journal.append([payload, payload]) == Position(1, HEADER_BYTES + 3 * 108)
    assert journal.append([]) == Position(1, HEADER_BYTES + 3 * 108)
    journal.close()


def test_positions_only_grow_across_segments(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=1000)
    positions = append_each(journal, records(12))
    assert positions == sorted(positions) and len(set(positions)) == 12
    assert positions[-1].segment > 1
    assert Position(1, 999) < Position(2, 4) < Position(2, 5)
    journal.close()


def test_a_batch_is_one_write_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = opened(tmp_path)
    writes: list[int] = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd: int, data: bytes, offset: int) -> int:
        writes.append(len(data))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    journal.append(records(500))
    assert writes == [500 * 408]
    journal.close()


def test_rotation_closes_a_segment_before_it_would_pass_segment_bytes(tmp_path: Path) -> None:
    # 4 + 4 x 408 = 1636 bytes; a fifth record would make 2044 > 2000.
    journal = opened(tmp_path, segment_bytes=2000)
    last = journal.append(records(20))
    assert last == Position(5, 1636)
    assert segment_files(tmp_path) == [f"0000000{n}.sgj" for n in range(1, 6)]
    assert [(tmp_path / name).stat().st_size for name in segment_files(tmp_path)] == [1636] * 5
    assert [payload for _, payload in journal.pending()] == records(20)
    assert journal.disk_bytes() == 5 * 1636
    journal.close()


def test_a_record_bigger_than_a_segment_gets_one_of_its_own(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=1000)
    small, big = b"s" * 100, b"B" * 3000
    positions = append_each(journal, [big, small, small, big])
    assert positions == [Position(1, 3012), Position(2, 112), Position(2, 220), Position(3, 3012)]
    assert journal.append([small, big]) == Position(5, 3012)
    assert [payload for _, payload in journal.pending()] == [big, small, small, big, small, big]
    assert [(tmp_path / name).stat().st_size for name in segment_files(tmp_path)] == [
        3012, 220, 3012, 112, 3012]
    journal.close()


def test_payloads_must_hold_one_to_64_mib_bytes(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    journal.append([b"kept"])
    for bad in ([b"ok", b""], [b"ok", bytes(64 * 1024 * 1024 + 1)]):
        with pytest.raises(ValueError):
            journal.append(bad)
    with pytest.raises(TypeError):
        journal.append(b"one payload, not a list")  # type: ignore[arg-type]
    assert journal.pending() == [(Position(1, 16), b"kept")]
    journal.close()


# -- acknowledging


def test_acknowledge_deletes_acknowledged_segments_and_pending_starts_after_it(
        tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=2000)      # four records per segment
    payloads = records(20)
    positions = append_each(journal, payloads)

    journal.acknowledge(positions[5])                   # the 2nd record of segment 2
    assert segment_files(tmp_path)[0] == "00000002.sgj"
    assert journal.pending() == list(zip(positions[6:], payloads[6:], strict=True))

    journal.acknowledge(positions[7])                   # the end of segment 2
    assert segment_files(tmp_path)[0] == "00000003.sgj"
    assert journal.pending_count() == 12

    journal.acknowledge(positions[19])                  # the end of the open segment: it stays
    assert segment_files(tmp_path) == ["00000005.sgj"]
    assert journal.pending() == []
    assert journal.disk_bytes() == 1636

    later = journal.append([b"after"])
    assert journal.pending() == [(later, b"after")]
    journal.close()


def test_acknowledging_an_older_position_changes_nothing(tmp_path: Path) -> None:
    journal = opened(tmp_path, segment_bytes=2000)
    positions = append_each(journal, records(10))
    journal.acknowledge(positions[6])
    journal.acknowledge(positions[2])
    assert journal.pending_count() == 3
    journal.close()
    journal.open()
    assert journal.pending_count() == 3
    journal.close()


def test_acknowledging_past_the_end_is_refused(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    position = journal.append([b"one"])
    with pytest.raises(ValueError):
        journal.acknowledge(Position(position.segment, position.offset + 1))
    with pytest.raises(ValueError):
        journal.acknowledge(Position(position.segment + 1, 4))
    assert journal.pending_count() == 1
    journal.close()


def test_the_checkpoint_survives_a_reopen(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    payloads = records(6)
    positions = append_each(journal, payloads)
    journal.acknowledge(positions[3])
    journal.close()
    (tmp_path / "checkpoint.tmp").write_bytes(b"a checkpoint write cut short")

    journal = opened(tmp_path)
    assert journal.pending() == list(zip(positions[4:], payloads[4:], strict=True))
    assert not (tmp_path / "checkpoint.tmp").exists()
    journal.close()


def test_a_damaged_checkpoint_delivers_everything_again(
        tmp_path: Path, damage_warnings: Callable[[], list[str]]) -> None:
    journal = opened(tmp_path)
    positions = append_each(journal, records(4))
    journal.acknowledge(positions[2])
    journal.close()
    damage(tmp_path / "checkpoint", 10)

    journal = opened(tmp_path)
    assert [payload for _, payload in journal.pending()] == records(4)
    assert any("checkpoint" in message for message in damage_warnings())
    journal.close()


def test_acknowledged_records_lost_on_disk_do_not_hide_new_ones(tmp_path: Path) -> None:
    # fsync="never" and a power loss: the checkpoint is past what the segment still holds.
    # Appending there again would make the new records look acknowledged.
    journal = opened(tmp_path, fsync="never")
    positions = append_each(journal, records(5))
    journal.acknowledge(positions[4])
    journal.close()
    os.truncate(tmp_path / "00000001.sgj", positions[1].offset)

    journal = opened(tmp_path)
    assert journal.pending() == []
    position = journal.append([b"new"])
    assert position.segment == 2
    assert journal.pending() == [(position, b"new")]
    assert segment_files(tmp_path) == ["00000002.sgj"]
    journal.close()


def test_segment_files_deleted_by_hand_do_not_hide_new_records(tmp_path: Path) -> None:
    # New segments are numbered after the checkpoint's, or their records would count as
    # acknowledged.
    journal = opened(tmp_path, segment_bytes=2000)
    journal.acknowledge(journal.append(records(10)))
    journal.close()
    for name in segment_files(tmp_path):
        (tmp_path / name).unlink()

    journal = opened(tmp_path, segment_bytes=2000)
    position = journal.append([b"new"])
    assert position == Position(4, HEADER_BYTES + FRAME_BYTES + 3)
    assert journal.pending() == [(position, b"new")]
    journal.close()


# -- reopening and crashes


def test_reopen_after_close_keeps_pending_and_resumes_appending(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    before = journal.append(records(3, tag="a"))
    journal.close()
    journal.close()                                     # idempotent

    journal = opened(tmp_path)
    assert [payload for _, payload in journal.pending()] == records(3, tag="a")
    after = journal.append(records(1, tag="b"))
    assert after == Position(1, before.offset + 408)
    assert [payload for _, payload in journal.pending()] == records(3, tag="a") + records(
        1, tag="b")
    journal.close()


@pytest.mark.parametrize("cut_into", [
    pytest.param(3, id="length field"),
    pytest.param(FRAME_BYTES, id="right after the frame"),
    pytest.param(200, id="mid payload"),
    pytest.param(FRAME_BYTES + 399, id="one byte short"),
])
def test_a_torn_last_record_is_cut_and_appends_follow_the_last_good_one(
        tmp_path: Path, cut_into: int) -> None:
    journal = opened(tmp_path)
    payloads = records(5)
    positions = append_each(journal, payloads)
    journal.close()
    segment = tmp_path / "00000001.sgj"
    os.truncate(segment, positions[3].offset + cut_into)

    journal = opened(tmp_path)
    assert segment.stat().st_size == positions[3].offset
    assert journal.pending() == list(zip(positions[:4], payloads[:4], strict=True))
    position = journal.append([b"after the crash"])
    assert position == Position(1, positions[3].offset + FRAME_BYTES + 15)
    assert journal.pending()[-1] == (position, b"after the crash")
    assert journal.pending_count() == 5
    journal.close()


@pytest.mark.parametrize("where", [
    pytest.param(-1, id="last payload byte"),
    pytest.param(-400, id="first payload byte"),
    pytest.param(-404, id="checksum"),
])
def test_a_last_record_failing_its_checksum_is_cut(tmp_path: Path, where: int) -> None:
    journal = opened(tmp_path)
    payloads = records(5)
    positions = append_each(journal, payloads)
    journal.close()
    segment = tmp_path / "00000001.sgj"
    damage(segment, positions[4].offset + where)

    journal = opened(tmp_path)
    assert segment.stat().st_size == positions[3].offset
    assert journal.pending() == list(zip(positions[:4], payloads[:4], strict=True))
    position = journal.append([b"new"])
    assert position == Position(1, positions[3].offset + FRAME_BYTES + 3)
    assert journal.pending()[-1] == (position, b"new")
    journal.close()


@pytest.mark.parametrize(("where", "value"), [
    pytest.param(-10, None, id="payload byte"),
    pytest.param(-404, None, id="checksum"),
    pytest.param(-408, b"\xff\xff\xff\xff", id="absurd length"),
    pytest.param(-408, b"\x00\x00\x00\x00", id="zero length"),
    pytest.param(-408, b"\x00\x00\x01\x00", id="plausible wrong length"),
])
def test_a_damaged_record_in_the_middle_is_skipped_and_later_ones_delivered(
        tmp_path: Path, damage_warnings: Callable[[], list[str]], where: int,
        value: bytes | None) -> None:
    journal = opened(tmp_path)
    payloads = records(5)
    positions = append_each(journal, payloads)
    journal.close()
    segment = tmp_path / "00000001.sgj"
    damage(segment, positions[2].offset + where, value)

    journal = opened(tmp_path)
    assert segment.stat().st_size == positions[4].offset    # no good record was cut
    expected = [(positions[i], payloads[i]) for i in (0, 1, 3, 4)]
    assert journal.pending() == expected
    assert journal.pending_count() == 4
    skipped = positions[1].offset
    assert damage_warnings() == [
        f"journal segment 00000001.sgj: skipped 408 damaged bytes at offset {skipped}"]
    journal.pending()
    assert len(damage_warnings()) == 1                      # logged once, not per read
    position = journal.append([b"new"])
    assert journal.pending() == [*expected, (position, b"new")]
    journal.close()


def test_a_damaged_payload_is_never_read_as_records(tmp_path: Path) -> None:
    # A payload may hold bytes that frame a record of their own; when the payload's checksum
    # fails, its length (still good) says where the next record is, and nothing inside it
    # is delivered.
    inner = b"looks like a record"
    framed = struct.pack(">II", len(inner), zlib.crc32(inner)) + inner
    journal = opened(tmp_path)
    positions = append_each(journal, [b"first", b"<" + framed + b">", b"last"])
    journal.close()
    damage(tmp_path / "00000001.sgj", positions[1].offset - 1)

    journal = opened(tmp_path)
    assert journal.pending() == [(positions[0], b"first"), (positions[2], b"last")]
    journal.close()


def test_damage_in_an_older_segment_is_skipped(
        tmp_path: Path, damage_warnings: Callable[[], list[str]]) -> None:
    journal = opened(tmp_path, segment_bytes=2000)
    payloads = records(10)
    positions = append_each(journal, payloads)
    journal.close()
    damage(tmp_path / "00000001.sgj", positions[1].offset - 5)
    os.truncate(tmp_path / "00000002.sgj", positions[7].offset - 5)  # a torn older segment

    journal = opened(tmp_path, segment_bytes=2000)
    assert [payload for _, payload in journal.pending()] == [
        payloads[i] for i in (0, 2, 3, 4, 5, 6, 8, 9)]
    assert len(damage_warnings()) == 2
    journal.close()


def test_an_empty_segment_left_by_a_crash_at_creation_is_used(tmp_path: Path) -> None:
    journal = opened(tmp_path)
    journal.append([b"one"])
    journal.close()
    (tmp_path / "00000002.sgj").write_bytes(b"SG")

    journal = opened(tmp_path)
    assert journal.append([b"two"]) == Position(2, HEADER_BYTES + FRAME_BYTES + 3)
    assert [payload for _, payload in journal.pending()] == [b"one", b"two"]
    journal.close()


def test_a_file_that_is_not_a_segment_makes_open_fail(tmp_path: Path) -> None:
    (tmp_path / "00000001.sgj").write_bytes(b"SGJ9 a later version")
    journal = Journal(tmp_path)
    with pytest.raises(JournalError, match="not a journal segment"):
        journal.open()
    (tmp_path / "00000001.sgj").unlink()
    opened(tmp_path).close()                # the failed open let go of the directory


CHILD = """
import sys
from middleware.metering.journal import Journal
from tests.middleware.test_metering_journal import crash_payload

journal = Journal(sys.argv[1], fsync="always", segment_bytes=16 * 1024)
journal.open()
number = int(sys.argv[2])
while True:
    batch = [crash_payload(number + k) for k in range(1 + number % 9)]
    position = journal.append(batch)
    number += len(batch)
    print(position.segment, position.offset, number - 1, flush=True)
"""


def crash_payload(number: int) -> bytes:
    return f"crash-{number:08d}-".encode().ljust(300 + number % 250, b"z")


def append_until_killed(directory: Path, first: int, lines: int) -> dict[Position, int]:
    """Run a child appending from record `first`, SIGKILL it after `lines` appends returned.

    Returns each position it printed with the number of the record just before it.
    """
    printed: list[str] = []
    with subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(first)], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}) as child:
        assert child.stdout is not None and child.stderr is not None
        watchdog = threading.Timer(60, child.kill)
        watchdog.start()
        try:
            for line in child.stdout:
                printed.append(line)
                if len(printed) == lines:
                    child.send_signal(signal.SIGKILL)   # while it appends the next batch
                    break
            child.wait()
            printed += child.stdout.readlines()
        finally:
            watchdog.cancel()
            watchdog.join()
        assert child.returncode == -signal.SIGKILL, child.stderr.read()
    reported = {}
    for line in printed:
        if line.endswith("\n"):
            segment, offset, number = map(int, line.split())
            reported[Position(segment, offset)] = number
    assert len(reported) >= lines
    return reported


def test_records_reported_appended_survive_sigkill(
        tmp_path: Path, damage_warnings: Callable[[], list[str]]) -> None:
    first_pending = 0           # the number of the oldest unacknowledged record
    next_number = 0
    for round_number, lines in enumerate((40, 7, 120, 1)):
        reported = append_until_killed(tmp_path, next_number, lines)

        journal = opened(tmp_path)
        found = journal.pending()
        numbers = [int(payload[6:14]) for _, payload in found]
        assert numbers == list(range(first_pending, first_pending + len(found))), round_number
        assert [payload for _, payload in found] == [crash_payload(n) for n in numbers]
        at = {position: number for (position, _), number in zip(found, numbers, strict=True)}
        for position, number in reported.items():
            assert at.get(position) == number, (round_number, position)

        middle = len(found) // 2
        journal.acknowledge(found[middle][0])
        first_pending, next_number = numbers[middle] + 1, numbers[-1] + 1
        journal.close()
    assert not [m for m in damage_warnings() if "skipped" in m]


# -- fsync policies


def test_always_fsyncs_before_append_returns(tmp_path: Path, fsync_calls: list[int]) -> None:
    journal = opened(tmp_path, fsync="always")
    fsync_calls.clear()
    for batch in range(3):
        journal.append(records(10))
        assert len(fsync_calls) == batch + 1
    journal.close()


def test_never_does_not_fsync_on_append(tmp_path: Path, fsync_calls: list[int]) -> None:
    journal = opened(tmp_path, fsync="never", segment_bytes=2000)
    fsync_calls.clear()
    for _ in range(10):
        journal.append(records(3))                      # rotating, too
    assert fsync_calls == []
    assert journal.pending_count() == 30
    journal.close()


def test_batch_fsyncs_once_the_interval_has_passed(tmp_path: Path,
                                                  fsync_calls: list[int]) -> None:
    journal = opened(tmp_path, fsync="batch", fsync_interval_s=0.0)
    fsync_calls.clear()
    journal.append(records(2))
    journal.append(records(2))
    assert len(fsync_calls) == 2
    journal.close()


def test_sync_is_due_once_unsynced_records_waited_the_interval(
        tmp_path: Path, fsync_calls: list[int]) -> None:
    journal = opened(tmp_path, fsync="batch", fsync_interval_s=1.0)
    journal.append(records(1))
    journal.sync()
    fsync_calls.clear()
    assert not journal.sync_due()                       # nothing unsynced
    journal.append(records(2))                          # within the interval: no fsync
    assert fsync_calls == [] and not journal.sync_due()
    time.sleep(1.05)
    assert journal.sync_due()
    journal.sync()
    assert len(fsync_calls) == 1 and not journal.sync_due()
    journal.close()
    assert not journal.sync_due()                       # closed: nothing to sync
    for policy in ("always", "never"):
        other = opened(tmp_path / policy, fsync=policy, fsync_interval_s=0.0)
        other.append(records(1))
        assert not other.sync_due()                     # not this policy's business
        other.close()


def test_batch_leaves_the_rest_to_sync(tmp_path: Path, fsync_calls: list[int]) -> None:
    journal = opened(tmp_path, fsync="batch", fsync_interval_s=3600.0)
    fsync_calls.clear()
    journal.append(records(2))
    journal.append(records(2))
    assert fsync_calls == []
    journal.sync()
    assert len(fsync_calls) == 1
    journal.sync()                                      # nothing written since
    assert len(fsync_calls) == 1
    journal.append(records(1))
    journal.close()                                     # close syncs
    assert len(fsync_calls) == 2
    journal.sync()                                      # a timer firing after close
    assert len(fsync_calls) == 2


@pytest.mark.parametrize("options", [
    {"fsync": "sometimes"}, {"fsync": "ALWAYS"}, {"segment_bytes": 0},
    {"fsync_interval_s": -1.0},
])
def test_bad_options_raise_value_error(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Journal(tmp_path / "journal", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "journal").exists()


@pytest.mark.parametrize("policy", FSYNC_POLICIES)
def test_every_policy_keeps_records_across_a_reopen(tmp_path: Path, policy: str) -> None:
    journal = opened(tmp_path, fsync=policy, segment_bytes=2000)
    journal.append(records(10))
    journal.close()
    journal = opened(tmp_path, fsync=policy, segment_bytes=2000)
    assert [payload for _, payload in journal.pending()] == records(10)
    journal.close()


# -- the directory


def test_the_directory_is_created_private_and_untouched_until_open(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "journal"
    journal = Journal(directory)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert os.listdir(directory) == []
    journal.open()
    assert segment_files(directory) == ["00000001.sgj"]
    journal.close()


def test_an_unusable_directory_raises_journal_error(tmp_path: Path) -> None:
    (tmp_path / "a file").write_text("")
    with pytest.raises(JournalError):
        Journal(tmp_path / "a file")


def test_one_journal_per_directory(tmp_path: Path) -> None:
    first = opened(tmp_path)
    second = Journal(tmp_path)
    with pytest.raises(JournalError, match="in use"):
        second.open()
    with pytest.raises(JournalError, match="already open"):
        first.open()
    first.close()
    second.open()
    second.close()


def test_a_closed_journal_refuses_to_append(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with pytest.raises(JournalError, match="not open"):
        journal.append([b"x"])
    journal.open()
    journal.close()
    with pytest.raises(JournalError, match="not open"):
        journal.append([b"x"])
    with pytest.raises(JournalError, match="not open"):
        journal.pending()


# -- readers (read_only=True): `sluicegate usage --journal` beside a running gateway


def reader(directory: Path) -> Journal:
    journal = Journal(directory, read_only=True)
    journal.open()
    return journal


def disk_state(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_reader_reads_a_journal_another_journal_holds(tmp_path: Path) -> None:
    writer = opened(tmp_path, segment_bytes=4096)
    payloads = records(30)
    positions = append_each(writer, payloads)               # three segments
    writer.acknowledge(positions[11])
    before = disk_state(tmp_path)

    journal = reader(tmp_path)
    assert journal.pending() == list(zip(positions[12:], payloads[12:], strict=True))
    assert journal.pending() == writer.pending() and journal.pending_count() == 18
    journal.close()
    assert disk_state(tmp_path) == before
    with pytest.raises(JournalError, match="in use"):        # the writer's lock still holds
        Journal(tmp_path).open()
    assert writer.append([b"still appending"]) > positions[-1]
    writer.close()


def test_a_reader_sees_the_journal_as_it_was_at_open(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    writer.append(records(3, tag="a"))
    journal = reader(tmp_path)
    writer.append(records(2, tag="b"))                       # appended after the reader opened
    assert [payload for _, payload in journal.pending()] == records(3, tag="a")
    journal.close()
    later = reader(tmp_path)
    assert later.pending_count() == 5
    later.close()
    writer.close()


def test_a_reader_can_neither_append_nor_acknowledge(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    position = writer.append([b"x"])
    writer.close()
    journal = reader(tmp_path)
    with pytest.raises(JournalError, match="read-only"):
        journal.append([b"y"])
    with pytest.raises(JournalError, match="read-only"):
        journal.acknowledge(position)
    assert journal.pending() == [(position, b"x")]
    journal.close()
    with pytest.raises(JournalError, match="not open"):
        journal.pending()
    writer = opened(tmp_path)
    assert writer.pending() == [(position, b"x")]            # nothing was acknowledged
    writer.close()


@pytest.mark.parametrize("tear", [
    pytest.param(lambda segment, end: os.truncate(segment, end - 200), id="cut mid payload"),
    pytest.param(lambda segment, end: damage(segment, end - 1), id="failing its checksum"),
])
def test_a_reader_skips_a_torn_tail_without_cutting_it(
        tmp_path: Path, tear: Callable[[Path, int], None]) -> None:
    journal = opened(tmp_path)
    payloads = records(5)
    positions = append_each(journal, payloads)
    journal.close()
    segment = tmp_path / "00000001.sgj"
    tear(segment, positions[4].offset)
    before = disk_state(tmp_path)

    journal = reader(tmp_path)
    assert journal.pending() == list(zip(positions[:4], payloads[:4], strict=True))
    journal.close()
    assert disk_state(tmp_path) == before                   # the tail is still there
    opened(tmp_path).close()
    assert segment.stat().st_size == positions[3].offset     # where a writer cuts it


def test_a_reader_leaves_alone_what_a_writer_repairs(tmp_path: Path) -> None:
    """A crash's leftovers that a writer's open cleans up: a segment wholly acknowledged but
    not yet deleted, a checkpoint write cut short, a segment created without its header."""
    writer = opened(tmp_path, segment_bytes=4096)
    payloads = records(15)
    positions = append_each(writer, payloads)               # segments 1 and 2
    first_segment = (tmp_path / "00000001.sgj").read_bytes()
    writer.acknowledge(positions[12])
    writer.close()
    (tmp_path / "00000001.sgj").write_bytes(first_segment)
    (tmp_path / "checkpoint.tmp").write_bytes(b"cut short")
    (tmp_path / "00000003.sgj").write_bytes(b"")
    before = disk_state(tmp_path)

    journal = reader(tmp_path)
    assert [payload for _, payload in journal.pending()] == payloads[13:]
    journal.close()
    assert disk_state(tmp_path) == before
    opened(tmp_path).close()
    after = disk_state(tmp_path)
    assert "00000001.sgj" not in after and "checkpoint.tmp" not in after
    assert after["00000003.sgj"] == b"SGJ1"


def test_a_reader_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(JournalError, match="no journal"):
        Journal(missing, read_only=True).open()
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    journal = reader(empty)
    assert journal.pending() == []
    journal.close()
    assert os.listdir(empty) == []                          # no lock file, no segment


# -- threads and volume


def test_threads_append_and_read_at_once(
        tmp_path: Path, damage_warnings: Callable[[], list[str]]) -> None:
    journal = opened(tmp_path, segment_bytes=8192)
    positions: dict[str, list[Position]] = {}
    stop_reading = threading.Event()

    def writer(tag: str) -> None:
        positions[tag] = [journal.append(records(5, tag=f"{tag}{n}")) for n in range(40)]

    def reader() -> None:
        while not stop_reading.is_set():
            journal.pending()

    reading = threading.Thread(target=reader)
    reading.start()
    writers = [threading.Thread(target=writer, args=(tag,)) for tag in "abcdef"]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop_reading.set()
    reading.join()

    found = journal.pending()
    assert len(found) == 6 * 40 * 5
    assert [position for position, _ in found] == sorted(position for position, _ in found)
    for tag, returned in positions.items():
        mine = [p for p, payload in found if payload.startswith(tag.encode())]
        assert mine[4::5] == returned                   # in order, at the returned positions
    assert damage_warnings() == []
    journal.close()


def test_fifty_thousand_records_in_batches_of_500(tmp_path: Path) -> None:
    journal = opened(tmp_path, fsync="batch")
    payloads = records(500, size=400)
    for _ in range(100):
        journal.append(payloads)
    assert journal.pending_count() == 50_000
    assert journal.disk_bytes() == HEADER_BYTES + 50_000 * 408
    assert [payload for _, payload in journal.pending(limit=3)] == payloads[:3]
    journal.close()
