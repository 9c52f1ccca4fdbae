//! The tenant key-value API: round trips, listing and bad input.

use reqwest::{Method, StatusCode};

use crate::both_backends;
use crate::helpers::{assert_problem, Backend, TestDb};

both_backends!(
    put_get_list_delete_round_trip,
    listing_pages_by_prefix_and_cursor,
    bad_input_is_a_problem_never_a_500,
);

async fn put_get_list_delete_round_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;

    let created = app.put("acme", "greeting", b"hello").await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(created.headers()["x-cell-id"], "test-cell");
    assert_eq!(created.headers()["x-app-version"], "1.2.3-test");
    let body: serde_json::Value = created.json().await.expect("json");
    assert_eq!(body["version"], 1);

    let updated = app.put("acme", "greeting", b"hello again").await;
    assert_eq!(updated.status(), StatusCode::OK);
    let body: serde_json::Value = updated.json().await.expect("json");
    assert_eq!(body["version"], 2);

    let got = app.get("acme", "greeting").await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.headers()["etag"], "\"2\"");
    assert_eq!(got.headers()["content-type"], "application/octet-stream");
    assert_eq!(got.bytes().await.expect("body").as_ref(), b"hello again");

    // Binary values and the exact 1 MiB limit survive the round trip.
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    assert_eq!(
        app.put("acme", "blob", &binary).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.value("acme", "blob").await, Some(binary));
    assert_eq!(
        app.put("acme", "empty", b"").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(app.value("acme", "empty").await, Some(Vec::new()));

    let listing = app.list("acme", "").await;
    let keys: Vec<&str> = listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["blob", "empty", "greeting"]);
    assert_eq!(listing["items"][2]["size"], 11);
    assert_eq!(listing["items"][2]["version"], 2);

    assert_eq!(
        app.delete("acme", "greeting").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.value("acme", "greeting").await, None);
    assert_problem(app.delete("acme", "greeting").await, StatusCode::NOT_FOUND).await;
    assert_eq!(app.all_keys("acme").await, ["blob", "empty"]);

    // Writing a deleted key creates it again, with a version above the tombstone's.
    let revived = app.put("acme", "greeting", b"back").await;
    assert_eq!(revived.status(), StatusCode::CREATED);
    let body: serde_json::Value = revived.json().await.expect("json");
    assert_eq!(body["version"], 4);
}

async fn listing_pages_by_prefix_and_cursor(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("user:{i:03}");
        app.put_ok("acme", &key, b"v").await;
        expected.push(key);
    }
    for key in ["user_x", "user.", "userA", "users", "a", "Z", "user:"] {
        app.put_ok("acme", key, b"v").await;
    }
    expected.push("user:".to_owned());
    expected.sort();

    let mut seen = Vec::new();
    let mut query = "prefix=user:&limit=10".to_owned();
    let mut pages = 0;
    loop {
        let page = app.list("acme", &query).await;
        pages += 1;
        for item in page["items"].as_array().expect("items") {
            seen.push(item["key"].as_str().expect("key").to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("prefix=user:&limit=10&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, expected,
        "prefix listing in byte order, no gaps or repeats"
    );

    let all = app.all_keys("acme").await;
    assert_eq!(all.len(), 32);
    assert_eq!(&all[..2], ["Z", "a"], "byte order: uppercase first");
    assert_eq!(
        app.list("acme", "prefix=nothing").await["items"],
        serde_json::json!([])
    );
}

async fn bad_input_is_a_problem_never_a_500(backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = db.spawn().await;
    app.put_ok("acme", "k", b"v").await;

    // No tenant, or a malformed one.
    let no_tenant = app
        .client
        .get(app.url("/v1/kv/k"))
        .send()
        .await
        .expect("answered");
    let detail = assert_problem(no_tenant, StatusCode::BAD_REQUEST).await;
    assert!(detail.contains("X-Tenant-ID"), "{detail}");
    for tenant in ["", "A", "acme!", "1acme", "a", "acme/../b", &"a".repeat(64)] {
        let response = app
            .client
            .get(app.url("/v1/kv/k"))
            .header("X-Tenant-ID", tenant)
            .send()
            .await
            .expect("answered");
        assert_problem(response, StatusCode::BAD_REQUEST).await;
    }

    // Keys outside the charset or too long.
    let long_key = "k".repeat(257);
    for key in ["a%20b", "a%2Fb", "%C3%A4", "a'b", long_key.as_str()] {
        assert_problem(app.put("acme", key, b"v").await, StatusCode::BAD_REQUEST).await;
        assert_problem(app.get("acme", key).await, StatusCode::BAD_REQUEST).await;
        assert_problem(app.delete("acme", key).await, StatusCode::BAD_REQUEST).await;
    }
    let oversized = vec![b'x'; (1 << 20) + 1];
    let detail = assert_problem(
        app.put("acme", "big", &oversized).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await;
    assert!(detail.contains("1048576"), "{detail}");
    assert_eq!(app.value("acme", "big").await, None);

    // Listing parameters.
    for query in [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "prefix=a%20b",
        "cursor=a%2Fb",
        "cursor=",
    ] {
        let response = app
            .tenant_request(Method::GET, "acme", &format!("/v1/kv?{query}"), None)
            .await;
        assert_problem(response, StatusCode::BAD_REQUEST).await;
    }

    // Unknown routes and methods.
    let response = app
        .tenant_request(Method::GET, "acme", "/v2/kv/k", None)
        .await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let response = app
        .tenant_request(Method::PATCH, "acme", "/v1/kv/k", None)
        .await;
    assert_problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
    let response = app
        .tenant_request(Method::GET, "acme", "/v1/kv/a/b", None)
        .await;
    assert_problem(response, StatusCode::NOT_FOUND).await;

    // Nothing above disturbed the stored value.
    assert_eq!(app.value("acme", "k").await, Some(b"v".to_vec()));
}
