//! Webhook subscriptions (issue "Signed webhooks…", item 2): secrets shown once and kept
//! encrypted, rotation, validation of destinations before any request, tenant-admin scoping.

use cellplane_tests::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A fixed key for the subscriptions' secrets (base64 of 32 bytes), as an operator sets it.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

fn options() -> AppOptions {
    AppOptions::default().with("CELLPLANE__WEBHOOKS__SECRET_KEY", KEY)
}

async fn post(app: &TestApp, token: Option<&str>, path: &str, body: Value) -> (u16, Value) {
    let c = match token {
        Some(t) => app.client(t),
        None => app.admin.clone(),
    };
    let r = c
        .request(Method::POST, path)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn token(app: &TestApp, role: &str, tenant: Option<&str>) -> String {
    let mut body = json!({"role": role});
    if let Some(t) = tenant {
        body["tenant_id"] = json!(t);
    }
    let t: Value = app.admin.post("/v1/tokens", &body).await.unwrap();
    t["token"].as_str().unwrap().to_string()
}

both_backends!(
    a_subscription_shows_its_secret_once_and_keeps_it_encrypted,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        let (status, created) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": "https://hooks.example.com/in", "events": ["*"],
                   "description": "billing"}),
        )
        .await;
        assert_eq!(status, 201, "{created}");
        let id = created["webhook_id"].as_str().unwrap().to_string();
        let secret = created["secret"].as_str().unwrap().to_string();
        assert!(
            secret.starts_with("whsec_") && secret.len() > 30,
            "{secret}"
        );
        assert_eq!(created["state"], "enabled");
        assert_eq!(created["ordering"], "none");
        assert_eq!(created["version"], 1);
        assert!(created["tenant_id"].is_null());

        // Never shown again, never stored in clear.
        let got: Value = app.admin.get(&format!("/v1/webhooks/{id}")).await.unwrap();
        assert!(got.get("secret").is_none(), "{got}");
        let listed: Value = app.admin.get("/v1/webhooks").await.unwrap();
        assert_eq!(listed["items"].as_array().unwrap().len(), 1);
        assert!(listed["items"][0].get("secret").is_none());
        let stored = app
            .sql_text(&format!(
                "SELECT secret_enc FROM webhooks WHERE webhook_id = '{id}'"
            ))
            .await;
        assert!(stored.starts_with("v1:"), "{stored}");
        assert!(
            !stored.contains(&secret[6..]),
            "the secret is stored in clear"
        );
        let audit: Value = app
            .admin
            .get(&format!("/v1/audit?target=webhook/{id}"))
            .await
            .unwrap();
        assert!(
            !audit.to_string().contains(&secret[6..]),
            "the secret reached the audit trail"
        );

        // An idempotent replay of the creation answers without the secret.
        let body = json!({"url": "https://hooks.example.com/other", "events": ["*"]});
        let first = app
            .req(Method::POST, "/v1/webhooks")
            .header("Idempotency-Key", "wh-create-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), 201);
        let first: Value = first.json().await.unwrap();
        assert!(first["secret"].is_string());
        let replay = app
            .req(Method::POST, "/v1/webhooks")
            .header("Idempotency-Key", "wh-create-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status(), 201);
        let replay: Value = replay.json().await.unwrap();
        assert_eq!(replay["webhook_id"], first["webhook_id"]);
        assert!(replay.get("secret").is_none(), "{replay}");

        // Rotation: a new secret, the old one kept (encrypted) for the grace period.
        let (status, rotated) = post(
            &app,
            None,
            &format!("/v1/webhooks/{id}/rotate-secret"),
            json!({}),
        )
        .await;
        assert_eq!(status, 200, "{rotated}");
        let new_secret = rotated["secret"].as_str().unwrap();
        assert!(new_secret.starts_with("whsec_"));
        assert_ne!(new_secret, secret);
        assert_eq!(rotated["version"], 2);
        let until = rotated["previous_secret_expires_at"].as_str().unwrap();
        assert!(cellplane::persistence::parse_time(until).unwrap() > chrono::Utc::now());
        let previous = app
            .sql_text(&format!(
                "SELECT previous_secret_enc FROM webhooks WHERE webhook_id = '{id}'"
            ))
            .await;
        assert_eq!(
            previous, stored,
            "the previous secret is kept as it was sealed"
        );

        // Changes: If-Match guards them; state, events and ordering change.
        let stale = app
            .req(Method::PATCH, &format!("/v1/webhooks/{id}"))
            .header("If-Match", "\"1\"")
            .json(&json!({"state": "disabled"}))
            .send()
            .await
            .unwrap();
        expect_problem(stale, 412).await;
        let patched: Value = app
            .admin
            .patch(
                &format!("/v1/webhooks/{id}"),
                &json!({"state": "disabled", "ordering": "per-subject",
                        "events": ["dev.cellplane.tenancy.activated.v1"]}),
            )
            .await
            .unwrap();
        assert_eq!(patched["state"], "disabled");
        assert_eq!(patched["ordering"], "per-subject");
        assert_eq!(
            patched["events"],
            json!(["dev.cellplane.tenancy.activated.v1"])
        );
        assert_eq!(patched["version"], 3);

        let r = app
            .req(Method::DELETE, &format!("/v1/webhooks/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        expect_problem(
            app.req(Method::GET, &format!("/v1/webhooks/{id}"))
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        assert!(app.audit_verify_ok().await);
    }
);

both_backends!(
    destinations_and_event_types_are_checked_before_any_request,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        // A port that must receive nothing: subscriptions are refused before any request.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let long = format!("https://hooks.example.com/{}", "a".repeat(2100));
        for (body, field) in [
            (
                json!({"url": "ftp://hooks.example.com/", "events": ["*"]}),
                "url",
            ),
            (
                json!({"url": "https://u:p@hooks.example.com/", "events": ["*"]}),
                "url",
            ),
            (json!({"url": long, "events": ["*"]}), "url"),
            (
                json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["*"]}),
                "url",
            ),
            (
                json!({"url": format!("http://localhost:{port}/hook"), "events": ["*"]}),
                "url",
            ),
            (
                json!({"url": "http://169.254.169.254/latest", "events": ["*"]}),
                "url",
            ),
            (json!({"url": "http://10.1.2.3/", "events": ["*"]}), "url"),
            (
                json!({"url": "https://hooks.example.com/", "events": ["dev.cellplane.nope.v1"]}),
                "events",
            ),
            (
                json!({"url": "https://hooks.example.com/", "events": []}),
                "events",
            ),
            (
                json!({"url": "https://hooks.example.com/", "events": ["*", "dev.cellplane.tenancy.activated.v1"]}),
                "events",
            ),
            (
                json!({"url": "https://hooks.example.com/", "events": ["*"], "tenant_id": "ghost"}),
                "tenant_id",
            ),
        ] {
            let (status, p) = post(&app, None, "/v1/webhooks", body.clone()).await;
            assert_eq!(status, 400, "{body}: {p}");
            assert!(p.to_string().contains(field), "{body}: {p}");
        }
        assert!(
            listener.accept().is_err(),
            "a refused subscription reached its destination"
        );
        let count = app.sql_i64("SELECT COUNT(*) FROM webhooks").await.unwrap();
        assert_eq!(count, 0, "nothing is stored for a refused subscription");

        // With the allowance (tests, development), loopback is a destination like any other.
        let open = TestApp::spawn_with(
            b,
            options().with("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true"),
        )
        .await;
        let (status, created) = post(
            &open,
            None,
            "/v1/webhooks",
            json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["*"]}),
        )
        .await;
        assert_eq!(status, 201, "{created}");
    }
);

both_backends!(
    a_tenant_admin_manages_only_its_own_subscriptions,
    |b| async move {
        let app = TestApp::spawn_with(b, options()).await;
        app.create_org("acme-corp").await;
        app.create_tenant("tenant-a", "acme-corp").await;
        app.create_tenant("tenant-b", "acme-corp").await;
        let ta = token(&app, "tenant-admin", Some("tenant-a")).await;
        let url = "https://hooks.example.com/in";
        let (status, own) = post(
            &app,
            Some(&ta),
            "/v1/webhooks",
            json!({"url": url, "events": ["*"]}),
        )
        .await;
        assert_eq!(status, 201, "{own}");
        assert_eq!(own["tenant_id"], "tenant-a");
        let (status, p) = post(
            &app,
            Some(&ta),
            "/v1/webhooks",
            json!({"url": url, "events": ["*"], "tenant_id": "tenant-b"}),
        )
        .await;
        assert_eq!(status, 400, "{p}");
        assert!(p.to_string().contains("tenant_id"), "{p}");
        let (status, other) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": url, "events": ["*"], "tenant_id": "tenant-b"}),
        )
        .await;
        assert_eq!(status, 201, "{other}");
        let other_id = other["webhook_id"].as_str().unwrap();

        let mine: Value = app.client(&ta).get("/v1/webhooks").await.unwrap();
        let ids: Vec<&str> = mine["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["webhook_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [own["webhook_id"].as_str().unwrap()]);
        let c = app.client(&ta);
        for (method, path) in [
            (Method::GET, format!("/v1/webhooks/{other_id}")),
            (Method::PATCH, format!("/v1/webhooks/{other_id}")),
            (Method::DELETE, format!("/v1/webhooks/{other_id}")),
            (
                Method::POST,
                format!("/v1/webhooks/{other_id}/rotate-secret"),
            ),
        ] {
            let r = c
                .request(method.clone(), &path)
                .json(&json!({"state": "disabled"}))
                .send()
                .await
                .unwrap();
            expect_problem(r, 404).await;
        }
        let all: Value = app.admin.get("/v1/webhooks").await.unwrap();
        assert_eq!(all["items"].as_array().unwrap().len(), 2);

        // A viewer reads, and may not subscribe.
        let viewer = token(&app, "viewer", None).await;
        let (status, _) = post(
            &app,
            Some(&viewer),
            "/v1/webhooks",
            json!({"url": url, "events": ["*"]}),
        )
        .await;
        assert_eq!(status, 403);
        let seen: Value = app.client(&viewer).get("/v1/webhooks").await.unwrap();
        assert_eq!(seen["items"].as_array().unwrap().len(), 2);
    }
);

// With SQLite and no configured key, the data directory keeps a generated one (0600);
// with PostgreSQL, replicas must share the key, so subscriptions wait for it (503).
both_backends!(
    without_a_configured_key_sqlite_generates_one_and_postgres_refuses,
    |b| async move {
        let app = TestApp::spawn(b).await;
        let (status, body) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": "https://hooks.example.com/in", "events": ["*"]}),
        )
        .await;
        let key_file = app.data_dir.join("webhook-key");
        match b {
            Backend::Sqlite => {
                assert_eq!(status, 201, "{body}");
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            Backend::Postgres => {
                assert_eq!(status, 503, "{body}");
                assert!(!key_file.exists());
            }
        }
    }
);

/// What a receiver got: the request's headers (lower-case names) and body.
struct Received {
    headers: std::collections::BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A webhook receiver written for the test (not the project's code): answers every request
/// with `status` and hands what it got to the channel.
async fn receiver(
    status: u16,
) -> (
    u16,
    tokio::sync::mpsc::UnboundedReceiver<Received>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let mut headers = std::collections::BTreeMap::new();
            for line in head.lines().skip(1) {
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_end..].to_vec();
            let _ = sock
                .write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tx.send(Received { headers, body });
        }
    });
    (port, rx, task)
}

/// Standard Webhooks verification, as a receiver implements it from the specification:
/// true when one of the `v1,` signatures is the HMAC-SHA256 of `{id}.{timestamp}.{body}`
/// under the secret's key.
fn verifies(secret: &str, r: &Received) -> bool {
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    let signed = format!(
        "{}.{}.{}",
        r.headers["webhook-id"],
        r.headers["webhook-timestamp"],
        String::from_utf8_lossy(&r.body)
    );
    mac.update(signed.as_bytes());
    let expected = b64.encode(mac.finalize().into_bytes());
    r.headers["webhook-signature"]
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
}

both_backends!(
    a_ping_is_signed_per_the_specification_and_verifies_with_both_secrets_while_rotating,
    |b| async move {
        let app = TestApp::spawn_with(
            b,
            options().with("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true"),
        )
        .await;
        let (port, mut got, _rx_task) = receiver(200).await;
        let (status, w) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": format!("http://127.0.0.1:{port}/hook"), "events": ["*"]}),
        )
        .await;
        assert_eq!(status, 201, "{w}");
        let id = w["webhook_id"].as_str().unwrap();
        let old = w["secret"].as_str().unwrap().to_string();

        let (status, attempt) =
            post(&app, None, &format!("/v1/webhooks/{id}/test"), json!({})).await;
        assert_eq!(status, 200, "{attempt}");
        assert_eq!(attempt["delivered"], true, "{attempt}");
        assert_eq!(attempt["status"], 200);
        let r = got.recv().await.unwrap();
        assert_eq!(
            r.headers["webhook-id"],
            attempt["message_id"].as_str().unwrap()
        );
        assert_eq!(r.headers["content-type"], "application/json");
        let ts: i64 = r.headers["webhook-timestamp"].parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60, "{ts}");
        assert!(
            verifies(&old, &r),
            "the signature does not verify: {:?}",
            r.headers
        );
        let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert!(
            !verifies(other, &r),
            "any secret verifies: the check is void"
        );
        let event: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(event["type"], "dev.cellplane.webhook.ping.v1");
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["data"]["webhook_id"], id);
        assert_eq!(event["id"], r.headers["webhook-id"].as_str());

        // During a rotation both secrets verify the same delivery.
        let (_, rotated) = post(
            &app,
            None,
            &format!("/v1/webhooks/{id}/rotate-secret"),
            json!({}),
        )
        .await;
        let new = rotated["secret"].as_str().unwrap().to_string();
        let (_, attempt) = post(&app, None, &format!("/v1/webhooks/{id}/test"), json!({})).await;
        assert_eq!(attempt["delivered"], true, "{attempt}");
        let r = got.recv().await.unwrap();
        assert_eq!(r.headers["webhook-signature"].split(' ').count(), 2);
        assert!(verifies(&old, &r) && verifies(&new, &r), "{:?}", r.headers);

        // A destination that is down: no answer, the reason given.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        let (_, d) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": format!("http://127.0.0.1:{dead}/hook"), "events": ["*"]}),
        )
        .await;
        let (status, attempt) = post(
            &app,
            None,
            &format!("/v1/webhooks/{}/test", d["webhook_id"].as_str().unwrap()),
            json!({}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(attempt["delivered"], false);
        assert!(attempt["status"].is_null());
        assert!(attempt["error"].is_string(), "{attempt}");

        // An answer that is not 2xx is not a delivery.
        let (port410, mut got410, _t) = receiver(410).await;
        let (_, g) = post(
            &app,
            None,
            "/v1/webhooks",
            json!({"url": format!("http://127.0.0.1:{port410}/gone"), "events": ["*"]}),
        )
        .await;
        let (_, attempt) = post(
            &app,
            None,
            &format!("/v1/webhooks/{}/test", g["webhook_id"].as_str().unwrap()),
            json!({}),
        )
        .await;
        assert_eq!(
            (attempt["delivered"].clone(), attempt["status"].clone()),
            (json!(false), json!(410))
        );
        assert!(got410.recv().await.is_some());
    }
);

/// An HTTPS receiver (Python's `ssl`, a certificate made here with `openssl`): answers every
/// POST 204 and records the `webhook-id`s it got. Returns the port, the path of the CA that
/// signed its certificate, and the receiver's process.
fn https_receiver(dir: &std::path::Path) -> (u16, std::path::PathBuf, std::process::Child) {
    // A CA, and a server certificate for 127.0.0.1 it signed (a self-signed certificate
    // used as a server's own is refused by the verifier: `CaUsedAsEndEntity`).
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr, ext) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("leaf.csr"),
        dir.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl {args:?}");
    };
    let s = |v: &str| std::ffi::OsStr::new(v).to_owned();
    openssl(&[
        &s("req"),
        &s("-x509"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-days"),
        &s("1"),
        &s("-subj"),
        &s("/CN=cellplane-test-ca"),
        &s("-keyout"),
        ca_key.as_os_str(),
        &s("-out"),
        ca.as_os_str(),
    ]);
    openssl(&[
        &s("req"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-subj"),
        &s("/CN=127.0.0.1"),
        &s("-keyout"),
        key.as_os_str(),
        &s("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        &s("x509"),
        &s("-req"),
        &s("-in"),
        csr.as_os_str(),
        &s("-CA"),
        ca.as_os_str(),
        &s("-CAkey"),
        ca_key.as_os_str(),
        &s("-CAcreateserial"),
        &s("-days"),
        &s("1"),
        &s("-out"),
        cert.as_os_str(),
        &s("-extfile"),
        ext.as_os_str(),
    ]);
    let script = dir.join("https_receiver.py");
    std::fs::write(
        &script,
        r#"import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        with open(sys.argv[3], "a") as f:
            f.write(self.headers["webhook-id"] + "\n")
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_port, flush=True)
s.serve_forever()
"#,
    )
    .unwrap();
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .arg(&cert)
        .arg(&key)
        .arg(dir.join("got.txt"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    (line.trim().parse().unwrap(), ca, child)
}

// Deliveries go out over TLS, verified against the system's trust store (here: the test's
// certificate, named by SSL_CERT_FILE); an unknown certificate fails the attempt.
both_backends!(
    https_destinations_are_verified_against_the_trust_store,
    |b| async move {
        let dir = tempfile::tempdir().unwrap();
        let (port, ca, mut child) = https_receiver(dir.path());
        for trusted in [false, true] {
            let mut options =
                options().with("CELLPLANE__WEBHOOKS__ALLOW_PRIVATE_DESTINATIONS", "true");
            if trusted {
                options = options.with("SSL_CERT_FILE", ca.to_str().unwrap());
            }
            let app = TestApp::spawn_with(b, options).await;
            let (status, w) = post(
                &app,
                None,
                "/v1/webhooks",
                json!({"url": format!("https://127.0.0.1:{port}/hook"), "events": ["*"]}),
            )
            .await;
            assert_eq!(status, 201, "{w}");
            let id = w["webhook_id"].as_str().unwrap();
            let (status, attempt) =
                post(&app, None, &format!("/v1/webhooks/{id}/test"), json!({})).await;
            assert_eq!(status, 200, "{attempt}");
            if trusted {
                assert_eq!(attempt["delivered"], true, "{attempt}");
                assert_eq!(attempt["status"], 204);
                let got = std::fs::read_to_string(dir.path().join("got.txt")).unwrap();
                assert!(got.contains(attempt["message_id"].as_str().unwrap()));
            } else {
                assert_eq!(attempt["delivered"], false, "{attempt}");
                let e = attempt["error"].as_str().unwrap().to_lowercase();
                assert!(e.contains("certificate"), "{e}");
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
);
