"""Processes for the benchmarks: start pinned to a CPU, stop the whole group, measure tree RSS.

Every server the harness starts goes through `ProcessSet`, which stops them all on exit, also
after an error or Ctrl-C. Only processes started here are ever signalled, by their own group id.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """`cmd` behind `taskset -c CPU` (taskset execs, so the pid stays the command's own)."""
    if cpu is None or shutil.which("taskset") is None:
        return list(cmd)
    return ["taskset", "-c", str(cpu), *cmd]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_port_free(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while port_in_use(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _parent_map() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name (field 2) may hold spaces and parentheses; ppid follows the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_map().items():
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Sum of the RSS of `pid` and every descendant (a supervisor and its workers)."""
    return sum(rss_bytes(p) for p in process_tree(pid))


@dataclass(slots=True)
class Started:
    """One server started by the harness: its process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> int | None:
        return self.proc.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(slots=True)
class ProcessSet:
    """The servers started by one run; leaving the `with` block stops all that still run."""

    stop_timeout_s: float = 10.0
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], *, log_path: Path, cwd: Path | None = None,
              env: Mapping[str, str] | None = None, cpu: int | None = None) -> Started:
        with open(log_path, "ab") as log:
            # A new session gives the server its own process group, so stopping it reaches the
            # workers it spawned, and a Ctrl-C at the terminal reaches only the harness.
            proc = subprocess.Popen(pinned(cmd, cpu), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=dict(env or os.environ),
                                    start_new_session=True)
        item = Started(name, proc, log_path)
        self.started.append(item)
        return item

    def stop(self, item: Started) -> None:
        if item in self.started:
            self.started.remove(item)
        _stop_group(item.proc, self.stop_timeout_s)

    def stop_all(self) -> None:
        for item in reversed(list(self.started)):
            self.stop(item)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process group we created, then SIGKILL what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the group id is the pid: start_new_session=True
        except ProcessLookupError:
            break
        if _group_gone(proc, timeout_s):
            break
    proc.poll()


def _group_gone(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait until the leader has exited and no other member of its group is alive."""
    deadline = time.monotonic() + timeout_s
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    while _live_group_members(proc.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that still run (zombies hold no port and wait for reaping)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry))
    return members
