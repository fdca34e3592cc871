"""Property tests: replicas doing random writes converge to identical rows and clocks, whatever the
delivery order, chunking, duplication, and whichever replica serves a version."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verdigris.store import Changeset, Statement, Store, split_changeset_groups

SCHEMA = """
CREATE TABLE items (id INTEGER NOT NULL PRIMARY KEY, a, b TEXT, c INTEGER NOT NULL DEFAULT 7);
CREATE TABLE pairs (k1 TEXT NOT NULL, k2 INTEGER NOT NULL, v, PRIMARY KEY (k1, k2));
CREATE INDEX items_b ON items (b);
"""

values = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([0.5, -1.25, 3.0]),
    st.sampled_from(["", "x", "y", "é"]),
    st.sampled_from([b"", b"\x00", b"\xff"]),
)
item_keys = st.integers(min_value=1, max_value=4)
pair_keys = st.tuples(st.sampled_from(["p", "q"]), st.integers(min_value=1, max_value=2))

write_op = st.one_of(
    st.tuples(st.just("insert"), item_keys, values, values),
    st.tuples(st.just("update_a"), item_keys, values, st.none()),
    st.tuples(st.just("update_b"), item_keys, values, st.none()),
    st.tuples(st.just("delete"), item_keys, st.none(), st.none()),
    st.tuples(st.just("upsert_pair"), pair_keys, values, st.none()),
    st.tuples(st.just("delete_pair"), pair_keys, st.none(), st.none()),
    st.tuples(st.just("move"), item_keys, item_keys, st.none()),
)


def statements(op: tuple[object, ...]) -> list[Statement]:
    kind, key, x, y = op
    if kind == "insert":
        return [Statement("INSERT OR REPLACE INTO items (id, a, b) VALUES (?, ?, ?)", [key, x, y])]
    if kind == "update_a":
        return [Statement("UPDATE items SET a = ? WHERE id = ?", [x, key])]
    if kind == "update_b":
        return [Statement("UPDATE items SET b = ?, c = c + 1 WHERE id = ?", [x, key])]
    if kind == "delete":
        return [Statement("DELETE FROM items WHERE id = ?", [key])]
    if kind == "upsert_pair":
        assert isinstance(key, tuple)
        return [
            Statement(
                "INSERT INTO pairs (k1, k2, v) VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET v = excluded.v",
                [key[0], key[1], x],
            )
        ]
    if kind == "delete_pair":
        assert isinstance(key, tuple)
        return [Statement("DELETE FROM pairs WHERE k1 = ? AND k2 = ?", [key[0], key[1]])]
    # A primary-key change: recorded as a delete of the old key and an insert of the new one.
    return [Statement("UPDATE OR IGNORE items SET id = ? WHERE id = ?", [x, key])]


step = st.one_of(
    st.tuples(
        st.just("write"), st.integers(min_value=0, max_value=4), st.lists(write_op, min_size=1, max_size=3)
    ),
    st.tuples(st.just("sync"), st.integers(min_value=0, max_value=4), st.integers(min_value=0, max_value=4)),
)


def pieces(cs: Changeset, rng: random.Random) -> list[Changeset]:
    """Split a changeset at random points (including not at all)."""
    if len(cs.changes) < 2 or rng.random() < 0.4:
        return [cs]
    cuts = sorted(rng.sample(range(1, len(cs.changes)), rng.randint(1, len(cs.changes) - 1)))
    groups = [cs.changes[i:j] for i, j in zip([0, *cuts], [*cuts, len(cs.changes)], strict=True)]
    return split_changeset_groups(cs, groups)


def deliver(source: Store, target: Store, rng: random.Random, *, partial: bool) -> None:
    """Send what ``source`` knows and ``target`` lacks, chunked, shuffled, with duplicates; when
    ``partial``, only a random part of it (leaving versions half-received)."""
    batch: list[Changeset] = []
    for actor, books in source.books().items():
        if actor == target.site_id:
            continue
        for start, end in books.known:
            for cs in source.changesets_for(actor, start, end):
                if target.knows(actor, cs.version):
                    continue
                for piece in pieces(cs, rng):
                    if partial and rng.random() < 0.3:
                        continue
                    batch.append(piece)
                    if rng.random() < 0.2:
                        batch.append(piece)
    rng.shuffle(batch)
    while batch:
        n = rng.randint(1, max(1, len(batch)))
        result = target.merge(batch[:n])
        assert not result.rejected, result.rejected
        batch = batch[n:]


def state(store: Store) -> tuple[object, ...]:
    return (
        store.rows("items"),
        store.rows("pairs"),
        store.clock_rows("items"),
        store.clock_rows("pairs"),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_replicas=st.integers(min_value=3, max_value=5),
    steps=st.lists(step, min_size=1, max_size=25),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_replicas_converge(
    tmp_path_factory: object, n_replicas: int, steps: list[tuple[object, ...]], seed: int
) -> None:
    rng = random.Random(seed)
    base: Path = tmp_path_factory.mktemp("conv")  # type: ignore[attr-defined]
    stores = [Store(base / f"r{i}.db", schema_sql=SCHEMA) for i in range(n_replicas)]
    try:
        for s in steps:
            if s[0] == "write":
                _, who, ops = s
                store = stores[int(who) % n_replicas]  # type: ignore[call-overload]
                stmts = [stmt for op in ops for stmt in statements(op)]  # type: ignore[attr-defined]
                store.transact(stmts)
            else:
                _, src, dst = s
                a, b = stores[int(src) % n_replicas], stores[int(dst) % n_replicas]  # type: ignore[call-overload]
                if a is not b:
                    deliver(a, b, rng, partial=True)
        # Full anti-entropy: every replica gets every version, served by a random replica that knows it.
        for _ in range(2):
            for target in stores:
                sources = [s for s in stores if s is not target]
                rng.shuffle(sources)
                for source in sources:
                    deliver(source, target, rng, partial=False)
        reference = state(stores[0])
        for other in stores[1:]:
            assert state(other) == reference
        for store in stores:
            assert store.needs() == {}
            assert all(not b.partials for b in store.books().values())
            heads = {actor: store.books()[actor].known.max for actor in store.books()}
            assert heads == {s.site_id: s.db_version for s in stores if s.db_version}
    finally:
        for s in stores:
            s.close()


def test_merge_is_idempotent_and_commutative(tmp_path: Path) -> None:
    a = Store(tmp_path / "a.db", schema_sql=SCHEMA)
    b = Store(tmp_path / "b.db", schema_sql=SCHEMA)
    a.transact([Statement("INSERT INTO items (id, a, b) VALUES (1, 'a1', 'x')")])
    b.transact([Statement("INSERT INTO items (id, a, b) VALUES (1, 'b1', 'y')")])
    a.transact([Statement("DELETE FROM items WHERE id = 1")])
    a.transact([Statement("INSERT INTO items (id, a) VALUES (1, 'again')")])
    b.transact([Statement("UPDATE items SET a = 'b2' WHERE id = 1")])
    sets = a.changesets_for(a.site_id, 1, 10) + b.changesets_for(b.site_id, 1, 10)
    results = []
    for i, order in enumerate([sets, list(reversed(sets)), sets[1::2] + sets[::2] + sets]):
        c = Store(tmp_path / f"c{i}.db", schema_sql=SCHEMA)
        c.merge(order)
        c.merge(order)  # idempotent: a second delivery changes nothing
        results.append(state(c))
        c.close()
    assert results[0] == results[1] == results[2]
    # The row was deleted and re-inserted by `a` (causal length 3) after b's concurrent writes at
    # length 1, so a's resurrection wins and b's older-life update is discarded.
    assert results[0][0] == [(1, "again", None, 7)]
