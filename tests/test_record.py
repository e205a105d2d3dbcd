"""The lock format: the seed's one-line lock keeps its meaning, pgfence's own records put the
token first, and parsing refuses anything pgfence did not write (fail closed)."""

from __future__ import annotations

import pytest

from harness.records import SAMPLE
from pgfence.errors import LockFormatError
from pgfence.record import (
    MAX_LOCK_BYTES,
    TOKEN_MAX_BYTES,
    LegacyLock,
    LockRecord,
    new_instance_id,
    parse,
    token_problem,
)

RECORD = SAMPLE
LEASE = RECORD.replace(mode="lease", interval=5.0, ttl=30.0, lock_delay=7.5)


def encoded_lines(record: LockRecord = RECORD) -> list[str]:
    return record.encode().decode().splitlines()


def with_line(index: int, line: str) -> bytes:
    lines = encoded_lines()
    lines[index] = line
    return ("\n".join(lines) + "\n").encode()


def refused(data: bytes, *needles: str) -> str:
    with pytest.raises(LockFormatError) as info:
        parse(data, "/data/fence_lock")
    message = info.value.message
    assert info.value.exit_code == 65
    assert "\n" not in message
    assert "/data/fence_lock" in message
    for needle in needles:
        assert needle in message
    return message


# -- the seed's one-line lock ------------------------------------------------------------


@pytest.mark.parametrize("data", [b"db-1", b"db-1\n"])
def test_one_line_lock_is_the_seed_token(data: bytes) -> None:
    assert parse(data, "lock") == LegacyLock("db-1")


def test_one_line_lock_keeps_inner_spaces_and_unicode() -> None:
    assert parse("hôte 1\n".encode(), "lock") == LegacyLock("hôte 1")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"   \n", "is blank"),
        (b"db-1\r\n", "spans several lines"),
        (b" db-1\n", "white space"),
        (b"db-1 \n", "white space"),
        (b"db\x01-1\n", "control characters"),
        (b"db\t1\n", "control characters"),
        (b"x" * (TOKEN_MAX_BYTES + 1) + b"\n", "longer than"),
        (b"db-1\xff\n", "not UTF-8"),
        (b"db-1\n\n", "no pgfence header"),
        (b"db-1\nsomething else\n", "no pgfence header"),
        (b"x" * (MAX_LOCK_BYTES + 1), "larger than"),
    ],
)
def test_garbage_is_refused(data: bytes, why: str) -> None:
    refused(data, why)


def test_longest_token_is_accepted() -> None:
    token = "x" * TOKEN_MAX_BYTES
    assert parse(token.encode(), "lock") == LegacyLock(token)


# -- pgfence's records --------------------------------------------------------------------


@pytest.mark.parametrize("record", [RECORD, LEASE])
def test_record_round_trips(record: LockRecord) -> None:
    assert parse(record.encode(), "lock") == record


def test_first_line_is_the_token_then_the_header() -> None:
    lines = encoded_lines()
    assert lines[0] == "db-1"
    assert lines[1] == "pgfence-lock 1"
    assert RECORD.encode().endswith(b"\n")


def test_record_parses_without_trailing_newline() -> None:
    assert parse(RECORD.encode().rstrip(b"\n"), "lock") == RECORD


def test_next_beat_moves_only_the_heartbeat() -> None:
    beat = RECORD.next_beat(2000.5, "2026-11-27T13:00:00Z")
    assert beat.heartbeat == RECORD.heartbeat + 1
    assert beat.beat() != RECORD.beat()
    assert (beat.token, beat.instance, beat.generation) == ("db-1", RECORD.instance, 4)
    assert parse(beat.encode(), "lock") == beat


def test_describe_names_the_token() -> None:
    assert "'db-1'" in RECORD.describe()
    assert "'db-1'" in LegacyLock("db-1").describe()


def test_unknown_version_is_refused() -> None:
    refused(with_line(1, "pgfence-lock 2"), "newer than this pgfence")


def test_unknown_field_is_refused() -> None:
    refused(RECORD.encode() + b"colour=blue\n", "unknown or missing fields", "colour")


def test_missing_field_is_refused() -> None:
    lines = [line for line in encoded_lines() if not line.startswith("heartbeat=")]
    refused(("\n".join(lines) + "\n").encode(), "unknown or missing fields", "heartbeat")


def test_duplicate_field_is_refused() -> None:
    refused(RECORD.encode() + b"heartbeat=118\n", "malformed line")


def test_line_without_equals_is_refused() -> None:
    refused(RECORD.encode() + b"garbage\n", "malformed line")


def test_blank_line_inside_record_is_refused() -> None:
    refused(RECORD.encode() + b"\n", "malformed line")


def field_index(key: str) -> int:
    return next(i for i, line in enumerate(encoded_lines()) if line.startswith(f"{key}="))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("instance", "5f0c3a9e7b1d246"),  # too short
        ("instance", "5F0C3A9E7B1D2468"),  # pgfence writes lower case
        ("instance", "zf0c3a9e7b1d2468"),
        ("mode", "eventual"),
        ("generation", "-1"),
        ("generation", "1e3"),
        ("generation", ""),
        ("generation", "9" * 19),
        ("generation", "\u00b2"),  # a digit to str.isdigit(), not to int()
        ("generation", "\u0663"),  # ARABIC-INDIC DIGIT THREE: int() accepts it, we do not
        ("heartbeat", "\u00b9"),
        ("pid", "12a"),
        ("interval", "fast"),
        ("interval", "0"),
        ("interval", "-2"),
        ("interval", "nan"),
        ("interval", "inf"),
        ("clock", "1e10"),
        ("host", "a\x07b"),
        ("host", "h" * 256),
        ("boot_id", "b" * 65),
        ("acquired_at", "t" * 41),
    ],
)
def test_bad_field_value_is_refused(key: str, value: str) -> None:
    refused(with_line(field_index(key), f"{key}={value}"))


def test_lease_without_ttl_is_refused() -> None:
    lines = encoded_lines(LEASE)
    lines[field_index("ttl")] = "ttl=0"
    refused(("\n".join(lines) + "\n").encode(), "TTL")


def test_record_with_bad_token_is_refused() -> None:
    refused(b"\n" + RECORD.encode().split(b"\n", 1)[1], "is empty")


# -- tokens and instance ids ------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "is empty"),
        ("   ", "is blank"),
        ("\t", "is blank"),
        ("a\nb", "spans several lines"),
        ("a\rb", "spans several lines"),
        ("x" * (TOKEN_MAX_BYTES + 1), "longer than"),
        ("é" * 128, "longer than"),  # 256 bytes in UTF-8
        ("a\x1bb", "control characters"),
        ("a\x7fb", "control characters"),
        (" a", "white space"),
    ],
)
def test_token_problems(token: str, problem: str) -> None:
    found = token_problem(token)
    assert found is not None
    assert problem in found


@pytest.mark.parametrize("token", ["db-1", "pg.example.com", "hôte 1", "x" * TOKEN_MAX_BYTES])
def test_good_tokens(token: str) -> None:
    assert token_problem(token) is None


def test_instance_ids_are_random_hex() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    for instance in ids:
        assert len(instance) == 16
        int(instance, 16)
        parse(RECORD.replace(instance=instance).encode(), "lock")
