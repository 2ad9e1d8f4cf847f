"""Real multi-process Ray clusters for tests: a head and more nodes on this machine, each a ``ray start --block``
process with free ports in its own session. Stopping or killing a node signals that process group only, so a
test stops exactly the nodes it started and nobody else's Ray (never ``ray stop``). The nodes are started with
``--node-ip-address 127.0.0.1``, which Ray 2.58 replaces by the machine's address: they listen on all interfaces
(docs/cluster.md, "The private local Ray"); pass ``env`` with ``RAY_AUTH_MODE=token`` and a token to close them."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Ports every node opens; each gets a free one, since other clusters on this machine hold Ray's defaults and,
# with --block, a node stops as a whole when any of its processes fails to bind.
_NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
_HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    process: subprocess.Popen
    temp_dir: str

    def output(self) -> str:
        """The tail of what ``ray start`` printed (why a node did not come up)."""
        with contextlib.suppress(OSError):
            return Path(self.temp_dir, "ray-start.log").read_text()[-3000:]
        return ""

    def kill(self) -> None:
        """SIGKILL the node: its raylet, object store and every worker on it, at once (a lost machine)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start(args: list[str], env: dict[str, str]) -> RayNode:
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = [x for flag in _NODE_PORTS for x in (flag, str(free_port()))]
    # A loaded CI machine starts the dashboard's modules slowly; past Ray's 30 s, the head gives up and exits.
    env = dict(os.environ, RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT="300", **env)
    with open(os.path.join(temp_dir, "ray-start.log"), "w") as log:
        process = subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir",
                                    temp_dir, "--disable-usage-stats", *ports, *args],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return RayNode(process, temp_dir)


def is_head(node: dict) -> bool:
    """Whether a ``ray.nodes()`` record is the head's."""
    return "node:__internal_head__" in node["Resources"]


@dataclass
class LocalCluster:
    """``gcs``: the address drivers join (``ray.init(address=...)``, ``--address``); ``dashboard``: the job
    submission and state API address; ``env``: what every node's environment adds (see :func:`local_cluster`)."""

    gcs: str
    dashboard: str
    head: RayNode
    env: dict[str, str]
    nodes: list[RayNode] = field(default_factory=list)

    def alive_nodes(self) -> list[dict]:
        """``ray.nodes()`` records (``NodeID``, ``Resources`` ...) of the nodes alive now, from the GCS: the
        test process joins the cluster as a driver on first use (the dashboard's state API drops nodes from its
        answers on a loaded machine)."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.gcs, logging_level=logging.ERROR, log_to_driver=False)
        return [node for node in ray.nodes() if node["Alive"]]

    def worker_node(self, exclude: tuple[str, ...] = ()) -> str:
        """The id of an alive node other than the head and ``exclude``."""
        return next(n["NodeID"] for n in self.alive_nodes()
                    if not is_head(n) and n["NodeID"] not in exclude)

    def add_node(self, num_cpus: float, timeout: float = 300) -> RayNode:
        """Start one more node and wait until the head counts it alive. A node that gives up starting (on a
        loaded machine its raylet can take more than Ray's fixed 30 s to register) is started again."""
        known = {n["NodeID"] for n in self.alive_nodes()}  # a node killed just before may still count as alive
        deadline = time.monotonic() + timeout
        while True:
            node = _start(["--address", self.gcs, "--num-cpus", str(num_cpus)], self.env)
            while node.process.poll() is None and not {n["NodeID"] for n in self.alive_nodes()} - known:
                assert time.monotonic() < deadline, f"the Ray node did not come up:\n{node.output()}"
                time.sleep(1)
            if node.process.poll() is None:
                self.nodes.append(node)
                return node
            assert time.monotonic() < deadline, f"the Ray node did not come up:\n{node.output()}"
            node.stop()


@contextlib.contextmanager
def local_cluster(head_cpus: float = 2, timeout: float = 600, env: dict[str, str] | None = None
                  ) -> Iterator[LocalCluster]:
    """A Ray head on 127.0.0.1 with ``head_cpus`` CPUs (add nodes with ``add_node``); every node it started is
    stopped on exit. ``env`` goes into every node's environment, e.g. ``RAY_AUTH_MODE=token`` and its token (the
    check that the head is up gets it too)."""
    env = env or {}
    deadline = time.monotonic() + timeout
    cluster = None
    try:
        while True:
            ports = {flag: str(free_port()) for flag in _HEAD_PORTS}
            head = _start(["--head", *(x for item in ports.items() for x in item), "--num-cpus", str(head_cpus),
                           "--dashboard-host", "127.0.0.1"], env)
            cluster = LocalCluster(f"127.0.0.1:{ports['--port']}", f"http://127.0.0.1:{ports['--dashboard-port']}",
                                   head, env)
            while head.process.poll() is None and subprocess.run(
                    [RAY, "job", "list", "--address", cluster.dashboard], capture_output=True, check=False,
                    env={**os.environ, **env}).returncode:
                assert time.monotonic() < deadline, f"the Ray head did not come up:\n{head.output()}"
                time.sleep(2)
            if head.process.poll() is None:
                break
            assert time.monotonic() < deadline, f"the Ray head did not come up:\n{head.output()}"
            head.stop()  # it gave up starting (see LocalCluster.add_node): start another
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            for node in [*cluster.nodes, cluster.head]:
                node.stop()
