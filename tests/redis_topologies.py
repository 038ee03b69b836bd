"""Real Redis deployments beyond the machine's single server, started for the tests that
need them: a TLS server, a primary with a replica behind a Sentinel, and a three-node Redis
Cluster. All on 127.0.0.1, on free ports, in a temporary directory, stopped afterwards."""
from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.harness import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        if all(_free(candidate) for candidate in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Servers:
    """The redis-server processes of one topology."""

    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, args: list[str], port: int) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes.append(subprocess.Popen([REDIS_SERVER, *args], cwd=self.workdir,
                                               stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.processes[-1].poll() is not None:
                    raise RuntimeError(f"{name} did not start: "
                                       f"{(self.workdir / f'{name}.log').read_text()[-800:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()


def _plain(port: int) -> list[str]:
    return ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca: Path  # the self-signed certificate the server presents

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"


def tls_redis(workdir: Path) -> Iterator[TlsRedis]:
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    servers, port = Servers(workdir), free_port()
    try:
        servers.start("tls", ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                              "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                              "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                              "--save", "", "--appendonly", "no"], port)
        yield TlsRedis(port, cert)
    finally:
        servers.stop()


@dataclass(frozen=True)
class SentinelRedis:
    sentinel_port: int
    ports: tuple[int, int]  # the first starts as the primary, the second as its replica
    service: str = "sgprimary"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port)

    def primary_port(self) -> int:
        with self.sentinel() as client:
            _, port = client.execute_command("SENTINEL", "get-master-addr-by-name",
                                             self.service)
        return int(port)

    def fail_over(self, timeout_s: float = 20.0) -> int:
        """Forces a failover and waits until the old replica is the primary, the Sentinel
        says so and the old primary has been turned into a replica; returns the new
        primary's port, once the old primary replicates from it. (Until it is demoted the
        old primary still takes writes, which the resync then drops: Redis Sentinel's
        split-brain window.)"""
        before = self.primary_port()
        with self.sentinel() as client:
            deadline = time.monotonic() + timeout_s
            while True:  # refused while the replica is not yet known to the Sentinel
                try:
                    client.execute_command("SENTINEL", "FAILOVER", self.service)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            after = self.primary_port()
            if after != before:
                with redis.Redis(port=after) as new, redis.Redis(port=before) as old:
                    if new.execute_command("ROLE")[0] == b"master" and \
                            old.execute_command("ROLE")[0] == b"slave":
                        _wait_replicated(after, before, timeout_s)  # ready for the next one
                        return after
            time.sleep(0.1)
        raise TimeoutError("the Sentinel failover did not finish")


def sentinel_redis(workdir: Path) -> Iterator[SentinelRedis]:
    servers = Servers(workdir)
    primary, replica, sentinel = free_port(), free_port(), free_port()
    topology = SentinelRedis(sentinel, (primary, replica))
    try:
        servers.start("primary", _plain(primary), primary)
        servers.start("replica", [*_plain(replica), "--replicaof", "127.0.0.1", str(primary)],
                      replica)
        conf = workdir / "sentinel.conf"
        conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {workdir}\n"
                        f"sentinel monitor {topology.service} 127.0.0.1 {primary} 1\n"
                        f"sentinel down-after-milliseconds {topology.service} 1000\n"
                        f"sentinel failover-timeout {topology.service} 4000\n")
        servers.start("sentinel", [str(conf), "--sentinel"], sentinel)
        _wait_replicated(primary, replica)
        yield topology
    finally:
        servers.stop()


def _wait_replicated(primary: int, replica: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    with redis.Redis(port=replica) as client:
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the replica on {replica} never synced with {primary}")
            time.sleep(0.05)


@dataclass(frozen=True)
class ClusterRedis:
    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:1])

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port)

    def owner(self, slot: int) -> int:
        """The port of the node serving `slot`."""
        with self.node(self.ports[0]) as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise LookupError(slot)

    def node_id(self, port: int) -> str:
        with self.node(port) as client:
            return str(client.execute_command("CLUSTER MYID").decode())


def cluster_redis(workdir: Path) -> Iterator[ClusterRedis]:
    servers = Servers(workdir)
    ports = tuple(free_cluster_port() for _ in range(3))
    try:
        for port in ports:
            servers.start(f"node{port}", [*_plain(port), "--cluster-enabled", "yes",
                                          "--cluster-config-file", f"nodes-{port}.conf",
                                          "--cluster-node-timeout", "2000"], port)
        subprocess.run([REDIS_CLI, "--cluster", "create",
                        *(f"127.0.0.1:{port}" for port in ports), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        for port in ports:
            with redis.Redis(port=port) as client:
                while not _cluster_ok(client.execute_command("CLUSTER INFO")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the test Redis Cluster never became ready")
                    time.sleep(0.1)
        yield ClusterRedis(ports)
    finally:
        servers.stop()


def _cluster_ok(info: object) -> bool:
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO
        return str(info.get("cluster_state")) == "ok"
    return b"cluster_state:ok" in info if isinstance(info, bytes) else False
