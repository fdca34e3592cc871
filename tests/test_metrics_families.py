"""The metric families added to tell an internal stall from the network's (issue 6) and listed by issue 7.

Agent side, in process with real stores, real gossip runtimes on 127.0.0.1 and a real agent: the apply batch
latency histogram, the apply lag (with the writer thread really blocked), sync needs and gaps read from the
books (a real gap made by merging a later version alone), the subscription lag, and the metrics endpoint
serving them. The proxy's new families are tested end to end in tests/test_proxy_metrics.py. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from _api_util import WAIT, write_config
from test_runtime import QUICK, Node, runtime_nodes, until
from verdigris.agent import Agent
from verdigris.api.metrics import ApiMetrics
from verdigris.config import Addr, load_config
from verdigris.runtime.metrics import BooksReading, Durations, read_books, refresh
from verdigris.store.store import Store
from verdigris.store.subscriptions import SubscriptionManager
from verdigris.store.types import Changeset, Statement

pytestmark = pytest.mark.timeout(60)

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);\n"


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """``name{k="v",...}`` (labels sorted) -> value, from the registry's text exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def write(store: Store, k: str, v: int) -> None:
    store.transact(
        [
            Statement(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", [k, v]
            )
        ]
    )


# ---------------------------------------------------------------------------------------- units


def test_durations_is_a_cumulative_histogram() -> None:
    d = Durations((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        d.observe(seconds)
    assert d.count == 4 and d.sum == pytest.approx(3.065)
    assert d.cumulative() == [("0.01", 2.0), ("0.1", 3.0), ("+Inf", 4.0)]  # bounds are inclusive


def test_books_reading_counts_missing_partial_and_gaps(tmp_path: Path) -> None:
    a = Store(tmp_path / "a.db", schema_sql=SCHEMA)
    b = Store(tmp_path / "b.db", schema_sql=SCHEMA)
    try:
        for i in range(4):
            write(a, f"k{i}", i)
        a.transact(
            [Statement("INSERT INTO kv (k, v) VALUES ('x', 1), ('y', 2)")]
        )  # version 5: several changes
        assert read_books(b.books()) == BooksReading()
        # version 4 alone: 1-3 missing, one hole
        b.merge(a.changesets_for(a.site_id, 4, 4))
        assert read_books(b.books()) == BooksReading(missing=3, partial=0, gaps=1)
        # the first piece of version 5: partial, and the hole 1-3 stays
        (v5,) = a.changesets_for(a.site_id, 5, 5)
        assert v5.last_seq >= 1
        first = Changeset(v5.actor, 5, [c for c in v5.changes if c.seq == 0], (0, 0), v5.last_seq)
        b.merge([first])
        assert read_books(b.books()) == BooksReading(missing=3, partial=1, gaps=2)
        b.merge(a.changesets_for(a.site_id, 1, 5))
        assert read_books(b.books()) == BooksReading()
    finally:
        a.close()
        b.close()


def test_subscription_lag_is_observed_from_commit_to_listeners(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", schema_sql=SCHEMA)
    metrics = ApiMetrics()
    try:
        with SubscriptionManager(store, tmp_path / "subs") as manager:
            manager.lag_observer = metrics.subscription_lag.observe
            sub, _ = manager.subscribe("SELECT k, v FROM kv")
            got = threading.Event()
            sub.add_listener(lambda events: got.set())
            assert samples(metrics.registry)["verdigris_subscription_lag_seconds_count"] == 0
            started = time.monotonic()
            write(store, "a", 1)
            assert got.wait(WAIT)
            assert manager.flush(WAIT)
            took = time.monotonic() - started
            s = samples(metrics.registry)
            assert s["verdigris_subscription_lag_seconds_count"] == 1
            assert 0 <= s["verdigris_subscription_lag_seconds_sum"] <= took
            write(store, "b", 2)  # one observation per subscription and batch with events
            assert manager.flush(WAIT)
            assert samples(metrics.registry)["verdigris_subscription_lag_seconds_count"] == 2
    finally:
        store.close()


# ---------------------------------------------------------------------------------------- gossip runtimes


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Gossip runtimes with their metrics in a registry of their own (no fault injection)."""
    async with runtime_nodes(tmp_path, QUICK) as make:

        async def metered(name: str, bootstrap: tuple[Addr, ...] = ()) -> Node:
            return await make(name, bootstrap, metrics=True, fault_injection=False)

        yield metered


async def scrape(node: Node) -> dict[str, float]:
    assert node.registry is not None
    await refresh(node.registry)
    return samples(node.registry)


async def test_apply_latency_and_apply_lag_move(make_node: Callable[..., Awaitable[Node]]) -> None:
    a = await make_node("a")
    assert a.runtime.addr is not None
    b = await make_node("b", bootstrap=(Addr(*a.runtime.addr),))

    async def joined() -> bool:
        return a.runtime.member_count() == 2 and b.runtime.member_count() == 2

    await until("b to join a", joined)
    s = await scrape(b)
    assert s["verdigris_gossip_apply_lag_seconds"] == 0
    merged_before = s["verdigris_gossip_apply_batch_seconds_count"]
    await a.write("k", 1)

    async def merged() -> bool:
        return (await scrape(b))["verdigris_gossip_apply_batch_seconds_count"] > merged_before

    await until("b to merge a's write", merged)
    s = await scrape(b)
    assert s["verdigris_gossip_apply_batch_seconds_sum"] > 0
    assert (
        s['verdigris_gossip_apply_batch_seconds_bucket{le="+Inf"}']
        == s["verdigris_gossip_apply_batch_seconds_count"]
    )

    # Block b's writer thread for real: what b receives now waits, and the apply lag grows with its age.
    release = threading.Event()
    b.threads.writer.submit(release.wait, WAIT)
    try:
        await a.write("k", 2)

        async def waiting() -> bool:
            return b.runtime.queue_size() > 0 or b.runtime.apply_lag() > 0

        await until("b to receive the write", waiting)
        t0 = time.monotonic()
        await refresh(b.registry, timeout=0.2)  # the books cannot be read now: bounded, previous reading kept
        assert time.monotonic() - t0 < 2.0
        first = samples(b.registry)["verdigris_gossip_apply_lag_seconds"]
        await asyncio.sleep(0.3)  # the lag is an age: it must have grown by about this much
        second = samples(b.registry)["verdigris_gossip_apply_lag_seconds"]
        assert 0 < first < second and second - first >= 0.25
        assert "verdigris_gossip_sync_needs" in " ".join(samples(b.registry))
    finally:
        release.set()

    async def applied() -> bool:
        return (await scrape(b))["verdigris_gossip_apply_lag_seconds"] == 0

    await until("b to apply it", applied)


async def test_sync_needs_and_gaps_are_read_from_the_books(
    make_node: Callable[..., Awaitable[Node]], tmp_path: Path
) -> None:
    node = await make_node("solo")
    s = await scrape(node)
    assert s['verdigris_gossip_sync_needs{kind="missing"}'] == 0
    assert s['verdigris_gossip_sync_needs{kind="partial"}'] == 0
    assert s["verdigris_gossip_gaps"] == 0
    other = Store(tmp_path / "other.db", schema_sql=SCHEMA)
    try:
        for i in range(3):
            write(other, f"o{i}", i)
        # version 3 of another actor, alone: versions 1 and 2 are known to be missing
        await node.threads.write(node.store.merge, other.changesets_for(other.site_id, 3, 3))
    finally:
        other.close()
    s = await scrape(node)
    assert s['verdigris_gossip_sync_needs{kind="missing"}'] == 2
    assert s["verdigris_gossip_gaps"] == 1


async def test_agent_endpoint_serves_the_new_families(tmp_path: Path) -> None:
    agent = Agent(load_config(write_config(tmp_path, prometheus_port=0)))
    await asyncio.wait_for(agent.start(), WAIT)
    try:
        assert agent.metrics_addr is not None
        url = f"http://127.0.0.1:{agent.metrics_addr.port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:

            async def scrape() -> dict[str, Any]:
                async with http.get(url) as r:
                    assert r.status == 200
                    return {
                        s.name: s.value
                        for f in text_string_to_metric_families(await r.text())
                        for s in f.samples
                    }

            assert (await scrape())["verdigris_subscription_lag_seconds_count"] == 0
            async with http.post(f"{agent.api_url}/v1/subscriptions", json="SELECT name FROM apps") as sub:
                assert sub.status == 200
                await asyncio.wait_for(sub.content.readline(), WAIT)  # columns: the subscription exists
                async with http.post(
                    f"{agent.api_url}/v1/transactions", json=[["INSERT INTO apps (name) VALUES ('x')", []]]
                ) as r:
                    assert r.status == 200

                async def observed() -> bool:
                    return bool((await scrape())["verdigris_subscription_lag_seconds_count"] >= 1)

                await until("the subscription lag to be observed", observed)
    finally:
        await asyncio.wait_for(agent.stop(), WAIT)
