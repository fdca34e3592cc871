"""The gossip keyring: the AES-GCM keys a node accepts, one of which (the primary) it encrypts with.

Semantics follow memberlist/Serf so that operators can rotate keys with no downtime:

1. ``install`` the new key on every node (each node now *accepts* both keys, still *sends* with the old);
2. ``use`` the new key on every node (nodes now send with the new key; the old one is still accepted,
   so a node that has not switched yet is still understood, and still understands the others);
3. ``remove`` the old key on every node (packets sealed with it are rejected from then on).

Decryption tries every installed key, primary first; encryption always uses the primary. The primary can
never be removed (``use`` another key first), so a keyring always holds at least one key.

Keys are AES keys of 16, 24 or 32 bytes (AES-128/192/256; 32 is recommended and is what
:func:`generate_key` makes). They travel as standard base64 strings, as in Serf and Consul.
Key material never appears in ``repr`` or error messages: keys are named by :func:`fingerprint`.

A keyring file is JSON, ``{"primary": "<base64>", "keys": ["<base64>", ...]}`` with the primary first;
:meth:`Keyring.load` also reads a bare JSON list of base64 keys, primary first (the Serf/Consul keyring
file format). :meth:`Keyring.save` writes it atomically (temporary file in the same directory, fsync,
``os.replace``) with mode 0600.

Mutations are serialised by a lock and publish a new immutable snapshot, so readers (the codec, on every
packet) never take a lock and never see a half-made change.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, TypeAlias

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "KEY_SIZES",
    "MAX_KEYS",
    "Key",
    "Keyring",
    "KeyringError",
    "decode_key",
    "encode_key",
    "fingerprint",
    "generate_key",
]

KEY_SIZES: Final = (16, 24, 32)
"""Accepted key lengths in bytes (AES-128, AES-192, AES-256), as memberlist accepts."""

MAX_KEYS: Final = 16
"""At most this many keys installed at once. A rotation needs two; the bound caps the work a forged packet
costs (one failed tag check per installed key)."""

MAX_FILE_BYTES: Final = 1 << 20
"""A keyring file larger than this is refused unread."""

Key: TypeAlias = str | bytes
"""A key as a base64 string (the exchange format) or as raw key bytes."""


class KeyringError(ValueError):
    """A bad key, an operation the keyring refuses, or an unreadable keyring file."""


def fingerprint(key: Key) -> str:
    """A short, non-secret name for a key: the first 8 bytes of SHA-256 of the raw key, in hex.

    Safe to log and to compare across nodes ("does every node have key 3fa1…?").
    """
    return hashlib.sha256(decode_key(key)).hexdigest()[:16]


def decode_key(key: Key) -> bytes:
    """Raw key bytes from a base64 string (surrounding whitespace ignored) or raw bytes; checks the length."""
    if isinstance(key, str):
        text = key.strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            # Never echo the text: it is (or was meant to be) a secret.
            raise KeyringError(
                f"key is not valid base64 ({len(text)} characters; a 32-byte key is 44 characters of "
                "standard base64 ending in '=')"
            ) from None
        if len(raw) not in KEY_SIZES:
            raise KeyringError(
                f"key decodes to {len(raw)} bytes; an AES key must be 16, 24 or 32 bytes (32 recommended)"
            )
        return raw
    if isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
        if len(raw) not in KEY_SIZES:
            raise KeyringError(
                f"key is {len(raw)} bytes; an AES key must be 16, 24 or 32 bytes (32 recommended)"
            )
        return raw
    raise KeyringError(f"a key must be a base64 string or bytes, not {type(key).__name__}")


def encode_key(key: Key) -> str:
    """The base64 form of a key (checks it first)."""
    return base64.b64encode(decode_key(key)).decode("ascii")


def generate_key(randbytes: Callable[[int], bytes], size: int = 32) -> str:
    """A new base64 key of ``size`` bytes drawn from ``randbytes`` (pass ``secrets.token_bytes`` or
    ``os.urandom``; the random source is handed in, never read here)."""
    if size not in KEY_SIZES:
        raise KeyringError(f"key size must be 16, 24 or 32 bytes, not {size}")
    raw = randbytes(size)
    if len(raw) != size:
        raise KeyringError(f"random source returned {len(raw)} bytes, not {size}")
    return encode_key(raw)


class Keyring:
    """An ordered set of AES-GCM keys; the first is the primary.

    ``Keyring(keys, primary=None)``: ``keys`` must not be empty; ``primary`` defaults to the first key and
    is installed if it is not among ``keys``.
    """

    __slots__ = ("_lock", "_snapshot")

    def __init__(self, keys: Iterable[Key], primary: Key | None = None) -> None:
        raws: builtins.list[bytes] = []
        for key in keys:
            raw = decode_key(key)
            if raw not in raws:
                raws.append(raw)
        if primary is not None:
            first = decode_key(primary)
            if first in raws:
                raws.remove(first)
            raws.insert(0, first)
        if not raws:
            raise KeyringError("a keyring needs at least one key")
        if len(raws) > MAX_KEYS:
            raise KeyringError(f"{len(raws)} keys given; at most {MAX_KEYS} may be installed")
        self._lock = threading.Lock()
        self._snapshot: tuple[tuple[bytes, AESGCM], ...] = tuple((raw, AESGCM(raw)) for raw in raws)

    # --- reading ------------------------------------------------------------------------------------------

    @property
    def primary(self) -> str:
        """The primary key, base64."""
        return encode_key(self._snapshot[0][0])

    def list(self) -> builtins.list[str]:
        """Every installed key, base64, primary first."""
        return [encode_key(raw) for raw, _ in self._snapshot]

    def fingerprints(self) -> builtins.list[str]:
        """:func:`fingerprint` of every installed key, primary first (safe to log or show)."""
        return [fingerprint(raw) for raw, _ in self._snapshot]

    def ciphers(self) -> tuple[AESGCM, ...]:
        """One AES-GCM cipher per installed key, primary first: encrypt with ``[0]``, try all to decrypt.

        The tuple is an immutable snapshot; take it once per packet.
        """
        return tuple(cipher for _, cipher in self._snapshot)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str | bytes):
            return False
        try:
            raw = decode_key(key)
        except KeyringError:
            return False
        return any(raw == k for k, _ in self._snapshot)

    def __repr__(self) -> str:
        prints = self.fingerprints()
        return f"Keyring(primary={prints[0]}, keys={prints})"

    # --- changing -----------------------------------------------------------------------------------------

    def install(self, key: Key) -> bool:
        """Accept ``key`` for decryption (not yet used to encrypt). False if it was already installed."""
        raw = decode_key(key)
        with self._lock:
            snap = self._snapshot
            if any(raw == k for k, _ in snap):
                return False
            if len(snap) >= MAX_KEYS:
                raise KeyringError(
                    f"keyring is full ({MAX_KEYS} keys); remove a key that is no longer in use first"
                )
            self._snapshot = (*snap, (raw, AESGCM(raw)))
            return True

    def use(self, key: Key) -> None:
        """Make ``key`` the primary (the key every packet is sealed with). It must be installed already."""
        raw = decode_key(key)
        with self._lock:
            snap = self._snapshot
            found = [entry for entry in snap if entry[0] == raw]
            if not found:
                raise KeyringError(
                    f"key {fingerprint(raw)} is not installed; install it on every node before using it"
                )
            self._snapshot = (found[0], *(entry for entry in snap if entry[0] != raw))

    def remove(self, key: Key) -> bool:
        """Stop accepting ``key``. Refuses the primary. False if it was not installed (removal is idempotent,
        so a cluster-wide rotation can be retried)."""
        raw = decode_key(key)
        with self._lock:
            snap = self._snapshot
            if snap[0][0] == raw:
                raise KeyringError(
                    f"key {fingerprint(raw)} is the primary key and cannot be removed; use another key first"
                )
            kept = tuple(entry for entry in snap if entry[0] != raw)
            if len(kept) == len(snap):
                return False
            self._snapshot = kept
            return True

    # --- persistence --------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file (see the module docstring for the format)."""
        where = os.fspath(path)
        try:
            with open(where, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise KeyringError(f"cannot read keyring file {where}: {e.strerror or e}") from None
        if len(data) > MAX_FILE_BYTES:
            raise KeyringError(f"keyring file {where} is larger than {MAX_FILE_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KeyringError(f"keyring file {where} is not valid JSON: {e}") from None

        primary: object = None
        if isinstance(doc, builtins.list):
            keys: object = doc
        elif isinstance(doc, dict):
            unknown = sorted(set(doc) - {"primary", "keys"})
            if unknown:
                raise KeyringError(f"keyring file {where}: unknown field(s) {', '.join(unknown)}")
            keys = doc.get("keys", [])
            primary = doc.get("primary")
        else:
            raise KeyringError(
                f"keyring file {where} must hold a JSON object {{'primary', 'keys'}} or a list of keys"
            )
        if not isinstance(keys, builtins.list) or not all(isinstance(k, str) for k in keys):
            raise KeyringError(f"keyring file {where}: 'keys' must be a list of base64 strings")
        if primary is not None and not isinstance(primary, str):
            raise KeyringError(f"keyring file {where}: 'primary' must be a base64 string")

        raws: builtins.list[bytes] = []
        for i, text in enumerate(keys):
            try:
                raws.append(decode_key(text))
            except KeyringError as e:
                raise KeyringError(f"keyring file {where}, key #{i + 1}: {e}") from None
        first: bytes | None = None
        if primary is not None:
            try:
                first = decode_key(primary)
            except KeyringError as e:
                raise KeyringError(f"keyring file {where}, primary: {e}") from None
            if raws and first not in raws:
                raise KeyringError(f"keyring file {where}: the primary key is not among 'keys'")
        if not raws and first is None:
            raise KeyringError(f"keyring file {where} holds no keys")
        try:
            return cls(raws, primary=first)
        except KeyringError as e:
            raise KeyringError(f"keyring file {where}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring to ``path`` atomically, mode 0600 (a crash leaves the old file or the new one)."""
        target = Path(path)
        keys = self.list()
        body = json.dumps({"primary": keys[0], "keys": keys}, indent=2).encode("ascii") + b"\n"
        directory = target.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise KeyringError(f"cannot write keyring file {target}: {e.strerror or e}") from None
        replaced = False
        try:
            try:
                os.fchmod(fd, 0o600)  # mkstemp already uses 0600; be explicit, whatever the platform
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
            replaced = True
        except OSError as e:
            raise KeyringError(f"cannot write keyring file {target}: {e.strerror or e}") from None
        finally:
            if not replaced:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        # Make the rename itself durable; not every platform/filesystem lets a directory be fsynced.
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
