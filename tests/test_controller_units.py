"""Unit tests for the single-node controller's pure parts (no network, no subprocess).

selectors (parse / matches / proto round trip), tokens (bearer and router tokens), store
(SQLite durability), leases (reconcile with an explicit clock), convert (stored objects →
upstream messages) and auth (metadata + bearer token → identity or refusal).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jumpstarter_exporter.controller import selectors, tokens
from jumpstarter_exporter.controller.auth import Identity, Refused, authenticate
from jumpstarter_exporter.controller.convert import conditions, lease_to_proto, parse_name
from jumpstarter_exporter.controller.leases import active_lease_for, next_deadline, reconcile
from jumpstarter_exporter.controller.selectors import Requirement, SelectorError
from jumpstarter_exporter.controller.store import Exporter, Lease, Store

NS = "ns"
NOW = 1_700_000_000.0
KEY = b"k" * 32


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "controller.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    try:
        yield s
    finally:
        s.close()


def add_exporter(
    store: Store,
    name: str,
    labels: dict[str, str] | None = None,
    *,
    namespace: str = NS,
    devices: list[dict[str, Any]] | None = None,
    registered: bool = True,
    status: str = "Available",
    enabled: bool = True,
) -> Exporter:
    exporter = store.add_exporter(namespace, name, labels or {}, f"hash-{namespace}-{name}")
    exporter.devices = (devices or []) if registered else None
    exporter.status = status
    exporter.enabled = enabled
    store.update_exporter(exporter)
    return exporter


def add_lease(store: Store, name: str, selector: str = "", **kw: Any) -> Lease:
    kw.setdefault("namespace", NS)
    kw.setdefault("client", "alice")
    kw.setdefault("duration", 3600.0)
    kw.setdefault("created", NOW - 100)
    return store.add_lease(Lease(name=name, selector=selector, **kw))


def lease(store: Store, name: str, namespace: str = NS) -> Lease:
    found = store.get_lease(namespace, name)
    assert found is not None, f"lease {namespace}/{name} is gone"
    return found


def online(*names: str, namespace: str = NS) -> set[tuple[str, str]]:
    return {(namespace, n) for n in names}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def craft_router_token(
    claims: Any, key: bytes = KEY, header: Any = None, valid_for: float = 300
) -> str:
    """A router token signed with ``key`` carrying exactly ``claims``."""
    if isinstance(claims, dict):
        claims = {
            "iss": tokens.ROUTER_ISSUER,
            "aud": [tokens.ROUTER_AUDIENCE],
            "sub": "stream-1",
            "iat": int(NOW),
            "nbf": int(NOW),
            "exp": int(NOW + valid_for),
            **claims,
        }
        claims = {k: v for k, v in claims.items() if v is not None}
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- selectors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k=v", (Requirement("k", "In", ("v",)),)),
        ("k==v", (Requirement("k", "In", ("v",)),)),
        ("k!=v", (Requirement("k", "NotIn", ("v",)),)),
        ("k in (a,b)", (Requirement("k", "In", ("a", "b")),)),
        ("k notin (a,b)", (Requirement("k", "NotIn", ("a", "b")),)),
        ("k", (Requirement("k", "Exists"),)),
        ("!k", (Requirement("k", "DoesNotExist"),)),
        ("k=", (Requirement("k", "In", ("",)),)),
        (
            "example.com/board-type=rpi_4",
            (Requirement("example.com/board-type", "In", ("rpi_4",)),),
        ),
    ],
)
def test_parse_single_requirement(text: str, expected: tuple[Requirement, ...]) -> None:
    assert selectors.parse(text) == expected


def test_parse_tolerates_whitespace_everywhere() -> None:
    assert selectors.parse("  a = 1 ,b  !=  2, c   in ( x , y ) ,  ! d , e ") == (
        Requirement("a", "In", ("1",)),
        Requirement("b", "NotIn", ("2",)),
        Requirement("c", "In", ("x", "y")),
        Requirement("d", "DoesNotExist"),
        Requirement("e", "Exists"),
    )


def test_parse_does_not_split_on_commas_inside_parentheses() -> None:
    assert selectors.parse("a in (1,2,3),b notin (4,5),c=6") == (
        Requirement("a", "In", ("1", "2", "3")),
        Requirement("b", "NotIn", ("4", "5")),
        Requirement("c", "In", ("6",)),
    )


@pytest.mark.parametrize("text", ["", "   ", ",", " , "])
def test_parse_empty_selector_has_no_requirements(text: str) -> None:
    assert selectors.parse(text) == ()


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("a=1,b=>2", "b=>2"),
        ("a=1, k in (a,b", "k in (a,b"),
        ("k in ()", "k in ()"),
        ("k in ( , )", "k in ( , )"),
        ("ok=1,-bad=1", "-bad=1"),
        ("k=v w", "k=v w"),
        ("k=a),x", "k=a),x"),
        ("k notin a", "k notin a"),
    ],
)
def test_parse_error_names_the_offending_part(text: str, bad_part: str) -> None:
    with pytest.raises(SelectorError) as excinfo:
        selectors.parse(text)
    assert repr(bad_part) in str(excinfo.value)


def test_selector_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        selectors.parse("=")


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("k=v", {"k": "v"}, True),
        ("k=v", {"k": "w"}, False),
        ("k=v", {}, False),
        ("k!=v", {"k": "w"}, True),
        ("k!=v", {"k": "v"}, False),
        ("k!=v", {}, True),  # Kubernetes: a missing key satisfies !=
        ("k in (a,b)", {"k": "b"}, True),
        ("k in (a,b)", {"k": "c"}, False),
        ("k in (a,b)", {}, False),
        ("k notin (a,b)", {"k": "c"}, True),
        ("k notin (a,b)", {"k": "a"}, False),
        ("k notin (a,b)", {}, True),  # Kubernetes: a missing key satisfies notin
        ("k", {"k": ""}, True),
        ("k", {"j": "k"}, False),
        ("!k", {"j": "k"}, True),
        ("!k", {"k": ""}, False),
        ("", {"any": "thing"}, True),
        ("a=1,b=2", {"a": "1", "b": "2", "c": "3"}, True),
        ("a=1,b=2", {"a": "1", "b": "3"}, False),
    ],
)
def test_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    assert selectors.matches(selectors.parse(text), labels) is expected


def test_to_proto_puts_equality_in_match_labels_and_the_rest_in_expressions() -> None:
    proto = selectors.to_proto(selectors.parse("a=1,b!=2,c in (x,y),d,!e"))
    assert dict(proto.match_labels) == {"a": "1"}
    assert [(e.key, e.operator, list(e.values)) for e in proto.match_expressions] == [
        ("b", "NotIn", ["2"]),
        ("c", "In", ["x", "y"]),
        ("d", "Exists", []),
        ("e", "DoesNotExist", []),
    ]


def test_to_proto_keeps_a_second_equality_on_the_same_key() -> None:
    proto = selectors.to_proto(selectors.parse("a=1,a=2"))
    assert dict(proto.match_labels) == {"a": "1"}
    assert [(e.key, e.operator, list(e.values)) for e in proto.match_expressions] == [
        ("a", "In", ["2"])
    ]


@pytest.mark.parametrize(
    "text",
    [
        "a=1",
        "b=2,a=1",
        "a!=1",
        "a in (1,2),b notin (3)",
        "a,!b",
        "a=1,a=2",
        "board=rpi4,region!=eu,arch in (arm64,amd64),dut,!broken",
    ],
)
def test_to_proto_from_proto_round_trip(text: str) -> None:
    requirements = selectors.parse(text)
    again = selectors.parse(selectors.from_proto(selectors.to_proto(requirements)))
    assert sorted(again, key=repr) == sorted(requirements, key=repr)


def test_from_proto_text_is_stable() -> None:
    proto = selectors.to_proto(selectors.parse("z=1,a=2,k notin (x,y),!d"))
    assert selectors.from_proto(proto) == "a=2,z=1,k notin (x,y),!d"


# --- tokens -------------------------------------------------------------------------------


def test_new_token_is_jwt_shaped_with_subject_and_no_expiry() -> None:
    token = tokens.new_token("namespaces/ns/clients/alice")
    parts = token.split(".")
    assert len(parts) == 3
    for part in parts:
        assert part
        assert set(part) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        ), "not base64url without padding"
    header = json.loads(unb64(parts[0]))
    payload = json.loads(unb64(parts[1]))
    assert header["typ"] == "JWT"
    assert header["alg"]
    assert payload["sub"] == "namespaces/ns/clients/alice"
    assert "exp" not in payload
    assert len(unb64(parts[2])) >= 32, "fewer than 256 random bits"


def test_new_tokens_are_unique() -> None:
    many = {tokens.new_token("same") for _ in range(200)}
    assert len(many) == 200


def test_token_hash_is_stable_and_distinguishes_tokens() -> None:
    a, b = tokens.new_token("x"), tokens.new_token("x")
    assert tokens.token_hash(a) == tokens.token_hash(a)
    assert tokens.token_hash(a) == hashlib.sha256(a.encode()).hexdigest()
    assert tokens.token_hash(a) != tokens.token_hash(b)
    assert a not in tokens.token_hash(a)


def test_router_token_round_trip() -> None:
    token = tokens.mint_router_token(KEY, ttl=60, now=NOW)
    claims = tokens.verify_router_token(KEY, token, now=NOW + 1)
    assert claims.stream_id
    assert claims.expires == NOW + 60
    payload = json.loads(unb64(token.split(".")[1]))
    assert payload["sub"] == claims.stream_id
    assert payload["iss"] == tokens.ROUTER_ISSUER
    assert tokens.ROUTER_AUDIENCE in payload["aud"]


def test_router_tokens_name_distinct_streams() -> None:
    a = tokens.verify_router_token(KEY, tokens.mint_router_token(KEY, now=NOW), now=NOW)
    b = tokens.verify_router_token(KEY, tokens.mint_router_token(KEY, now=NOW), now=NOW)
    assert a.stream_id != b.stream_id


def test_crafted_valid_router_token_is_accepted() -> None:
    """The crafting helper below must itself produce acceptable tokens (so the negatives
    fail for the reason they claim)."""
    assert tokens.verify_router_token(KEY, craft_router_token({}), now=NOW).stream_id == (
        "stream-1"
    )


def test_router_token_with_tampered_signature_is_refused() -> None:
    header, payload, signature = tokens.mint_router_token(KEY, now=NOW).split(".")
    flipped = bytes([unb64(signature)[0] ^ 1]) + unb64(signature)[1:]
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify_router_token(KEY, f"{header}.{payload}.{b64(flipped)}", now=NOW)


def test_router_token_with_tampered_claims_is_refused() -> None:
    header, _, signature = tokens.mint_router_token(KEY, now=NOW).split(".")
    forged = b64(json.dumps({"sub": "someone-elses-stream", "exp": int(NOW + 999)}).encode())
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify_router_token(KEY, f"{header}.{forged}.{signature}", now=NOW)


def test_router_token_signed_with_another_key_is_refused() -> None:
    token = tokens.mint_router_token(b"other" * 8, now=NOW)
    with pytest.raises(tokens.TokenError, match="signature"):
        tokens.verify_router_token(KEY, token, now=NOW)


def test_router_token_expires() -> None:
    token = tokens.mint_router_token(KEY, ttl=60, now=NOW)
    tokens.verify_router_token(KEY, token, now=NOW + 59)
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify_router_token(KEY, token, now=NOW + 60)


@pytest.mark.parametrize("exp", [None, "9999999999", 9999999999.5])
def test_router_token_without_integer_exp_is_refused(exp: Any) -> None:
    token = craft_router_token({"exp": exp})  # None: no exp claim at all
    with pytest.raises(tokens.TokenError, match="expired"):
        tokens.verify_router_token(KEY, token, now=NOW)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "é.é.é", "%%%.%%%.%%%"],
)
def test_malformed_router_token_is_refused(token: str) -> None:
    with pytest.raises(tokens.TokenError):
        tokens.verify_router_token(KEY, token, now=NOW)


def test_router_token_with_unparseable_payload_is_refused() -> None:
    signing_input = f"{b64(b'{}')}.{b64(b'not json')}"
    signature = b64(hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(tokens.TokenError, match="malformed"):
        tokens.verify_router_token(KEY, f"{signing_input}.{signature}", now=NOW)


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": ["https://example.com/router"]},
        {"aud": []},
        {"aud": None},
        {"iss": "https://evil.example/stream"},
        {"iss": None},
    ],
    ids=["other-audience", "empty-audience", "no-audience", "other-issuer", "no-issuer"],
)
def test_router_token_for_another_audience_or_issuer_is_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(tokens.TokenError, match="issuer or audience"):
        tokens.verify_router_token(KEY, craft_router_token(claims), now=NOW)


def test_router_token_with_another_algorithm_is_refused() -> None:
    token = craft_router_token({}, header={"alg": "none", "typ": "JWT"})
    with pytest.raises(tokens.TokenError, match="algorithm"):
        tokens.verify_router_token(KEY, token, now=NOW)


def test_router_token_not_yet_valid_is_refused() -> None:
    token = craft_router_token({"nbf": int(NOW + 60)}, valid_for=600)
    with pytest.raises(tokens.TokenError, match="not yet valid"):
        tokens.verify_router_token(KEY, token, now=NOW)
    # ... and accepted once the clock reaches nbf.
    tokens.verify_router_token(KEY, token, now=NOW + 60)


def test_router_token_nbf_tolerates_small_clock_skew() -> None:
    token = craft_router_token({"nbf": int(NOW + 3)})
    tokens.verify_router_token(KEY, token, now=NOW)


@pytest.mark.parametrize("sub", [None, ""])
def test_router_token_without_stream_id_is_refused(sub: str | None) -> None:
    with pytest.raises(tokens.TokenError, match="stream id"):
        tokens.verify_router_token(KEY, craft_router_token({"sub": sub}), now=NOW)


def test_router_token_with_non_object_claims_is_refused_as_token_error() -> None:
    with pytest.raises(tokens.TokenError):
        tokens.verify_router_token(KEY, craft_router_token(["not", "an", "object"]), now=NOW)


# --- store --------------------------------------------------------------------------------


def test_store_exporter_crud(store: Store) -> None:
    created = store.add_exporter(NS, "e1", {"board": "rpi"}, "h1")
    got = store.get_exporter(NS, "e1")
    assert got == created
    assert got is not None
    assert got.uid and got.devices is None and got.enabled and got.status == ""

    got.labels = {"board": "rpi5"}
    got.devices = [{"uuid": "u1", "labels": {"jumpstarter.dev/name": "power"}}]
    got.status = "LeaseReady"
    got.status_message = "ready"
    got.last_seen = NOW
    got.enabled = False
    store.update_exporter(got)
    assert store.get_exporter(NS, "e1") == got

    assert store.delete_exporter(NS, "e1") is True
    assert store.get_exporter(NS, "e1") is None
    assert store.delete_exporter(NS, "e1") is False


def test_deleting_an_exporter_ends_its_leases(store: Store) -> None:
    store.add_exporter(NS, "e1", {}, "h1")
    store.add_exporter(NS, "e2", {}, "h2")
    held, other = (store.add_lease(Lease(NS, n, "alice", 60.0)) for n in ("l1", "l2"))
    for lease, exporter in ((held, "e1"), (other, "e2")):
        lease.exporter, lease.reason = exporter, "Ready"  # assigned, as the scheduler does
        store.update_lease(lease)

    assert store.delete_exporter(NS, "e1") is True
    # A new exporter under the old name starts with nothing leased.
    store.add_exporter(NS, "e1", {}, "h3")
    ended = store.get_lease(NS, held.name)
    assert ended is not None and ended.ended and ended.reason == "ExporterDeleted"
    assert [lease.name for lease in store.list_leases(NS, active_only=True)] == [other.name]

    assert store.delete_client(NS, "alice") is False  # no such client row: nothing changes
    store.add_client(NS, "alice", "hc")
    assert store.delete_client(NS, "alice") is True
    assert store.list_leases(NS, active_only=True) == []


def test_store_exporter_by_token_and_listing(store: Store) -> None:
    store.add_exporter("b", "z", {}, "hz")
    store.add_exporter("a", "y", {}, "hy")
    store.add_exporter("a", "x", {}, "hx")
    found = store.exporter_by_token("hy")
    assert found is not None and found.key == ("a", "y")
    assert store.exporter_by_token("nope") is None
    assert [e.key for e in store.list_exporters()] == [("a", "x"), ("a", "y"), ("b", "z")]
    assert [e.name for e in store.list_exporters("a")] == ["x", "y"]
    assert store.list_exporters("c") == []


def test_store_exporter_names_are_per_namespace(store: Store) -> None:
    store.add_exporter("a", "same", {}, "h1")
    store.add_exporter("b", "same", {}, "h2")
    with pytest.raises(sqlite3.IntegrityError):
        store.add_exporter("a", "same", {}, "h3")


def test_store_client_crud_and_token_rotation(store: Store) -> None:
    created = store.add_client(NS, "alice", "h1")
    assert store.get_client(NS, "alice") == created
    assert store.client_by_token("h1") == created
    store.set_client_token(NS, "alice", "h2")
    assert store.client_by_token("h1") is None
    rotated = store.client_by_token("h2")
    assert rotated is not None and rotated.name == "alice" and rotated.uid == created.uid
    store.add_client("a", "bob", "h3")
    assert [(c.namespace, c.name) for c in store.list_clients()] == [("a", "bob"), (NS, "alice")]
    assert store.delete_client(NS, "alice") is True
    assert store.get_client(NS, "alice") is None
    assert store.delete_client(NS, "alice") is False


@pytest.mark.parametrize("second", ["exporter", "client"])
def test_store_token_hash_is_unique_per_table(store: Store, second: str) -> None:
    if second == "exporter":
        store.add_exporter(NS, "e1", {}, "dup")
        with pytest.raises(sqlite3.IntegrityError):
            store.add_exporter(NS, "e2", {}, "dup")
    else:
        store.add_client(NS, "c1", "dup")
        with pytest.raises(sqlite3.IntegrityError):
            store.add_client(NS, "c2", "dup")


def test_store_lease_crud_and_sequence(store: Store) -> None:
    first = add_lease(store, "l1", "board=rpi", tags={"team": "qa"}, begin_time=NOW + 5)
    second = add_lease(store, "l2", exporter_name="e1", end_time=NOW + 50)
    assert (first.seq, second.seq) == (1, 2)
    assert store.get_lease(NS, "l1") == first
    assert store.get_lease(NS, "l2") == second
    assert store.get_lease(NS, "missing") is None

    first.exporter = "e1"
    first.effective_begin = NOW
    first.duration = 10.0
    store.update_lease(first)
    second.released = True
    second.ended = True
    second.reason = "Released"
    second.effective_end = NOW
    store.update_lease(second)
    assert store.get_lease(NS, "l1") == first
    assert store.get_lease(NS, "l2") == second
    assert [x.name for x in store.list_leases()] == ["l1", "l2"]
    assert [x.name for x in store.list_leases(active_only=True)] == ["l1"]
    assert store.list_leases("other") == []


def test_store_add_lease_sets_created_when_missing(store: Store) -> None:
    added = store.add_lease(Lease(NS, "l1", "alice", 60.0))
    assert added.created > 0


def test_store_lists_leases_in_creation_order_not_name_order(store: Store) -> None:
    for name in ["c", "a", "b"]:
        add_lease(store, name)
    assert [x.name for x in store.list_leases()] == ["c", "a", "b"]


def test_store_survives_close_and_reopen(db_path: Path) -> None:
    """A controller restart: a new Store on the same file sees everything."""
    first = Store(db_path)
    exporter = add_exporter(first, "e1", {"board": "rpi"}, devices=[{"uuid": "u"}])
    client = first.add_client(NS, "alice", "hc")
    added = add_lease(first, "l1", "board=rpi", tags={"k": "v"})
    reconcile(first, online("e1"), NOW)
    assigned = lease(first, "l1")
    first.set_meta("schema", "1")
    first.close()

    second = Store(db_path)
    try:
        assert second.get_exporter(NS, "e1") == exporter
        assert second.get_client(NS, "alice") == client
        assert second.get_lease(NS, "l1") == assigned
        assert assigned.exporter == "e1" and assigned.seq == added.seq
        assert second.get_meta("schema") == "1"
        assert second.add_lease(Lease(NS, "l2", "alice", 1.0, created=NOW)).seq == added.seq + 1
    finally:
        second.close()


def test_store_meta(store: Store) -> None:
    assert store.get_meta("k") is None
    store.set_meta("k", "1")
    store.set_meta("k", "2")
    assert store.get_meta("k") == "2"


def test_store_uses_wal(store: Store, db_path: Path) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_store_database_file_is_private(store: Store, db_path: Path) -> None:
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_store_database_file_mode_is_repaired_on_open(db_path: Path) -> None:
    Store(db_path).close()
    db_path.chmod(0o644)
    Store(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_store_wal_and_shm_files_are_private_on_first_open(db_path: Path) -> None:
    previous = os.umask(0o022)  # the usual default; the store must not rely on a stricter one
    try:
        store = Store(db_path)
    finally:
        os.umask(previous)
    try:
        store.add_client(NS, "alice", "h")
        for suffix in ("-wal", "-shm"):
            side = db_path.with_name(db_path.name + suffix)
            assert side.exists(), f"{side.name} missing (removed only on the last close)"
            mode = stat.S_IMODE(side.stat().st_mode)
            assert mode & 0o077 == 0, f"{side.name} is {oct(mode)}, readable by others"
    finally:
        store.close()


# --- leases: assignment -------------------------------------------------------------------


def test_reconcile_assigns_a_matching_online_exporter(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "b"})
    add_lease(store, "l1", "board=b")
    changed = reconcile(store, online("e1", "e2"), NOW)
    got = lease(store, "l1")
    assert got.exporter == "e2"
    assert got.effective_begin == NOW
    assert got.reason == "Ready"
    assert not got.ended
    assert changed == {(NS, "e2")}


@pytest.mark.parametrize("status", ["", "Unspecified", "Available"])
def test_reconcile_assigns_exporters_in_leasable_statuses(store: Store, status: str) -> None:
    add_exporter(store, "e1", {"board": "a"}, status=status)
    add_lease(store, "l1", "board=a")
    reconcile(store, online("e1"), NOW)
    assert lease(store, "l1").exporter == "e1"


def test_reconcile_is_first_come_first_served(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "zz-first", "board=a")
    add_lease(store, "aa-second", "board=a")
    reconcile(store, online("e1"), NOW)
    assert lease(store, "zz-first").exporter == "e1"
    second = lease(store, "aa-second")
    assert second.exporter is None
    assert (second.reason, second.ended) == ("NotAvailable", False)


def test_reconcile_gives_each_lease_its_own_exporter(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l1", "board=a")
    add_lease(store, "l2", "board=a")
    changed = reconcile(store, online("e1", "e2"), NOW)
    assert {lease(store, "l1").exporter, lease(store, "l2").exporter} == {"e1", "e2"}
    assert changed == {(NS, "e1"), (NS, "e2")}


def test_reconcile_skips_an_exporter_leased_earlier(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a")
    reconcile(store, online("e1"), NOW)
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l2", "board=a")
    changed = reconcile(store, online("e1", "e2"), NOW + 1)
    assert lease(store, "l1").exporter == "e1"
    assert lease(store, "l2").exporter == "e2"
    assert changed == {(NS, "e2")}


def test_reconcile_does_not_match_exporters_of_other_namespaces(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"}, namespace="other")
    add_lease(store, "l1", "board=a")
    changed = reconcile(store, online("e1", namespace="other") | online("e1"), NOW)
    assert lease(store, "l1").reason == "NoMatch"
    assert changed == set()


def test_reconcile_without_changes_reports_nothing(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a")
    reconcile(store, online("e1"), NOW)
    before = lease(store, "l1")
    assert reconcile(store, online("e1"), NOW + 1) == set()
    assert lease(store, "l1") == before


# --- leases: pending reasons ----------------------------------------------------------------


def _pending_reason(store: Store, online_set: set[tuple[str, str]], **lease_kw: Any) -> Lease:
    add_lease(store, "l1", **lease_kw)
    changed = reconcile(store, online_set, NOW)
    got = lease(store, "l1")
    assert got.exporter is None
    assert not got.ended, f"{got.reason} should keep the lease pending"
    assert got.effective_begin is None and got.effective_end is None
    assert changed == set()
    return got


def test_pending_no_match(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    got = _pending_reason(store, online("e1"), selector="board=b")
    assert got.reason == "NoMatch"
    assert got.message


def test_pending_offline_when_not_connected(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    assert _pending_reason(store, set(), selector="board=a").reason == "Offline"


def test_pending_offline_when_not_registered(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"}, registered=False)
    assert _pending_reason(store, online("e1"), selector="board=a").reason == "Offline"


def test_pending_not_available_when_leased(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l0", "board=a")
    reconcile(store, online("e1"), NOW - 1)
    assert _pending_reason(store, online("e1"), selector="board=a").reason == "NotAvailable"


@pytest.mark.parametrize(
    "status", ["LeaseReady", "AfterLeaseHook", "BeforeLeaseHook", "AfterLeaseHookFailed"]
)
def test_pending_not_ready_while_exporter_is_busy_cleaning(store: Store, status: str) -> None:
    add_exporter(store, "e1", {"board": "a"}, status=status)
    assert _pending_reason(store, online("e1"), selector="board=a").reason == "NotReady"


def test_pending_exporter_disabled(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"}, enabled=False)
    assert _pending_reason(store, online("e1"), selector="board=a").reason == "ExporterDisabled"


def test_disabled_exporter_is_skipped_for_an_enabled_one(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"}, enabled=False)
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l1", "board=a")
    reconcile(store, online("e1", "e2"), NOW)
    assert lease(store, "l1").exporter == "e2"


def test_pending_reason_follows_the_situation_until_assigned(store: Store) -> None:
    add_lease(store, "l1", "board=a")
    reconcile(store, set(), NOW)
    assert lease(store, "l1").reason == "NoMatch"
    exporter = add_exporter(store, "e1", {"board": "a"}, status="AfterLeaseHook")
    reconcile(store, set(), NOW + 1)
    assert lease(store, "l1").reason == "Offline"
    reconcile(store, online("e1"), NOW + 2)
    assert lease(store, "l1").reason == "NotReady"
    exporter.status = "Available"
    store.update_exporter(exporter)
    assert reconcile(store, online("e1"), NOW + 3) == {(NS, "e1")}
    got = lease(store, "l1")
    assert (got.reason, got.exporter, got.effective_begin) == ("Ready", "e1", NOW + 3)


# --- leases: named exporter -----------------------------------------------------------------


def test_named_exporter_is_assigned_even_when_others_match(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l1", "board=a", exporter_name="e2")
    assert reconcile(store, online("e1", "e2"), NOW) == {(NS, "e2")}
    assert lease(store, "l1").exporter == "e2"


def test_named_exporter_without_selector(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", exporter_name="e1")
    reconcile(store, online("e1"), NOW)
    assert lease(store, "l1").exporter == "e1"


def test_named_exporter_not_found_ends_the_lease(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "ghost", {"board": "a"}, namespace="other")
    add_lease(store, "l1", exporter_name="ghost")
    changed = reconcile(store, online("e1") | online("ghost", namespace="other"), NOW)
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.exporter) == (True, "ExporterNotFound", None)
    assert got.effective_end == NOW
    assert "ghost" in got.message
    assert changed == set()
    assert store.list_leases(active_only=True) == []


def test_named_exporter_selector_mismatch_ends_the_lease(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=b", exporter_name="e1")
    changed = reconcile(store, online("e1"), NOW)
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.exporter) == (True, "SelectorMismatch", None)
    assert got.effective_end == NOW
    assert changed == set()


def test_named_exporter_that_is_busy_keeps_the_lease_pending(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l0", exporter_name="e1")
    add_lease(store, "l1", exporter_name="e1")
    reconcile(store, online("e1", "e2"), NOW)
    got = lease(store, "l1")
    assert (got.exporter, got.ended, got.reason) == (None, False, "NotAvailable")


# --- leases: time -------------------------------------------------------------------------


def test_scheduled_lease_waits_for_its_begin_time(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", begin_time=NOW + 60, duration=30.0)
    assert reconcile(store, online("e1"), NOW) == set()
    got = lease(store, "l1")
    assert (got.reason, got.exporter, got.ended) == ("Scheduled", None, False)
    assert reconcile(store, online("e1"), NOW + 59.9) == set()
    assert lease(store, "l1").exporter is None

    assert reconcile(store, online("e1"), NOW + 61) == {(NS, "e1")}
    got = lease(store, "l1")
    assert (got.reason, got.exporter, got.effective_begin) == ("Ready", "e1", NOW + 61)
    assert got.expires_at() == NOW + 91


def test_scheduled_lease_does_not_hold_the_exporter(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "later", "board=a", begin_time=NOW + 60)
    add_lease(store, "now", "board=a")
    reconcile(store, online("e1"), NOW)
    assert lease(store, "now").exporter == "e1"
    assert lease(store, "later").reason == "Scheduled"


def test_lease_expires_after_its_duration(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", duration=60.0)
    reconcile(store, online("e1"), NOW)
    assert reconcile(store, online("e1"), NOW + 59.9) == set()
    assert lease(store, "l1").active

    changed = reconcile(store, online("e1"), NOW + 60)
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.effective_end) == (True, "Expired", NOW + 60)
    assert got.exporter == "e1", "an ended lease still says which exporter it had"
    assert changed == {(NS, "e1")}


def test_lease_expires_at_its_end_time(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", duration=3600.0, end_time=NOW + 30)
    reconcile(store, online("e1"), NOW)
    assert lease(store, "l1").active
    changed = reconcile(store, online("e1"), NOW + 30)
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.effective_end) == (True, "Expired", NOW + 30)
    assert changed == {(NS, "e1")}


def test_expired_lease_frees_the_exporter_for_the_next_in_line(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", duration=60.0)
    add_lease(store, "l2", "board=a")
    reconcile(store, online("e1"), NOW)
    assert lease(store, "l2").reason == "NotAvailable"
    changed = reconcile(store, online("e1"), NOW + 60)
    assert lease(store, "l1").reason == "Expired"
    got = lease(store, "l2")
    assert (got.exporter, got.effective_begin) == ("e1", NOW + 60)
    assert changed == {(NS, "e1")}


def test_pending_lease_past_its_end_time_expires_unassigned(store: Store) -> None:
    add_lease(store, "l1", "board=a", end_time=NOW + 10)
    reconcile(store, set(), NOW)
    assert lease(store, "l1").reason == "NoMatch"
    assert reconcile(store, set(), NOW + 10) == set()
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.exporter) == (True, "Expired", None)


def test_released_lease_ends_and_reports_its_exporter(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a")
    reconcile(store, online("e1"), NOW)
    got = lease(store, "l1")
    got.released = True
    store.update_lease(got)
    changed = reconcile(store, online("e1"), NOW + 5)
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.effective_end) == (True, "Released", NOW + 5)
    assert changed == {(NS, "e1")}


def test_released_pending_lease_ends_without_changes(store: Store) -> None:
    add_lease(store, "l1", "board=a")
    got = lease(store, "l1")
    got.released = True
    store.update_lease(got)
    assert reconcile(store, set(), NOW) == set()
    got = lease(store, "l1")
    assert (got.ended, got.reason, got.exporter) == (True, "Released", None)


def test_release_wins_over_expiry(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", duration=10.0)
    reconcile(store, online("e1"), NOW)
    got = lease(store, "l1")
    got.released = True
    store.update_lease(got)
    reconcile(store, online("e1"), NOW + 100)
    assert lease(store, "l1").reason == "Released"


def test_ended_leases_are_left_alone(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_lease(store, "l1", "board=a", duration=10.0)
    reconcile(store, online("e1"), NOW)
    reconcile(store, online("e1"), NOW + 10)
    ended = lease(store, "l1")
    assert reconcile(store, online("e1"), NOW + 1000) == set()
    assert lease(store, "l1") == ended


# --- leases: next_deadline / active_lease_for ---------------------------------------------


def test_next_deadline_without_leases(store: Store) -> None:
    assert next_deadline(store) is None


def test_next_deadline_ignores_pending_leases_without_times(store: Store) -> None:
    add_lease(store, "l1", "board=a")
    reconcile(store, set(), NOW)
    assert next_deadline(store) is None


def test_next_deadline_is_the_earliest_expiry_or_begin_time(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "b"})
    add_lease(store, "dur", "board=a", duration=100.0)
    add_lease(store, "end", "board=b", duration=3600.0, end_time=NOW + 80)
    add_lease(store, "sched", "board=a", begin_time=NOW + 500)
    reconcile(store, online("e1", "e2"), NOW)
    assert next_deadline(store) == NOW + 80
    reconcile(store, online("e1", "e2"), NOW + 80)
    assert next_deadline(store) == NOW + 100
    reconcile(store, online("e1", "e2"), NOW + 100)
    assert next_deadline(store) == NOW + 500


def test_next_deadline_includes_end_time_of_pending_lease(store: Store) -> None:
    add_lease(store, "l1", "board=a", end_time=NOW + 10)
    reconcile(store, set(), NOW)
    assert next_deadline(store) == NOW + 10


def test_active_lease_for(store: Store) -> None:
    add_exporter(store, "e1", {"board": "a"})
    add_exporter(store, "e2", {"board": "a"})
    add_lease(store, "l1", "board=a", exporter_name="e1", duration=10.0)
    reconcile(store, online("e1", "e2"), NOW)
    found = active_lease_for(store, NS, "e1")
    assert found is not None and found.name == "l1"
    assert active_lease_for(store, NS, "e2") is None
    assert active_lease_for(store, "other", "e1") is None
    reconcile(store, online("e1", "e2"), NOW + 10)
    assert active_lease_for(store, NS, "e1") is None


# --- convert ------------------------------------------------------------------------------


def _conds(lease_: Lease) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in conditions(lease_)}


def test_conditions_pending() -> None:
    pending = Lease(NS, "l1", "alice", 60.0, reason="NoMatch", message="m", created=NOW)
    assert _conds(pending) == {"Pending": ("True", "NoMatch")}
    (cond,) = conditions(pending)
    assert cond.message == "m"
    assert cond.lastTransitionTime.seconds == int(NOW)


def test_conditions_ready() -> None:
    ready = Lease(NS, "l1", "alice", 60.0, exporter="e1", effective_begin=NOW, reason="Ready")
    got = _conds(ready)
    assert got["Ready"] == ("True", "Ready")
    assert got.get("Pending", ("False",))[0] == "False"
    assert "Unsatisfiable" not in got


@pytest.mark.parametrize("reason", ["Released", "Expired"])
def test_conditions_ended(reason: str) -> None:
    ended = Lease(
        NS,
        "l1",
        "alice",
        60.0,
        exporter="e1",
        effective_begin=NOW,
        effective_end=NOW + 5.5,
        ended=True,
        reason=reason,
    )
    got = _conds(ended)
    assert got["Ready"] == ("False", reason)
    assert got.get("Pending", ("False",))[0] == "False"
    assert "Unsatisfiable" not in got
    ready = next(c for c in conditions(ended) if c.type == "Ready")
    assert (ready.lastTransitionTime.seconds, ready.lastTransitionTime.nanos) == (
        int(NOW) + 5,
        500_000_000,
    )


@pytest.mark.parametrize("reason", ["ExporterNotFound", "SelectorMismatch"])
def test_conditions_unsatisfiable(reason: str) -> None:
    ended = Lease(NS, "l1", "alice", 60.0, effective_end=NOW, ended=True, reason=reason)
    got = _conds(ended)
    assert got["Unsatisfiable"] == ("True", reason)
    assert got.get("Pending", ("False",))[0] == "False"
    assert got.get("Ready", ("False",))[0] == "False"


def test_lease_to_proto_pending() -> None:
    pending = Lease(NS, "l1", "alice", 90.0, selector="board=a", tags={"t": "1"}, created=NOW)
    msg = lease_to_proto(pending, NOW + 10)
    assert msg.name == "namespaces/ns/leases/l1"
    assert msg.client == "namespaces/ns/clients/alice"
    assert msg.selector == "board=a"
    assert msg.duration.ToSeconds() == 90
    assert dict(msg.tags) == {"t": "1"}
    for field in (
        "exporter",
        "effective_begin_time",
        "effective_end_time",
        "effective_duration",
        "begin_time",
        "end_time",
    ):
        assert not msg.HasField(field), field
    assert [c.type for c in msg.conditions] == ["Pending"]


def test_lease_to_proto_active() -> None:
    active = Lease(
        NS,
        "l1",
        "alice",
        60.0,
        exporter="e1",
        effective_begin=NOW,
        begin_time=NOW - 1,
        end_time=NOW + 60,
    )
    msg = lease_to_proto(active, NOW + 15)
    assert msg.exporter == "namespaces/ns/exporters/e1"
    assert msg.effective_begin_time.seconds == int(NOW)
    assert not msg.HasField("effective_end_time")
    assert msg.effective_duration.ToSeconds() == 15
    assert msg.begin_time.seconds == int(NOW - 1)
    assert msg.end_time.seconds == int(NOW + 60)


def test_lease_to_proto_ended() -> None:
    ended = Lease(
        NS,
        "l1",
        "alice",
        60.0,
        exporter="e1",
        effective_begin=NOW,
        effective_end=NOW + 20,
        ended=True,
        reason="Released",
    )
    msg = lease_to_proto(ended, NOW + 1000)
    assert msg.effective_end_time.seconds == int(NOW + 20)
    assert msg.effective_duration.ToSeconds() == 20, "duration stops at the end"
    assert msg.exporter == "namespaces/ns/exporters/e1"


def test_lease_to_proto_unsatisfiable_has_end_but_no_begin() -> None:
    ended = Lease(NS, "l1", "alice", 60.0, exporter_name="ghost", effective_end=NOW, ended=True)
    ended.reason = "ExporterNotFound"
    msg = lease_to_proto(ended, NOW)
    assert not msg.HasField("exporter")
    assert not msg.HasField("effective_begin_time")
    assert msg.HasField("effective_end_time")
    assert msg.exporter_name == "ghost"


def test_parse_name() -> None:
    assert parse_name("namespaces/ns/leases/x", "leases") == ("ns", "x")
    assert parse_name("namespaces/a-b/exporters/e.1", "exporters") == ("a-b", "e.1")


@pytest.mark.parametrize(
    "resource",
    [
        "",
        "x",
        "namespaces/ns/leases",
        "namespaces/ns/leases/x/y",
        "namespace/ns/leases/x",
        "namespaces/ns/exporters/x",
        "namespaces//leases/x",
        "namespaces/ns/leases/",
        "/ns/leases/x",
    ],
)
def test_parse_name_errors(resource: str) -> None:
    with pytest.raises(ValueError, match="namespaces/<namespace>/leases/<name>"):
        parse_name(resource, "leases")


# --- auth ---------------------------------------------------------------------------------


@pytest.fixture
def creds(store: Store) -> dict[str, str]:
    """Tokens of one exporter and two clients, registered in the store."""
    issued = {
        "exporter": tokens.new_token("e1"),
        "alice": tokens.new_token("alice"),
        "bob": tokens.new_token("bob"),
    }
    store.add_exporter(NS, "e1", {}, tokens.token_hash(issued["exporter"]))
    store.add_client(NS, "alice", tokens.token_hash(issued["alice"]))
    store.add_client(NS, "bob", tokens.token_hash(issued["bob"]))
    return issued


def md(token: str | None, kind: str = "Client", name: str = "alice", **extra: str) -> dict:
    metadata = {
        "jumpstarter-kind": kind,
        "jumpstarter-namespace": NS,
        "jumpstarter-name": name,
        **extra,
    }
    if token is not None:
        metadata["authorization"] = f"Bearer {token}"
    return metadata


def refusal(store: Store, metadata: dict[str, str], allowed: set[Any]) -> Refused:
    with pytest.raises(Refused) as excinfo:
        authenticate(store, metadata, allowed)
    return excinfo.value


def test_authenticate_client(store: Store, creds: dict[str, str]) -> None:
    assert authenticate(store, md(creds["alice"]), {"Client"}) == Identity("Client", NS, "alice")


def test_authenticate_exporter(store: Store, creds: dict[str, str]) -> None:
    who = authenticate(store, md(creds["exporter"], "Exporter", "e1"), {"Exporter"})
    assert who == Identity("Exporter", NS, "e1")


def test_authenticate_accepts_lowercase_bearer(store: Store, creds: dict[str, str]) -> None:
    metadata = md(None, authorization=f"bearer {creds['alice']}")
    assert authenticate(store, metadata, {"Client"}).name == "alice"


@pytest.mark.parametrize("value", [None, ""])
def test_missing_authorization_is_unauthenticated(
    store: Store, creds: dict[str, str], value: str | None
) -> None:
    metadata = md(None) if value is None else md(None, authorization=value)
    err = refusal(store, metadata, {"Client"})
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in err.message


@pytest.mark.parametrize("scheme", ["Basic {t}", "{t}", "Bearer", "Bearer    ", "Token {t}"])
def test_non_bearer_authorization_is_unauthenticated(
    store: Store, creds: dict[str, str], scheme: str
) -> None:
    token = creds["alice"]
    err = refusal(store, md(None, authorization=scheme.format(t=token)), {"Client"})
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert token not in err.message


@pytest.mark.parametrize(
    "missing", ["jumpstarter-namespace", "jumpstarter-kind", "jumpstarter-name"]
)
def test_missing_identity_metadata_is_invalid_argument(
    store: Store, creds: dict[str, str], missing: str
) -> None:
    metadata = md(creds["alice"])
    del metadata[missing]
    err = refusal(store, metadata, {"Client"})
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert missing in err.message


def test_unknown_token_is_unauthenticated(store: Store, creds: dict[str, str]) -> None:
    stranger = tokens.new_token("alice")
    err = refusal(store, md(stranger), {"Client"})
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert stranger not in err.message


def test_deleted_client_token_is_unauthenticated(store: Store, creds: dict[str, str]) -> None:
    store.delete_client(NS, "alice")
    assert refusal(store, md(creds["alice"]), {"Client"}).code == (grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.parametrize(
    ("kind", "name", "namespace"),
    [("Client", "bob", NS), ("Client", "alice", "other"), ("Exporter", "alice", NS)],
    ids=["other-name", "other-namespace", "other-kind"],
)
def test_token_of_another_identity_is_permission_denied(
    store: Store, creds: dict[str, str], kind: str, name: str, namespace: str
) -> None:
    metadata = md(creds["alice"], kind, name)
    metadata["jumpstarter-namespace"] = namespace
    err = refusal(store, metadata, {"Client", "Exporter"})
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert creds["alice"] not in err.message


def test_exporter_token_for_a_client_call_is_permission_denied(
    store: Store, creds: dict[str, str]
) -> None:
    err = refusal(store, md(creds["exporter"], "Exporter", "e1"), {"Client"})
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert "client" in err.message
    assert creds["exporter"] not in err.message


def test_client_token_for_an_exporter_call_is_permission_denied(
    store: Store, creds: dict[str, str]
) -> None:
    err = refusal(store, md(creds["alice"]), {"Exporter"})
    assert err.code == grpc.StatusCode.PERMISSION_DENIED


def test_refusal_messages_never_contain_the_token(store: Store, creds: dict[str, str]) -> None:
    token = creds["alice"]
    cases = [
        md(None, authorization=f"Basic {token}"),
        {k: v for k, v in md(token).items() if k != "jumpstarter-namespace"},
        md(token + "x"),
        md(token, "Client", "bob"),
    ]
    for metadata in cases:
        err = refusal(store, metadata, {"Exporter"})
        assert token not in err.message and token not in str(err)
        for part in token.split("."):
            assert part not in err.message
