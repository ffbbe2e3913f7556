"""
Tests for L{zaiproxy.front.clientkeys}: parsing key lists and files, lookup; and
client keys enforced through the real proxy, with the official SDKs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import anthropic
import openai
import pytest
import pytest_twisted
from support.stack import UPSTREAM_KEY, Stack
from twisted.internet import task, threads
from twisted.web.http_headers import Headers

from zaiproxy.config.settings import SettingsError, loadSettings
from zaiproxy.fake.testing import rawRequest
from zaiproxy.front.clientkeys import (
    ClientKeysError,
    buildClientKeys,
    parseInlineKeys,
    presentedKeys,
    readKeyFile,
)
from zaiproxy.limits.admission import clientBucket

T = TypeVar("T")

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-fedcba9876543210"
CAROL = "carol-key-00112233445566778899"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keyFile(tmp_path: Any, text: str, mode: int = 0o600, name: str = "keys") -> str:
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


# -- parsing -------------------------------------------------------------------


def test_fileWithCommentsAndHashes(tmp_path: Any) -> None:
    """
    A key file holds name:key lines, comments, blank lines, and keys
    stored as sha256:<hex>; both kinds are found by the key itself.
    """
    path = keyFile(
        tmp_path,
        f"# team keys\n\nalice:{ALICE}\n  bob : sha256:{sha(BOB).upper()}  \n#carol:{CAROL}\n",
    )
    keys, warnings = readKeyFile(path)
    assert [(k.name, k.where) for k in keys] == [("alice", f"{path} line 3"), ("bob", f"{path} line 4")]
    assert warnings == []
    built, _ = buildClientKeys((), path)
    assert built is not None
    assert built.names == ("alice", "bob")
    assert built.lookup(ALICE.encode()) == "alice"
    assert built.lookup(BOB.encode()) == "bob"
    assert built.lookup(CAROL.encode()) is None
    assert built.lookup(sha(BOB).encode()) is None
    assert built.lookup(b"") is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("alice", "line 2: expected name:key"),
        (f":{ALICE}", "line 2: the name is empty"),
        (f"al ice:{ALICE}", "line 2: name 'al ice' is not valid"),
        (f'al"ice:{ALICE}', "line 2: name 'al\"ice' is not valid"),
        (f"{'a' * 65}:{ALICE}", "is not valid: use 1 to 64 letters"),
        (f"unauthorized:{ALICE}", "line 2: name 'unauthorized' is reserved by the proxy"),
        ("alice:", "line 2: the key of 'alice' is empty"),
        ("alice:sha256:abc", "line 2: the key of 'alice' starts with sha256: but is not 64 hex digits"),
        (f"alice:{ALICE} extra", "line 2: the key of 'alice' contains spaces or control characters"),
        (f"bob:{ALICE}", "line 2: the key of 'bob' is the same as at"),
        (f"bob:sha256:{sha(ALICE)}", "line 2: the key of 'bob' is the same as at"),
        (f"ALICE:{BOB}", "line 2: the name 'ALICE' is already used at"),
    ],
)
def test_badLines(tmp_path: Any, line: str, message: str) -> None:
    """
    A bad line stops loading with one line naming the file and line, and
    never the key.
    """
    path = keyFile(tmp_path, f"alice:{ALICE}\n{line}\n")
    with pytest.raises(ClientKeysError) as raised:
        buildClientKeys((), path)
    text = str(raised.value)
    assert f"{path} line 2" in text
    assert message in text
    assert ALICE not in text and BOB not in text


def test_duplicateNameNamesBothLines(tmp_path: Any) -> None:
    path = keyFile(tmp_path, f"alice:{ALICE}\n\nalice:{BOB}\n")
    with pytest.raises(ClientKeysError) as raised:
        buildClientKeys((), path)
    assert str(raised.value) == f"{path} line 3: the name 'alice' is already used at {path} line 1"


def test_fileProblems(tmp_path: Any) -> None:
    """
    Unreadable, empty or non-UTF-8 files are errors; a world-readable file
    or a short key loads with a warning.
    """
    with pytest.raises(
        ClientKeysError, match=r"cannot read key file /nonexistent/keys: No such file or directory"
    ):
        readKeyFile("/nonexistent/keys")
    empty = keyFile(tmp_path, "# nobody yet\n\n", name="empty")
    with pytest.raises(ClientKeysError) as raised:
        readKeyFile(empty)
    assert str(raised.value) == f"key file {empty} holds no keys"
    binary = tmp_path / "binary"
    binary.write_bytes(b"alice:\xff\xfe\n")
    with pytest.raises(ClientKeysError, match="is not UTF-8 text"):
        readKeyFile(str(binary))
    open_ = keyFile(tmp_path, f"alice:{ALICE}\nbob:short\n", mode=0o644, name="open")
    keys, warnings = readKeyFile(open_)
    assert [k.name for k in keys] == ["alice", "bob"]
    assert warnings == [
        f"key file {open_} is readable by every user (mode 0644); chmod 0640 or 0600 it",
        f"{open_} line 2: the key of 'bob' is shorter than 16 characters and easy to guess",
    ]


def test_inlineKeys() -> None:
    """
    PROXY_API_KEYS is a comma-separated list; with the file, names and keys
    must be unique across both; a bad entry is reported without its value.
    """
    inline = parseInlineKeys(f" alice:{ALICE}, ,bob:sha256:{sha(BOB)} ")
    assert [(k.name, k.where) for k in inline] == [("alice", "entry 1"), ("bob", "entry 3")]
    assert parseInlineKeys("") == ()
    settings, _ = loadSettings({"ZAI_API_KEY": "k", "PROXY_API_KEYS": f"alice:{ALICE}"})
    assert [k.name for k in settings.proxyApiKeys] == ["alice"]
    assert ALICE not in repr(settings) and sha(ALICE) not in repr(settings)
    with pytest.raises(SettingsError) as raised:
        loadSettings({"ZAI_API_KEY": "k", "PROXY_API_KEYS": f"alice:{ALICE},bob"})
    assert str(raised.value) == "PROXY_API_KEYS=(hidden) is not valid: entry 2: expected name:key"


def test_inlineAndFileTogether(tmp_path: Any) -> None:
    path = keyFile(tmp_path, f"bob:{BOB}\n")
    keys, _ = buildClientKeys(parseInlineKeys(f"alice:{ALICE}"), path)
    assert keys is not None and keys.names == ("alice", "bob")
    clash = keyFile(tmp_path, f"carol:{ALICE}\n", name="clash")
    with pytest.raises(ClientKeysError) as raised:
        buildClientKeys(parseInlineKeys(f"alice:{ALICE}"), clash)
    assert str(raised.value) == f"{clash} line 1: the key of 'carol' is the same as at entry 1"
    assert buildClientKeys((), None) == (None, [])


def test_presentedKeys() -> None:
    """
    Keys come from Authorization: Bearer (any case of the scheme) and
    x-api-key; other schemes and empty values are not keys.
    """
    headers = Headers(
        {
            b"authorization": [b"bearer  tok-1 "],
            b"x-api-key": [b"tok-2", b""],
        }
    )
    assert presentedKeys(headers) == [b"tok-1", b"tok-2"]
    assert presentedKeys(Headers({b"authorization": [b"Basic dXNlcjpwYXNz"]})) == []
    assert presentedKeys(Headers({b"authorization": [b"Bearer"]})) == []
    keys, _ = buildClientKeys(parseInlineKeys(f"alice:{ALICE},bob:{BOB}"), None)
    assert keys is not None
    assert keys.lookupAny([b"wrong", BOB.encode()]) == "bob"
    assert keys.lookupAny([ALICE.encode(), BOB.encode()]) == "alice"
    assert keys.lookupAny([]) is None


def test_lookupComparesEveryEntry(monkeypatch: Any) -> None:
    """
    A lookup compares the presented key's digest with every stored digest,
    with hmac.compare_digest, whichever entry matches.
    """
    keys, _ = buildClientKeys(parseInlineKeys(f"alice:{ALICE},bob:{BOB},carol:{CAROL}"), None)
    assert keys is not None
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("zaiproxy.front.clientkeys.hmac.compare_digest", counting)
    for key, name in ((ALICE, "alice"), (CAROL, "carol"), ("nobody", None)):
        calls.clear()
        assert keys.lookup(key.encode()) == name
        assert [b for _, b in calls] == [k.digest for k in keys.keys]
        assert all(a == hashlib.sha256(key.encode()).digest() for a, _ in calls)


# -- through the proxy -----------------------------------------------------------

MESSAGES = json.dumps(
    {"model": "glm-4.7", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
).encode()
CHAT = json.dumps({"model": "glm-4.7", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def inThread(f: Callable[[], T]) -> T:
    return await threads.deferToThread(f)


async def keyedStack(makeStack: Any, tmp_path: Any, scenario: str = "", **env: str) -> Stack:
    path = keyFile(tmp_path, f"alice:{ALICE}\nbob:sha256:{sha(BOB)}\n")
    stack: Stack = await makeStack(scenario, PROXY_API_KEYS_FILE=path, **env)
    return stack


@pytest_twisted.ensureDeferred
async def test_sdksWithBothHeaderStyles(reactor: Any, makeStack: Any, tmp_path: Any) -> None:
    """
    The anthropic SDK sending x-api-key (what Claude Code sends for
    ANTHROPIC_API_KEY) and Authorization: Bearer (auth_token, and api_key in
    this SDK version), and the openai SDK (Bearer), get through with a
    configured key; upstream sees only the Z.AI key.
    """
    stack = await keyedStack(makeStack, tmp_path)

    def call() -> list[str]:
        texts = []
        with anthropic.Anthropic(
            base_url=stack.url(""), api_key=None, default_headers={"x-api-key": ALICE}, max_retries=0
        ) as client:
            message = client.messages.create(
                model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
            [block] = message.content
            assert isinstance(block, anthropic.types.TextBlock)
            texts.append(block.text)
        with anthropic.Anthropic(
            base_url=stack.url(""), api_key=None, auth_token=BOB, max_retries=0
        ) as client:
            message = client.messages.create(
                model="glm-4.7", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
            )
            [block] = message.content
            assert isinstance(block, anthropic.types.TextBlock)
            texts.append(block.text)
        with openai.OpenAI(base_url=stack.url("/v1"), api_key=BOB, max_retries=0) as client:
            completion = client.chat.completions.create(
                model="glm-4.7", messages=[{"role": "user", "content": "hi"}]
            )
            texts.append(completion.choices[0].message.content or "")
        return texts

    assert await inThread(call) == ["hello " * 5] * 3
    anthropicKey, anthropicToken, chat = stack.fake.received
    assert anthropicKey.header(b"x-api-key") == [UPSTREAM_KEY.encode()]
    assert anthropicKey.header(b"authorization") == []
    assert anthropicToken.header(b"x-api-key") == [UPSTREAM_KEY.encode()]
    assert anthropicToken.header(b"authorization") == []
    assert chat.header(b"authorization") == [b"Bearer " + UPSTREAM_KEY.encode()]
    assert chat.header(b"x-api-key") == []
    labels = {"method": "POST", "status_code": "200", "variant": "production"}
    assert stack.sample("zai_proxy_requests_total", path="/v1/messages", **labels) == 2
    assert stack.sample("zai_proxy_requests_total", path="/v1/chat/completions", **labels) == 1
    assert stack.sample("zai_proxy_client_keys", variant="production") == 2


@pytest.mark.parametrize("dialect", ["anthropic", "openai"])
@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
@pytest_twisted.ensureDeferred
async def test_sdkAuthenticationError(
    reactor: Any,
    makeStack: Any,
    tmp_path: Any,
    logEvents: list[dict[str, Any]],
    dialect: str,
    key: str | None,
) -> None:
    """
    A missing or unknown key gets 401 in the route's dialect, which each
    SDK raises as its AuthenticationError; nothing goes upstream, and the
    presented key is neither echoed nor logged.
    """
    stack = await keyedStack(makeStack, tmp_path)

    def call() -> Any:
        if dialect == "anthropic":
            headers: dict[str, Any] = {"x-api-key": key} if key else {"authorization": anthropic.Omit()}
            with anthropic.Anthropic(
                base_url=stack.url(""), api_key=None, max_retries=0, default_headers=headers
            ) as c:
                c.messages.create(model="glm-4.7", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        else:
            extra: dict[str, Any] = {} if key else {"Authorization": openai.Omit()}
            with openai.OpenAI(base_url=stack.url("/v1"), api_key=key or "x", max_retries=0) as c:
                c.chat.completions.create(
                    model="glm-4.7", messages=[{"role": "user", "content": "hi"}], extra_headers=extra
                )

    errorClass = anthropic.AuthenticationError if dialect == "anthropic" else openai.AuthenticationError
    with pytest.raises(errorClass) as raised:
        await inThread(call)
    error = raised.value
    assert isinstance(error, (anthropic.AuthenticationError, openai.AuthenticationError))
    assert error.status_code == 401
    reason = "unknown" if key else "missing"
    if dialect == "anthropic":
        assert error.body == {
            "type": "error",
            "error": {
                "type": "authentication_error",
                "message": (
                    "the client key is not valid for this proxy"
                    if key
                    else "this proxy needs a client key: send it as x-api-key or Authorization: Bearer"
                ),
            },
        }
    else:
        assert isinstance(error, openai.AuthenticationError)
        assert error.code == "invalid_api_key"
        assert error.type == "authentication_error"
    assert stack.fake.received == []
    path = "/v1/messages" if dialect == "anthropic" else "/v1/chat/completions"
    assert (
        stack.sample(
            "zai_proxy_requests_total", method="POST", path=path, status_code="401", variant="production"
        )
        == 1
    )
    assert stack.sample("zai_proxy_client_auth_failures_total", reason=reason, variant="production") == 1
    access = [e for e in logEvents if e.get("log_namespace") == "zaiproxy.access"]
    assert [(e["status"], e["client"], e["peer"], e["errorType"]) for e in access] == [
        (401, "unauthorized", "127.0.0.1", "unauthorized")
    ]
    # The id the client got is the one logged: a user's report joins the log.
    requestId = error.response.headers["x-zaiproxy-request-id"]
    assert len(requestId) == 16 and access[0]["requestId"] == requestId
    assert access[0]["line"].endswith(f" error=unauthorized client=unauthorized id={requestId}")
    if key:
        assert key not in repr(logEvents)


@pytest_twisted.ensureDeferred
async def test_onlyProxiedRoutesNeedAKey(reactor: Any, makeStack: Any, tmp_path: Any) -> None:
    """
    /health, /readyz and /metrics do not take client keys; unknown paths
    are 404 before any key is asked for; a malformed Authorization gets
    401 like a missing key.
    """
    stack = await keyedStack(makeStack, tmp_path)
    for path in (b"/health", b"/readyz", b"/metrics"):
        client = await rawRequest(reactor, stack.port, b"GET", path, [], b"")
        await client.closed.addErrback(lambda f: None)
        assert client.response().status == 200, path
    client = await rawRequest(reactor, stack.port, b"GET", b"/nowhere", [], b"")
    await client.closed.addErrback(lambda f: None)
    assert client.response().status == 404
    client = await rawRequest(
        reactor, stack.port, b"POST", b"/v1/messages", [(b"authorization", ALICE.encode())], MESSAGES
    )
    await client.closed.addErrback(lambda f: None)
    response = client.response()
    assert response.status == 401
    assert response.header(b"www-authenticate") == [b'Bearer realm="zaiproxy"']
    assert json.loads(response.body)["error"]["type"] == "authentication_error"
    assert stack.sample("zai_proxy_client_auth_failures_total", reason="missing", variant="production") == 1
    assert stack.fake.received == []


@pytest_twisted.ensureDeferred
async def test_keyNameIsLabelLogAndFairnessKey(
    reactor: Any, makeStack: Any, tmp_path: Any, logEvents: list[dict[str, Any]]
) -> None:
    """
    With one slot, alice queues two calls and then bob one: the admission
    queue takes turns by key name, so bob's call goes before alice's third
    (by address all three would share one bucket and bob would be last).
    The name is the client label of the admission metrics and the access
    log's client field.
    """
    stack = await keyedStack(makeStack, tmp_path, "events=3 interval=0.1", MAX_WORKERS="1")
    clients = []
    for who, key in (("a1", ALICE), ("a2", ALICE), ("a3", ALICE), ("b1", BOB)):
        body = json.dumps(
            {
                "model": "glm-4.7",
                "max_tokens": 16,
                "stream": True,
                "messages": [{"role": "user", "content": who}],
            }
        ).encode()
        clients.append(
            await rawRequest(
                reactor, stack.port, b"POST", b"/v1/messages", [(b"x-api-key", key.encode())], body
            )
        )
        await task.deferLater(reactor, 0.05, lambda: None)
    for client in clients:
        await client.closed.addErrback(lambda f: None)
        assert client.response().status == 200
    order = [json.loads(r.body)["messages"][0]["content"] for r in stack.fake.received]
    assert order == ["a1", "a2", "b1", "a3"]
    assert stack.sample("zai_proxy_rate_limit_wait_seconds_count", variant="production", client="alice") == 3
    assert stack.sample("zai_proxy_rate_limit_wait_seconds_count", variant="production", client="bob") == 1
    access = [e for e in logEvents if e.get("log_namespace") == "zaiproxy.access"]
    assert sorted((e["client"], e["peer"]) for e in access) == [("alice", "127.0.0.1")] * 3 + [
        ("bob", "127.0.0.1")
    ]
    assert all(e["line"].endswith(f" client={e['client']} id={e['requestId']}") for e in access)
    assert len({e["requestId"] for e in access}) == len(access)


@pytest_twisted.ensureDeferred
async def test_withoutKeysBehaviourStays(reactor: Any, stack: Stack, logEvents: list[dict[str, Any]]) -> None:
    """
    Without client keys any key (or none) goes through, the access log's
    client is the peer address and admission uses the seed's buckets.
    """
    client = await rawRequest(reactor, stack.port, b"POST", b"/v1/messages", [], MESSAGES)
    await client.closed.addErrback(lambda f: None)
    assert client.response().status == 200
    access = [e for e in logEvents if e.get("log_namespace") == "zaiproxy.access"]
    assert [(e["client"], e["peer"]) for e in access] == [("127.0.0.1", "127.0.0.1")]
    assert " client=" not in access[0]["line"]
    bucket = clientBucket("127.0.0.1")
    assert bucket.startswith("source-")
    assert stack.sample("zai_proxy_rate_limit_wait_seconds_count", variant="production", client=bucket) == 1
    assert stack.sample("zai_proxy_client_keys", variant="production") == 0
