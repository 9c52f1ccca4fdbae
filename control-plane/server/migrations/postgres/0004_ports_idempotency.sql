-- Ports handed to cells (variables with `source = "port"`). A port is taken by inserting
-- its row in the transaction that registers the cell; the primary key makes a second
-- holder impossible on both stores, so concurrent creations never share a port. A row
-- whose cell is destroyed (or gone) is free again. Cells registered before this migration
-- keep their ports in their `vars`, which allocation still reads.
CREATE TABLE cell_ports (
    port BIGINT PRIMARY KEY,
    cell_id TEXT NOT NULL,
    var TEXT NOT NULL,
    allocated_at TEXT NOT NULL
);
CREATE INDEX cell_ports_cell ON cell_ports(cell_id);

-- Idempotency keys are scoped per principal and route (method and matched path), and
-- stored responses never hold a secret: fields a route withholds (a new token's secret)
-- are removed before the response is stored and named in `withheld`. The old table held
-- first responses verbatim, token secrets included; it is dropped rather than migrated
-- (entries live 24 hours, so at most a day of retries is not replayed).
DROP TABLE idempotency_keys;
CREATE TABLE idempotency_keys (
    principal TEXT NOT NULL,
    route TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    withheld TEXT NOT NULL DEFAULT '',
    etag TEXT,
    location TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (principal, route, idem_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
