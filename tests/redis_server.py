"""Real ``redis-server`` processes for the tests, on loopback: one server, a 3-master Cluster, or a master
with a replica and three sentinels (``redis-server --sentinel``: no redis-sentinel package needed); and
(re-exported from ``tests/certs.py``) certificates for the TLS tests.

Never a system service: each server runs on a free port with persistence off
(``--save '' --appendonly no``) in a temporary folder, and is stopped by its
own PID. A missing ``redis-server`` skips locally and fails under ``CI=true``
(``support.missing``); scripts/test.sh installs it.
"""

from __future__ import annotations

import atexit
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .certs import Certificate as Certificate  # the TLS tests' certificates live in tests/certs.py now
from .certs import certificate as certificate
from .support import free_port, missing, port_open


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        missing("redis-server is not installed (scripts/test.sh installs it with apt)")
    return found  # type: ignore[return-value]


def _command(port: int, *args: str) -> bytes:
    """One inline command to a server; its reply (a line, or a bulk string's body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall((" ".join(args) + "\r\n").encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            data += chunk
            head, _, body = data.partition(b"\r\n")
            if not chunk or (_ and not head.startswith(b"$")):
                return data
            if _ and (int(head[1:]) < 0 or len(body) >= int(head[1:]) + 2):
                return body[: max(int(head[1:]), 0)]


SCRIPTED = {"time", "get", "set", "exists", "zadd", "zrem", "pexpire", "persist", "hmget", "hset", "xrange", "xdel",
            "xadd", "publish"}
"""Commands the store runs inside its scripts (INFO commandstats counts those calls too)."""


def round_trips(commandstats: str) -> int:
    """Client round trips so far: every command but INFO and the ones the scripts run inside.

    On the request path every round trip is one EVALSHA (read, write, and the
    write's rare look), so this is exact there; elsewhere it undercounts
    top-level uses of the commands in ``SCRIPTED``.
    """
    total = 0
    for line in commandstats.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, stats = line[len("cmdstat_"):].partition(":")
        if name in SCRIPTED or name == "info":
            continue
        fields = dict(kv.split("=") for kv in stats.split(","))
        total += int(fields["calls"]) + int(fields.get("rejected_calls", 0))
    return total


class RedisServer:
    """One ``redis-server``; ``stop()`` and ``start()`` again keep its port (the outage tests)."""

    READY = b"Ready to accept connections"  # the log line that says this process is serving

    def __init__(self, folder: Path, port: int | None = None, *extra: str) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.folder), *self.extra]

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"redis-{self.port}.log", "ab")  # noqa: SIM115  (the process owns it)
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        # Ready when *this* process says so: an open port alone may be someone else's (another test run's
        # server on a port that was free a moment ago), and then ours has just failed to bind.
        logfile = self.folder / f"redis-{self.port}.log"
        deadline = time.monotonic() + 10
        while self.READY not in logfile.read_bytes() or not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on {self.port} did not start: {logfile.read_text()[-2000:]}")
            time.sleep(0.01)
        return self

    def command(self, *args: str) -> bytes:
        return _command(self.port, *args)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or clients (a crashed or powered-off host)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One server for the whole test run (the contract suite isolates tests by key prefix)."""
    global _shared
    if _shared is None:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="lapse-redis-"))).start()
        atexit.register(server.stop)
        _shared = server
    return _shared


def _cluster_ports(n: int) -> list[int]:
    """n ports whose cluster-bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 39999)
        if p not in ports and not port_open(p) and not port_open(p + 10000):
            ports.append(p)
    return ports


class RedisCluster:
    """Three masters, slots split three ways, no replicas: the smallest real Cluster."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.nodes = self._nodes()

    def _nodes(self) -> list[RedisServer]:
        return [
            RedisServer(self.folder / str(p), p, "--cluster-enabled", "yes", "--cluster-config-file",
                        f"nodes-{p}.conf", "--cluster-node-timeout", "5000")
            for p in _cluster_ports(3)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for attempt in range(3):  # ports were free when picked; another run may have taken one since
            try:
                for node in self.nodes:
                    node.start()
                break
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
                self.nodes = self._nodes()
        # Slots by hand and MEET: much quicker than `redis-cli --cluster create`, which waits between steps.
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(self.nodes):
            node.command("CLUSTER", "ADDSLOTSRANGE", str(bounds[i]), str(bounds[i + 1] - 1))
        for node in self.nodes[1:]:
            self.nodes[0].command("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") and
                      b"cluster_known_nodes:3" in n.command("CLUSTER", "INFO") for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            shutil.rmtree(node.folder, ignore_errors=True)


class SentinelServer(RedisServer):
    """One ``redis-server --sentinel`` watching ``master_port`` under ``name``, in a folder of its own.

    Sentinel rewrites its config file (what it learns: the other sentinels, the replicas, a new master),
    so each sentinel gets its own, written afresh at every start.
    """

    READY = b"+monitor master"  # Sentinel never logs "Ready to accept connections"

    def __init__(self, folder: Path, name: str, master_port: int, *settings: str) -> None:
        super().__init__(folder)
        self.name, self.master_port, self.settings = name, master_port, settings

    def argv(self) -> list[str]:
        conf = self.folder / "sentinel.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.folder}",
                 f"sentinel monitor {self.name} 127.0.0.1 {self.master_port} 2",
                 *(f"sentinel {setting}" for setting in self.settings)]
        conf.write_text("\n".join(lines) + "\n")
        return [redis_binary(), str(conf), "--sentinel"]


def _info(server: RedisServer, section: str) -> dict[str, str]:
    lines = server.command("INFO", section).decode().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


class RedisSentinels:
    """A master, one replica (``replicaof``) and three sentinels, quorum 2: the smallest real failover.

    ``down_after_ms`` is how long the master must be silent before a sentinel calls it down;
    ``failover_timeout_ms`` bounds one failover attempt and spaces retries (twice it) after a split vote.
    """

    NAME = "lapsemaster"

    def __init__(self, folder: Path, *, down_after_ms: int = 1000, failover_timeout_ms: int = 2000) -> None:
        self.folder = folder
        self.master = RedisServer(folder / "master", None, "--repl-diskless-sync-delay", "0")  # else 5 s to sync
        self.replica = RedisServer(folder / "replica", None, "--replicaof", "127.0.0.1", str(self.master.port))
        settings = (f"down-after-milliseconds {self.NAME} {down_after_ms}",
                    f"failover-timeout {self.NAME} {failover_timeout_ms}")
        self.sentinels = [SentinelServer(folder / f"sentinel{i}", self.NAME, self.master.port, *settings)
                          for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.NAME}"

    def start(self, timeout: float = 15) -> RedisSentinels:
        """Everything up, and every sentinel knowing the replica and the two other sentinels (a failover
        needs a majority of sentinels that know each other; they meet over the master's hello channel)."""
        try:
            self.master.start()
            self.replica.start()
            deadline = time.monotonic() + timeout
            while _info(self.replica, "replication").get("master_link_status") != "up":
                self._before(deadline, "the replica did not sync with the master")
            for sentinel in self.sentinels:
                sentinel.start()
            ready = f"status=ok,address=127.0.0.1:{self.master.port},slaves=1,sentinels=3"
            while not all(ready in _info(s, "sentinel").get("master0", "") for s in self.sentinels):
                self._before(deadline, "the sentinels did not find each other and the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def _before(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.folder.glob("*/*.log")))
            raise RuntimeError(f"{what}:\n{logs}")
        time.sleep(0.02)

    def master_ports(self) -> list[int | None]:
        """The master each sentinel names now (``None``: a sentinel that does not answer)."""
        ports: list[int | None] = []
        for sentinel in self.sentinels:
            try:
                fields = dict(kv.split("=", 1) for kv in _info(sentinel, "sentinel")["master0"].split(","))
                ports.append(int(fields["address"].rsplit(":", 1)[1]))
            except (OSError, KeyError, ValueError):
                ports.append(None)
        return ports

    def wait_replicated(self, timeout: float = 5) -> None:
        """Until the replica has applied every write the master has made so far (its offset caught up)."""
        target = int(_info(self.master, "replication")["master_repl_offset"])
        deadline = time.monotonic() + timeout
        while int(_info(self.replica, "replication")["master_repl_offset"]) < target:
            self._before(deadline, "the replica did not catch up")

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()
