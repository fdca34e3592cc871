"""The dashboard (docs/dashboard.md): ``GET /dashboard`` and ``GET /v1/dashboard`` on the agent, the proxy
supervisor's ``GET /events``, and the page itself in real headless Chromium against ``verdigris demo``.

Three layers, cheapest first:

* units: Prometheus text → figures, rates from successive samples, the supervisor's log lines → events,
  instance health;
* one in-process agent (no cluster) with a bearer token: the page is public, the JSON is not, CORS;
  apps/instances/checks as stored;
* a small real fleet (module fixture): regions ``a`` and ``b``, one agent (region mode) and one proxy
  (one worker, metrics, fault injection) each, two aiohttp upstreams as instances. The JSON of agent ``a``
  shows both regions' nodes alive, its instances with health and load, request and error rates that follow
  traffic sent through its proxy, both scopes' replication state, and a stuck worker's watchdog event.

The browser test starts ``verdigris demo --regions 2 --nodes 1``, loads its dashboard URL in headless
Chromium (selenium + the Debian ``chromium-driver``) and waits, bounded, until the page shows every region
and node alive, the apps with their instances and health, and a request rate that rises, without a reload,
while the test sends requests through a proxy. The screenshot goes to ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from _api_util import free_port, short_dir, wait_until, write_config
from _proxy_env import PLATFORM_SQL, VERDIGRIS, Upstreams, stop_process
from test_cluster import new_key
from test_proxy_regions import RegionProxy
from test_regions import GLOBAL_CLUSTER_ID, REGIONAL_CLUSTER_IDS, RegionNode
from verdigris.admin import admin_call
from verdigris.agent import Agent
from verdigris.config import load_config
from verdigris.dashboard.events import ProxyEventLog, parse_fields
from verdigris.dashboard.scrape import Sample, _History, parse_metrics
from verdigris.dashboard.view import instance_health
from verdigris.dashboard.web import page_html
from verdigris.proxy.config import parse_proxy_config
from verdigris.proxy.registry import metrics_address

REPO = Path(__file__).resolve().parent.parent
ARTIFACT = REPO / "artifacts" / "dashboard.png"
WAIT = 30.0
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "dash-s3cret"
FLEET_TOKEN = "fleet-s3cret"
FLEET_AUTH = {"Authorization": f"Bearer {FLEET_TOKEN}"}


def until(what: str, check: Callable[[], Any], timeout: float = WAIT, interval: float = 0.1) -> Any:
    return wait_until(what, check, timeout, interval, (OSError, KeyError, ValueError))


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------- units

METRICS_TEXT = """\
# HELP verdigris_proxy_requests_total Requests answered, by app, responding region and status class.
# TYPE verdigris_proxy_requests_total counter
verdigris_proxy_requests_total{app="web",region="a",status="2xx"} 90.0
verdigris_proxy_requests_total{app="web",region="b",status="5xx"} 10.0
verdigris_proxy_requests_total{app="solo",region="a",status="2xx"} 3.0
# HELP verdigris_proxy_instance_in_flight In-flight requests per instance (capped).
# TYPE verdigris_proxy_instance_in_flight gauge
verdigris_proxy_instance_in_flight{instance="w1",app="web"} 2.0
# HELP verdigris_proxy_upstream_errors_total Failed exchanges.
# TYPE verdigris_proxy_upstream_errors_total counter
verdigris_proxy_upstream_errors_total{kind="refused"} 4.0
verdigris_proxy_upstream_errors_total{kind="reset"} 1.0
# HELP verdigris_proxy_instance_upstream_errors_total Failed exchanges with instances.
# TYPE verdigris_proxy_instance_upstream_errors_total counter
verdigris_proxy_instance_upstream_errors_total{app="web",instance="w1",kind="refused"} 4.0
# HELP verdigris_proxy_instance_ejected_seconds Ejection time left.
# TYPE verdigris_proxy_instance_ejected_seconds gauge
verdigris_proxy_instance_ejected_seconds{app="web",instance="w1"} 2.5
# HELP verdigris_proxy_worker_up 1 if the worker answered its last probe in time.
# TYPE verdigris_proxy_worker_up gauge
verdigris_proxy_worker_up{worker="0"} 1.0
verdigris_proxy_worker_up{worker="1"} 0.0
"""


def test_parse_metrics_reads_requests_errors_load_and_workers() -> None:
    s = parse_metrics(METRICS_TEXT)
    assert s.requests == {"web": 100.0, "solo": 3.0}
    assert s.errors == {"web": 10.0}
    assert s.in_flight == {("web", "w1"): 2.0}
    assert s.upstream_errors[("web", "w1", "refused")] == 4.0 and s.per_instance_errors
    assert s.ejected == {("web", "w1"): 2.5}
    # a proxy that counts per instance but had no error yet: every instance is known to have none
    empty = parse_metrics(
        "# HELP verdigris_proxy_instance_upstream_errors_total x\n"
        "# TYPE verdigris_proxy_instance_upstream_errors_total counter\n"
    )
    assert empty.per_instance_errors and not empty.upstream_errors
    assert not parse_metrics(
        METRICS_TEXT.split("# HELP verdigris_proxy_instance_upstream")[0]
    ).per_instance_errors
    assert (s.workers, s.workers_up) == (2, 1)
    with pytest.raises(ValueError):
        parse_metrics("this is { not prometheus\n")


def test_rates_come_from_successive_samples_and_survive_a_restart() -> None:
    h = _History(window=5.0, min_interval=0.5)
    assert h.add(0.0, Sample(requests={"web": 100.0}, errors={"web": 0.0})) is None
    assert h.add(0.2, Sample(requests={"web": 110.0})) is None  # too close to say
    assert h.add(2.0, Sample(requests={"web": 140.0}, errors={"web": 4.0})) == {"web": (20.0, 2.0)}
    # past the window the oldest samples go: the rate follows what happened lately
    h.add(6.0, Sample(requests={"web": 140.0}, errors={"web": 4.0}))
    rates = h.add(9.0, Sample(requests={"web": 140.0}, errors={"web": 4.0}))
    assert rates == {"web": (0.0, 0.0)}
    # counters went down (the proxy restarted): start over instead of a negative or huge rate
    assert h.add(10.0, Sample(requests={"web": 5.0})) is None
    assert h.add(11.0, Sample(requests={"web": 15.0})) == {"web": (10.0, 0.0)}
    # a proxy that has not answered any request yet: known to be 0, not unknown
    idle = _History(window=5.0, min_interval=0.5)
    assert idle.add(0.0, Sample()) is None and idle.add(1.0, Sample()) == {}


def test_event_log_turns_supervisor_lines_into_events() -> None:
    log = logging.getLogger("test.dashboard.events")
    log.propagate = False
    events = ProxyEventLog(keep=3)
    log.addHandler(events)
    try:
        log.info("listening on 127.0.0.1:1 with 1 workers")  # not an event
        log.error(
            "watchdog_restart worker=%d pid=%d reason=%s detection=%.3fs since_last_answer=%s "
            "deadline=%gs detected_at=%.3f killed_at=%.3f dump=%s stacks=%s cause=%s main_stack=%s",
            0, 4242, "probe_timeout", 1.002, "1.1", 1.0, 5.0, 5.1, "complete",
            json.dumps("/tmp/x.stacks"), json.dumps("worker.py:stall"), json.dumps("a.py:1 | b.py:2"),
        )  # fmt: skip
        # the watchdog's kill makes it exit: part of the same event
        log.warning("worker_exited worker=0 pid=4242 status=-9 uptime=3.000s streak=1 backoff=0.000s t=5")
        log.warning("worker_exited worker=1 pid=77 status=3 uptime=0.500s streak=2 backoff=0.100s t=6")
    finally:
        log.removeHandler(events)
    got = events.events()
    assert [(e["seq"], e["kind"], e["pid"], e["worker"]) for e in got] == [
        (1, "probe_timeout", 4242, 0),
        (2, "exited", 77, 1),
    ]
    assert got[0]["cause"] == "worker.py:stall" and "a.py:1 | b.py:2" in got[0]["detail"]
    assert got[1]["cause"] == "exit status 3" and got[0]["at"] <= got[1]["at"]
    assert parse_fields('k=v q="a \\"b\\"" n=null') == {"k": "v", "q": 'a "b"', "n": "null"}


def test_proxy_registers_where_its_metrics_are_scraped() -> None:
    def metrics_of(section: dict[str, Any]) -> str | None:
        return metrics_address(parse_proxy_config({"proxy": {"listen": "0.0.0.0:8000", **section}}))

    assert metrics_of({}) is None  # no metrics_listen: nothing to scrape
    assert metrics_of({"metrics_listen": "127.0.0.1:9100"}) == "127.0.0.1:9100"
    # a wildcard is not an address to connect to: the host other proxies use instead
    assert metrics_of({"metrics_listen": "0.0.0.0:9100", "external_addr": "10.0.0.7:80"}) == "10.0.0.7:9100"
    assert metrics_of({"metrics_listen": "[::]:9100", "external_addr": "[fd00::7]:80"}) == "[fd00::7]:9100"


def test_instance_health() -> None:
    passing = {"status": "passing"}
    assert instance_health("started", []) == "passing"
    assert instance_health("started", [passing, passing]) == "passing"
    assert instance_health("started", [passing, {"status": "warning"}]) == "warning"
    assert instance_health("started", [{"status": "warning"}, {"status": "critical"}]) == "critical"
    assert instance_health("started", [{"status": "bogus"}]) == "critical"  # unknown is not healthy
    assert instance_health("stopped", [passing]) == "stopped"


def test_page_is_self_contained() -> None:
    html = page_html().decode()
    assert html.startswith("<!doctype html>") and "</html>" in html
    # nothing fetched from elsewhere: the machine (and many fleets) have no internet
    for needle in ("<script src", 'rel="stylesheet"', "@import", "https://", "http://"):
        assert needle not in html, needle


# ---------------------------------------------------------------------------------------- one agent


@pytest.fixture
async def token_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    agent = Agent(load_config(write_config(tmp_path, token=TOKEN, schema=PLATFORM_SQL)))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@pytest.mark.timeout(60)
async def test_page_is_public_json_needs_the_token_and_allows_cors(token_agent: Agent) -> None:
    base = token_agent.api_url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(base + "/dashboard") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "verdigrisDashboard" in await r.text()
        async with http.get(base + "/v1/dashboard") as r:
            assert r.status == 401
        async with http.get(base + "/v1/dashboard", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        # the browser's preflight for a cross-origin read carries no credentials
        preflight = {"Origin": "http://elsewhere:1", "Access-Control-Request-Headers": "authorization"}
        async with http.options(base + "/v1/dashboard", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
        # the exemption is exactly those routes: the rest of the API still wants the token
        async with http.options(base + "/v1/queries", headers=preflight) as r:
            assert r.status == 401
        async with http.post(base + "/v1/queries", json="SELECT 1") as r:
            assert r.status == 401
        async with http.get(base + "/v1/dashboard?only=apps", headers=auth) as r:
            assert r.status == 400 and "only" in (await r.json())["error"]
        async with http.get(base + "/v1/dashboard?only=replication", headers=auth) as r:
            assert r.status == 200 and set(await r.json()) >= {"self", "replication"}
        async with http.get(base + "/v1/dashboard", headers=auth) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
            doc = await r.json()
    assert doc["schema"] == 1 and doc["region"] is None
    [region] = doc["regions"]
    [node] = region["nodes"]
    assert node["self"] and node["state"] == "alive" and node["api"] == str(token_agent.api_addr)
    assert doc["apps"] == [] and doc["proxies"] == [] and doc["replication"] == {} and doc["events"] == []
    assert doc["peers"] == []


@pytest.mark.timeout(60)
async def test_apps_instances_and_health_as_stored(token_agent: Agent) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    statements = [
        ["INSERT INTO apps (name, soft_limit, hard_limit) VALUES ('web', 5, 8)", []],
        ["INSERT INTO apps (name) VALUES ('idle')", []],
        ["INSERT INTO hostnames (hostname, app) VALUES ('web.test', 'web')", []],
        ["INSERT INTO app_regions (app, region, capacity) VALUES ('web', 'ams', 2)", []],
        *[
            [
                "INSERT INTO machines (id, app, region, state, address, node) VALUES (?, 'web', 'ams', ?, ?, 'n1')",
                [mid, state, f"127.0.0.1:{port}"],
            ]
            for mid, state, port in (("w1", "started", 1001), ("w2", "started", 1002), ("w3", "stopped", 1003))
        ],
        ["INSERT INTO checks (machine, name, app, status) VALUES ('w1', 'http', 'web', 'passing')", []],
        ["INSERT INTO checks (machine, name, app, status, output) VALUES ('w2', 'http', 'web', 'critical', 'HTTP 500')", []],
    ]  # fmt: skip
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(token_agent.api_url + "/v1/transactions", json=statements, headers=auth) as r:
            assert r.status == 200, await r.text()
        async with http.get(token_agent.api_url + "/v1/dashboard", headers=auth) as r:
            doc = await r.json()
    apps = {a["name"]: a for a in doc["apps"]}
    assert set(apps) == {"web", "idle"}
    web = apps["web"]
    assert web["hostnames"] == ["web.test"] and (web["soft_limit"], web["hard_limit"]) == (5, 8)
    assert web["regions"][0]["region"] == "ams" and web["regions"][0]["capacity"] == 2
    health = {i["id"]: (i["state"], i["health"], i["healthy"]) for i in web["instances"]}
    assert health == {
        "w1": ("started", "passing", True),
        "w2": ("started", "critical", False),
        "w3": ("stopped", "stopped", False),
    }
    w2 = next(i for i in web["instances"] if i["id"] == "w2")
    assert w2["checks"][0]["output"] == "HTTP 500" and w2["node"] == "n1"
    assert w2["in_flight"] is None and web["requests_per_s"] is None  # no proxy: load unknown, not 0
    assert apps["idle"]["instances"] == []


@pytest.mark.timeout(60)
async def test_agent_watchdog_stall_is_an_event(tmp_path: Path) -> None:
    config = write_config(tmp_path, schema=PLATFORM_SQL)
    config.write_text(
        config.read_text()
        + f'[watchdog]\nfault-injection = true\napply-deadline = 1.0\nstack-dir = "{tmp_path / "stacks"}"\n'
    )
    agent = Agent(load_config(config))  # embedded: its watchdog reports, it never re-execs the test
    await agent.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def events() -> list[dict[str, Any]]:
                async with http.get(agent.api_url + "/v1/dashboard") as r:
                    assert r.status == 200
                    found: list[dict[str, Any]] = (await r.json())["events"]
                    return found

            assert await events() == []
            reply = await asyncio.to_thread(
                admin_call,
                agent.config.admin.path,
                {"cmd": "fault", "action": "stall-apply", "seconds": 2.5},
                5.0,
            )
            assert reply.get("ok"), reply
            deadline = time.monotonic() + 20
            found: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not found:
                found = await events()
                await asyncio.sleep(0.2)
    finally:
        await agent.stop()
    [event] = found
    assert (event["component"], event["kind"], event["cause"]) == ("agent", "stall", "apply")
    assert event["at"] is not None and "reported only" in event["detail"]


# ---------------------------------------------------------------------------------------- a small fleet


class FleetProxy(RegionProxy):
    """``verdigris proxy`` of one region: one worker, metrics (with /events), fault injection."""

    def __init__(self, tmp: Path, agent_url: str, region: str) -> None:
        super().__init__(
            tmp,
            agent_url,
            region,
            extra=(
                f'token = "{FLEET_TOKEN}"\npeer_token = "fleet-peer-token"\n'
                f'fault_injection = true\nstack_dir = "{tmp / ("stacks-" + region)}"\n'
            ),
        )

    def status(self, host: str, path: str = "/") -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                return int(r.status)
        except urllib.error.HTTPError as e:
            e.read()
            return int(e.code)


class Fleet:
    """Regions a and b: an agent (region mode, bearer token) and a proxy each; instances are two aiohttp
    upstreams."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Any] = []
        self.proxies: dict[str, FleetProxy] = {}
        self.upstreams = Upstreams(["A", "B"])
        try:
            self._start()
        except BaseException:
            self.close()  # what did start: a fixture whose setup fails is never torn down
            raise

    def _start(self) -> None:
        tmp = self.tmp
        key = new_key()
        admin_root = short_dir()
        # agents "a" and "b" (with a proxy each) and "a2", a second agent of region a (no proxy)
        self.nodes = {
            name: RegionNode(
                name=name,
                root=tmp / name,
                admin_dir=admin_root / name,
                api_port=free_port(),
                gossip_port=free_port(),
                global_port=free_port(),
                http=None,  # type: ignore[arg-type]  # only write_config is used
                key=key,
                region=name[0],
                cluster_id=REGIONAL_CLUSTER_IDS[name[0]],
            )
            for name in ("a", "b", "a2")
        }
        assert GLOBAL_CLUSTER_ID
        self.nodes["a"].global_bootstrap = [self.nodes["b"].global_addr]
        self.nodes["b"].global_bootstrap = [self.nodes["a"].global_addr]
        self.nodes["a2"].global_bootstrap = [self.nodes["a"].global_addr]
        self.nodes["a2"].bootstrap = [self.nodes["a"].gossip]
        for r, node in self.nodes.items():
            node.admin_dir.mkdir(parents=True)
            config = node.write_config()
            extra = f'[api.authz]\nbearer-token = "{FLEET_TOKEN}"\n'
            if r == "a2":  # its watchdog restarts it on demand (test_fleet_agent_watchdog_restart)
                stacks = tmp / "stacks-a2"
                extra += f'[watchdog]\nfault-injection = true\napply-deadline = 2.0\nstack-dir = "{stacks}"\n'
            config.write_text(config.read_text() + extra)
            log = open(tmp / f"agent-{r}.log", "ab")  # noqa: SIM115
            self.logs.append(log)
            self.agents[r] = subprocess.Popen(
                [VERDIGRIS, "agent", "-c", str(node.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        for r in self.nodes:
            until(f"agent {r} answers", lambda r=r: self.dashboard(r))
        p = self.upstreams.ports
        machine = "INSERT INTO machines (id, app, region, state, address, node) VALUES (?, ?, ?, ?, ?, ?)"
        check = "INSERT INTO checks (machine, name, app, status, output) VALUES (?, 'http', ?, ?, ?)"
        self.exec(
            "a",
            ("INSERT INTO apps (name, org) VALUES ('web', 'o')", []),
            ("INSERT INTO apps (name, org) VALUES ('solo', 'o')", []),
            ("INSERT INTO hostnames (hostname, app) VALUES ('web.test', 'web')", []),
            ("INSERT INTO hostnames (hostname, app) VALUES ('solo.test', 'solo')", []),
            ("INSERT INTO apps (name, org) VALUES ('dead', 'o')", []),
            ("INSERT INTO hostnames (hostname, app) VALUES ('dead.test', 'dead')", []),
            (machine, ["d1", "dead", "a", "started", f"127.0.0.1:{free_port()}", "node-a"]),  # refuses
            (machine, ["a1", "web", "a", "started", f"127.0.0.1:{p['A']}", "node-a"]),
            (machine, ["a2", "web", "a", "stopped", "127.0.0.1:9", "node-a"]),
            (check, ["a1", "web", "passing", "HTTP 200"]),
        )
        self.exec(
            "b",
            (machine, ["b1", "web", "b", "started", f"127.0.0.1:{p['B']}", "node-b"]),
            (machine, ["b2", "solo", "b", "started", f"127.0.0.1:{p['B']}", "node-b"]),
            (check, ["b1", "web", "warning", "slow"]),
        )
        for r in ("a", "b"):
            self.proxies[r] = FleetProxy(tmp, self.url(r), r)

    def url(self, region: str) -> str:
        return f"http://127.0.0.1:{self.nodes[region].api_port}"

    def dashboard(self, region: str) -> dict[str, Any]:
        for r, proc in self.agents.items():
            if proc.poll() is not None:
                tail = (self.tmp / f"agent-{r}.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"agent {r} exited ({proc.returncode}); the end of its log:\n{tail}")
        doc: dict[str, Any] = get_json(self.url(region) + "/v1/dashboard", FLEET_AUTH)
        return doc

    def exec(self, region: str, *statements: tuple[str, list[Any]]) -> None:
        body = json.dumps([[sql, params] for sql, params in statements]).encode()
        req = urllib.request.Request(
            self.url(region) + "/v1/transactions", body, {"content-type": "application/json", **FLEET_AUTH}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200

    def close(self) -> None:
        for proxy in self.proxies.values():
            stop_process(proxy.proc, proxy.log)
        for proc, log in zip(self.agents.values(), self.logs, strict=False):
            stop_process(proc, log)
        for log in self.logs[len(self.agents) :]:  # opened for an agent that did not start
            log.close()
        self.upstreams.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("dashboard"))
    try:
        yield f
    finally:
        f.close()


def _apps(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in doc["apps"]}


def test_fleet_regions_and_nodes_alive(fleet: Fleet) -> None:
    def both_alive() -> Any:
        doc = fleet.dashboard("a")
        regions = {r["name"]: r for r in doc["regions"]}
        ok = set(regions) == {"a", "b"} and all(
            n["state"] == "alive" for r in regions.values() for n in r["nodes"]
        )
        # this region's nodes are in both clusters: wait for both views (the global join may lag)
        ok = ok and all(n["regional"] == n["global"] == "alive" for n in regions["a"]["nodes"])
        return doc if ok and len(regions["a"]["nodes"]) == 2 and doc["regions"][0]["name"] == "a" else None

    doc = until("both regions' nodes alive at a", both_alive)
    regions = {r["name"]: r for r in doc["regions"]}
    nodes_a = {n["api"]: n for n in regions["a"]["nodes"]}
    own = nodes_a[f"127.0.0.1:{fleet.nodes['a'].api_port}"]
    peer = nodes_a[f"127.0.0.1:{fleet.nodes['a2'].api_port}"]
    [other] = regions["b"]["nodes"]
    assert own["self"] and own["regional"] == own["global"] == "alive"
    # a node of the same region is in both clusters; the two ids differ (one actor per scope)
    assert not peer["self"] and peer["regional"] == peer["global"] == "alive" and peer["gossip"]
    assert regions["a"]["alive"] == 2
    # another region's node is seen in the global cluster only; its api address is what the page polls
    assert other["global"] == "alive" and other["regional"] is None
    assert other["api"] == f"127.0.0.1:{fleet.nodes['b'].api_port}"


def test_fleet_instances_health_and_regions(fleet: Fleet) -> None:
    def ready() -> Any:
        doc = fleet.dashboard("a")
        web = _apps(doc).get("web")
        regions = {r["region"] for r in web["regions"]} if web else set()
        return doc if regions == {"a", "b"} and len(doc["proxies"]) == 1 and doc["proxies"][0]["up"] else None

    doc = until("app_regions from both presence publishers and proxy a scraped", ready)
    apps = _apps(doc)
    web = apps["web"]
    # only this region's instances: b1 stays in region b
    assert {i["id"]: i["health"] for i in web["instances"]} == {"a1": "passing", "a2": "stopped"}
    a1 = next(i for i in web["instances"] if i["id"] == "a1")
    assert a1["checks"][0]["output"] == "HTTP 200" and a1["node"] == "node-a"
    assert a1["in_flight"] == 0.0  # the proxy was scraped: known to be idle
    assert apps["solo"]["instances"] == [] and [r["region"] for r in apps["solo"]["regions"]] == ["b"]
    doc_b = fleet.dashboard("b")
    assert {i["id"]: i["health"] for i in _apps(doc_b)["web"]["instances"]} == {"b1": "warning"}
    # a proxy that has answered nothing yet has a rate (0) once scraped twice: not "unknown"
    until("proxy b's rate known", lambda: fleet.dashboard("b")["proxies"][0]["requests_per_s"] is not None)
    [proxy] = doc["proxies"]
    assert proxy["id"] == "proxy-a" and proxy["metrics"] == f"127.0.0.1:{fleet.proxies['a'].metrics_port}"
    assert proxy["workers"] == proxy["workers_up"] == 1


def test_fleet_request_and_error_rates_follow_traffic(fleet: Fleet) -> None:
    proxy = fleet.proxies["a"]
    until("proxy a routes web", lambda: proxy.status("web.test") == 200)
    until("a first rate", lambda: _apps(fleet.dashboard("a"))["web"]["requests_per_s"] is not None)
    sent = errors = 0
    deadline = time.monotonic() + WAIT
    web: dict[str, Any] = {}
    while time.monotonic() < deadline:  # steady traffic, 1 in 5 answered 500 by the instance
        for _ in range(10):
            status = proxy.status("web.test", "/500" if sent % 5 == 0 else "/")
            errors += status == 500
            sent += 1
        web = _apps(fleet.dashboard("a"))["web"]
        if web["requests_per_s"] >= 5 and web["errors_per_s"] >= 1:
            break
    else:
        raise AssertionError(f"rates never rose: {web}")
    assert errors >= 1 and web["requests_total"] >= sent and web["errors_total"] >= errors
    assert web["errors_per_s"] < web["requests_per_s"]
    [p] = fleet.dashboard("a")["proxies"]
    assert p["requests_per_s"] > 0
    # traffic stops: the rate falls back as the window moves on (5 s)
    until("rate back to 0", lambda: _apps(fleet.dashboard("a"))["web"]["requests_per_s"] == 0, timeout=15)


def test_fleet_upstream_errors_per_instance(fleet: Fleet) -> None:
    proxy = fleet.proxies["a"]
    until("dead.test routed, and failing", lambda: proxy.status("dead.test") in (502, 503))

    def d1_errors() -> Any:
        [d1] = _apps(fleet.dashboard("a"))["dead"]["instances"]
        return d1 if (d1["upstream_errors"] or 0) >= 1 else None

    d1 = until("d1's upstream errors shown", d1_errors)
    assert d1["id"] == "d1" and d1["health"] == "passing"  # no check says otherwise: the proxy found out
    a1 = next(i for i in _apps(fleet.dashboard("a"))["web"]["instances"] if i["id"] == "a1")
    assert a1["upstream_errors"] == 0.0  # counted per instance: a1 had none


def test_fleet_replication_state_per_scope(fleet: Fleet) -> None:
    def settled() -> Any:
        rep = fleet.dashboard("a")["replication"]
        ok = set(rep) == {"regional", "global"} and all(s["gaps"] == 0 for s in rep.values())
        return rep if ok and rep["global"]["last_remote_apply_age_s"] is not None else None

    fleet.exec("b", ("INSERT INTO apps (name) VALUES ('from-b')", []))  # a global change made elsewhere
    rep = until("a's global scope applied b's change", settled)
    g, r = rep["global"], rep["regional"]
    assert g["members_alive"] == 3 and r["members_alive"] == 2
    assert g["actor"] in g["heads"] and g["own_version"] == g["heads"][g["actor"]]
    # b's global actor is known at a with its head: what the page compares across regions
    b_global = fleet.dashboard("b")["replication"]["global"]
    until(
        "b's head known at a",
        lambda: fleet.dashboard("a")["replication"]["global"]["heads"].get(b_global["actor"]),
    )
    assert 0 <= g["last_remote_apply_age_s"] < 60


def test_fleet_region_peers_replication(fleet: Fleet) -> None:
    """Agent a reports its region's other agent (a2) too: what a2 has applied of a's regional writes."""
    fleet.exec("a", ("INSERT INTO services (app, port) VALUES ('web', 8080)", []))  # regional, shown nowhere
    a2_api = f"127.0.0.1:{fleet.nodes['a2'].api_port}"

    def a2_caught_up() -> Any:
        doc = fleet.dashboard("a")
        own = doc["replication"]["regional"]
        [peer] = doc["peers"]
        assert peer["api"] == a2_api, peer
        theirs = (peer["replication"] or {}).get("regional")
        caught_up = theirs and theirs["heads"].get(own["actor"]) == own["own_version"]
        return (own, theirs) if caught_up and theirs["last_remote_apply_age_s"] is not None else None

    own, theirs = until("a2's regional state, through a", a2_caught_up)
    assert theirs["actor"] != own["actor"] and theirs["members_alive"] == 2 and theirs["gaps"] == 0
    # region b's agent has no peer in its region, and never sees region a's regional actors
    doc_b = fleet.dashboard("b")
    assert doc_b["peers"] == [] and own["actor"] not in doc_b["replication"]["regional"]["heads"]


def test_fleet_watchdog_event_of_a_stuck_worker(fleet: Fleet) -> None:
    proxy = fleet.proxies["a"]
    until("proxy a routes web", lambda: proxy.status("web.test") == 200)
    req = urllib.request.Request(
        f"http://127.0.0.1:{proxy.metrics_port}/fault/stall?worker=0&seconds=4", method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    events = until(
        "the watchdog event at /events",
        lambda: get_json(f"http://127.0.0.1:{proxy.metrics_port}/events")["events"],
        timeout=WAIT,
    )
    [event] = [e for e in events if e["kind"] == "probe_timeout"]
    assert event["worker"] == 0 and event["component"] == "proxy" and event["cause"]
    # the kill that follows is the same event, not a second one
    until("the worker is back", lambda: proxy.status("web.test") == 200)
    events = get_json(f"http://127.0.0.1:{proxy.metrics_port}/events")["events"]
    assert [e["kind"] for e in events].count("exited") == 0, events
    # and the agent shows it, with where it happened
    shown = until(
        "the event in /v1/dashboard",
        lambda: [e for e in fleet.dashboard("a")["events"] if e.get("pid") == event["pid"]],
    )
    assert shown[0]["proxy"] == "proxy-a" and shown[0]["region"] == "a" and shown[0]["at"] == event["at"]


def test_fleet_agent_watchdog_restart(fleet: Fleet) -> None:
    """a2's writer thread is stalled past its deadline: its watchdog re-executes it (same pid), and the
    new process's dashboard lists the restart carried over, timed."""
    a2 = fleet.nodes["a2"]
    pid = fleet.agents["a2"].pid
    stalled_at = time.time()
    reply = admin_call(a2.admin_path, {"cmd": "fault", "action": "stall-apply", "seconds": 4}, 5.0)
    assert reply.get("ok"), reply

    def restart_shown() -> Any:
        events = fleet.dashboard("a2")["events"]
        return [e for e in events if e["component"] == "agent" and e["kind"] == "restart"]

    [event] = until("a2's restart on its dashboard", restart_shown)
    assert fleet.agents["a2"].pid == pid and fleet.agents["a2"].poll() is None  # re-executed in place
    assert event["cause"] == "apply" and event["api"] == f"127.0.0.1:{a2.api_port}"
    assert event["at"] is not None and stalled_at <= event["at"] <= time.time()


# ---------------------------------------------------------------------------------------- the browser


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (Debian packages chromium, chromium-driver; ./dev test installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (dev extras)"
    return None


class Demo:
    """``verdigris demo`` as a subprocess (its own session, so a stop reaches all of it)."""

    def __init__(self, tmp: Path, regions: int, nodes: int) -> None:
        self.tmp = tmp
        self.status_file = tmp / "status.json"
        self.log_path = tmp / "demo.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *(VERDIGRIS, "demo", "--regions", str(regions), "--nodes", str(nodes)),
                *("--status-file", str(self.status_file), "--data-dir", str(tmp / "fleet")),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        def ready() -> Any:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"verdigris demo exited with {self.proc.returncode}:\n{tail}")
            return json.loads(self.status_file.read_text()) if self.status_file.exists() else None

        doc: dict[str, Any] = until("the demo fleet ready", ready, timeout=timeout, interval=0.25)
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the demo stops its fleet in order
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


PAGE_STATE_JS = """
const text = el => (el ? el.innerText.trim() : null);
return {
  updates: (window.verdigrisDashboard || {}).updates || 0,
  marker: window.__testMarker || null,
  regions: [...document.querySelectorAll('.card.region')].map(c => c.dataset.region),
  nodes: [...document.querySelectorAll('tr.node')].map(tr => ({
    region: tr.dataset.region, api: tr.dataset.api, state: tr.dataset.state, text: text(tr)})),
  instances: [...document.querySelectorAll('tr.instance')].map(tr => ({
    app: tr.dataset.app, region: tr.dataset.region, id: tr.dataset.instance, state: tr.dataset.state,
    health: tr.dataset.health, text: text(tr)})),
  apps: [...document.querySelectorAll('.card.app')].map(c => c.dataset.app),
  rates: Object.fromEntries([...document.querySelectorAll('.app-rps')].map(b => [b.dataset.app, text(b)])),
  replication: document.querySelectorAll('tr.replication').length,
  problems: [...document.querySelectorAll('[data-problem-region]')].map(text),
};
"""


def chromium() -> Any:
    """Headless Chromium driven by the Debian chromedriver; skips the test (saying why) when missing."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,2200")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.mark.timeout(120)
def test_page_with_a_token_reads_every_region_in_chromium(fleet: Fleet) -> None:
    """Cross-origin reads with the bearer token (CORS preflight) in a real browser, on the small fleet."""
    driver = chromium()
    try:
        page = fleet.url("a") + "/dashboard"
        driver.get(page + "?no-token")  # a distinct URL: the next get is a full load, not a fragment jump
        until(
            "the page to say the token is missing",
            lambda: "401" in driver.find_element("id", "status").text,
            interval=0.2,
        )
        driver.get(f"{page}#token={FLEET_TOKEN}")

        def both_regions() -> Any:
            s: dict[str, Any] = driver.execute_script(PAGE_STATE_JS)
            instances = {i["id"]: i["health"] for i in s["instances"]}
            # b1 is only known to region b's agent: the page read it, cross-origin, with the token
            ok = sorted(s["regions"]) == ["a", "b"] and instances.get("b1") == "warning" and not s["problems"]
            return s if ok and instances.get("a1") == "passing" else None

        shown = until("both regions read with the token", both_regions, interval=0.3)
        assert {n["region"] for n in shown["nodes"]} == {"a", "b"}
        assert driver.execute_script("return sessionStorage.getItem('verdigris-token')") == FLEET_TOKEN
    finally:
        driver.quit()


@pytest.mark.timeout(400)
def test_dashboard_in_headless_chromium_against_the_demo(tmp_path: Path) -> None:
    if _browser_missing():
        pytest.skip(str(_browser_missing()))
    demo = Demo(Path(tempfile.mkdtemp(prefix="vd-dash-", dir=tmp_path)), regions=2, nodes=1)
    driver: Any = None
    try:
        status = demo.wait_ready(timeout=200)
        regions = sorted({a["region"] for a in status["agents"]})
        apis = {a["api"].removeprefix("http://"): a["region"] for a in status["agents"]}
        assert len(regions) == 2

        driver = chromium()
        driver.get(status["dashboard"])

        def page() -> dict[str, Any]:
            state: dict[str, Any] = driver.execute_script(PAGE_STATE_JS)
            return state

        def fleet_shown() -> Any:
            s = page()
            nodes = {n["api"]: n for n in s["nodes"]}
            ok = (
                sorted(s["regions"]) == regions
                and set(nodes) == set(apis)
                and all(n["state"] == "alive" and "alive" in n["text"] for n in nodes.values())
                and all(nodes[api]["region"] == region for api, region in apis.items())
                and {"hello", "notes", "sleepy"} <= set(s["apps"])
                and any(i["app"] == "hello" and i["health"] == "passing" for i in s["instances"])
                and s["replication"] >= 4  # two scopes per region
                and not s["problems"]
            )
            return s if ok else None

        shown = until(
            "every region, node, app and instance on the page", fleet_shown, timeout=90, interval=0.5
        )
        hello = [i for i in shown["instances"] if i["app"] == "hello"]
        assert {i["state"] for i in hello} == {"started"} and all("passing" in i["text"] for i in hello)
        # hello runs in both regions: the other region's instances were read from its agent, cross-origin
        assert {i["region"] for i in hello} == set(status["apps"]["hello"]["regions"]) == set(regions)
        assert all(i["id"] in i["text"] for i in shown["instances"])

        # live: the rate shown rises while requests go through a proxy, with no reload of the page
        driver.execute_script("window.__testMarker = 'no-reload';")
        before = page()
        start_rate = float(before["rates"].get("hello") or 0) if before["rates"].get("hello") != "–" else 0.0
        proxy = status["proxies"][0]["address"]
        hostname = status["apps"]["hello"]["hostname"]
        deadline = time.monotonic() + 60
        sent, rate = 0, start_rate
        while time.monotonic() < deadline:
            for _ in range(10):
                req = urllib.request.Request(f"http://{proxy}/", headers={"Host": hostname})
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                sent += 1
            s = page()
            shown_rate = s["rates"].get("hello")
            rate = float(shown_rate) if shown_rate not in (None, "–") else 0.0
            if rate >= start_rate + 3 and s["updates"] > before["updates"]:
                break
        else:
            raise AssertionError(f"the request rate shown never rose: {start_rate} -> {rate} after {sent}")
        after = page()
        assert after["marker"] == "no-reload", "the page was reloaded"
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, f"the page logged errors: {errors}"  # a script error, a failed fetch
        ARTIFACT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACT)), "no screenshot"
        assert ARTIFACT.stat().st_size > 10_000
        print(f"\ndashboard screenshot: {ARTIFACT} (hello: {start_rate:.1f} -> {rate:.1f} req/s shown)")
    finally:
        if driver is not None:
            driver.quit()
        demo.stop()
        shutil.rmtree(demo.tmp, ignore_errors=True)
