"""Restoring a node's database from a backup (``verdigris restore``), with the agent stopped.

A backup (``verdigris backup``, :meth:`Store.backup`) is a plain SQLite copy. Verdigris's clocks name
every change's actor explicitly, so unlike cr-sqlite's (where Corrosion's backup must rewrite clock
tables) the copy is already node-neutral; the only node-specific fact in it is the site id of the node it
was taken on.

**Which site id the restored node has.** Like ``corrosion restore``, the node keeps its own identity:
the restored file gets the site id of the database it replaces (or, when there is none, the backup's).
That alone would be dangerous in one case: when this node has written versions that the backup does not
have (an older backup of this node, or another node's backup), keeping the identity would make the node
issue those version numbers again for different changes, and peers that already have them would ignore
the new ones. :func:`restore_database` refuses that case and explains; ``new_site_id=True`` restores
under a fresh identity instead (the old actor's versions stay, as any other actor's).

The same holds for the node's second actor, the one of its global tables (``__vd_actors``, own = 1,
scope ``global``; docs/store.md, "Scopes"): the restored node keeps the one of the database it replaces,
under the same check, and gets a fresh one (made when the store opens) with ``new_site_id=True`` or when
the database it replaces had none.

The file is replaced atomically (written beside the database, then renamed) after removing the old
``-wal`` and ``-shm`` files, which belong to the old file and must never be applied to the new one. The
subscriptions' state (change ids of the old contents) is removed too; clients resubscribe.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from verdigris.store.schema import INTERNAL_PREFIX

SITE_TABLE = f"{INTERNAL_PREFIX}site"
BOOKS_TABLE = f"{INTERNAL_PREFIX}bookkeeping"
ACTORS_TABLE = f"{INTERNAL_PREFIX}actors"
_OWN_GLOBAL = f"SELECT actor FROM {ACTORS_TABLE} WHERE own = 1 AND scope = 'global'"


class RestoreError(Exception):
    """The restore was refused or failed; nothing was changed. The message is for the user."""


@dataclass(frozen=True)
class RestoreResult:
    site_id: bytes
    """The site id of the restored node."""
    new_identity: bool
    removed: list[Path]
    """Files and directories removed besides the replaced database."""


def _read_identity(path: Path, what: str) -> tuple[bytes, bytes | None, dict[bytes, int]]:
    """The site id stored in a Verdigris database, its global actor (None in a database from before
    scopes), and the highest version known per actor."""
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise RestoreError(f"cannot open {what} {path}: {e}") from None
    try:
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as e:
            raise RestoreError(f"{what} {path} is not a SQLite database: {e}") from None
        if check is None or check[0] != "ok":
            raise RestoreError(
                f"{what} {path} is damaged: quick_check says {check[0] if check else 'nothing'}"
            )
        try:
            row = conn.execute(f"SELECT site_id FROM {SITE_TABLE} WHERE id = 0").fetchone()
            books = conn.execute(f'SELECT actor, MAX("end") FROM {BOOKS_TABLE} GROUP BY actor').fetchall()
        except sqlite3.OperationalError:
            raise RestoreError(f"{what} {path} is not a Verdigris database (no {SITE_TABLE} table)") from None
        if row is None:
            raise RestoreError(f"{what} {path} has no site id")
        try:
            grow = conn.execute(_OWN_GLOBAL).fetchone()
        except sqlite3.OperationalError:
            grow = None
        global_actor = None if grow is None else bytes(grow[0])
        return bytes(row[0]), global_actor, {bytes(a): int(v) for a, v in books}
    finally:
        conn.close()


def _set_global_actor(conn: sqlite3.Connection, actor: bytes | None) -> None:
    """Make ``actor`` the restored node's global actor; None: the store makes a fresh one when it opens.
    The backup's own global actor becomes an actor like any other."""
    try:
        conn.execute(
            f"UPDATE {ACTORS_TABLE} SET own = 0 WHERE own = 1 AND scope = 'global' AND actor IS NOT ?",
            (actor,),
        )
    except sqlite3.OperationalError:
        return  # a backup from before scopes: the store records its actors when it opens
    if actor is not None:
        conn.execute(
            f"INSERT INTO {ACTORS_TABLE} (actor, scope, own) VALUES (?, 'global', 1) "
            "ON CONFLICT (actor) DO UPDATE SET scope = 'global', own = 1",
            (actor,),
        )


def restore_database(
    db_path: Path, backup: Path, *, new_site_id: bool = False, state_dirs: tuple[Path, ...] = ()
) -> RestoreResult:
    """Replace the database at ``db_path`` with ``backup`` (see the module docstring).

    The caller must make sure no agent uses the database. ``state_dirs`` (the subscriptions' state) are
    removed after the replacement.
    """
    if not backup.is_file():
        raise RestoreError(f"no backup file at {backup}")
    if db_path.exists() and backup.resolve() == db_path.resolve():
        raise RestoreError("the backup is the database itself")
    backup_site, backup_global, backup_books = _read_identity(backup, "backup")
    if db_path.exists():
        current_site, current_global, current_books = _read_identity(db_path, "database")
    else:
        current_site, current_global, current_books = backup_site, backup_global, {}

    global_actor: bytes | None = None
    if new_site_id:
        site = os.urandom(16)
    else:
        site = current_site
        global_actor = current_global
        for actor, which in ((site, "site id"), (global_actor, "global actor id")):
            if actor is None:
                continue
            ours = current_books.get(actor, 0)
            theirs = backup_books.get(actor, 0)
            if ours > theirs:
                raise RestoreError(
                    f"this node has written versions the backup lacks (its own version {ours}, the backup "
                    f"has {theirs}); keeping its {which} would reuse version numbers its peers already "
                    "have. Restore with --new-site-id to give the node a fresh identity instead"
                )

    tmp = db_path.with_name(db_path.name + ".restoring")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
        leftover.unlink(missing_ok=True)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = sqlite3.connect(f"file:{backup.resolve()}?mode=ro", uri=True)
        try:
            out = sqlite3.connect(str(tmp), isolation_level=None)
            try:
                src.backup(out)
                out.execute("PRAGMA journal_mode = DELETE")
                out.execute(f"UPDATE {SITE_TABLE} SET site_id = ? WHERE id = 0", (site,))
                _set_global_actor(out, global_actor)
            finally:
                out.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise RestoreError(f"copying {backup} failed: {e}") from None

    removed: list[Path] = []
    # The old WAL belongs to the old file: SQLite would apply it to the new one.
    for suffix in ("-wal", "-shm", "-journal"):
        side = Path(f"{db_path}{suffix}")
        if side.exists():
            side.unlink()
            removed.append(side)
    os.replace(tmp, db_path)
    for state in state_dirs:
        if state.exists():
            shutil.rmtree(state)
            removed.append(state)
    return RestoreResult(site_id=site, new_identity=site != current_site, removed=removed)
