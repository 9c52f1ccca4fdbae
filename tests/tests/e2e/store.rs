//! The store test suite, run against SQLite and PostgreSQL alike: the same code path must
//! hold the same guarantees on both.

use cellplane::persistence::{AuditInput, JobEnd, LastStepRecord, NewJob, Store};
use cellplane_api::JobState;
use cellplane_tests::*;
use serde_json::json;
use std::sync::Arc;

async fn open(b: Backend) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = match b {
        Backend::Sqlite => None,
        Backend::Postgres => Some(fresh_pg_database().await),
    };
    let store = Store::open(url.as_deref(), dir.path(), 16).await.unwrap();
    (store, dir)
}

fn lease(secs: i64) -> i64 {
    secs * 1000
}

async fn enqueue(store: &Store, id: &str, target: &str) {
    try_enqueue(store, id, target, &[target]).await.unwrap();
}

async fn try_enqueue(
    store: &Store,
    id: &str,
    target: &str,
    locks: &[&str],
) -> Result<(), cellplane::persistence::StoreError> {
    let mut tx = store.write().await.unwrap();
    tx.insert_job(&NewJob {
        job_id: id,
        kind: "tenant.activate",
        target,
        payload: json!({}),
        max_attempts: 3,
        correlation_id: None,
        locks: locks.iter().map(|l| l.to_string()).collect(),
    })
    .await?;
    tx.commit().await.unwrap();
    Ok(())
}

fn holder(e: cellplane::persistence::StoreError) -> (String, String) {
    match e {
        cellplane::persistence::StoreError::Locked { resource, job_id } => (resource, job_id),
        other => panic!("expected a lock conflict, got {other}"),
    }
}

both_backends!(migrations_are_idempotent, |b| async move {
    let dir = tempfile::tempdir().unwrap();
    let url = match b {
        Backend::Sqlite => None,
        Backend::Postgres => Some(fresh_pg_database().await),
    };
    let s1 = Store::open(url.as_deref(), dir.path(), 4).await.unwrap();
    s1.close().await;
    let s2 = Store::open(url.as_deref(), dir.path(), 4).await.unwrap();
    s2.ping().await.unwrap();
});

// One job at a time per resource, from enqueue to end: a job's locks hold while it is
// queued, running, backing off or waiting, and go in the transaction that ends it.
both_backends!(one_job_per_resource_from_enqueue_to_end, |b| async move {
    let (store, _d) = open(b).await;
    try_enqueue(
        &store,
        "job-big",
        "tenant/t",
        &["tenant/t", "cell/a", "cell/b"],
    )
    .await
    .unwrap();
    for r in ["tenant/t", "cell/a", "cell/b"] {
        let e = try_enqueue(&store, "job-other", r, &[r]).await.unwrap_err();
        assert_eq!(holder(e), (r.to_string(), "job-big".to_string()));
    }
    // Taking several resources is all or nothing.
    let e = try_enqueue(&store, "job-mixed", "cell/c", &["cell/c", "cell/a"])
        .await
        .unwrap_err();
    assert_eq!(holder(e).1, "job-big");
    try_enqueue(&store, "job-c", "cell/c", &["cell/c"])
        .await
        .unwrap();
    // Claimed, then put back for a retry: still held.
    let j = store.claim_job("w1", lease(30)).await.unwrap().unwrap();
    assert_eq!(j.job.job_id, "job-big");
    assert!(store
        .requeue_job("job-big", "w1", "boom", chrono::Utc::now())
        .await
        .unwrap());
    assert!(try_enqueue(&store, "job-other", "cell/b", &["cell/b"])
        .await
        .is_err());
    let j = store.claim_job("w1", lease(30)).await.unwrap().unwrap();
    let j = if j.job.job_id == "job-big" {
        j
    } else {
        store.claim_job("w2", lease(30)).await.unwrap().unwrap()
    };
    assert_eq!(j.job.job_id, "job-big");
    let owner = j.lease_owner.clone().unwrap();
    let mut tx = store.write().await.unwrap();
    assert!(tx
        .finish_job("job-big", &owner, cellplane_api::JobState::Succeeded, None)
        .await
        .unwrap());
    tx.release_locks("job-big").await.unwrap();
    tx.commit().await.unwrap();
    for r in ["tenant/t", "cell/a", "cell/b"] {
        try_enqueue(
            &store,
            &format!("job-after-{}", r.replace('/', "-")),
            r,
            &[r],
        )
        .await
        .unwrap();
    }
});

both_backends!(
    expired_lease_is_reclaimed_and_old_owner_locked_out,
    |b| async move {
        let (store, _d) = open(b).await;
        enqueue(&store, "job-x", "cell/x").await;
        let past = lease(-5);
        let j = store.claim_job("dead-worker", past).await.unwrap().unwrap();
        assert_eq!(j.job.attempts, 1);
        let again = store
            .claim_job("new-worker", lease(30))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.job.job_id, "job-x");
        assert_eq!(again.job.attempts, 2);
        assert_eq!(
            store
                .renew_lease("job-x", "dead-worker", lease(30))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .renew_lease("job-x", "new-worker", lease(30))
                .await
                .unwrap(),
            Some(false)
        );
        assert!(!store
            .job_progress("job-x", "dead-worker", 0.5, Some(1), "s", "x\n", None)
            .await
            .unwrap());
        let mut tx = store.write().await.unwrap();
        assert!(!tx
            .finish_job(
                "job-x",
                "dead-worker",
                cellplane_api::JobState::Succeeded,
                None
            )
            .await
            .unwrap());
        tx.commit().await.unwrap();
    }
);

both_backends!(concurrent_claims_never_double_claim, |b| async move {
    let (store, _d) = open(b).await;
    for i in 0..40 {
        enqueue(&store, &format!("job-{i:02}"), &format!("tenant/t{i}")).await;
    }
    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = store.clone();
        let claimed = claimed.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(j) = store.claim_job(&format!("w{w}"), lease(30)).await.unwrap() {
                claimed.lock().unwrap().push(j.job.job_id);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut ids = claimed.lock().unwrap().clone();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!((n, ids.len()), (40, 40));
});

both_backends!(concurrent_audit_appends_keep_one_chain, |b| async move {
    let (store, _d) = open(b).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = store.write().await.unwrap();
            tx.audit(AuditInput {
                tenant_id: None,
                event_type: "TENANCY_TEST",
                actor: "test",
                target: &format!("tenant/t{i}"),
                payload: json!({"i": i}),
                correlation_id: None,
            })
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.verify_audit().await.unwrap(),
        cellplane::persistence::VerifyOutcome::Ok { records: 40 }
    );
});

both_backends!(rolled_back_write_leaves_no_audit, |b| async move {
    let (store, _d) = open(b).await;
    {
        let mut tx = store.write().await.unwrap();
        tx.insert_organization("acme", "Acme").await.unwrap();
        tx.audit(AuditInput {
            tenant_id: None,
            event_type: "TENANCY_ORGANIZATION_CREATED",
            actor: "test",
            target: "organization/acme",
            payload: json!({}),
            correlation_id: None,
        })
        .await
        .unwrap();
        // dropped without commit
    }
    assert!(store.get_organization("acme").await.unwrap().is_none());
    assert_eq!(
        store.verify_audit().await.unwrap(),
        cellplane::persistence::VerifyOutcome::Ok { records: 0 }
    );
});

both_backends!(
    job_with_a_fatal_step_fails_once_with_its_reason,
    |b| async move {
        let (store, d) = open(b).await;
        let config = cellplane::config::Config {
            data_dir: d.path().to_path_buf(),
            jobs: cellplane::config::JobsConfig {
                poll_ms: 20,
                max_attempts: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let (_service, engine) =
            cellplane::startup::service_and_engine(&config, store.clone()).unwrap();
        let stop = tokio_util_free_token();
        // A payload without a tenant cannot succeed however often it is tried.
        enqueue(&store, "job-broken", "tenant/ghost").await;
        let handles = engine.spawn(stop.clone());
        let job = eventually(std::time::Duration::from_secs(10), || {
            let store = store.clone();
            async move {
                let j = store.get_job("job-broken").await.ok()??;
                j.job.state.is_terminal().then_some(j)
            }
        })
        .await
        .unwrap();
        stop.cancel();
        for h in handles {
            let _ = h.await;
        }
        assert_eq!(job.job.state, cellplane_api::JobState::Failed);
        assert_eq!(job.job.attempts, 1, "fatal errors are not retried");
        assert!(job.job.error.unwrap_or_default().contains("tenant_id"));
    }
);

fn tokio_util_free_token() -> cellplane::jobs::Shutdown {
    cellplane::jobs::Shutdown::new()
}

fn new_tenant(id: &str, org: &str) -> cellplane::persistence::NewTenant {
    let ts = cellplane::persistence::now();
    cellplane::persistence::NewTenant {
        row: cellplane::persistence::TenantRow {
            tenant_id: id.into(),
            organization_id: org.into(),
            profile: cellplane_api::Profile::MtStandard,
            state: cellplane_api::TenantState::Draft,
            region: "eu-west-1".into(),
            quotas: Default::default(),
            policies: Default::default(),
            billing: Default::default(),
            placement: None,
            pending_job_id: None,
            archived_at: None,
            version: 1,
            created_at: ts.clone(),
            updated_at: ts.clone(),
            desired: Default::default(),
        },
        env: cellplane::persistence::EnvironmentRow {
            tenant_id: id.into(),
            name: "prod".into(),
            region: "eu-west-1".into(),
            isolation_level: "shared".into(),
            cell_id: None,
            endpoint: None,
            created_at: ts,
        },
        audit: cellplane::persistence::OwnedAudit {
            tenant_id: Some(id.into()),
            event_type: "TENANCY_CREATED".into(),
            actor: "test".into(),
            target: format!("tenant/{id}"),
            payload: json!({}),
            correlation_id: None,
        },
    }
}

both_backends!(
    a_creation_batch_reports_each_creation_on_its_own,
    |b| async move {
        use cellplane::persistence::CreateOutcome::*;
        let (store, _d) = open(b).await;
        let mut tx = store.write().await.unwrap();
        tx.insert_organization("org-a", "A").await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store
                .create_tenants(&[new_tenant("old", "org-a")])
                .await
                .unwrap(),
            vec![Created]
        );
        let batch = [
            new_tenant("fresh", "org-a"),
            new_tenant("old", "org-a"),
            new_tenant("fresh", "org-a"),
            new_tenant("orphan", "org-missing"),
            new_tenant("orphan", "org-a"),
            new_tenant("lonely", "org-missing"),
        ];
        assert_eq!(
            store.create_tenants(&batch).await.unwrap(),
            vec![
                Created,
                Duplicate,
                Duplicate,
                UnknownOrganization,
                Created,
                UnknownOrganization
            ]
        );
        for (id, org) in [("fresh", "org-a"), ("orphan", "org-a")] {
            let t = store.get_tenant(id).await.unwrap().expect(id);
            assert_eq!(t.organization_id, org);
            assert_eq!(store.list_environments(id).await.unwrap().len(), 1);
        }
        assert!(store.get_tenant("lonely").await.unwrap().is_none());
        // A batch with nothing to write leaves the store as it was.
        assert_eq!(
            store
                .create_tenants(&[new_tenant("old", "org-a")])
                .await
                .unwrap(),
            vec![Duplicate]
        );
        assert_eq!(
            store.verify_audit().await.unwrap(),
            cellplane::persistence::VerifyOutcome::Ok { records: 3 }
        );
    }
);

// Group commit of job ends: one statement ends several jobs and records each one's last
// step, leaving alone a job whose lease went to another worker; one statement then
// releases the ended jobs' locks and claims at most `n` next jobs, expired leases first.
both_backends!(
    jobs_end_together_and_claim_their_successors,
    |b| async move {
        let (store, _d) = open(b).await;
        for i in 1..=3 {
            enqueue(&store, &format!("job-{i}"), &format!("bench/{i}")).await;
        }
        let mut mine = Vec::new();
        for _ in 0..2 {
            mine.push(store.claim_job("w1", lease(30)).await.unwrap().unwrap());
        }
        // w1 claims job-3 with a lease that has already run out; w2 takes it over.
        let lost = store.claim_job("w1", -1000).await.unwrap().unwrap();
        assert_eq!(lost.job.job_id, "job-3");
        let taken = store.claim_job("w2", lease(30)).await.unwrap().unwrap();
        assert_eq!(taken.job.job_id, "job-3");
        for i in 4..=6 {
            enqueue(&store, &format!("job-{i}"), &format!("bench/{i}")).await;
        }
        // job-4 is claimed by w3 with an expired lease: the claim below must take it first.
        let dead = store.claim_job("w3", -1000).await.unwrap().unwrap();
        assert_eq!(dead.job.job_id, "job-4");

        let step_state = json!({"cursor": 7});
        let mut tx = store.write().await.unwrap();
        let ended = tx
            .end_jobs(
                "w1",
                &[
                    JobEnd {
                        job_id: "job-1",
                        state: JobState::Succeeded,
                        error: None,
                        last: Some(LastStepRecord {
                            step_index: 1,
                            step: "noop",
                            log: "step noop done: é\n",
                            state: &step_state,
                        }),
                    },
                    JobEnd {
                        job_id: "job-2",
                        state: JobState::Failed,
                        error: Some("boom"),
                        last: None,
                    },
                    JobEnd {
                        job_id: "job-3",
                        state: JobState::Succeeded,
                        error: None,
                        last: None,
                    },
                ],
            )
            .await
            .unwrap();
        let mut ended_sorted = ended.clone();
        ended_sorted.sort();
        assert_eq!(ended_sorted, vec!["job-1".to_string(), "job-2".to_string()]);
        let next = tx
            .release_locks_and_claim(&["job-1", "job-2"], "w1", lease(30), 2)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let mut next_ids: Vec<String> = next.iter().map(|j| j.job.job_id.clone()).collect();
        next_ids.sort();
        assert_eq!(next_ids, vec!["job-4".to_string(), "job-5".to_string()]);
        assert!(next.iter().all(|j| j.lease_owner.as_deref() == Some("w1")));

        let j1 = store.get_job("job-1").await.unwrap().unwrap();
        assert_eq!(j1.job.state, JobState::Succeeded);
        assert_eq!(j1.job.step.as_deref(), Some("noop"));
        assert_eq!(j1.step_index, 1);
        assert_eq!(j1.state, step_state);
        assert!(store
            .job_log("job-1")
            .await
            .unwrap()
            .unwrap()
            .ends_with("step noop done: é\n"));
        let j2 = store.get_job("job-2").await.unwrap().unwrap();
        assert_eq!(j2.job.state, JobState::Failed);
        assert_eq!(j2.job.error.as_deref(), Some("boom"));
        assert_eq!(j2.step_index, 0);
        // The job w2 holds is untouched and keeps its lock; the ended jobs' locks are free.
        let j3 = store.get_job("job-3").await.unwrap().unwrap();
        assert_eq!(j3.job.state, JobState::Running);
        assert_eq!(j3.lease_owner.as_deref(), Some("w2"));
        let e = try_enqueue(&store, "job-x", "bench/3", &["bench/3"])
            .await
            .unwrap_err();
        assert_eq!(holder(e).1, "job-3");
        try_enqueue(&store, "job-y", "bench/1", &["bench/1"])
            .await
            .unwrap();
        try_enqueue(&store, "job-z", "bench/2", &["bench/2"])
            .await
            .unwrap();
    }
);
