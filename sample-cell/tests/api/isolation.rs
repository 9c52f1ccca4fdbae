//! Tenant isolation through every route, and row-level security on PostgreSQL.

use reqwest::StatusCode;
use sqlx::{Connection, Row};

use crate::both_backends;
use crate::helpers::{Backend, TestDb};

both_backends!(tenants_never_touch_each_other);

async fn tenants_never_touch_each_other(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    app.put_ok("tenant-a", "only-a", b"a-secret").await;
    app.put_ok("tenant-a", "shared", b"a-value").await;
    app.put_ok("tenant-b", "shared", b"b-value").await;
    let a_before = app.checksum("tenant-a").await;

    // Read and list.
    assert_eq!(app.value("tenant-b", "only-a").await, None);
    assert_eq!(
        app.value("tenant-b", "shared").await,
        Some(b"b-value".to_vec())
    );
    assert_eq!(
        app.value("tenant-a", "shared").await,
        Some(b"a-value".to_vec())
    );
    assert_eq!(app.all_keys("tenant-b").await, ["shared"]);
    assert_eq!(
        app.list("tenant-b", "prefix=only").await["items"],
        serde_json::json!([])
    );

    // Overwrite and delete.
    app.put_ok("tenant-b", "shared", b"b-overwrite").await;
    assert_eq!(
        app.delete("tenant-b", "only-a").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.delete("tenant-b", "shared").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.value("tenant-a", "only-a").await,
        Some(b"a-secret".to_vec())
    );
    assert_eq!(
        app.value("tenant-a", "shared").await,
        Some(b"a-value".to_vec())
    );
    let response = app.get("tenant-a", "shared").await;
    assert_eq!(
        response.headers()["etag"],
        "\"1\"",
        "B's writes never bumped A's version"
    );

    // The cell contract is per tenant too.
    let export_b = app.export("tenant-b", None).await;
    assert!(!export_b.body.contains("only-a") && !export_b.body.contains("a-value"));
    app.freeze("tenant-b").await;
    app.put_ok("tenant-a", "while-b-frozen", b"x").await;
    app.purge("tenant-b").await;
    assert_eq!(app.checksum("tenant-b").await.0, 0);
    app.delete("tenant-a", "while-b-frozen").await;
    assert_eq!(app.checksum("tenant-a").await, a_before);
    assert_eq!(app.all_keys("tenant-a").await, ["only-a", "shared"]);

    // Importing into B cannot reach A's rows either.
    let stream = concat!(
        r#"{"type":"row","key":"only-a","value_b64":"aGlqYWNr","version":99,"seq":1}"#,
        "\n"
    );
    app.import("tenant-b", stream.to_owned()).await;
    assert_eq!(
        app.value("tenant-a", "only-a").await,
        Some(b"a-secret".to_vec())
    );
}

/// Row-level security: under the service role, a query with no tenant filter sees only the
/// tenant named by `app.tenant_id`, nothing without it, and cannot write another tenant's
/// rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_row_level_security_confines_the_service_role() {
    let db = TestDb::new(Backend::Postgres).await;
    let app = db.spawn().await;
    for (tenant, key) in [("tenant-a", "a1"), ("tenant-a", "a2"), ("tenant-b", "b1")] {
        app.put_ok(tenant, key, b"v").await;
    }

    let mut conn = sqlx::PgConnection::connect(&db.app_role_url())
        .await
        .expect("connect as the service role");
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&mut conn)
        .await
        .expect("current user");
    assert_eq!(role, "sample_cell_app");

    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SELECT set_config('app.tenant_id', 'tenant-a', true)")
        .execute(&mut *tx)
        .await
        .expect("set tenant");
    let rows = sqlx::query("SELECT tenant_id, key FROM kv ORDER BY key")
        .fetch_all(&mut *tx)
        .await
        .expect("unfiltered select");
    let seen: Vec<(String, String)> = rows
        .iter()
        .map(|row| (row.get("tenant_id"), row.get("key")))
        .collect();
    assert_eq!(
        seen,
        [
            ("tenant-a".to_owned(), "a1".to_owned()),
            ("tenant-a".to_owned(), "a2".to_owned())
        ]
    );
    let flags: Vec<String> = sqlx::query_scalar("SELECT tenant_id FROM tenant_flags")
        .fetch_all(&mut *tx)
        .await
        .expect("unfiltered flags");
    assert_eq!(flags, ["tenant-a"]);
    let touched = sqlx::query("UPDATE kv SET value = 'x'::bytea WHERE key = 'b1'")
        .execute(&mut *tx)
        .await
        .expect("update runs")
        .rows_affected();
    assert_eq!(touched, 0, "tenant-b's row is invisible to the update");
    let insert = sqlx::query(
        "INSERT INTO kv (tenant_id, key, value, version, seq) VALUES ('tenant-b', 'evil', ''::bytea, 1, 1)",
    )
    .execute(&mut *tx)
    .await;
    assert!(insert.is_err(), "WITH CHECK refuses rows of another tenant");
    tx.rollback().await.expect("rollback");

    // The setting is transaction-local: a new transaction starts with no tenant.
    let mut tx = conn.begin().await.expect("begin");
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kv")
        .fetch_one(&mut *tx)
        .await
        .expect("count");
    assert_eq!(count, 0, "no tenant set, no rows");
    tx.rollback().await.expect("rollback");

    // The service role does not own the tables and cannot turn the policy off.
    let disable = sqlx::query("ALTER TABLE kv DISABLE ROW LEVEL SECURITY")
        .execute(&mut conn)
        .await;
    assert!(disable.is_err(), "only the owner may alter the table");
    conn.close().await.ok();
}

/// Several sample-cells starting at once against one PostgreSQL server (different
/// databases) race to create the cluster-wide service role; every one of them must start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_startups_share_one_service_role() {
    let role = format!("sc_role_{}", hex::encode(rand::random::<[u8; 4]>()));
    let mut dbs = Vec::new();
    for _ in 0..4 {
        dbs.push(TestDb::new(Backend::Postgres).await);
    }
    let flags = [
        "--app-role",
        role.as_str(),
        "--app-db-password",
        "p'a\"ss word",
    ];
    let apps = futures_util::future::join_all(dbs.iter().map(|db| db.spawn_with(&flags))).await;
    for (i, app) in apps.iter().enumerate() {
        app.put_ok("acme", "k", format!("db-{i}").as_bytes()).await;
        assert_eq!(
            app.value("acme", "k").await,
            Some(format!("db-{i}").into_bytes())
        );
    }
    let mut conn = sqlx::PgConnection::connect(&dbs[0].owner_url())
        .await
        .expect("connect as owner");
    let row = sqlx::query(
        "SELECT rolcanlogin, rolsuper, rolbypassrls, rolpassword IS NOT NULL AS has_password \
         FROM pg_authid WHERE rolname = $1",
    )
    .bind(&role)
    .fetch_one(&mut conn)
    .await
    .expect("the role exists");
    let login: bool = row.get("rolcanlogin");
    let superuser: bool = row.get("rolsuper");
    let bypass: bool = row.get("rolbypassrls");
    let has_password: bool = row.get("has_password");
    assert!(login && !superuser && !bypass && has_password);
    conn.close().await.ok();

    for app in apps {
        app.stop().await;
    }
    drop(dbs);
    let mut conn = sqlx::PgConnection::connect(&crate::helpers::pg_server_url())
        .await
        .expect("connect to the server");
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(&mut conn)
        .await
        .expect("drop the test role once its databases are gone");
}
