"""Convergence bounds derived from protocol parameters, for tests that assert them.

After faults stop (no more loss, partitions healed, crashed nodes restarted, no more writes) every node
must end up holding every version and lacking none. How long that can take is bounded by the repair
paths, each of which makes progress within a period set by the configuration:

1. **Membership settles** (SWIM mode only). A suspicion still running when the faults stop ends within
   the longest suspicion timeout ``hi = suspicion_max_timeout_mult · suspicion_mult · max(1, log10 N) ·
   probe_interval``, refuted or turned into a death. A node held dead (after a long partition, or a
   restart) is healed by the announce to a dead member that every node makes once per push/pull period
   (at most ``1.25 · push_pull_period(N)`` apart, jitter included): at the first, it hears it is held dead
   and renews its incarnation; at the second, its renewed ``Alive`` reaches the other side directly, from
   where gossip carries it to everyone within ``retransmit_limit(N)`` gossip rounds. (The runtime's
   reconnect every ``reconnect_interval`` and the answers to any packet from a member held dead usually
   do this much sooner; the bound does not count on them.)
2. **Sessions started before the faults stopped end** within the client's ``idle_timeout`` (a stream cut by
   a partition goes silent) or ``connect_timeout``; until then their peers are skipped by rounds.
3. **Sync spreads every version** (:func:`pull_rounds`). Once every node sees every other in its view,
   each node runs a sync round at least every ``sync_max_interval`` (the scheduler's longest backoff), and
   in each round every actor's missing versions are asked of one chosen peer (gaps dealt round-robin from
   a random peer, the versions above the head by ``share_of``), which holds them with probability at
   least the fraction of nodes that do: a pull epidemic with one uniformly random contact per round.
   Broadcast only adds arrivals and is not counted.

Then ``bound = [hi + 2 · 1.25 · push_pull_period(N) + retransmit_limit(N) · gossip_interval]
+ max(idle_timeout, connect_timeout) + pull_rounds(N, δ / N) · sync_max_interval``, the first term in SWIM
mode only; δ / N is a union bound over at most N actors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from verdigris.gossip.membership import Timing
from verdigris.sim.simulator import Changes

__all__ = ["ConvergenceBound", "convergence_bound", "pull_rounds"]


def pull_rounds(n: int, delta: float, *, start: int = 1) -> int:
    """Rounds after which a pull epidemic among ``n`` nodes has reached all of them with probability at
    least ``1 − delta``, from ``start`` holders.

    Each round, every node lacking the rumour asks one peer chosen uniformly among the other ``n − 1`` and
    gets it if that peer held it when the round began (so new holders in a round are
    ``Binomial(n − s, s / (n − 1))`` given ``s`` holders). Computed exactly over the distribution of ``s``.
    """
    if n <= 1 or start >= n:
        return 0
    if not 0.0 < delta < 1.0 or start < 1:
        raise ValueError("0 < delta < 1 and start >= 1")
    dist = [0.0] * (n + 1)
    dist[start] = 1.0
    rounds = 0
    while sum(dist[:n]) > delta:
        new = [0.0] * (n + 1)
        new[n] = dist[n]
        for s in range(1, n):
            w = dist[s]
            if w < 1e-300:
                continue
            m = n - s
            p = s / (n - 1)
            if p >= 1.0:
                new[n] += w
                continue
            lp, lq = math.log(p), math.log1p(-p)
            for k in range(m + 1):
                log_pk = (
                    math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * lp + (m - k) * lq
                )
                if log_pk > -745.0:
                    new[s + k] += w * math.exp(log_pk)
        dist = new
        rounds += 1
        if rounds > 10_000:
            raise RuntimeError("pull epidemic does not converge")
    return rounds


@dataclass(frozen=True, slots=True)
class ConvergenceBound:
    """The terms of :func:`convergence_bound`, in seconds (``rounds`` in sync rounds)."""

    membership: float
    sessions: float
    rounds: int
    sync: float

    @property
    def total(self) -> float:
        return self.membership + self.sessions + self.sync


def convergence_bound(
    n: int, changes: Changes, timing: Timing | None = None, *, swim: bool = True, delta: float = 1e-9
) -> ConvergenceBound:
    """How long after the faults stop every node of ``n`` holds every version (see the module docstring);
    ``swim=False`` for static membership, where views do not change."""
    if not changes.sync_rounds:
        raise ValueError("without sync rounds nothing bounds convergence after loss")
    t = timing if timing is not None else Timing()
    membership = 0.0
    if swim:
        _, hi = t.suspicion_bounds(n)
        membership = hi + 2 * 1.25 * t.push_pull_period(n) + t.retransmit_limit(n) * t.gossip_interval
    sessions = max(changes.sync.idle_timeout, changes.connect_timeout)
    rounds = pull_rounds(n, delta / n)
    return ConvergenceBound(membership, sessions, rounds, rounds * changes.sync_max_interval)
