"""The replicated SQLite store."""

from verdigris.store.schema import SCOPES
from verdigris.store.store import (
    ActorBooks,
    CommitNotice,
    MergeResult,
    Store,
    clock_table,
    split_changeset,
    split_changeset_groups,
    value_key,
)
from verdigris.store.types import (
    SENTINEL_CID,
    Change,
    Changeset,
    MergeError,
    SchemaError,
    SqlValue,
    Statement,
    StatementError,
    StatementResult,
    StoreError,
    TransactionResult,
)

__all__ = [
    "SCOPES",
    "SENTINEL_CID",
    "ActorBooks",
    "Change",
    "Changeset",
    "CommitNotice",
    "MergeError",
    "MergeResult",
    "SchemaError",
    "SqlValue",
    "Statement",
    "StatementError",
    "StatementResult",
    "Store",
    "StoreError",
    "TransactionResult",
    "clock_table",
    "split_changeset",
    "split_changeset_groups",
    "value_key",
]
