//! Integration tests of sample-cell: one test binary; every scenario runs against SQLite
//! and PostgreSQL (`CELLPLANE_TEST_PG_URL`), in-process on port 0, plus a few runs of the
//! real binary.

mod helpers;

mod binary;
mod contract;
mod faults;
mod isolation;
mod kv;
