"""HTTP limits on real Ray Serve (loopback) over the fake engine: the API key is checked from the headers
before the body is read, the body has a size and a time limit, every refusal in a burst is OpenAI-shaped
with Retry-After (the shipped serve_config.yaml numbers), and the API key never reaches a log."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve import RunTarget

from configs import EngineConfig
from configs.serve import BatonAppArgs, ServerConfig
from deployments.builder import make_app
from tests.deployments.serve_testing import fake_factory

REPO = Path(__file__).resolve().parents[2]
ENGINE = EngineConfig(model="fake", max_batch_size=4, max_model_len=512)
API_KEY = "sk-limits-" + secrets.token_hex(8)
FILE_KEY = "sk-file-" + secrets.token_hex(12)  # only ever in a file: must appear in no log
BODY_TIMEOUT_S = 1.5


def shipped_app() -> tuple[ServerConfig, dict[str, Any]]:
    """serve_config.yaml's server options and Ray limits (what a deploy of the shipped file gets)."""
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    server = BatonAppArgs.model_validate(app["args"]).server
    deployment = next(d for d in app["deployments"] if d["name"] == "BatonIngress")
    limits = ("max_ongoing_requests", "max_queued_requests", "backpressure_config")
    return server, {k: deployment[k] for k in limits}


@pytest.fixture(scope="module")
def base_url(serve_instance: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(FILE_KEY + "\n")
    key_file.chmod(0o600)
    server, limits = shipped_app()
    limited = ServerConfig(
        api_key=API_KEY, max_body_bytes=64 * 1024, body_timeout_s=BODY_TIMEOUT_S  # type: ignore[arg-type]
    )
    keyed_by_file = ServerConfig(api_key_file=str(key_file))
    serve.run_many(
        [
            RunTarget(make_app(ENGINE, limited, fake_factory()), "limits", "/limits"),
            RunTarget(make_app(ENGINE, server, fake_factory(), ingress_options=limits), "shipped", "/shipped"),
            RunTarget(make_app(ENGINE, keyed_by_file, fake_factory()), "keyfile", "/keyfile"),
        ]
    )
    yield serve_instance


def host_port(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def open_slow_body(base_url: str, path: str, headers: dict[str, str], declared: int = 1_000_000) -> socket.socket:
    """A connection that sent complete headers and a few bytes of a `declared`-byte body, then nothing."""
    sock = socket.create_connection(host_port(base_url), timeout=10)
    lines = [f"POST {path} HTTP/1.1", f"Host: {base_url.removeprefix('http://')}",
             "Content-Type: application/json", f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"prompt": "')
    return sock


def read_response(sock: socket.socket, timeout_s: float) -> str:
    """The raw response on `sock` (status line, headers, body), or "(no answer)" after `timeout_s`."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(v) for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:] if b":" in h)
                      if k.strip().lower() == b"content-length"]
            if not chunk or (sep and length and len(body) >= length[0]):
                return data.decode(errors="replace")
    except TimeoutError:
        return data.decode(errors="replace") or "(no answer)"


def test_slow_bodies_without_a_key_do_not_delay_a_keyed_request(base_url: str) -> None:
    """40 clients send headers with Content-Length: 1000000, a few bytes, and no API key: each gets a 401
    at once (the key is checked before the body is read), so they hold none of the replica's slots, and a
    keyed request, /health and /stats answer within a second of their usual time."""
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "fast", "max_tokens": 4}
    with httpx.Client(base_url=f"{base_url}/limits", timeout=10) as http:
        t0 = time.monotonic()
        assert http.post("/v1/completions", json=body, headers=keyed).status_code == 200
        usual = time.monotonic() - t0
        slow = [open_slow_body(base_url, "/limits/v1/completions", {}) for _ in range(40)]
        try:
            time.sleep(0.5)  # every slow client is now connected, mid-body
            t0 = time.monotonic()
            r = http.post("/v1/completions", json=body, headers=keyed, timeout=5)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "fast"
            assert time.monotonic() - t0 < usual + 1.0
            assert http.get("/health", timeout=2).status_code == 200
            assert http.get("/stats", headers=keyed, timeout=2).status_code == 200
            answers = [read_response(s, 5) for s in slow]
            assert all(a.startswith("HTTP/1.1 401 ") for a in answers), answers
        finally:
            for s in slow:
                s.close()


def test_a_keyed_slow_body_gets_a_408_and_a_big_one_a_413(base_url: str) -> None:
    keyed = {"Authorization": f"Bearer {API_KEY}"}
    sock = open_slow_body(base_url, "/limits/v1/completions", keyed, declared=1000)
    try:
        t0 = time.monotonic()
        answer = read_response(sock, BODY_TIMEOUT_S + 10)
        assert answer.startswith("HTTP/1.1 408"), answer
        assert BODY_TIMEOUT_S - 0.2 <= time.monotonic() - t0 < BODY_TIMEOUT_S + 5
        assert '"code":"request_timeout"' in answer.replace(" ", "")
    finally:
        sock.close()
    url = f"{base_url}/limits/v1/completions"
    declared = httpx.post(url, content=b"x" * (64 * 1024 + 1), headers=keyed, timeout=10)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        for _ in range(100):
            yield b" " * 1024

    streamed = httpx.post(url, content=chunks(), headers=keyed, timeout=10)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(url, json={"prompt": "still", "max_tokens": 5}, headers=keyed, timeout=10)
    assert ok.json()["choices"][0]["text"] == "still"


def test_without_a_key_a_bad_body_is_a_401_not_a_400(base_url: str) -> None:
    r = httpx.post(f"{base_url}/limits/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{base_url}/limits/v1/chat/completions", json={"messages": 5}, timeout=10)
    assert r.status_code == 401


def test_a_burst_gets_only_openai_shaped_refusals(base_url: str) -> None:
    """200 simultaneous requests against the shipped limits (serve_config.yaml): each is answered 200 or
    with the replica's OpenAI-shaped 429 + Retry-After; none with Ray's plain-text 429."""
    server, _ = shipped_app()

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=f"{base_url}/shipped", timeout=60, limits=limits) as client:
            body = {"prompt": "burst", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(200)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code != 200]
    assert refused and len(refused) < 200, [r.status_code for r in responses]
    for r in refused:
        assert r.status_code == 429 and r.headers["retry-after"] == str(server.retry_after_s), r.text
        assert r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["code"] == "server_overloaded"
    ok = [r for r in responses if r.status_code == 200]
    assert all(r.json()["choices"][0]["text"] == "burst" * 8 for r in ok)


def test_the_api_key_from_a_file_works_and_reaches_no_log(base_url: str) -> None:
    url = f"{base_url}/keyfile/v1/completions"
    body = {"prompt": "k", "max_tokens": 1}
    assert httpx.post(url, json=body, timeout=10).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {FILE_KEY}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "k"
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    leaks = [p for p in logs.rglob("*") if p.is_file() and FILE_KEY.encode() in p.read_bytes()]
    assert logs.is_dir() and not leaks, leaks
