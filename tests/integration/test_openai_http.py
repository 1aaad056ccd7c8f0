"""The OpenAI-compatible embeddings endpoint on real gateways: the `openai` client against
it, the gRPC vectors as reference, and the error statuses a plain HTTP client sees."""

from __future__ import annotations

import base64
import json
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from openai import OpenAI
from taskmux_api.v1 import taskmux_pb2 as pb
from taskmux_api.v1 import taskmux_pb2_grpc

from gateway.auth import hash_key
from model.manifest import load_manifest
from taskmux import local
from taskmux.local import free_port
from tests.harness import Cluster, Proc, wait_until

pytestmark = pytest.mark.integration

KEYS = {
    # tenant: (key, keys-file entry)
    "alpha": ("alpha-key-0123456789", {}),
    "no-embed": ("no-embed-key-0123456789", {"heads": ["sentiment"]}),
    # Slow enough that no request is re-admitted while the test runs.
    "rated": ("rated-key-0123456789", {"rate_per_s": 0.01, "burst": 1}),
}


class Gateway:
    """A gateway process and its three ports."""

    def __init__(self, cluster: Cluster, **env: str) -> None:
        self.http_port, self.metrics_port = free_port(), free_port()
        self.proc: Proc
        self.proc, self.target = cluster.start_gateway(
            http_addr=f"127.0.0.1:{self.http_port}",
            metrics_addr=f"127.0.0.1:{self.metrics_port}",
            **env,
        )
        self.base = f"http://127.0.0.1:{self.http_port}/v1"


def _request(
    url: str,
    body: bytes | dict[str, Any] | None = None,
    *,
    key: str = "",
    method: str = "",
    request_id: str = "",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers) of one plain HTTP call."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if request_id:
        headers["X-Request-Id"] = request_id
    request = urllib.request.Request(url, data=data, headers=headers, method=method or None)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def _ready(gateway: Gateway, key: str = "") -> bool:
    try:
        return _request(f"{gateway.base}/models", key=key)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    """A gateway without authentication."""
    gw = Gateway(cluster)
    wait_until(lambda: _ready(gw), 60, "the HTTP port and the catalog")
    return gw


@pytest.fixture(scope="module")
def keyed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    """A gateway with a keys file."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    tenants = {name: {"key_sha256": hash_key(key), **entry} for name, (key, entry) in KEYS.items()}
    path.write_text(json.dumps({"tenants": tenants}))
    gw = Gateway(cluster, api_keys_file=str(path))
    wait_until(lambda: _ready(gw, KEYS["alpha"][0]), 60, "the keyed HTTP port")
    return gw


@pytest.fixture(scope="module")
def stub(gateway: Gateway) -> Iterator[taskmux_pb2_grpc.TaskMuxStub]:
    with grpc.insecure_channel(gateway.target) as channel:
        yield taskmux_pb2_grpc.TaskMuxStub(channel)


@pytest.fixture(scope="module")
def encoder_name(model_repo: Path) -> str:
    return load_manifest(model_repo, verify=False).encoder.name


def _grpc_vectors(stub: taskmux_pb2_grpc.TaskMuxStub, texts: list[str]) -> np.ndarray:
    response = stub.Embed(pb.EmbedRequest(texts=texts), timeout=30)
    return np.array([list(e.values) for e in response.embeddings])


def _assert_same(got: list[list[float]], want: np.ndarray) -> None:
    vectors = np.array(got)
    assert vectors.shape == want.shape
    cosines = (
        (vectors * want).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(want, axis=1)
    )
    assert (cosines > 0.9999).all(), cosines


def test_openai_client_embeds_one_string_as_grpc_embed_does(
    gateway: Gateway, stub: taskmux_pb2_grpc.TaskMuxStub, encoder_name: str
) -> None:
    client = OpenAI(base_url=gateway.base, api_key="unused", max_retries=0)
    response = client.embeddings.create(model=encoder_name, input="The cat sat on the mat.")
    assert response.model == encoder_name
    assert [d.index for d in response.data] == [0]
    _assert_same([response.data[0].embedding], _grpc_vectors(stub, ["The cat sat on the mat."]))


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_openai_client_embeds_a_list_in_order(
    gateway: Gateway, stub: taskmux_pb2_grpc.TaskMuxStub, encoder_name: str, encoding_format: Any
) -> None:
    texts = ["first text", "a second, different one", "first text", "and a third"]
    client = OpenAI(base_url=gateway.base, api_key="unused", max_retries=0)
    # Asked for base64, the client hands the strings over as they came (left unset, as in
    # the test above, it asks for base64 and decodes them itself).
    response = client.embeddings.create(
        model=f"sentence-transformers/{encoder_name}", input=texts, encoding_format=encoding_format
    )
    assert [d.index for d in response.data] == [0, 1, 2, 3]
    vectors = [_decoded(d.embedding) for d in response.data]
    _assert_same(vectors, _grpc_vectors(stub, texts))


def _decoded(embedding: list[float] | str) -> list[float]:
    """An embedding as floats; from base64, as little-endian float32 (OpenAI's encoding)."""
    if not isinstance(embedding, str):
        return embedding
    raw = base64.b64decode(embedding)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_base64_is_little_endian_float32(
    gateway: Gateway, stub: taskmux_pb2_grpc.TaskMuxStub
) -> None:
    status, body, _ = _request(
        f"{gateway.base}/embeddings",
        {"input": ["hello"], "model": "embed", "encoding_format": "base64", "dimensions": 384},
    )
    assert status == 200, body
    _assert_same([_decoded(body["data"][0]["embedding"])], _grpc_vectors(stub, ["hello"]))
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


def test_models_lists_the_encoder(gateway: Gateway, encoder_name: str) -> None:
    client = OpenAI(base_url=gateway.base, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [encoder_name]
    assert client.models.retrieve(encoder_name).id == encoder_name


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({"model": "embed"}, "input", "input is required"),
        ({"input": [], "model": "embed"}, "input", "input is empty"),
        ({"input": [[1, 2, 3]], "model": "embed"}, "input", "token arrays"),
        ({"input": "", "model": "embed"}, None, "empty or only whitespace"),
        ({"input": ["x"] * 129, "model": "embed"}, None, "at most 128"),
        ({"input": "x" * 8193, "model": "embed"}, None, "at most 8192"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "not supported"),
        ({"input": "x", "dimensions": 256}, "dimensions", "does not shorten"),
    ],
)
def test_bad_requests_are_400_invalid_request_error(
    gateway: Gateway, body: Any, param: str | None, message: str
) -> None:
    status, error, _ = _request(f"{gateway.base}/embeddings", body)
    assert status == 400, error
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "invalid_argument"
    assert error["error"]["param"] == param
    assert message in error["error"]["message"]


def test_unknown_model_is_404_model_not_found(gateway: Gateway) -> None:
    status, error, _ = _request(f"{gateway.base}/embeddings", {"input": "x", "model": "ada-002"})
    assert status == 404
    assert error["error"]["code"] == "model_not_found"
    assert error["error"]["param"] == "model"
    assert _request(f"{gateway.base}/models/ada-002")[0] == 404


def test_unknown_path_and_wrong_method_have_openai_error_bodies(gateway: Gateway) -> None:
    status, error, _ = _request(f"{gateway.base}/completions", {"prompt": "x"})
    assert status == 404
    assert error["error"]["type"] == "invalid_request_error"
    status, error, headers = _request(f"{gateway.base}/embeddings", method="GET")
    assert status == 405
    assert "POST" in headers["Allow"]


def test_request_id_is_echoed(gateway: Gateway) -> None:
    request = urllib.request.Request(
        f"{gateway.base}/embeddings",
        data=json.dumps({"input": "x"}).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "req-42"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["X-Request-Id"] == "req-42"


def _counted(gateway: Gateway, code: str, rpc: str = "OpenAI.Embeddings") -> float:
    """The gateway's taskmux_gateway_requests_total for `rpc` calls that ended with `code`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as r:
        text = r.read().decode()
    pattern = rf'taskmux_gateway_requests_total{{code="{code}",head="",rpc="{rpc}"}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def _counts(gateway: Gateway, *codes: str) -> dict[str, float]:
    return {code: _counted(gateway, code) for code in codes}


def test_http_calls_are_counted_in_the_request_metrics(gateway: Gateway) -> None:
    before = _counts(gateway, "OK", "INVALID_ARGUMENT", "NOT_FOUND")
    assert _request(f"{gateway.base}/embeddings", {"input": "counted"})[0] == 200
    assert _request(f"{gateway.base}/embeddings", {"input": []})[0] == 400
    assert _request(f"{gateway.base}/embeddings", b"{not json")[0] == 400
    assert _request(f"{gateway.base}/embeddings", {"input": "x", "model": "ada-002"})[0] == 404
    # The stack counts a call as it leaves, after the client may have its answer.
    want = {"OK": before["OK"] + 1, "INVALID_ARGUMENT": before["INVALID_ARGUMENT"] + 2}
    want["NOT_FOUND"] = before["NOT_FOUND"] + 1
    wait_until(lambda: _counts(gateway, *want) == want, 10, f"the counts {want}")
    models = _counted(gateway, "OK", "OpenAI.Models")
    assert _request(f"{gateway.base}/models")[0] == 200
    wait_until(lambda: _counted(gateway, "OK", "OpenAI.Models") == models + 1, 10, "GET counted")


@pytest.mark.parametrize(
    ("key", "message"), [("", "missing API key"), ("wrong-key-0123456789", "invalid API key")]
)
def test_missing_or_wrong_key_is_401(keyed: Gateway, key: str, message: str) -> None:
    status, error, headers = _request(f"{keyed.base}/embeddings", {"input": "x"}, key=key)
    assert status == 401
    assert error["error"]["type"] == "authentication_error"
    assert message in error["error"]["message"]
    assert headers["WWW-Authenticate"] == "Bearer"
    assert _request(f"{keyed.base}/models", key=key)[0] == 401


def test_refused_calls_are_authenticated_first_and_counted(keyed: Gateway) -> None:
    """As on the gRPC port: a call without a valid key hears 401 whatever its body, and is
    counted and logged; with a key, a body that does not parse is 400."""
    url, key = f"{keyed.base}/embeddings", KEYS["alpha"][0]
    codes = ("OK", "UNAUTHENTICATED", "INVALID_ARGUMENT", "PERMISSION_DENIED")
    before = _counts(keyed, *codes)
    assert _request(url, {"input": "x"}, request_id="http-no-key")[0] == 401
    assert _request(url, b"{not json", key="wrong-key-0123456789")[0] == 401
    assert _request(url, {"input": "x", "model": "ada-002"})[0] == 401
    assert _request(url, b"{not json", key=key)[0] == 400
    assert _request(url, {"input": "x"}, key=KEYS["no-embed"][0])[0] == 403
    assert _request(url, {"input": "accepted"}, key=key)[0] == 200
    want = {
        "OK": before["OK"] + 1,
        "UNAUTHENTICATED": before["UNAUTHENTICATED"] + 3,
        "INVALID_ARGUMENT": before["INVALID_ARGUMENT"] + 1,
        "PERMISSION_DENIED": before["PERMISSION_DENIED"] + 1,
    }
    wait_until(lambda: _counts(keyed, *codes) == want, 10, f"the counts {want}")

    lines = [json.loads(x) for x in keyed.proc.output().splitlines() if x.startswith("{")]
    access = [x for x in lines if x["logger"] == "gateway.metrics"]
    refused = next(x for x in access if x.get("request_id") == "http-no-key")
    assert refused["message"].startswith("OpenAI.Embeddings UNAUTHENTICATED")
    assert "tenant" not in refused


def test_key_is_accepted_by_the_openai_client(keyed: Gateway, encoder_name: str) -> None:
    client = OpenAI(base_url=keyed.base, api_key=KEYS["alpha"][0], max_retries=0)
    response = client.embeddings.create(model=encoder_name, input=["with a key"])
    assert len(response.data[0].embedding) == 384


def test_tenant_without_the_embedding_head_is_403(keyed: Gateway) -> None:
    status, error, _ = _request(f"{keyed.base}/embeddings", {"input": "x"}, key=KEYS["no-embed"][0])
    assert status == 403
    assert error["error"]["type"] == "permission_error"


def test_over_the_rate_limit_is_429_with_retry_after(keyed: Gateway) -> None:
    key = KEYS["rated"][0]
    assert _request(f"{keyed.base}/embeddings", {"input": "the burst"}, key=key)[0] == 200
    status, error, headers = _request(f"{keyed.base}/embeddings", {"input": "one past"}, key=key)
    assert status == 429, error
    assert error["error"]["type"] == "rate_limit_error"
    assert "rate limit" in error["error"]["message"]
    assert int(headers["Retry-After"]) >= 1
    assert int(headers["retry-after-ms"]) > 0


def test_redis_unreachable_is_503_and_the_gateway_drains_cleanly(cluster: Cluster) -> None:
    gw = Gateway(cluster, redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing there

    def answers() -> bool:
        try:
            return _request(f"{gw.base}/models")[0] > 0
        except OSError:
            return False

    wait_until(answers, 60, "the HTTP port")
    status, error, _ = _request(f"{gw.base}/embeddings", {"input": "x"})
    assert status == 503
    assert error["error"]["code"] == "unavailable"
    assert gw.proc.stop() == 0, gw.proc.output()


def test_taskmux_up_gives_each_gateway_the_http_port(monkeypatch: pytest.MonkeyPatch) -> None:
    for balanced in (True, False):
        monkeypatch.setattr(local, "reuse_port_balances", lambda b=balanced: b)
        layout = local.plan_layout(50051, gateways=2, workers=1, http_port=8080)
        commands = local.cluster_commands(layout, "redis://127.0.0.1:1/0", Path("repo"))
        addrs = [env["TASKMUX_HTTP_ADDR"] for name, _, env in commands if "gateway" in name]
        assert addrs[0] == "127.0.0.1:8080"
        assert len(set(addrs)) == (1 if balanced else 2)
