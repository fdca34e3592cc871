-- Example schema for an edge platform: the apps it hosts and the machines that run them.
--
-- Schema files may only hold CREATE TABLE and CREATE INDEX statements. Replicated tables must not use
-- UNIQUE constraints (other than the primary key) or FOREIGN KEYs, and every NOT NULL column needs a
-- DEFAULT, so that rows and columns can be merged from any peer in any order.

CREATE TABLE apps (
    name   TEXT PRIMARY KEY,
    org    TEXT NOT NULL DEFAULT '',
    config TEXT
);

CREATE TABLE machines (
    id         TEXT PRIMARY KEY,
    app        TEXT NOT NULL DEFAULT '',
    region     TEXT NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT 'created',
    address    TEXT,
    updated_at INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX machines_app ON machines (app);
