"""The members file: who this node knew, kept beside the database so a restart can find them again.

A node restarted after a crash, a deploy or a long partition should not depend on its bootstrap list
alone: seeds get replaced, and the bootstrap list may name nodes that are gone. So the runtime writes the
members it knows (id, address, metadata, incarnation, state) to ``<db>.members.json`` every few seconds
when something changed, and at shutdown; on start it joins the bootstrap list *and* the members it knew.

The file also keeps this node's own incarnation. Starting again above it means the first ``Alive`` the
restarted node sends already beats what the cluster remembers, instead of being ignored until a peer
tells the node that it is suspected and it refutes.

The file is advisory: a missing, unreadable or malformed file is logged and ignored (the node then starts
from its bootstrap list), never fatal. It is written atomically (temporary file, ``os.replace``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Final

import msgspec

__all__ = ["MAX_SAVED_MEMBERS", "PeerRecord", "SavedPeers", "load_peers", "peers_path", "save_peers"]

log = logging.getLogger(__name__)

MAX_SAVED_MEMBERS: Final = 1024
"""At most this many members are written (alive first, then the most recently seen)."""
_MAX_FILE: Final = 4 * 1024 * 1024


class PeerRecord(msgspec.Struct, frozen=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65_535)]
    state: str
    incarnation: Annotated[int, msgspec.Meta(ge=0)]
    metadata: dict[str, str] = {}

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


class SavedPeers(msgspec.Struct, frozen=True):
    node_id: str
    incarnation: Annotated[int, msgspec.Meta(ge=0)]
    members: Annotated[list[PeerRecord], msgspec.Meta(max_length=MAX_SAVED_MEMBERS)]
    version: int = 1


_decoder = msgspec.json.Decoder(SavedPeers)


def peers_path(db_path: Path, scope: str | None = None) -> Path:
    """Where the members file of the database at ``db_path`` lives: ``<db>.members.json`` for the node's
    only cluster or its regional one, ``<db>.global.members.json`` for the global cluster of region mode."""
    if scope == "global":
        return db_path.with_name(db_path.name + ".global.members.json")
    return db_path.with_name(db_path.name + ".members.json")


def load_peers(path: Path) -> SavedPeers | None:
    """The saved members, or None when there is no usable file (logged)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the members file %s: %s; starting from the bootstrap list", path, e)
        return None
    if len(data) > _MAX_FILE:
        log.warning("the members file %s is too large; ignored", path)
        return None
    try:
        return _decoder.decode(data)
    except (msgspec.MsgspecError, ValueError) as e:
        log.warning("the members file %s is malformed (%s); ignored", path, e)
        return None


def save_peers(path: Path, saved: SavedPeers) -> None:
    """Write the members file atomically. Raises ``OSError`` on failure (the caller logs it)."""
    body = msgspec.json.encode(saved)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
