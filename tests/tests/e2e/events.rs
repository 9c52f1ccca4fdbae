//! Public events (issue "Signed webhooks…", item 1): the CloudEvents envelope, the pull API
//! `GET /v1/events`, its filters, paging and tenant scoping, and `docs/events.md` as the
//! schema every published `data` follows.

use cellplane_api::EventType;
use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The JSON Schema of each event type's `data`, read from `docs/events.md`: the ```json
/// block under each "### `type`" heading.
pub fn documented_schemas() -> BTreeMap<String, Value> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events.md"))
            .expect("docs/events.md");
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut block: Option<String> = None;
    for line in doc.lines() {
        if let Some(b) = block.as_mut() {
            if line.trim() == "```" {
                let schema: Value = serde_json::from_str(b).expect("schema block parses");
                if let Some(t) = current.take() {
                    out.insert(t, schema);
                }
                block = None;
            } else {
                b.push_str(line);
                b.push('\n');
            }
        } else if let Some(h) = line.strip_prefix("### `") {
            current = h.strip_suffix('`').map(str::to_string);
        } else if line.trim() == "```json" && current.is_some() {
            block = Some(String::new());
        }
    }
    out
}

/// Checks `data` against the documented schema: exactly the listed properties, each of
/// the documented JSON type (and enum, when there is one).
pub fn check_data(event_type: &str, data: &Value, schemas: &BTreeMap<String, Value>) {
    let schema = schemas
        .get(event_type)
        .unwrap_or_else(|| panic!("{event_type} is not documented in docs/events.md"));
    let props = schema["properties"].as_object().expect("properties");
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let keys: BTreeSet<&str> = data
        .as_object()
        .expect("data is an object")
        .keys()
        .map(String::as_str)
        .collect();
    let documented: BTreeSet<&str> = props.keys().map(String::as_str).collect();
    assert_eq!(keys, documented, "{event_type}: {data}");
    assert!(required.is_subset(&keys), "{event_type}: {data}");
    for (k, p) in props {
        let v = &data[k];
        let types: Vec<&str> = match &p["type"] {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(|t| t.as_str()).collect(),
            _ => panic!("{event_type}.{k}: no type"),
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            "null" => v.is_null(),
            "boolean" => v.is_boolean(),
            _ => false,
        });
        assert!(ok, "{event_type}.{k} = {v} is not {types:?}");
        if let Some(allowed) = p["enum"].as_array() {
            assert!(
                allowed.contains(v),
                "{event_type}.{k} = {v} not in {allowed:?}"
            );
        }
    }
}

pub async fn events(client: &cellplane_api::Client, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?{query}&cursor={c}"),
            None => format!("/v1/events?{query}"),
        };
        let page: Value = client.get(&path).await.expect("GET /v1/events");
        out.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

fn types_of(evs: &[Value]) -> Vec<&str> {
    evs.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn every_event_type_is_documented_with_its_schema() {
    let schemas = documented_schemas();
    let documented: BTreeSet<&str> = schemas.keys().map(String::as_str).collect();
    let published: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(documented, published);
    for (t, s) in &schemas {
        let props: BTreeSet<&String> = s["properties"].as_object().unwrap().keys().collect();
        for r in s["required"].as_array().unwrap() {
            assert!(props.contains(&r.as_str().unwrap().to_string()), "{t}: {r}");
        }
    }
}

both_backends!(
    tenant_lifecycle_publishes_five_events_in_order,
    |b| async move {
        let app = TestApp::spawn(b).await;
        let schemas = documented_schemas();
        app.stamp_local("euw1-pool-1", json!({})).await;
        app.create_org("acme-corp").await;
        app.create_tenant("acme", "acme-corp").await;
        app.create_tenant("globex", "acme-corp").await;
        for action in ["activate", "suspend", "resume", "archive"] {
            app.lifecycle("acme", action).await;
        }
        app.lifecycle("globex", "activate").await;

        // One tenant's lifecycle: exactly its five events, in commit order, each once.
        let acme = events(&app.admin, "subject=tenant/acme").await;
        assert_eq!(
            types_of(&acme),
            [
                "dev.cellplane.tenancy.created.v1",
                "dev.cellplane.tenancy.activated.v1",
                "dev.cellplane.tenancy.suspended.v1",
                "dev.cellplane.tenancy.resumed.v1",
                "dev.cellplane.tenancy.archived.v1",
            ]
        );
        let states: Vec<&Value> = acme[1..].iter().map(|e| &e["data"]["state"]).collect();
        assert_eq!(
            states,
            [
                &json!("active"),
                &json!("suspended"),
                &json!("active"),
                &json!("archived")
            ]
        );
        let seqs: Vec<i64> = acme.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let ids: BTreeSet<&str> = acme.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 5);
        for e in &acme {
            assert_eq!(e["specversion"], "1.0");
            assert_eq!(e["source"], "urn:cellplane:control-plane");
            assert_eq!(e["subject"], "tenant/acme");
            assert_eq!(e["datacontenttype"], "application/json");
            assert_eq!(e["data"]["tenant_id"], "acme");
            assert!(cellplane::persistence::parse_time(e["time"].as_str().unwrap()).is_some());
            assert!(e["correlationid"].is_string(), "{e}");
        }
        // Internal payload fields never leak.
        let created = &acme[0]["data"];
        assert_eq!(created["organization_id"], "acme-corp");
        assert!(created.get("quotas").is_none() && created.get("billing").is_none());

        // Everything published follows its documented schema, and internal records (routes,
        // job requests, placements, tokens) are not published at all.
        let all = events(&app.admin, "limit=2").await;
        assert!(all.len() > acme.len());
        for e in &all {
            check_data(e["type"].as_str().unwrap(), &e["data"], &schemas);
        }
        assert!(types_of(&all).contains(&"dev.cellplane.cell.registered.v1"));
        assert!(types_of(&all).contains(&"dev.cellplane.cell.stamped.v1"));
        let published: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert!(types_of(&all).iter().all(|t| published.contains(t)));
        // Paging by cursor and by `after` give the same sequence.
        let unpaged = events(&app.admin, "limit=1000").await;
        assert_eq!(all, unpaged);
        let after = acme[1]["seq"].as_i64().unwrap();
        assert_eq!(
            events(&app.admin, &format!("subject=tenant/acme&after={after}")).await,
            acme[2..].to_vec()
        );
        // Type filters, one or several.
        let activated = events(&app.admin, "type=dev.cellplane.tenancy.activated.v1").await;
        let subjects: Vec<&str> = activated
            .iter()
            .map(|e| e["subject"].as_str().unwrap())
            .collect();
        assert_eq!(subjects, ["tenant/acme", "tenant/globex"]);
        let two = events(
            &app.admin,
            "type=dev.cellplane.tenancy.suspended.v1,dev.cellplane.tenancy.resumed.v1",
        )
        .await;
        assert_eq!(
            types_of(&two),
            [
                "dev.cellplane.tenancy.suspended.v1",
                "dev.cellplane.tenancy.resumed.v1"
            ]
        );

        // A tenant-admin reads only its own tenant's events.
        let t: Value = app
            .admin
            .post(
                "/v1/tokens",
                &json!({"role": "tenant-admin", "tenant_id": "globex"}),
            )
            .await
            .unwrap();
        let globex_admin = app.client(t["token"].as_str().unwrap());
        let own = events(&globex_admin, "limit=1000").await;
        assert_eq!(
            types_of(&own),
            [
                "dev.cellplane.tenancy.created.v1",
                "dev.cellplane.tenancy.activated.v1"
            ]
        );
        assert!(own.iter().all(|e| e["subject"] == "tenant/globex"));
        assert!(events(&globex_admin, "subject=tenant/acme")
            .await
            .is_empty());
        let viewer = app.client(&app.token("viewer").await);
        assert_eq!(events(&viewer, "limit=1000").await, unpaged);

        // Bad input: 400 naming the field.
        for (query, field) in [
            ("type=dev.cellplane.nope.v1", "type"),
            ("type=", "type"),
            ("subject=acme", "subject"),
            ("subject=route/acme", "subject"),
            ("subject=tenant/ACME", "subject"),
            ("after=-1", "after"),
            ("limit=0", "limit"),
            ("cursor=zz", "cursor"),
        ] {
            let p = expect_problem(
                app.req(Method::GET, &format!("/v1/events?{query}"))
                    .send()
                    .await
                    .unwrap(),
                400,
            )
            .await;
            assert!(p.to_string().contains(field), "{query}: {p}");
        }
        expect_problem(
            app.anonymous()
                .request(Method::GET, "/v1/events")
                .send()
                .await
                .unwrap(),
            401,
        )
        .await;
    }
);
