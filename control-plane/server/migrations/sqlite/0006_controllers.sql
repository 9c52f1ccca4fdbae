-- Controllers run on one replica at a time under a lease row: the holder, a term that
-- grows each time another replica takes the lease (a fencing token: writes carry it and a
-- deposed holder's are refused), and an expiry judged by the database clock.
CREATE TABLE controller_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    renewed_at TEXT NOT NULL
);

-- Never used: the singleton loops it was meant for run under controller_leases.
DROP TABLE leases;
