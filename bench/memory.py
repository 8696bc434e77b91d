"""Memory of a running Serve application: the proportional set size (PSS) of its processes.

PSS counts a page shared by N processes as 1/N in each, so the sum over processes is what the
application really holds (RSS would count torch's shared libraries once per replica). The
application is every process below the one that started Ray (the GCS, the raylet, Serve's
controller and proxies, every replica, HAProxy), which is how ``serve run`` and the benchmark both
start it. Processes are grouped by role as the benchmark's CPU table groups them.

This module imports no project code, so that the same measurement can be run against an older
checkout (``python bench/memory.py`` from that checkout's root, see the README).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20


def process_role(cmdline: str) -> str:
    """Name a process by its role in the served path (the benchmark's CPU table uses it too)."""
    if cmdline.startswith("ray::ServeReplica:"):
        # ``ray::ServeReplica:app:Deployment`` (the title gets ``.method`` while a call runs).
        return cmdline.split(":")[-1].split()[0].split(".")[0]
    if cmdline.startswith("ray::ProxyActor"):
        return "Serve proxy"
    if cmdline.startswith("ray::HAProxyManager"):
        return "HAProxy manager"
    if cmdline.startswith("ray::ServeController"):
        return "Serve controller"
    if "haproxy" in cmdline.split(" ", 1)[0]:
        return "HAProxy"
    return "Ray control plane and other"


@dataclass
class MemorySnapshot:
    """PSS and RSS of an application's processes at one moment."""

    pss_bytes: int = 0
    rss_bytes: int = 0
    processes: int = 0
    by_role: dict[str, int] = field(default_factory=dict)
    """PSS per role, largest first."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "pss_mib": round(self.pss_bytes / MIB, 1),
            "rss_mib": round(self.rss_bytes / MIB, 1),
            "processes": self.processes,
            "pss_mib_by_role": {k: round(v / MIB, 1) for k, v in self.by_role.items()},
        }


def tree_memory(root_pid: int | None = None, exclude: Iterable[int] = ()) -> MemorySnapshot:
    """PSS of every process below ``root_pid`` (default: this process), ``exclude`` left out."""
    import psutil

    root = psutil.Process(root_pid)
    skipped = set(exclude)
    snapshot = MemorySnapshot()
    roles: dict[str, int] = {}
    for process in root.children(recursive=True):
        if process.pid in skipped:
            continue
        try:
            info = process.memory_full_info()
            cmdline = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        snapshot.pss_bytes += info.pss
        snapshot.rss_bytes += info.rss
        snapshot.processes += 1
        role = process_role(cmdline)
        roles[role] = roles.get(role, 0) + info.pss
    snapshot.by_role = dict(sorted(roles.items(), key=lambda kv: -kv[1]))
    return snapshot


class PeakMemory:
    """Samples :func:`tree_memory` in a thread while a load runs; keeps the largest total."""

    def __init__(
        self, interval_s: float = 1.0, sample: Callable[[], MemorySnapshot] = tree_memory
    ) -> None:
        import threading

        self.interval_s = interval_s
        self.sample = sample
        self.peak = MemorySnapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = self.sample()
            if snapshot.pss_bytes > self.peak.pss_bytes:
                self.peak = snapshot
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def settled_memory(settle_s: float = 10.0) -> MemorySnapshot:
    """The application's memory once it is idle: after ``settle_s`` without requests (lazy
    imports and first-call allocations done, background pollers at their steady state)."""
    time.sleep(settle_s)
    return tree_memory()


def main() -> int:
    """Deploy ``serve_config.yaml`` of the checkout this is run from on a private Ray cluster,
    wait until it is ready and idle, print its memory as JSON, shut everything down.

    Run from a checkout's root with that checkout's environment, e.g. to compare two commits::

        .venv/bin/python bench/memory.py serve_config.yaml
    """
    import json
    import os
    import socket
    import sys

    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from graphs.deploy import deploy, start_serve, wait_ready
    from servecore.config_check import load_config

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    http_port = free_port
    try:  # the checkout's own Serve settings and port choice, where it has them
        from graphs.deploy import quiet_port, serve_env

        os.environ.update(serve_env())
        http_port = quiet_port
    except ImportError:
        pass
    config = load_config(sys.argv[1] if len(sys.argv) > 1 else "serve_config.yaml")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        port = http_port()
        start_serve(config, http_port=port)
        deploy(config)
        wait_ready(f"http://127.0.0.1:{port}")
        print(json.dumps(settled_memory(20.0).to_dict(), indent=2))
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
