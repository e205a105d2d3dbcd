"""The etcd backend's parts that need no etcd: endpoint and option checks, the JSON
gateway's encodings (base64, int64 as strings, absent fields), error shapes, failover,
timeouts and re-authentication against a small fake gateway, and how a hold judges what
a renewal found."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from pgfence import clock
from pgfence.backends.etcd import client as ec
from pgfence.backends.etcd import hold as etcd_hold
from pgfence.backends.etcd.budget import Budget
from pgfence.backends.etcd.config import open_client, parse_endpoints
from pgfence.backends.etcd.hold import EtcdHold, FenceKey
from pgfence.config import resolve
from pgfence.errors import LockLost, StorageError, UsageError
from pgfence.record import LockRecord
from pgfence.timings import Timings, request_timeouts

Route = Callable[[dict[str, Any]], "tuple[int, Any]"]
ANY_TIME = Budget.unbounded(2.0)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- endpoints and options -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("http://127.0.0.1:2379", ["http://127.0.0.1:2379"]),
        ("https://etcd-1:2379, https://etcd-2", ["https://etcd-1:2379", "https://etcd-2:2379"]),
        ("http://localhost:1,http://localhost:1/", ["http://localhost:1"]),
        ("http://[::1]:2379", ["http://[::1]:2379"]),
        ("http://127.0.0.2:2379", ["http://127.0.0.2:2379"]),
    ],
)
def test_endpoints_accepted(text: str, urls: list[str]) -> None:
    assert [e.url for e in parse_endpoints(text, allow_insecure=False)] == urls


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (None, "needs endpoints"),
        (" , ", "no etcd endpoint"),
        ("etcd:2379", "must be http"),
        ("ftp://h:1", "must be http"),
        ("http://h:99999", "not a URL"),
        ("http://127.0.0.1:2379/v3", "no path"),
        ("http://user@127.0.0.1:2379", "no path"),
        ("http://10.0.0.1:2379", "allow-insecure"),
        ("http://etcd.local:2379", "allow-insecure"),  # names are not resolved to decide
    ],
)
def test_endpoints_refused(text: str | None, words: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_endpoints(text, allow_insecure=False)
    assert words in err.value.message and err.value.exit_code == 64


def test_plain_http_to_a_remote_host_is_allowed_only_explicitly() -> None:
    assert parse_endpoints("http://10.0.0.1:2379", allow_insecure=True)[0].host == "10.0.0.1"


def settings(tmp_path: Any, **env: str) -> Any:
    base = {"FENCE_BACKEND": "etcd", "FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:2379"}
    base.update(FENCE_ETCD_KEY="/pgfence/db", FENCE_VARIABLE="db-1")
    base.update(env)
    return resolve("run", {}, base)


def test_etcd_backend_defaults_to_lease_mode(tmp_path: Any) -> None:
    s = settings(tmp_path)
    assert s.timings.mode == "lease" and s.wait is True
    assert resolve("run", {}, {"FENCE_VARIABLE": "x"}).timings.mode == "strict"


def test_request_timeouts_leave_room_to_fail_over_within_the_deadline() -> None:
    for ttl in (2.0, 3.0, 30.0, 600.0):
        timings = Timings.lease(ttl)
        fast, slow = request_timeouts(timings)
        assert fast <= max(0.5, timings.deadline / 3) and fast <= slow


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"FENCE_MODE": "strict"}, "lease mode"),
        ({"FENCE_ETCD_KEY": ""}, "FENCE_ETCD_KEY"),
        ({"FENCE_ETCD_KEY": " /x"}, "white space"),
        ({"FENCE_ETCD_USER": "u"}, "no password file"),
        ({"FENCE_ETCD_PASSWORD_FILE": "PW"}, "no user"),
        ({"FENCE_ETCD_USER": "u", "FENCE_ETCD_PASSWORD_FILE": "EMPTY"}, "empty"),
        ({"FENCE_ETCD_USER": "u", "FENCE_ETCD_PASSWORD_FILE": "TWO"}, "more than one line"),
        ({"FENCE_ETCD_CA_FILE": "PW"}, "no endpoint uses https"),
        (
            {"FENCE_ETCD_ENDPOINTS": "https://127.0.0.1:2379", "FENCE_ETCD_KEY_FILE": "PW"},
            "needs --etcd-cert-file",
        ),
        (
            {"FENCE_ETCD_ENDPOINTS": "https://127.0.0.1:2379", "FENCE_ETCD_CA_FILE": "PW"},
            "cannot load the etcd CA file",
        ),
    ],
)
def test_bad_etcd_options_are_usage_errors(tmp_path: Any, env: dict[str, str], words: str) -> None:
    files = {"PW": "secret\n", "EMPTY": "\n", "TWO": "a\nb\n"}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    env = {k: str(tmp_path / v) if v in files else v for k, v in env.items()}
    with pytest.raises(UsageError) as err:
        open_client(settings(tmp_path, **env))
    assert words in err.value.message
    assert "secret" not in err.value.message


def test_password_file_loses_only_its_line_end(tmp_path: Any) -> None:
    (tmp_path / "pw").write_text(" pass word \r\n")
    client, key = open_client(
        settings(tmp_path, FENCE_ETCD_USER="u", FENCE_ETCD_PASSWORD_FILE=str(tmp_path / "pw"))
    )
    assert key == "/pgfence/db"
    assert callable(client._password) and client._password() == " pass word "


# -- wire encoding ---------------------------------------------------------------------


def test_key_value_absent_fields_mean_zero_and_integers_arrive_as_strings() -> None:
    kv = ec.key_value({"key": b64("/k"), "create_revision": "9007199254740993"})
    assert kv == ec.KeyValue(b"/k", b"", 9007199254740993, 0, 0, 0)
    assert ec.first_kv({"header": {"revision": "3"}}) is None
    assert ec.first_kv({"kvs": [{"key": b64("k"), "value": b64("v"), "lease": "7"}]}) == (
        ec.KeyValue(b"k", b"v", 0, 0, 0, 7)
    )
    for bad in ({"key": "not base64!"}, {"lease": "7.5"}, {"version": True}, {"value": 3}):
        with pytest.raises(StorageError) as err:
            ec.key_value(bad)
        assert err.value.exit_code == 74 and "malformed" in err.value.message
    with pytest.raises(StorageError):
        ec.first_kv({"kvs": ["x"]})


def test_transaction_parts_are_base64_and_string_integers() -> None:
    assert etcd_hold.compare(b"/k", "CREATE", 0) == {
        "key": b64("/k"),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": "0",
    }
    assert etcd_hold.compare(b"/k", "VALUE", b"v")["value"] == b64("v")
    assert etcd_hold.compare(b"/k", "LEASE", 2**62)["lease"] == str(2**62)
    assert etcd_hold.put(b"/k", b"v", 5) == {
        "request_put": {"key": b64("/k"), "value": b64("v"), "lease": "5"}
    }


@pytest.mark.parametrize(
    ("answer", "status", "expected"),
    [
        ({"header": {}}, 200, (False, None, "")),
        ({"result": {"TTL": "3"}}, 200, (False, None, "")),
        ({"error": "etcdserver: request timed out", "code": 14}, 503,
         (True, 14, "request timed out")),
        ({"error": {"grpc_code": 14, "message": "etcdserver: no leader"}}, 200,
         (True, 14, "no leader")),
        ({"message": "boom"}, 500, (True, None, "boom")),
        ({}, 502, (True, None, "HTTP 502")),
    ],
)  # fmt: skip
def test_error_shapes(answer: dict[str, Any], status: int, expected: tuple[Any, ...]) -> None:
    assert ec._error_of(answer, status) == expected


# -- a fake gateway --------------------------------------------------------------------


class FakeGateway:
    """A loopback HTTP server: `routes[path](request body) -> (status, JSON or bytes)`."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.seen: list[tuple[str, dict[str, Any], str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                fake.seen.append((self.path, body, self.headers.get("Authorization")))
                route = fake.routes.get(self.path)
                status, answer = route(body) if route else (404, b"404 page not found")
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def version(server: str = "3.4.23", cluster: str = "3.4.0") -> Route:
    return lambda _: (200, {"etcdserver": server, "etcdcluster": cluster})


def ok(answer: dict[str, Any]) -> Route:
    return lambda _: (200, answer)


@pytest.fixture
def gateways() -> Iterator[Callable[..., FakeGateway]]:
    made: list[FakeGateway] = []

    def make(**routes: Route) -> FakeGateway:
        table = {"/version": version()}
        table.update({"/" + k.replace("__", "/"): v for k, v in routes.items()})
        made.append(FakeGateway(table))
        return made[-1]

    yield make
    for g in made:
        g.close()


def client(*fakes: FakeGateway, **kw: Any) -> ec.EtcdClient:
    endpoints = parse_endpoints(",".join(f.url for f in fakes), allow_insecure=False)
    return ec.EtcdClient(endpoints, None, **kw)


@pytest.mark.parametrize(("server", "cluster"), [("3.3.25", "3.3.0"), ("3.4.23", "3.3.0")])
def test_too_old_etcd_is_refused(
    gateways: Callable[..., FakeGateway], server: str, cluster: str
) -> None:
    fake = gateways()
    fake.routes["/version"] = version(server, cluster)
    with pytest.raises(ec.EtcdRefused) as err:
        client(fake).get(b"/k", ANY_TIME)
    assert "3.4 or later" in err.value.message and err.value.exit_code == 64


def test_undecided_cluster_version_is_accepted(gateways: Callable[..., FakeGateway]) -> None:
    fake = gateways(v3__kv__range=ok({"header": {"revision": "1"}}))
    fake.routes["/version"] = version("3.5.9", "not_decided")
    assert client(fake).get(b"/k", ANY_TIME) is None


def test_unavailable_member_is_skipped_and_the_answering_one_kept(
    gateways: Callable[..., FakeGateway],
) -> None:
    down = gateways(v3__kv__range=lambda _: (503, {"error": "etcdserver: no leader", "code": 14}))
    up = gateways(v3__kv__range=ok({"kvs": [{"key": b64("/k"), "value": b64("v")}]}))
    c = client(down, up)
    assert c.get(b"/k", ANY_TIME) == ec.KeyValue(b"/k", b"v", 0, 0, 0, 0)
    assert c.get(b"/k", ANY_TIME) is not None
    assert down.paths().count("/v3/kv/range") == 1  # the second call went to `up` first
    assert up.paths().count("/v3/kv/range") == 2


def test_every_endpoint_down_is_a_storage_error_naming_each(
    gateways: Callable[..., FakeGateway],
) -> None:
    slow = gateways(v3__kv__range=lambda _: (time.sleep(1.0), (200, {}))[1])
    closed = parse_endpoints(f"http://127.0.0.1:{ec_free_port()}", allow_insecure=False)
    c = ec.EtcdClient([*closed, *parse_endpoints(slow.url, False)], None)
    with pytest.raises(ec.EtcdUnavailable) as err:
        c.get(b"/k", Budget.unbounded(0.2))
    assert err.value.exit_code == 74
    assert "connection refused" in err.value.message and "no answer within" in err.value.message


def ec_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_guard_and_budget_are_checked_before_sending(gateways: Callable[..., FakeGateway]) -> None:
    fake = gateways(v3__lease__keepalive=ok({"result": {"TTL": "5"}}))
    c = client(fake)
    assert c.keepalive(7, ANY_TIME) == (5, 0)
    with pytest.raises(ec.GuardRefused):
        c.keepalive(7, Budget(2.0, guard=lambda: False))
    with pytest.raises(ec.EtcdUnavailable):
        c.keepalive(7, Budget(2.0, until=clock.now() - 1))
    assert fake.paths().count("/v3/lease/keepalive") == 1
    assert fake.seen[-1][1] == {"ID": "7"}


def test_keepalive_of_an_unknown_lease_reads_as_ttl_zero(
    gateways: Callable[..., FakeGateway],
) -> None:
    fake = gateways(v3__lease__keepalive=ok({"result": {"header": {}, "ID": "7"}}))
    assert client(fake).keepalive(7, ANY_TIME) == (0, 0)


def test_keepalive_stream_error_fails_over(gateways: Callable[..., FakeGateway]) -> None:
    error = {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: no leader"}}
    down = gateways(v3__lease__keepalive=ok(error))
    up = gateways(v3__lease__keepalive=ok({"result": {"TTL": "4", "header": {"raft_term": "6"}}}))
    assert client(down, up).keepalive(7, ANY_TIME) == (4, 6)


def test_txn_absent_succeeded_means_false_and_responses_are_unwrapped(
    gateways: Callable[..., FakeGateway],
) -> None:
    kv = {"key": b64("/k"), "value": b64("v"), "create_revision": "4", "lease": "9"}
    fake = gateways(
        v3__kv__txn=ok({"header": {}, "responses": [{"response_range": {"kvs": [kv]}}]})
    )
    ok_, responses = client(fake).txn(
        [etcd_hold.compare(b"/k", "CREATE", 0)], [], [etcd_hold.get(b"/k")], ANY_TIME
    )
    assert ok_ is False
    assert ec.first_kv(responses[0]) == ec.KeyValue(b"/k", b"v", 4, 0, 0, 9)


def test_auth_token_is_sent_and_renewed_once_when_etcd_forgot_it(
    gateways: Callable[..., FakeGateway],
) -> None:
    tokens = iter(["t1", "t2"])
    calls = {"n": 0}

    def range_(_: dict[str, Any]) -> tuple[int, Any]:
        calls["n"] += 1
        if calls["n"] == 2:
            return 401, {"error": "etcdserver: invalid auth token", "code": 16}
        return 200, {}

    fake = gateways(
        v3__auth__authenticate=lambda body: (200, {"token": next(tokens)}), v3__kv__range=range_
    )
    c = client(fake, user="u", password="pw")
    c.get(b"/k", ANY_TIME)
    c.get(b"/k", ANY_TIME)
    auth = [(body, token) for path, body, token in fake.seen if path.endswith("authenticate")]
    assert auth[0][0] == {"name": "u", "password": "pw"} and len(auth) == 2
    assert [t for p, _, t in fake.seen if p == "/v3/kv/range"] == ["t1", "t1", "t2"]


def test_wrong_password_is_a_usage_error_without_the_password(
    gateways: Callable[..., FakeGateway],
) -> None:
    error = {"error": "etcdserver: authentication failed, invalid user ID or password", "code": 3}
    fake = gateways(v3__auth__authenticate=lambda _: (400, error))
    with pytest.raises(ec.EtcdRefused) as err:
        client(fake, user="u", password="hunter2").get(b"/k", ANY_TIME)
    assert "refused user 'u'" in err.value.message and "hunter2" not in err.value.message


def test_gateway_refusing_a_client_certificate_with_a_cn_is_explained(
    gateways: Callable[..., FakeGateway],
) -> None:
    text = b"CommonName of client sending a request against gateway will be ignored\n"
    fake = gateways(v3__kv__range=lambda _: (400, text))
    with pytest.raises(ec.EtcdRefused) as err:
        client(fake).get(b"/k", ANY_TIME)
    assert "without CN" in err.value.message


def test_a_non_etcd_server_is_unavailable_not_a_crash(gateways: Callable[..., FakeGateway]) -> None:
    fake = gateways()
    fake.routes["/version"] = lambda _: (200, b"<html>hello</html>")
    with pytest.raises(ec.EtcdUnavailable):
        client(fake).get(b"/k", ANY_TIME)


# -- what a renewal makes of what it finds ---------------------------------------------


class ScriptedClient(ec.EtcdClient):
    """Answers keepalive and txn from lists, in order."""

    def __init__(self, ttls: list[Any], txns: list[Any]) -> None:
        super().__init__(parse_endpoints("http://127.0.0.1:1", False), None)
        self.ttls, self.txns = ttls, txns
        self.sent: list[list[dict[str, Any]]] = []
        self.writes: list[bool] = []  # per txn: did its success branch write

    def keepalive(self, lease: int, budget: Budget) -> Any:
        answer = self.ttls.pop(0)
        if isinstance(answer, Exception):
            raise answer
        ttl, term = answer if isinstance(answer, tuple) else (answer, 0)
        return int(ttl), term

    def txn(self, compares: Any, success: Any, failure: Any, *args: Any, **kw: Any) -> Any:
        self.sent.append(compares)
        self.writes.append(bool(success))
        answer = self.txns.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.last_term = answer[2] if len(answer) > 2 else 0
        return answer[:2]


def record(instance: str = "a" * 16, heartbeat: int = 0) -> LockRecord:
    return LockRecord(
        "db-1", instance, "lease", 0, heartbeat, 0.5, 3.0, 0.75, 1, "h", "b", 1.0, "t", "t"
    )


def hold_with(scripted: ScriptedClient) -> EtcdHold:
    fence = FenceKey(scripted, "/k", Timings.lease(3.0))
    mine = record()
    return EtcdHold(fence, mine.__class__(**{**mine.__dict__, "generation": 40}), b"old", 9, 3, 0)


def found(value: bytes, create: int = 40, lease: int = 9) -> tuple[bool, list[dict[str, Any]]]:
    kv = {"key": b64("/k"), "value": base64.b64encode(value).decode(), "lease": str(lease)}
    kv["create_revision"] = str(create)
    return False, [{"kvs": [kv]}]


def test_renewal_writes_the_next_heartbeat_only_over_our_own_value() -> None:
    scripted = ScriptedClient([3], [(True, [])])
    assert hold_with(scripted).renew(lambda: True)
    targets = {c["target"]: c for c in scripted.sent[0]}
    assert targets["CREATE"]["create_revision"] == "40" and targets["LEASE"]["lease"] == "9"
    assert targets["VALUE"]["value"] == base64.b64encode(b"old").decode()


def test_renewal_goes_on_from_its_own_write_whose_answer_was_lost() -> None:
    landed = record(heartbeat=5).encode()
    scripted = ScriptedClient([3], [found(landed), (True, [])])
    assert hold_with(scripted).renew(lambda: True)
    assert scripted.sent[1][2]["value"] == base64.b64encode(landed).decode()


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (found(record(instance="b" * 16).encode()), "now holds"),
        (found(record().encode(), create=41), "now holds"),
        (found(b"junk"), "did not write"),
        ((False, [{}]), "was deleted"),
    ],
)
def test_renewal_finding_another_key_is_lock_lost(
    answer: tuple[bool, list[dict[str, Any]]], words: str
) -> None:
    with pytest.raises(LockLost) as err:
        hold_with(ScriptedClient([3], [answer])).renew(lambda: True)
    assert words in err.value.message


def test_expired_lease_is_lock_lost_and_refusals_are_storage_errors() -> None:
    with pytest.raises(LockLost):
        hold_with(ScriptedClient([0], [])).renew(lambda: True)
    refused = ec.EtcdRefused("etcd refused user 'u'")
    with pytest.raises(StorageError) as err:
        hold_with(ScriptedClient([refused], [])).renew(lambda: True)
    assert err.value.exit_code == 74
    assert hold_with(ScriptedClient([ec.GuardRefused()], [])).renew(lambda: False) is False


def test_renewal_between_heartbeat_writes_only_compares() -> None:
    scripted = ScriptedClient([3, 3], [(True, []), (True, [])])
    hold = hold_with(scripted)
    assert hold.renew(lambda: True) and hold.renew(lambda: True)
    assert scripted.writes == [True, False]  # one write per TTL, then compare-only
    assert [c["target"] for c in scripted.sent[1]] == ["CREATE", "LEASE", "VALUE"]


def test_keepalive_at_another_raft_term_is_sent_again_and_must_agree() -> None:
    # answered by a leader cut off from the majority (term 3), the check by the new one
    scripted = ScriptedClient([(3, 3), (3, 4)], [(True, [], 4)])
    assert hold_with(scripted).renew(lambda: True)
    assert scripted.ttls == []
    scripted = ScriptedClient([(3, 3), (3, 3)], [(True, [], 4)])
    with pytest.raises(StorageError) as err:
        hold_with(scripted).renew(lambda: True)
    assert "raft term 3" in err.value.message and "term 4" in err.value.message


def test_a_full_etcd_does_not_fail_the_renewal_that_cannot_write() -> None:
    full = ec.EtcdNoSpace("etcd refused /v3/kv/txn: its database is full")
    scripted = ScriptedClient([3], [full, (True, [])])
    assert hold_with(scripted).renew(lambda: True)
    assert scripted.writes == [True, False]


def test_renewal_retries_while_etcd_has_no_leader() -> None:
    down = ec.EtcdUnavailable("no etcd endpoint answered: no leader")
    scripted = ScriptedClient([down, 3], [(True, [])])
    assert hold_with(scripted).renew(lambda: True)


def test_no_release_after_the_deadline() -> None:
    scripted = ScriptedClient([], [])
    hold = hold_with(scripted)  # acquired at clock 0: long past its deadline
    assert hold.release(lambda: True) is False and scripted.sent == []


def test_a_full_database_is_its_own_error_with_the_fix(
    gateways: Callable[..., FakeGateway],
) -> None:
    error = {"error": "etcdserver: mvcc: database space exceeded", "code": 8}
    fake = gateways(v3__kv__txn=lambda _: (500, error))
    with pytest.raises(ec.EtcdNoSpace) as err:
        client(fake).txn([], [], [], ANY_TIME)
    assert "--auto-compaction-retention" in err.value.message and err.value.exit_code == 74


def test_a_stale_jwt_login_and_a_changed_password_file_log_in_again(
    gateways: Callable[..., FakeGateway],
) -> None:
    passwords = iter(["old", "new"])
    calls = {"n": 0}

    def range_(_: dict[str, Any]) -> tuple[int, Any]:
        calls["n"] += 1
        if calls["n"] == 2:
            return 400, {"error": "etcdserver: revision of auth store is old", "code": 9}
        return 200, {}

    fake = gateways(v3__auth__authenticate=lambda body: (200, {"token": "t"}), v3__kv__range=range_)
    c = client(fake, user="u", password=lambda: next(passwords))
    c.get(b"/k", ANY_TIME)
    c.get(b"/k", ANY_TIME)
    auth = [body for path, body, _ in fake.seen if path.endswith("authenticate")]
    assert [a["password"] for a in auth] == ["old", "new"]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"FENCE_LEASE_TTL": "4"}, "set --ttl (FENCE_LEASE_TTL) to 9.8 or more"),
        ({"FENCE_LEASE_TTL": "3", "FENCE_ETCD_ELECTION_TIMEOUT": "500"}, "to 5.3 or more"),
        ({"FENCE_LEASE_TTL": "12", "FENCE_LOCK_DELAY": "3"}, "to 8 (TTL/2 + TTL/6)"),
        ({"FENCE_ETCD_ELECTION_TIMEOUT": "1s"}, "milliseconds"),
    ],
)
def test_timings_the_etcd_backend_cannot_keep_are_refused(
    tmp_path: Any, env: dict[str, str], words: str
) -> None:
    with pytest.raises(UsageError) as err:
        open_client(settings(tmp_path, **env))
    assert words in err.value.message and err.value.exit_code == 64


def test_etcd_lock_delay_defaults_to_outlast_the_holders_deadline(tmp_path: Any) -> None:
    timings = settings(tmp_path, FENCE_LEASE_TTL="12").timings
    assert timings.lock_delay == 8.0
    open_client(settings(tmp_path, FENCE_LEASE_TTL="9.8"))  # the shortest at etcd's default


@pytest.mark.parametrize(
    ("version", "affected"),
    [("3.4.23", True), ("3.4.31", False), ("3.5.12", True), ("3.5.13", False), ("3.6.0", False)],
)
def test_versions_whose_stuck_leader_revokes_live_leases(version: str, affected: bool) -> None:
    assert ec._revokes_live_leases(version) is affected
