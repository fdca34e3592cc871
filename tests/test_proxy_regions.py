"""Forwarding across regions, end to end (docs/proxy.md, "Forwarding across regions").

Three regions ``a``, ``b``, ``c``, each with ONE agent in region mode (``[gossip]`` per region,
``[gossip.global]`` for all; the config comes from ``test_regions.RegionNode``) and one proxy
(``workers = 1``, a shared ``peer_token``) that registers itself in the global ``proxies`` table. Two
aiohttp upstreams (``_proxy_env.Upstreams``) are instances: ``B`` in region b, ``C`` in region c; region a
has none. Global rows (apps, hostnames, app_regions, region_rtt) are written on agent a, each region's
machines on its own agent. One environment for the module (startup dominates); the test that stops
proxy b runs last. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import verdigris.config
from _api_util import wait_until
from _proxy_env import VERDIGRIS, Proxy, Upstreams
from test_cluster import free_port, new_key
from test_regions import GLOBAL_CLUSTER_ID, REGIONAL_CLUSTER_IDS, RegionNode

WAIT = 20.0
TOKEN = "s3cret-peer-token"
APPS = [("web", "o"), ("bonly", "o")]


def until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    return wait_until(what, check, timeout)


class RegionAgent:
    def __init__(
        self, root: Path, region: str, key: str, global_bootstrap: list[str], node: RegionNode
    ) -> None:
        self.node = node
        self.region = region
        config = node.write_config()
        if hasattr(verdigris.config, "PresenceConfig"):
            # the rtt rows and app_regions are written by hand here: no publisher to race with
            config.write_text(config.read_text() + "[presence]\nenabled = false\n")
        self.log = open(root / f"agent-{region}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [VERDIGRIS, "agent", "-c", str(node.config_path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{node.api_port}"

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"agent {self.region} exited"
        try:
            with urllib.request.urlopen(self.url + "/v1/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def exec(self, *statements: tuple[str, list[Any]]) -> None:
        body = json.dumps([[sql, params] for sql, params in statements]).encode()
        req = urllib.request.Request(
            self.url + "/v1/transactions", body, {"content-type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            assert resp.status == 200

    def query(self, sql: str) -> list[list[Any]]:
        req = urllib.request.Request(
            self.url + "/v1/queries", json.dumps(sql).encode(), {"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            lines = r.read().decode().splitlines()
        return [json.loads(x)["row"][1] for x in lines if '"row"' in x]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


REGION_TIMEOUTS = "connect = 1.0\nresponse = 5.0\nqueue = 0.4\ndrain = 2.0\n"


class RegionProxy(Proxy):
    """``verdigris proxy`` of one region (one worker, ``id = "proxy-<region>"``, metrics on); ``extra``:
    more ``[proxy]`` lines (default: this module's peer token)."""

    def __init__(
        self, tmp: Path, agent_url: str, region: str, extra: str = f'peer_token = "{TOKEN}"\n'
    ) -> None:
        self.region = region
        self.metrics_port = free_port()
        super().__init__(
            tmp,
            agent_url,
            workers=1,
            name=f"proxy-{region}",
            region=region,
            extra=f'id = "proxy-{region}"\n{extra}metrics_listen = "127.0.0.1:{self.metrics_port}"\n',
            timeouts=REGION_TIMEOUTS,
        )

    def event(self, name: str) -> float:
        """A worker counter, from /metrics (``events_total{event=...}``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=WAIT) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("verdigris_proxy_events_total{") and f'event="{name}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def call(
        self, host: str, path: str = "/", headers: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            c.request("GET", path, headers={"Host": host, **(headers or {})})
            r = c.getresponse()
            return r.status, r.headers, r.read()
        finally:
            c.close()


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.agents: dict[str, RegionAgent] = {}
        self.proxies: dict[str, RegionProxy] = {}
        self.upstreams = Upstreams(["B", "C"])
        key = new_key()
        admin_root = Path(tempfile.mkdtemp(prefix="vdp"))
        nodes = {
            r: RegionNode(
                name=r,
                root=tmp / r,
                admin_dir=admin_root,
                api_port=free_port(),
                gossip_port=free_port(),
                global_port=free_port(),
                http=None,  # type: ignore[arg-type]  # not used: only write_config
                key=key,
                region=r,
                cluster_id=REGIONAL_CLUSTER_IDS[r],
            )
            for r in ("a", "b", "c")
        }
        for r, n in nodes.items():
            n.admin_dir = admin_root / r
            n.admin_dir.mkdir()
            n.global_bootstrap = [nodes["a"].global_addr] if r != "a" else [nodes["b"].global_addr]
        assert GLOBAL_CLUSTER_ID
        for r, n in nodes.items():
            self.agents[r] = RegionAgent(tmp, r, key, n.global_bootstrap, n)
        for a in self.agents.values():
            until(f"agent {a.region} healthy", a.healthy)
        p = self.upstreams.ports
        a, b, c = self.agents["a"], self.agents["b"], self.agents["c"]
        statements: list[tuple[str, list[Any]]] = []
        for name, org in APPS:
            statements.append(("INSERT INTO apps (name, org) VALUES (?, ?)", [name, org]))
            statements.append(("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", [f"{name}.test", name]))
        statements += [
            ("INSERT INTO app_regions (app, region) VALUES (?, ?)", ["web", "b"]),
            ("INSERT INTO app_regions (app, region) VALUES (?, ?)", ["web", "c"]),
            ("INSERT INTO app_regions (app, region) VALUES (?, ?)", ["bonly", "b"]),
        ]
        a.exec(*statements)
        self.set_rtt(b=50.0, c=10.0)
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, ?, 'started', ?)"
        b.exec(
            (machine, ["b1", "bonly", "b", f"127.0.0.1:{p['B']}"]),
            (machine, ["b2", "web", "b", f"127.0.0.1:{p['B']}"]),
        )
        c.exec((machine, ["c1", "web", "c", f"127.0.0.1:{p['C']}"]))
        for r, agent in self.agents.items():
            self.proxies[r] = RegionProxy(tmp, agent.url, r)
        # every agent has every proxy row and rtt row; proxy a routes bonly through b
        for agent in self.agents.values():
            until(
                f"global rows at {agent.region}",
                lambda agent=agent: (
                    len(agent.query("SELECT id FROM proxies")) == 3
                    and len(agent.query("SELECT src FROM region_rtt")) == 2
                    and len(agent.query("SELECT app FROM app_regions")) == 3
                ),
            )
        until("proxy a forwards bonly", lambda: self.proxies["a"].call("bonly.test")[0] == 200)
        until("proxy a forwards web", lambda: self.proxies["a"].call("web.test")[0] == 200)

    def set_rtt(self, **rtt: float) -> None:
        self.agents["a"].exec(
            *[
                (
                    "INSERT INTO region_rtt (src, dst, rtt_ms) VALUES ('a', ?, ?) "
                    "ON CONFLICT (src, dst) DO UPDATE SET rtt_ms = excluded.rtt_ms",
                    [dst, ms],
                )
                for dst, ms in rtt.items()
            ]
        )

    def close(self) -> None:
        for p in self.proxies.values():
            p.stop()
        for a in self.agents.values():
            a.stop()
        self.upstreams.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("regions"))
    try:
        yield w
    finally:
        w.close()


def echo(resp: tuple[int, Any, bytes]) -> dict[str, Any]:
    status, _, body = resp
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def test_forwarded_to_the_only_region_with_the_app(world: World) -> None:
    status, headers, body = world.proxies["a"].call("bonly.test", "/x?y=1")
    doc = echo((status, headers, body))
    assert doc["server"] == "B" and doc["path"] == "/x?y=1"
    h = doc["headers"]
    assert h["fly-forwarded-hops"] == "1"  # set by proxy b for its instance, never taken from a client
    assert h["fly-region"] == "b"
    assert h["host"] == "bonly.test"
    assert h["x-forwarded-for"] == "127.0.0.1" and h["fly-client-ip"] == "127.0.0.1"
    assert h["via"].count("verdigris") == 2
    assert "verdigris-peer-token" not in h
    # what the client sees: no internal header, one request id (the same on both proxies)
    assert headers["fly-request-id"] == h["fly-request-id"]
    assert not [k for k in headers if k.lower().startswith("verdigris-")]


def test_nearest_region_follows_region_rtt(world: World) -> None:
    assert echo(world.proxies["a"].call("web.test"))["server"] == "C"  # c: 10 ms, b: 50 ms
    world.set_rtt(b=5.0, c=80.0)
    until("b nearest", lambda: echo(world.proxies["a"].call("web.test"))["server"] == "B")
    for _ in range(5):
        assert echo(world.proxies["a"].call("web.test"))["server"] == "B"
    world.set_rtt(b=50.0, c=10.0)
    until("c nearest again", lambda: echo(world.proxies["a"].call("web.test"))["server"] == "C")


def test_replay_to_an_instance_of_another_region(world: World) -> None:
    # b is nearer, so proxy a first asks b for c1 (404 there: "not here"), then c
    world.set_rtt(b=5.0, c=80.0)
    until("b nearest", lambda: echo(world.proxies["a"].call("web.test"))["server"] == "B")
    misses = world.proxies["a"].event("forward_search_miss")
    doc = echo(
        world.proxies["a"].call("web.test", "/r?replay_from=B&replay_to=c1", {"fly-prefer-region": "b"})
    )
    assert doc["server"] == "C"
    src = dict(kv.split("=", 1) for kv in doc["headers"]["fly-replay-src"].split(";"))
    assert src["instance"] == "b2" and src["region"] == "b" and src["state"] == "abc"
    assert doc["headers"]["fly-forwarded-hops"] == "1"
    assert world.proxies["a"].event("forward_search_miss") == misses + 1  # b said "not here"
    # forcing an instance in another region: found without any global per-instance state
    assert echo(world.proxies["a"].call("web.test", "/", {"fly-force-instance-id": "c1"}))["server"] == "C"
    assert echo(world.proxies["b"].call("web.test", "/", {"fly-force-instance-id": "c1"}))["server"] == "C"
    world.set_rtt(b=50.0, c=10.0)


def test_prefer_unknown_instance_falls_back_force_is_404(world: World) -> None:
    doc = echo(world.proxies["a"].call("web.test", "/", {"fly-prefer-instance-id": "nosuch"}))
    assert doc["server"] in ("B", "C")
    status, headers, body = world.proxies["a"].call("web.test", "/", {"fly-force-instance-id": "nosuch"})
    assert status == 404 and headers["fly-error-code"] == "no_such_instance", body
    # a replay prefer_instance= to an unknown id from b's instance falls back to web's usual routing
    status, _, body = world.proxies["b"].call("web.test", "/r?replay_from=B&replay_to=nosuch")
    assert status == 404 and b"no_such_instance" in body  # instance= (forced) unknown everywhere


def test_forged_hop_header_is_stripped(world: World) -> None:
    forged = {"fly-forwarded-hops": "1", "verdigris-peer-token": "wrong", "fly-client-ip": "6.6.6.6"}
    # to proxy b (a local instance): routed normally, the forged headers never reach the instance
    doc = echo(world.proxies["b"].call("bonly.test", "/", forged))
    assert "fly-forwarded-hops" not in doc["headers"] and "verdigris-peer-token" not in doc["headers"]
    assert doc["headers"]["fly-client-ip"] == "127.0.0.1"
    # to proxy a: a trusted hop header would forbid forwarding; a forged one does not
    doc = echo(world.proxies["a"].call("bonly.test", "/", forged))
    assert doc["server"] == "B" and doc["headers"]["fly-client-ip"] == "127.0.0.1"


def test_a_forwarded_request_is_never_forwarded_again(world: World) -> None:
    peer = {"fly-forwarded-hops": "1", "verdigris-peer-token": TOKEN}
    status, headers, body = world.proxies["a"].call("bonly.test", "/", peer)
    assert status == 503 and headers["fly-error-code"] == "no_healthy_instance", body
    status, headers, body = world.proxies["a"].call("bonly.test", "/", {**peer, "fly-forwarded-hops": "2"})
    assert status == 508 and headers["fly-error-code"] == "forward_loop", body
    # a peer's request for a local instance is served, its client headers kept
    doc = echo(world.proxies["b"].call("bonly.test", "/", {**peer, "fly-client-ip": "10.1.2.3"}))
    assert doc["headers"]["fly-client-ip"] == "10.1.2.3"


def test_remote_proxy_down(world: World) -> None:
    a = world.agents["a"]
    dead = free_port()
    a.exec(("INSERT INTO proxies (id, region, address) VALUES ('b-dead', 'b', ?)", [f"127.0.0.1:{dead}"]))
    until("dead row at a", lambda: len(a.query("SELECT id FROM proxies WHERE region = 'b'")) == 2)
    time.sleep(0.3)  # the proxy's subscription
    for _ in range(8):  # the dead one is tried first about half the time: the next one answers
        assert echo(world.proxies["a"].call("bonly.test"))["server"] == "B"
    assert world.proxies["b"].stop() == 0  # deregisters on a clean stop
    until("proxy-b gone", lambda: a.query("SELECT id FROM proxies WHERE region = 'b'") == [["b-dead"]])
    _, headers, body = until("502", lambda: (r := world.proxies["a"].call("bonly.test"))[0] == 502 and r)
    assert headers["fly-error-code"] == "upstream_refused", body
    a.exec(("DELETE FROM proxies WHERE id = 'b-dead'", []))
    _, headers, body = until("503", lambda: (r := world.proxies["a"].call("bonly.test"))[0] == 503 and r)
    assert (
        headers["fly-error-code"] == "no_healthy_instance" and b"no proxy is registered in region b" in body
    )


# ------------------------------------------------------------------------------------------------ units


def test_config_keys_and_defaults() -> None:
    from verdigris.proxy.config import ProxyConfigError, parse_proxy_config

    cfg = parse_proxy_config({"proxy": {"listen": "127.0.0.1:8001", "region": "ams"}})
    assert cfg.peer_token is None and cfg.proxy_id() == "ams-127.0.0.1-8001"
    assert str(cfg.peer_address()) == "127.0.0.1:8001"
    assert cfg.headers.forwarded_hops == "fly-forwarded-hops"
    cfg = parse_proxy_config(
        {
            "proxy": {
                "listen": "0.0.0.0:8001",
                "id": "edge-1",
                "external_addr": "10.0.0.5:8001",
                "peer_token": "t",
                "headers": {"forwarded_hops": "X-Hops", "peer_token": "x-peer"},
            }
        }
    )
    assert (cfg.proxy_id(), str(cfg.peer_address()), cfg.peer_token) == ("edge-1", "10.0.0.5:8001", "t")
    assert (cfg.headers.forwarded_hops, cfg.headers.peer_token) == ("x-hops", "x-peer")
    with pytest.raises(ProxyConfigError, match="external_addr"):
        parse_proxy_config({"proxy": {"external_addr": "0.0.0.0:80"}})


def test_table_proxies_and_live_distances() -> None:
    from verdigris.api.wire import Change
    from verdigris.proxy.balance import Balancer
    from verdigris.proxy.table import RoutingTable

    t = RoutingTable()
    problems = t.load("proxies", [("p1", "b", "10.0.0.1:8000"), ("p2", "b", "nope"), ("", "c", "1.2.3.4:1")])
    assert [p.kind for p in problems] == ["bad_row", "bad_row"]
    assert [p.id for p in t.proxies("b")] == ["p1"]
    t.load("region_rtt", [("a", "b", 30), ("c", "a", 7.5), ("a", "x", "slow"), ("a", "y", -1)])
    d = t.distances("a")
    assert dict(d) == {"b": 30.0, "c": 7.5}  # (c, a) counts for a -> c
    import random

    bal = Balancer(t, "a", rng=random.Random(1), distances=d)
    assert bal.distances.get("c") == 7.5
    assert t.feed("region_rtt", Change("update", 1, ["a", "b", 3], 1)) is None
    assert bal.distances.get("b") == 3.0  # live
    assert t.feed("proxies", Change("delete", 1, ["p1", "b", "10.0.0.1:8000"], 1)) is None
    assert list(t.proxies("b")) == []
    # the optional subscriptions do not hold readiness back
    for name in ("apps", "hostnames", "app_regions", "machines", "services", "checks"):
        t.load(name, [])
    assert t.ready
