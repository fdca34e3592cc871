-- The platform's routing state: what the edge proxy routes on (docs/proxy.md).
--
-- Replicated-table rules (enforced by the store): only CREATE TABLE / CREATE INDEX; every table has a
-- PRIMARY KEY; no FOREIGN KEY and no UNIQUE besides the primary key (replicas merge rows in any order and
-- concurrently); every NOT NULL column has a DEFAULT (a row may be created by a single column's change).
-- Changes must stay additive: add tables, nullable or defaulted columns, indexes; never drop or retype.
--
-- Scopes (ARCHITECTURE.md, "State lives at two levels"; docs/store.md, "Scopes"): a table is declared
-- global by a `-- scope: global` comment line directly above its CREATE TABLE; without one it is regional.
--   global     apps, hostnames, app_regions, region_rtt, proxies, machine_agents   coarse, change rarely, replicated among all nodes
--   regional   machines, services, checks     fine-grained, change often, never leave the region
-- A table's scope cannot change once the table exists.
-- The proxy subscribes to one query per table (verdigris.proxy.table.QUERIES) and joins in memory.
--
-- Values the proxy relies on (anything else is treated as described in docs/proxy.md):
--   apps.concurrency      'connections' | 'requests'
--   machines.state        'created' | 'started' | 'stopping' | 'stopped' | 'destroyed'
--   checks.status         'passing' | 'warning' | 'critical'
--   limits                0 means "no limit"
-- `apps` and `machines` are supersets of schemas/example.sql's tables of the same names (same
-- definitions for the shared columns), so a database created from example.sql upgrades additively.

-- An application: the unit a hostname routes to. Limits are per instance, in units of `concurrency`.
-- scope: global
CREATE TABLE apps (
    name        TEXT PRIMARY KEY,
    org         TEXT NOT NULL DEFAULT '',
    config      TEXT,
    concurrency TEXT NOT NULL DEFAULT 'requests',
    soft_limit  INTEGER NOT NULL DEFAULT 20,
    hard_limit  INTEGER NOT NULL DEFAULT 25,
    updated_at  INTEGER NOT NULL DEFAULT 0
);

-- Host name -> app. `hostname` is lower case without a port or trailing dot; a wildcard is written
-- '*.example.com' and matches any name ending in '.example.com' (at any depth, not the bare
-- 'example.com'); an exact name beats every wildcard and a longer wildcard beats a shorter one.
-- scope: global
CREATE TABLE hostnames (
    hostname   TEXT PRIMARY KEY,
    app        TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX hostnames_app ON hostnames (app);

-- Global summary: the regions an app has instances in, which is all a proxy elsewhere needs to
-- forward a request for it (coarse: written when an app gains or loses its last instance in a region).
-- Written by the region's presence publisher (docs/regions.md, "Coarse global state"): a row while the
-- app has >= 1 started instance there; `capacity` is that count rounded down to a power of two (1, 2, 4,
-- 8, ...), so it changes only when a bucket boundary is crossed. `updated_at`: unix milliseconds.
-- scope: global
CREATE TABLE app_regions (
    app        TEXT NOT NULL DEFAULT '',
    region     TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL DEFAULT 0,
    capacity   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, region)
);

-- An instance (a Fly "machine") of an app. `address` is 'host:port' (IPv6 as '[::1]:8080') where the
-- proxy connects for HTTP; `node` is the server it runs on.
-- scope: regional
CREATE TABLE machines (
    id         TEXT PRIMARY KEY,
    app        TEXT NOT NULL DEFAULT '',
    region     TEXT NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT 'created',
    address    TEXT,
    updated_at INTEGER NOT NULL DEFAULT 0,
    node       TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX machines_app ON machines (app);

-- The ports an app serves on the edge: a public `port` (80, 443, ...) handled as `handlers`
-- ('http', 'tls,http', or '' for raw TCP) and sent to `internal_port` on the instance (0: the port of
-- machines.address).
-- scope: regional
CREATE TABLE services (
    app           TEXT NOT NULL DEFAULT '',
    port          INTEGER NOT NULL DEFAULT 0,
    protocol      TEXT NOT NULL DEFAULT 'tcp',
    handlers      TEXT NOT NULL DEFAULT 'http',
    internal_port INTEGER NOT NULL DEFAULT 0,
    force_https   INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, port)
);

-- Health checks run by the machines agent, one row per (instance, check). An instance is healthy when
-- it is started and every one of its checks is 'passing' (no checks: healthy once started).
-- scope: regional
CREATE TABLE checks (
    machine    TEXT NOT NULL DEFAULT '',
    name       TEXT NOT NULL DEFAULT '',
    app        TEXT NOT NULL DEFAULT '',
    status     TEXT NOT NULL DEFAULT 'critical',
    output     TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (machine, name)
);

CREATE INDEX checks_app ON checks (app);

-- Measured round-trip time between two regions' nodes, in milliseconds (`src` measured `dst`). The proxy
-- reads the rows whose `src` is its region as its distances (nearest region first when it forwards); a
-- missing pair is looked up the other way round, else the region counts as farthest.
-- Written by src's presence publisher (docs/regions.md, "Coarse global state"): the median smoothed probe
-- RTT rounded UP to 1, 2, 5, 10, 20, 50, ... ms, rewritten only when that bucket changes.
-- scope: global
CREATE TABLE region_rtt (
    src        TEXT NOT NULL DEFAULT '',
    dst        TEXT NOT NULL DEFAULT '',
    rtt_ms     REAL NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (src, dst)
);

-- The edge proxies, registered by each proxy's supervisor at start (docs/proxy.md, "Forwarding across
-- regions"): `address` ('host:port') is where another region's proxy sends a forwarded request;
-- `metrics` ('host:port' or NULL) is its supervisor's `metrics_listen`, scraped by the dashboard
-- (docs/dashboard.md) for request rates, in-flight load and watchdog events.
-- scope: global
CREATE TABLE proxies (
    id         TEXT PRIMARY KEY,
    region     TEXT NOT NULL DEFAULT '',
    address    TEXT NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL DEFAULT 0,
    metrics    TEXT
);

-- The machines agents (`verdigris machines`, docs/machines.md), one row per node, written by the agent
-- itself at start and deleted when it stops: `address` ('host:port') is its HTTP API, where a proxy
-- POSTs /v1/apps/<app>/start to wake an app that has no started instance in reach; `apps` is the JSON
-- list of the app names it can start (autostart on, instances on that node).
-- scope: global
CREATE TABLE machine_agents (
    id         TEXT PRIMARY KEY,
    region     TEXT NOT NULL DEFAULT '',
    address    TEXT NOT NULL DEFAULT '',
    apps       TEXT NOT NULL DEFAULT '[]',
    updated_at INTEGER NOT NULL DEFAULT 0
);
