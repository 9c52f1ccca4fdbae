//! The cell contract: export/import, cursors, freeze, checksum, purge and its auth.

use reqwest::{Method, StatusCode};
use sample_cell::contract::Record;

use crate::both_backends;
use crate::helpers::{assert_problem, pg_server_url, Backend, TestDb};

both_backends!(
    export_then_import_gives_the_same_checksum,
    export_since_a_cursor_carries_exactly_the_later_changes,
    freeze_refuses_writes_serves_reads_and_survives_restart,
    purge_leaves_no_rows,
    admin_routes_need_the_token,
    import_rejects_bad_lines,
);

/// Load a tenant with `n` keys through the tenant API, then overwrite and delete some.
async fn seed(app: &crate::helpers::TestApp, tenant: &str, n: usize) {
    for i in 0..n {
        let value = format!("value-{i}-{}", "x".repeat(i % 17));
        app.put_ok(tenant, &format!("key-{i:04}"), value.as_bytes())
            .await;
    }
    for i in (0..n).step_by(7) {
        app.put_ok(tenant, &format!("key-{i:04}"), b"overwritten")
            .await;
    }
    for i in (0..n).step_by(11) {
        assert_eq!(
            app.delete(tenant, &format!("key-{i:04}")).await.status(),
            StatusCode::NO_CONTENT
        );
    }
}

async fn export_then_import_gives_the_same_checksum(backend: Backend) {
    let source_db = TestDb::new(backend).await;
    let target_db = TestDb::new(backend).await;
    let source = source_db.spawn().await;
    let target = target_db.spawn().await;
    seed(&source, "acme", 120).await;
    source.put_ok("other", "key-0001", b"not acme").await;

    let export = source.export("acme", None).await;
    let (_, rows, tombstones) = export.cursor();
    let live = 120 - 120_usize.div_ceil(11);
    assert_eq!(rows as usize, live);
    assert_eq!(
        tombstones as usize,
        120_usize.div_ceil(11),
        "a full export carries tombstones"
    );
    assert_eq!(export.data().len(), live + 120_usize.div_ceil(11));

    let (applied, skipped) = target.import("acme", export.body.clone()).await;
    assert_eq!((applied as usize, skipped), (export.data().len(), 0));
    let source_sum = source.checksum("acme").await;
    assert_eq!(source_sum.0 as usize, live);
    assert_eq!(target.checksum("acme").await, source_sum);
    assert_eq!(target.all_keys("acme").await, source.all_keys("acme").await);
    assert_eq!(
        target.value("acme", "key-0007").await,
        Some(b"overwritten".to_vec())
    );
    assert_eq!(target.value("acme", "key-0011").await, None);
    // Versions travel with the rows.
    let etag = |r: reqwest::Response| r.headers()["etag"].to_str().expect("etag").to_owned();
    assert_eq!(
        etag(target.get("acme", "key-0007").await),
        etag(source.get("acme", "key-0007").await)
    );

    // Importing the same stream again changes nothing.
    let (applied, skipped) = target.import("acme", export.body.clone()).await;
    assert_eq!((applied, skipped as usize), (0, export.data().len()));
    assert_eq!(target.checksum("acme").await, source_sum);
    let target_export = target.export("acme", None).await;
    assert_eq!(target_export.data().len(), export.data().len());

    // An older version never overwrites a newer one.
    let stale = concat!(
        r#"{"type":"row","key":"key-0007","value_b64":"c3RhbGU=","version":1,"seq":1}"#,
        "\n"
    );
    assert_eq!(target.import("acme", stale.to_owned()).await, (0, 1));
    assert_eq!(
        target.value("acme", "key-0007").await,
        Some(b"overwritten".to_vec())
    );
    assert_eq!(
        target.checksum("other").await.0,
        0,
        "only acme was imported"
    );
}

async fn export_since_a_cursor_carries_exactly_the_later_changes(backend: Backend) {
    let source_db = TestDb::new(backend).await;
    let target_db = TestDb::new(backend).await;
    let source = source_db.spawn().await;
    let target = target_db.spawn().await;
    for i in 1..=5 {
        source
            .put_ok("acme", &format!("k{i}"), format!("v{i}").as_bytes())
            .await;
    }
    let full = source.export("acme", None).await;
    let (first_cursor, rows, _) = full.cursor();
    assert_eq!(rows, 5);
    target.import("acme", full.body.clone()).await;

    // Changes after the cursor: an update, a delete, an insert and one key touched twice.
    source.put_ok("acme", "k1", b"v1-new").await;
    assert_eq!(
        source.delete("acme", "k2").await.status(),
        StatusCode::NO_CONTENT
    );
    source.put_ok("acme", "k6", b"v6").await;
    source.put_ok("acme", "k3", b"v3-a").await;
    source.put_ok("acme", "k3", b"v3-b").await;

    let delta = source.export("acme", Some(&first_cursor)).await;
    let (second_cursor, rows, tombstones) = delta.cursor();
    assert_eq!((rows, tombstones), (3, 1));
    let mut changes: Vec<(String, &str, Option<String>, i64)> = delta
        .data()
        .iter()
        .map(|record| match record {
            Record::Row {
                key,
                value_b64,
                version,
                ..
            } => (key.clone(), "row", Some(value_b64.clone()), *version),
            Record::Tombstone { key, version, .. } => (key.clone(), "tombstone", None, *version),
            Record::Cursor { .. } => unreachable!("data() excludes the cursor"),
        })
        .collect();
    changes.sort();
    let b64 = |s: &str| Some(base64_encode(s.as_bytes()));
    assert_eq!(
        changes,
        [
            ("k1".to_owned(), "row", b64("v1-new"), 2),
            ("k2".to_owned(), "tombstone", None, 2),
            ("k3".to_owned(), "row", b64("v3-b"), 3),
            ("k6".to_owned(), "row", b64("v6"), 1),
        ]
    );
    let seqs: Vec<i64> = delta
        .data()
        .iter()
        .map(|record| match record {
            Record::Row { seq, .. } | Record::Tombstone { seq, .. } => *seq,
            Record::Cursor { .. } => unreachable!(),
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "records come in seq order: {seqs:?}"
    );

    // Applying the delta makes the target equal again; twice changes nothing.
    assert_eq!(target.import("acme", delta.body.clone()).await, (4, 0));
    assert_eq!(target.checksum("acme").await, source.checksum("acme").await);
    assert_eq!(target.import("acme", delta.body.clone()).await, (0, 4));
    assert_eq!(target.value("acme", "k2").await, None);

    // Nothing changed since the latest cursor: an empty delta with the same cursor.
    let empty = source.export("acme", Some(&second_cursor)).await;
    assert_eq!(empty.cursor(), (second_cursor.clone(), 0, 0));
    assert_eq!(empty.data().len(), 0);
    // A freeze reports the same position.
    assert_eq!(
        source.freeze("acme").await["cursor"],
        second_cursor.as_str()
    );

    // Malformed cursors are 400; cursors of another history are 409.
    for bad in ["x", "12", "abc:-1", "abc:1:2"] {
        assert_problem(
            source.export_response("acme", Some(bad)).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
    }
    let foreign = target.export("acme", None).await.cursor().0;
    assert_problem(
        source.export_response("acme", Some(&foreign)).await,
        StatusCode::CONFLICT,
    )
    .await;
    source.purge("acme").await;
    source.put_ok("acme", "k1", b"reborn").await;
    assert_problem(
        source.export_response("acme", Some(&second_cursor)).await,
        StatusCode::CONFLICT,
    )
    .await;
}

fn base64_encode(bytes: &[u8]) -> String {
    match Record::row("k", bytes, 1, 1) {
        Record::Row { value_b64, .. } => value_b64,
        _ => unreachable!(),
    }
}

async fn freeze_refuses_writes_serves_reads_and_survives_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    app.put_ok("acme", "k", b"before").await;
    app.put_ok("acme", "gone", b"x").await;
    let frozen = app.freeze("acme").await;
    assert_eq!(frozen["frozen"], true);
    assert_eq!(frozen["tenant_id"], "acme");

    for response in [
        app.put("acme", "k", b"during").await,
        app.put("acme", "new", b"during").await,
        app.delete("acme", "gone").await,
    ] {
        assert_eq!(response.headers()["retry-after"], "1");
        let detail = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(detail.contains("frozen"), "{detail}");
    }
    assert_eq!(app.value("acme", "k").await, Some(b"before".to_vec()));
    assert_eq!(app.value("acme", "gone").await, Some(b"x".to_vec()));
    assert_eq!(app.value("acme", "new").await, None);
    assert_eq!(app.all_keys("acme").await, ["gone", "k"]);
    assert_eq!(app.export("acme", None).await.cursor().1, 2);
    // Other tenants keep writing.
    app.put_ok("other", "k", b"fine").await;

    // The freeze is stored, so it outlives the process.
    app.stop().await;
    let app = db.spawn().await;
    assert_problem(
        app.put("acme", "k", b"after-restart").await,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert_eq!(app.value("acme", "k").await, Some(b"before".to_vec()));

    let unfrozen = app.unfreeze("acme").await;
    assert_eq!(unfrozen["frozen"], false);
    assert_eq!(
        app.put("acme", "k", b"after").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.delete("acme", "gone").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.value("acme", "k").await, Some(b"after".to_vec()));
}

async fn purge_leaves_no_rows(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    seed(&app, "acme", 30).await;
    app.put_ok("other", "keep", b"me").await;
    app.freeze("acme").await;
    let (kv_rows, flag_rows) = db.stored_rows("acme").await;
    assert_eq!(
        (kv_rows, flag_rows),
        (30, 1),
        "rows and tombstones are stored"
    );

    let purged = app.purge("acme").await;
    assert_eq!(purged["purged_rows"], 30);
    assert_eq!(db.stored_rows("acme").await, (0, 0));
    assert_eq!(app.checksum("acme").await, (0, "0".repeat(64)));
    let export = app.export("acme", None).await;
    assert_eq!(export.records.len(), 1);
    assert_eq!(export.cursor(), ("0".to_owned(), 0, 0));
    assert!(app.all_keys("acme").await.is_empty());
    // The freeze went with the tenant; other tenants are untouched.
    app.put_ok("acme", "fresh", b"start").await;
    assert_eq!(app.value("other", "keep").await, Some(b"me".to_vec()));
    assert_eq!(db.stored_rows("other").await, (1, 1));
}

async fn admin_routes_need_the_token(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    let routes = [
        (Method::GET, "/cell/v1/tenants/acme/export"),
        (Method::POST, "/cell/v1/tenants/acme/import"),
        (Method::POST, "/cell/v1/tenants/acme/freeze"),
        (Method::POST, "/cell/v1/tenants/acme/unfreeze"),
        (Method::GET, "/cell/v1/tenants/acme/checksum"),
        (Method::DELETE, "/cell/v1/tenants/acme"),
    ];
    for (method, path) in &routes {
        let missing = app
            .client
            .request(method.clone(), app.url(path))
            .send()
            .await
            .expect("answered");
        assert_eq!(missing.headers()["www-authenticate"], "Bearer");
        assert_problem(missing, StatusCode::UNAUTHORIZED).await;
        let wrong = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth("not-the-token")
            .send()
            .await
            .expect("answered");
        assert_problem(wrong, StatusCode::UNAUTHORIZED).await;
    }
    // A bad tenant id in the path is a 400 (after auth).
    let response = app
        .admin(Method::POST, "/cell/v1/tenants/Bad_Id/freeze")
        .send()
        .await;
    assert_problem(response.expect("answered"), StatusCode::BAD_REQUEST).await;
    app.put_ok("acme", "k", b"v").await;
    assert_eq!(
        app.value("acme", "k").await,
        Some(b"v".to_vec()),
        "nothing was frozen or purged"
    );
    app.stop().await;

    // Without --admin-token the contract is switched off.
    let closed = db.spawn_with(&["--no-admin-token"]).await;
    for (method, path) in &routes {
        let response = closed
            .client
            .request(method.clone(), closed.url(path))
            .bearer_auth("anything")
            .send()
            .await
            .expect("answered");
        assert_problem(response, StatusCode::FORBIDDEN).await;
    }
}

async fn import_rejects_bad_lines(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    let cases = [
        ("not json", "line 2"),
        (
            r#"{"type":"row","key":"bad key","value_b64":"","version":1}"#,
            "key",
        ),
        (
            r#"{"type":"row","key":"k","value_b64":"***","version":1}"#,
            "base64",
        ),
        (
            r#"{"type":"row","key":"k","value_b64":"","version":0}"#,
            "version",
        ),
        (r#"{"type":"tombstone","key":"k"}"#, "not a record"),
        (r#"{"type":"upsert","key":"k"}"#, "not a record"),
    ];
    for (line, why) in cases {
        let body = format!(
            "{}\n{line}\n",
            r#"{"type":"row","key":"ok","value_b64":"","version":1}"#
        );
        let response = app.import_response("acme", body).await;
        let detail = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert!(
            detail.contains(why) && detail.contains("line 2"),
            "{line}: {detail}"
        );
    }
    // The bad line stopped its batch: nothing was applied.
    assert_eq!(app.checksum("acme").await.0, 0);

    // CRLF line ends, blank lines and a missing final newline are fine.
    let body = "\r\n{\"type\":\"row\",\"key\":\"a\",\"value_b64\":\"YQ==\",\"version\":1}\r\n\n\
                {\"type\":\"row\",\"key\":\"b\",\"value_b64\":\"Yg==\",\"version\":1}";
    assert_eq!(app.import("acme", body.to_owned()).await, (2, 0));
    assert_eq!(app.value("acme", "b").await, Some(b"b".to_vec()));
}

/// The checksum depends on the data only, not on the backend that stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_is_equal_across_sqlite_and_postgres() {
    let _ = pg_server_url();
    let sqlite_db = TestDb::new(Backend::Sqlite).await;
    let pg_db = TestDb::new(Backend::Postgres).await;
    let sqlite = sqlite_db.spawn().await;
    let postgres = pg_db.spawn().await;
    seed(&sqlite, "acme", 40).await;
    let binary: Vec<u8> = (0..=255u8).collect();
    sqlite.put_ok("acme", "binary", &binary).await;
    let export = sqlite.export("acme", None).await;
    postgres.import("acme", export.body.clone()).await;
    let from_sqlite = sqlite.checksum("acme").await;
    assert_eq!(from_sqlite.0, 40 - 4 + 1);
    assert_eq!(postgres.checksum("acme").await, from_sqlite);
    assert_eq!(postgres.value("acme", "binary").await, Some(binary));

    // And back: a PostgreSQL export imports into a fresh SQLite store unchanged.
    let back_db = TestDb::new(Backend::Sqlite).await;
    let back = back_db.spawn().await;
    back.import("acme", postgres.export("acme", None).await.body)
        .await;
    assert_eq!(back.checksum("acme").await, from_sqlite);
}

both_backends!(concurrent_writes_get_unique_sequence_numbers);

/// Writers of one tenant are serialized on its control row: concurrent writes never lose
/// a version, never share a sequence number, and a cursor taken between them is exact.
async fn concurrent_writes_get_unique_sequence_numbers(backend: Backend) {
    const WORKERS: usize = 8;
    const WRITES: usize = 10;
    let db = TestDb::new(backend).await;
    let app = std::sync::Arc::new(db.spawn().await);
    let mut handles = Vec::new();
    for worker in 0..WORKERS {
        let app = std::sync::Arc::clone(&app);
        handles.push(tokio::spawn(async move {
            for i in 0..WRITES {
                app.put_ok("acme", "hot", b"x").await;
                app.put_ok("acme", &format!("w{worker}-{i}"), b"y").await;
            }
        }));
    }
    // A cursor taken while writers run, and the delta after it, together cover everything.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let early = app.export("acme", None).await;
    for handle in handles {
        handle.await.expect("writer finishes");
    }
    let delta = app.export("acme", Some(&early.cursor().0)).await;
    let response = app.get("acme", "hot").await;
    assert_eq!(
        response.headers()["etag"],
        format!("\"{}\"", WORKERS * WRITES).as_str()
    );

    let full = app.export("acme", None).await;
    let mut seqs: Vec<i64> = full
        .data()
        .iter()
        .map(|record| match record {
            Record::Row { seq, .. } | Record::Tombstone { seq, .. } => *seq,
            Record::Cursor { .. } => unreachable!(),
        })
        .collect();
    assert_eq!(seqs.len(), WORKERS * WRITES + 1);
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        WORKERS * WRITES + 1,
        "sequence numbers are unique"
    );

    let replica_db = TestDb::new(backend).await;
    let replica = replica_db.spawn().await;
    replica.import("acme", early.body).await;
    replica.import("acme", delta.body).await;
    assert_eq!(replica.checksum("acme").await, app.checksum("acme").await);
    assert_eq!(replica.all_keys("acme").await.len(), WORKERS * WRITES + 1);
}
