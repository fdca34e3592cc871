"""The simulator with broadcast and sync on every node: convergence after faults within a derived bound,
determinism, static vs SWIM membership, and 10,000 nodes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from verdigris.gossip.broadcast import Broadcaster, new_to, retransmit_limit
from verdigris.gossip.versions import VersionSource
from verdigris.sim import Changes, Network, Simulator, StaticMembership
from verdigris.sim.bounds import convergence_bound, pull_rounds
from verdigris.sim.models import full_fraction, round_model_time_to, serf_time_to
from verdigris.sim.views import Peer, PeerView, Without

ROOT = Path(__file__).resolve().parent.parent

FAULTS_END = 120.0
PARTITION_AT = 40.0


def faulty_run(
    seed: int, *, n: int, static: bool, changes: Changes | None = None
) -> tuple[Simulator, list[str]]:
    """Random faults until FAULTS_END: 10 % loss, writes at random running nodes, six crashes (each
    restarted 5-60 s later, or when the faults stop), and a partition into halves from PARTITION_AT on.
    At FAULTS_END the loss stops, the partition heals and every crashed node restarts; no more writes."""
    sim = Simulator(
        seed,
        network=Network(loss=0.1),
        membership=StaticMembership() if static else None,
        changes=changes if changes is not None else Changes(),
    )
    ids = sim.add_nodes(n)
    sim.bootstrap()
    rng = random.Random(seed)
    seeds = [ids[0], ids[n - 1]]  # one on each side of the partition

    def write(nid: str, last_seq: int) -> None:
        if sim.is_running(nid):
            sim.write(nid, last_seq)

    for _ in range(150):
        nid = rng.choice(ids)
        sim.at(rng.uniform(0.0, FAULTS_END), partial(write, nid, rng.choice([0, 0, 3, 40])))

    def crash(nid: str) -> None:
        if sim.is_running(nid):
            sim.crash(nid)

    def restart(nid: str) -> None:
        if not sim.is_up(nid):
            sim.restart(nid, [s for s in seeds if s != nid])

    for _ in range(6):
        nid = rng.choice(ids[1:-1])
        at = rng.uniform(5.0, FAULTS_END - 5.0)
        sim.at(at, partial(crash, nid))
        back = at + rng.uniform(5.0, 60.0)
        if back < FAULTS_END:
            sim.at(back, partial(restart, nid))
    sim.at(PARTITION_AT, lambda: sim.partition(ids[: n // 2]))

    def stop() -> None:
        sim.set_network(Network(loss=0.0))
        sim.heal()
        for nid in ids:
            restart(nid)

    sim.at(FAULTS_END, stop)
    sim.run_until(FAULTS_END)
    return sim, ids


def converge(sim: Simulator, ids: list[str], limit: float, step: float = 0.5) -> float | None:
    """Run until every node is running and converged; return the time taken (None past ``limit``)."""
    start = sim.now
    while sim.now - start <= limit:
        if all(sim.is_running(x) for x in ids) and sim.converged():
            return sim.now - start
        sim.run_for(step)
    return None


# The runtime's policies (urgent sync with a member that comes up, reconnecting to members held dead)
# usually heal within a second; "cores only" leaves the repair to the cores' own periods, which is what
# the bound counts on.
CORES_ONLY = Changes(urgent_sync=False, reconnect_interval=None)


@pytest.mark.parametrize(
    ("static", "n", "seed", "changes"),
    [(False, 40, 1, None), (False, 40, 2, CORES_ONLY), (True, 60, 3, None)],
    ids=["swim", "swim-cores-only", "static"],
)
def test_every_node_converges_within_the_derived_bound_after_faults(
    static: bool, n: int, seed: int, changes: Changes | None
) -> None:
    sim, ids = faulty_run(seed, n=n, static=static, changes=changes)
    # The faults were real: datagrams were lost, cut and sent to crashed nodes; syncs failed.
    assert sim.stats.lost > 0 and sim.stats.partitioned > 0 and sim.stats.to_down_node > 0
    assert sim.stats.sync_failed > 0
    assert not sim.converged(), "nothing to repair: the scenario is too easy"
    assert sim.changes is not None
    bound = convergence_bound(n, sim.changes, sim.timing, swim=not static)
    took = converge(sim, ids, bound.total)
    print(f"{'static' if static else 'SWIM'} n={n}: converged {took} s after the faults; bound {bound}")
    assert took is not None, f"not converged within the bound {bound.total:.0f} s"
    # ... and it stays so: every node holds all the versions written, and nothing is lacking.
    sim.run_for(30.0)
    assert sim.converged()
    written = sim.stats.local_versions
    assert sum(e - s + 1 for r in sim.books_of(ids[0]).values() for s, e in r) == written
    assert sim.stats.sync_versions > 0 and sim.stats.broadcast_versions > 0


def test_convergence_bound_terms() -> None:
    ch = Changes()
    swim = convergence_bound(40, ch)
    static = convergence_bound(40, ch, swim=False)
    # hi = 6 · 4 · log10(40) · 1 s; push/pull at 40 members: 60 s; retransmit limit 8 rounds of 0.2 s
    assert swim.membership == pytest.approx(6 * 4 * 1.6020599913 + 2 * 1.25 * 60 + 8 * 0.2)
    assert static.membership == 0.0
    assert swim.sessions == static.sessions == 15.0  # the client's idle timeout
    assert swim.sync == swim.rounds * 15.0
    # more nodes or a smaller failure probability need more rounds
    assert pull_rounds(10, 1e-6) <= pull_rounds(100, 1e-6) <= pull_rounds(100, 1e-9)
    assert pull_rounds(2, 0.5) == 1 and pull_rounds(1, 0.5) == 0


def small_run(seed: int, static: bool) -> Simulator:
    sim = Simulator(
        seed,
        network=Network(loss=0.05, latency_jitter=0.003),
        membership=StaticMembership(detect_after=10.0) if static else None,
        changes=Changes(),
    )
    ids = sim.add_nodes(12)
    sim.bootstrap()

    def write(nid: str) -> None:
        if sim.is_running(nid):
            sim.write(nid)

    for i in range(30):
        sim.at(0.7 * i, partial(write, ids[i % 12]))
    sim.at(3.0, lambda: sim.crash(ids[4]))
    sim.at(5.0, lambda: sim.partition(ids[:6]))
    sim.at(15.0, sim.heal)
    sim.at(18.0, lambda: sim.restart(ids[4], [ids[0]]))
    sim.run_until(40.0)
    return sim


@pytest.mark.parametrize("static", [False, True])
def test_same_seed_same_run(static: bool) -> None:
    a, b, c = small_run(5, static), small_run(5, static), small_run(6, static)
    assert a.trace_digest() == b.trace_digest()
    assert a.stats == b.stats
    assert a.trace_digest() != c.trace_digest()
    assert a.stats.sync_sessions > 0 and a.stats.broadcast_datagrams > 0 and a.stats.partitioned > 0


def test_the_digest_does_not_depend_on_string_hashing() -> None:
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_sim_changes import small_run\n"
        "print(small_run(5, False).trace_digest())\n"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    assert digests == {small_run(5, False).trace_digest()}


def reach_times(n: int, seed: int, *, static: bool, loss: float = 0.0, ticker: bool = False) -> list[float]:
    """Seconds from one write until each node had it (broadcast only), sorted."""
    times: list[float] = []
    sim = Simulator(
        seed,
        network=Network(loss=loss),
        membership=StaticMembership() if static else None,
        changes=Changes(sync_rounds=False, urgent_sync=False, ticker=ticker),
        on_version=lambda t, _n, _a, v, _via: times.append(t),
    )
    ids = sim.add_nodes(n)
    sim.bootstrap()
    sim.run_until(2.0)
    times.clear()
    start = sim.now
    sim.write(ids[0])
    sim.run_for(10.0)
    return sorted(t - start for t in times)


def test_static_membership_disseminates_like_swim() -> None:
    """With membership settled, the shared static view gives the same propagation as per-node SWIM views."""
    n = 200
    for ticker in (False, True):
        swim = [reach_times(n, s, static=False, ticker=ticker) for s in range(4)]
        static = [reach_times(n, s, static=True, ticker=ticker) for s in range(4)]
        assert all(len(r) == n for r in swim + static)
        for q in (0.5, 0.99):
            k = int(q * n) - 1
            a = sorted(r[k] for r in swim)
            b = sorted(r[k] for r in static)
            med_a, med_b = (a[1] + a[2]) / 2, (b[1] + b[2]) / 2
            assert abs(med_a - med_b) <= 0.1 + 0.15 * max(med_a, med_b), (ticker, q, a, b)


def test_ten_thousand_nodes_one_update_reaches_all_within_the_epidemic_model() -> None:
    n, loss = 10_000, 0.1
    started = time.perf_counter()
    times = reach_times(n, 1, static=True, loss=loss, ticker=True)
    wall = time.perf_counter() - started
    assert len(times) == n
    # The ticker-driven broadcaster is at least as fast as Serf's model (which never stops gossiping)
    # and the round model with the same retransmit limit, to every last node.
    limit = retransmit_limit(4, n)
    assert times[-1] <= serf_time_to(full_fraction(n), n, 3, 0.2, loss)
    assert times[-1] <= round_model_time_to(full_fraction(n), n, 3, 0.2, loss, limit) + 0.2
    print(f"10,000 nodes: last node after {times[-1]:.2f} s simulated, {wall:.1f} s wall")


def test_models_reproduce_the_serf_anchors() -> None:
    assert serf_time_to(0.99, 1000, 3, 0.2) == pytest.approx(1.53, abs=0.005)
    assert serf_time_to(0.999, 1000, 3, 0.2) == pytest.approx(1.84, abs=0.005)
    assert serf_time_to(0.99, 1000, 3, 0.2, 0.1) == pytest.approx(1.70, abs=0.005)
    assert serf_time_to(0.999, 1000, 3, 0.2, 0.1) == pytest.approx(2.05, abs=0.005)
    # the round model: more loss or a lower retransmit limit is slower; a limit too low never finishes
    base = round_model_time_to(0.99, 1000, 3, 0.2, 0.0, 16)
    assert base < round_model_time_to(0.99, 1000, 3, 0.2, 0.1, 16)
    assert round_model_time_to(full_fraction(1000), 1000, 3, 0.2, 0.0, 1) == float("inf")


def test_views_sample_like_lists() -> None:
    by_addr = {("h", i): i for i in range(50)}
    view = PeerView(by_addr)
    for i in range(50):
        view.add(Peer(f"n{i}", ("h", i), i))
    for i in (3, 17, 49):
        view.remove(i)
    me = Without(view, 20)
    as_list = [p for p in view if p.index != 20]
    assert list(me) == as_list and len(me) == len(as_list) == 46
    assert [me[i] for i in range(-3, 3)] == as_list[-3:] + as_list[:3]
    assert me[5:9] == as_list[5:9]
    assert random.Random(1).sample(me, 5) == random.Random(1).sample(as_list, 5)
    assert ("h", 20) not in me.addrs and ("h", 21) in me.addrs and ("h", 3) not in me.addrs
    assert len(me.addrs) == 46 and set(me.addrs) == {p.addr for p in as_list}
    assert set(me.addrs) <= {("h", i) for i in range(50)}
    with pytest.raises(IndexError):
        me[46]


def test_broadcaster_ticks_the_same_over_a_view_as_over_a_list() -> None:
    """The O(fanout) tick (no node_id, a view that excludes this node, its address set) sends exactly
    what the plain tick sends over the equivalent list with node_id filtering."""
    n = 30
    by_addr = {("10.0.0.1", i): i for i in range(n)}
    view = PeerView(by_addr)
    for i in range(n):
        view.add(Peer(f"n{i}", ("10.0.0.1", i), i))
    me = 7
    src = VersionSource(bytes([me]) * 16)
    plain = Broadcaster(is_new=new_to(src.books), rng=random.Random(3), node_id=f"n{me}")
    fast = Broadcaster(is_new=new_to(src.books), rng=random.Random(3))
    members = list(view)  # includes this node: plain filters it by node_id
    without = Without(view, me)
    for step in range(40):
        if step % 4 == 0:
            cs = src.commit()
            plain.local_commit(cs, step * 0.2)
            fast.local_commit(cs, step * 0.2)
        if step == 20:
            view.remove(11)  # membership changes under the view
            members = list(view)
        a = plain.tick(step * 0.2, members)
        b = fast.tick(step * 0.2, without, addrs=without.addrs)
        assert a == b
    assert plain.stats == fast.stats and plain.stats.transmissions > 0
