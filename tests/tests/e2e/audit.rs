//! The hash-chained audit trail: every write appends a record; raw tampering is found.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::Value;

async fn seeded(b: Backend) -> TestApp {
    let app = TestApp::spawn(b).await;
    app.create_org("acme-corp").await;
    app.create_tenant("acme", "acme-corp").await;
    app.create_tenant("globex", "acme-corp").await;
    app.lifecycle("acme", "activate").await;
    let v = app.admin.audit_verify().await.unwrap();
    assert!(v.ok, "{v:?}");
    assert!(v.records >= 6, "{v:?}");
    app
}

both_backends!(
    every_write_has_an_audit_record_and_outbox_event,
    |b| async move {
        let app = seeded(b).await;
        let audit = app
            .sql_i64("SELECT COUNT(*) FROM tenant_audit")
            .await
            .unwrap();
        let outbox = app.sql_i64("SELECT COUNT(*) FROM outbox").await.unwrap();
        assert_eq!(audit, outbox);
        let recs: Value = app.admin.get("/v1/audit").await.unwrap();
        let items = recs["items"].as_array().unwrap();
        for pair in items.windows(2) {
            assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
            assert_eq!(
                pair[1]["seq"].as_i64().unwrap(),
                pair[0]["seq"].as_i64().unwrap() + 1
            );
        }
        for r in items {
            let e = r["event_type"].as_str().unwrap();
            assert!(e.starts_with("TENANCY_") || e.starts_with("CELL_"), "{e}");
            assert_eq!(e, e.to_uppercase());
        }
    }
);

both_backends!(modified_record_is_found, |b| async move {
    let app = seeded(b).await;
    let n = app
        .sql("UPDATE tenant_audit SET actor = 'mallory' WHERE seq = 3")
        .await
        .unwrap();
    assert_eq!(n, 1);
    let v = app.admin.audit_verify().await.unwrap();
    assert!(!v.ok);
    assert_eq!(v.broken_seq, Some(3), "{v:?}");
    let r = app
        .req(Method::GET, "/v1/audit/verify")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
});

both_backends!(payload_change_is_found, |b| async move {
    let app = seeded(b).await;
    app.sql("UPDATE tenant_audit SET payload = '{\"forged\":true}' WHERE seq = 4")
        .await
        .unwrap();
    let v = app.admin.audit_verify().await.unwrap();
    assert_eq!((v.ok, v.broken_seq), (false, Some(4)), "{v:?}");
});

both_backends!(deleted_record_is_found, |b| async move {
    let app = seeded(b).await;
    app.sql("DELETE FROM tenant_audit WHERE seq = 2")
        .await
        .unwrap();
    let v = app.admin.audit_verify().await.unwrap();
    assert_eq!((v.ok, v.broken_seq), (false, Some(2)), "{v:?}");
});

both_backends!(deleted_tail_is_found, |b| async move {
    let app = seeded(b).await;
    let last = app
        .sql_i64("SELECT MAX(seq) FROM tenant_audit")
        .await
        .unwrap();
    app.sql(&format!("DELETE FROM tenant_audit WHERE seq = {last}"))
        .await
        .unwrap();
    let v = app.admin.audit_verify().await.unwrap();
    assert_eq!((v.ok, v.broken_seq), (false, Some(last)), "{v:?}");
});

both_backends!(inserted_record_is_found, |b| async move {
    let app = seeded(b).await;
    // Shift the tail up by one and slip a forged record in at seq 3, copying the
    // neighbouring hashes so only a recomputation can tell.
    app.sql("UPDATE tenant_audit SET seq = seq + 1000 WHERE seq >= 3")
        .await
        .unwrap();
    app.sql("UPDATE tenant_audit SET seq = seq - 999 WHERE seq >= 1003")
        .await
        .unwrap();
    app.sql(
        "INSERT INTO tenant_audit (seq, audit_id, tenant_id, event_type, actor, target, payload, correlation_id, occurred_at, prev_hash, hash) \
         SELECT 3, 'evt-forged', tenant_id, 'TENANCY_DELETED', 'mallory', target, '{}', NULL, occurred_at, hash, prev_hash FROM tenant_audit WHERE seq = 2",
    )
    .await
    .unwrap();
    let v = app.admin.audit_verify().await.unwrap();
    assert_eq!((v.ok, v.broken_seq), (false, Some(3)), "{v:?}");
});

// A verify that runs while writes commit must see one consistent snapshot: the chain head
// and the records it walks. Reading them at different moments reports an intact chain as
// "records were removed from the end" whenever a write lands in between.
both_backends!(
    verify_is_consistent_under_concurrent_writes,
    |b| async move {
        let app = seeded(b).await;
        let writer = app.admin.clone();
        let writes = tokio::spawn(async move {
            for i in 0..150 {
                let body = serde_json::json!({"tenant_id": format!("t-{i}"),
                "organization_id": "acme-corp", "profile": "mt-standard", "region": "eu-west-1"});
                let _: Value = writer.post("/v1/tenants", &body).await.unwrap();
            }
        });
        let mut verifies = 0;
        while !writes.is_finished() {
            let v = app.admin.audit_verify().await.unwrap();
            assert!(v.ok, "verify {verifies} during writes: {v:?}");
            verifies += 1;
        }
        writes.await.unwrap();
        assert!(
            verifies >= 5,
            "only {verifies} verifies overlapped the writes"
        );
        let v = app.admin.audit_verify().await.unwrap();
        assert!(v.ok, "{v:?}");
    }
);

both_backends!(record_past_the_head_is_found, |b| async move {
    let app = seeded(b).await;
    let last = app
        .sql_i64("SELECT MAX(seq) FROM tenant_audit")
        .await
        .unwrap();
    // Append a copy of the last record one past it, then put the head back where it was:
    // a record the head never reached.
    app.sql(&format!(
        "INSERT INTO tenant_audit (seq, audit_id, tenant_id, event_type, actor, target, payload, correlation_id, occurred_at, prev_hash, hash) \
         SELECT seq + 1, 'evt-appended', tenant_id, event_type, 'mallory', target, payload, NULL, occurred_at, hash, hash FROM tenant_audit WHERE seq = {last}"
    ))
    .await
    .unwrap();
    app.sql(&format!(
        "UPDATE chain_head SET seq = {last}, hash = (SELECT hash FROM tenant_audit WHERE seq = {last}) WHERE id = 1"
    ))
    .await
    .unwrap();
    let v = app.admin.audit_verify().await.unwrap();
    assert_eq!((v.ok, v.broken_seq), (false, Some(last + 1)), "{v:?}");
    assert!(
        v.reason
            .as_deref()
            .unwrap_or("")
            .contains("past the chain head"),
        "{v:?}"
    );
});
