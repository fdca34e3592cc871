"""Value types shared by the store, the API and (later) the gossip wire format."""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

SqlValue: TypeAlias = int | float | str | bytes | None
"""A value SQLite can hold in a column."""

SENTINEL_CID = "-1"
"""Column id of the per-row causal-length record (cr-sqlite's sentinel)."""


class Change(msgspec.Struct, array_like=True, frozen=True):
    """One column-level change, cr-sqlite style.

    ``cid == SENTINEL_CID`` is the row's existence record: its ``col_version`` is the causal length
    (odd alive, even deleted). ``cl`` is the causal length of the row when the change was made.
    ``db_version``/``site_id``/``seq`` name the originating actor's transaction and the change's place in it.
    """

    table: str
    pk: tuple[Any, ...]
    """Primary key values (SqlValue each; typed Any because msgspec cannot decode a str|bytes union)."""
    cid: str
    val: Any
    """The column's value (a SqlValue; None for the sentinel)."""
    col_version: int
    db_version: int
    site_id: bytes
    cl: int
    seq: int


class Changeset(msgspec.Struct, array_like=True, frozen=True):
    """Part or all of one version (= one committed transaction) of one actor.

    ``seqs`` is the inclusive seq range this piece covers and ``last_seq`` the last seq of the whole
    version. A version is complete once the received ranges cover ``0..last_seq``. Seqs inside the
    range with no change are changes that were superseded at the sender; nothing is missing.
    A version with no current changes at all ("cleared") is sent as ``changes=[]``, ``seqs=(0, last_seq)``.
    """

    actor: bytes
    version: int
    changes: list[Change]
    seqs: tuple[int, int]
    last_seq: int
    ts: int = 0


class Statement(msgspec.Struct, frozen=True):
    """One SQL statement with positional or named parameters (never both)."""

    sql: str
    params: list[Any] | None = None
    named_params: dict[str, Any] | None = None


class StatementResult(msgspec.Struct, frozen=True):
    rows_affected: int
    time: float


class TransactionResult(msgspec.Struct, frozen=True):
    results: list[StatementResult]
    time: float
    version: int | None
    """The new version of this node's regional actor (its site id) if the transaction wrote a regional
    table, else of its global actor; None when the transaction changed nothing."""
    versions: dict[str, int] = msgspec.field(default_factory=dict)
    """Scope -> the new version of this node's actor of that scope, for each scope the transaction wrote."""


class StoreError(Exception):
    """Base class of the store's errors; the message is meant for the user."""


class SchemaError(StoreError):
    """A schema file or statement was refused. The message names the file and statement."""


class StatementError(StoreError):
    """A statement of a transaction failed; the whole transaction was rolled back."""

    def __init__(self, index: int, sql: str, message: str) -> None:
        super().__init__(f"statement {index}: {message}")
        self.index = index
        self.sql = sql
        self.message = message


class MergeError(StoreError):
    """A remote change could not be applied (unknown table or column, wrong primary key arity)."""
