"""The gossip keyring: install/use/remove semantics, key validation, persistence."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from verdigris.gossip.keyring import (
    MAX_KEYS,
    Keyring,
    KeyringError,
    decode_key,
    encode_key,
    fingerprint,
    generate_key,
)


def key(n: int, size: int = 32) -> str:
    return base64.b64encode(bytes([n]) * size).decode()


K1, K2, K3 = key(1), key(2), key(3)


# --- keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_accepts_aes_key_sizes(size: int) -> None:
    ring = Keyring([key(9, size)])
    assert ring.primary == key(9, size)
    assert decode_key(key(9, size)) == bytes([9]) * size


@pytest.mark.parametrize("size", [0, 1, 15, 17, 31, 33, 64])
def test_rejects_other_key_sizes(size: int) -> None:
    with pytest.raises(KeyringError, match=f"{size} bytes.*16, 24 or 32"):
        decode_key(base64.b64encode(b"x" * size).decode())
    with pytest.raises(KeyringError, match=f"{size} bytes.*16, 24 or 32"):
        decode_key(b"x" * size)


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        "QUJD*",  # bad character
        "QUJDRA",  # bad padding
        "éàü",  # not ASCII
        K1[:-2] + "@=",
    ],
)
def test_rejects_bad_base64_without_echoing_it(text: str) -> None:
    with pytest.raises(KeyringError, match="not valid base64") as info:
        decode_key(text)
    assert text not in str(info.value)


def test_base64_surrounding_whitespace_is_ignored() -> None:
    assert decode_key(f"  {K1}\n") == bytes([1]) * 32


def test_rejects_non_key_types() -> None:
    with pytest.raises(KeyringError, match="base64 string or bytes"):
        decode_key(123)  # type: ignore[arg-type]


def test_raw_bytes_and_base64_are_the_same_key() -> None:
    ring = Keyring([bytes([1]) * 32])
    assert ring.list() == [K1]
    assert K1 in ring
    assert bytes([1]) * 32 in ring
    assert "garbage" not in ring
    assert 42 not in ring
    assert encode_key(bytes([1]) * 32) == K1


def test_fingerprint_and_repr_do_not_leak_keys() -> None:
    ring = Keyring([K1, K2])
    fp = fingerprint(K1)
    assert len(fp) == 16 and fp == fingerprint(bytes([1]) * 32)
    assert fp != fingerprint(K2)
    text = repr(ring)
    assert fp in text
    assert K1 not in text and K2 not in text


def test_generate_key_uses_the_given_random_source() -> None:
    assert generate_key(lambda n: b"\x07" * n) == key(7)
    assert decode_key(generate_key(lambda n: b"\x07" * n, size=16)) == b"\x07" * 16
    assert len(decode_key(generate_key(os.urandom))) == 32
    with pytest.raises(KeyringError, match="key size"):
        generate_key(os.urandom, size=20)
    with pytest.raises(KeyringError, match="random source returned 3 bytes"):
        generate_key(lambda n: b"abc")


# --- install / use / remove ------------------------------------------------------------------------------


def test_construction() -> None:
    assert Keyring([K1, K2]).list() == [K1, K2]
    assert Keyring([K1, K2], primary=K2).list() == [K2, K1]
    assert Keyring([K1], primary=K3).list() == [K3, K1]
    assert Keyring([], primary=K3).list() == [K3]
    assert Keyring([K1, K1, bytes([1]) * 32]).list() == [K1]
    with pytest.raises(KeyringError, match="at least one key"):
        Keyring([])
    with pytest.raises(KeyringError, match=f"at most {MAX_KEYS}"):
        Keyring([key(i) for i in range(MAX_KEYS + 1)])


def test_install_use_remove() -> None:
    ring = Keyring([K1])
    assert ring.install(K2) is True
    assert ring.install(K2) is False  # idempotent
    assert ring.list() == [K1, K2]
    assert ring.primary == K1

    ring.use(K2)
    assert ring.list() == [K2, K1]
    ring.use(K2)  # idempotent
    assert ring.primary == K2

    assert ring.remove(K1) is True
    assert ring.remove(K1) is False  # idempotent
    assert ring.list() == [K2]
    assert len(ring) == 1


def test_use_requires_an_installed_key() -> None:
    ring = Keyring([K1])
    with pytest.raises(KeyringError, match=f"{fingerprint(K2)} is not installed") as info:
        ring.use(K2)
    assert K2 not in str(info.value)
    assert ring.list() == [K1]


def test_primary_cannot_be_removed() -> None:
    ring = Keyring([K1, K2])
    with pytest.raises(KeyringError, match="primary key and cannot be removed; use another key first"):
        ring.remove(K1)
    assert ring.list() == [K1, K2]


def test_keyring_is_bounded() -> None:
    ring = Keyring([key(i) for i in range(MAX_KEYS)])
    with pytest.raises(KeyringError, match="keyring is full"):
        ring.install(key(200))
    ring.remove(key(5))
    assert ring.install(key(200)) is True


def test_ciphers_follow_the_primary() -> None:
    ring = Keyring([K1, K2])
    before = ring.ciphers()
    ring.use(K2)
    after = ring.ciphers()
    assert after == (before[1], before[0])
    ring.install(K3)
    assert len(ring.ciphers()) == 3
    assert len(before) == 2  # an old snapshot never changes


# --- persistence -----------------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring([K1, K2, key(4, 16)], primary=K2)
    ring.save(path)
    assert mode(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"primary": K2, "keys": [K2, K1, key(4, 16)]}
    assert Keyring.load(path).list() == ring.list()
    assert Keyring.load(str(path)).primary == K2
    assert os.listdir(tmp_path) == ["keyring.json"]  # no temporary file left behind


def test_save_replaces_atomically_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("old contents")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        Keyring([K3]).save(path)
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600
    assert Keyring.load(path).list() == [K3]
    assert os.listdir(tmp_path) == ["keyring.json"]


def test_save_to_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot write keyring file"):
        Keyring([K1]).save(tmp_path / "nope" / "keyring.json")


def test_load_serf_style_list(tmp_path: Path) -> None:
    path = tmp_path / "serf.keyring"
    path.write_text(json.dumps([K2, K1]))
    ring = Keyring.load(path)
    assert ring.primary == K2
    assert ring.list() == [K2, K1]


def test_load_primary_only(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"primary": K1}))
    assert Keyring.load(path).list() == [K1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'"a string"', "must hold a JSON object"),
        (b"[]", "holds no keys"),
        (b'{"keys": []}', "holds no keys"),
        (b'{"keys": [1, 2]}', "'keys' must be a list of base64 strings"),
        (b'{"keys": "abc"}', "'keys' must be a list of base64 strings"),
        (json.dumps({"keys": [K1], "primary": 5}).encode(), "'primary' must be a base64 string"),
        (json.dumps({"keys": [K1], "primary": K2}).encode(), "primary key is not among 'keys'"),
        (json.dumps({"keys": [K1], "extra": 1}).encode(), "unknown field"),
        (json.dumps([K1, "bogus!"]).encode(), r"key #2: key is not valid base64"),
        (json.dumps([K1, base64.b64encode(b"x" * 20).decode()]).encode(), r"key #2: key decodes to 20 bytes"),
        (json.dumps({"keys": [K1], "primary": "zz"}).encode(), "primary: key is not valid base64"),
        (json.dumps([key(i) for i in range(MAX_KEYS + 1)]).encode(), f"at most {MAX_KEYS}"),
    ],
)
def test_load_errors_are_clear(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(content)
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


def test_load_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="cannot read keyring file"):
        Keyring.load(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(KeyringError, match="larger than"):
        Keyring.load(big)
