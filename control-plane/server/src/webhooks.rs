//! Webhook subscriptions below the service: what a destination may be, the `whsec_`
//! secrets (Standard Webhooks 1.0) and how they are kept — encrypted with
//! XChaCha20-Poly1305 under the configured key, never hashed, since delivery signs with them.
//!
//! Destinations on loopback, private, link-local, shared (CGNAT) or cloud-metadata
//! addresses are refused unless `webhooks.allow_private_destinations` is set: a subscription
//! must not turn the control plane into a way into its own network. Names are checked here
//! as written (`localhost` and IP literals); what a name resolves to is checked again when
//! a delivery connects.

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::XChaCha20Poly1305;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest subscription URL taken.
pub const MAX_URL_BYTES: usize = 2048;

/// Why an address may not receive deliveries, or none when it may.
pub fn refused_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_v4(v4);
            }
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("a loopback address")
            } else if v6.is_unspecified() {
                Some("the unspecified address")
            } else if v6.is_multicast() {
                Some("a multicast address")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                Some("a private (unique local) address")
            } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("a cloud metadata address")
            } else {
                None
            }
        }
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("the unspecified network")
    } else if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        Some("a cloud metadata address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_private() {
        Some("a private address")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("a shared (carrier-grade NAT) address")
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("a broadcast, multicast or reserved address")
    } else {
        None
    }
}

/// Checks a destination URL: `http(s)`, a host, no credentials, at most
/// [`MAX_URL_BYTES`], and (unless `allow_private`) not a refused address. Returns the URL
/// as parsed (normalized) or the reason.
pub fn check_url(url: &str, allow_private: bool) -> Result<String, String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("must be at most {MAX_URL_BYTES} bytes"));
    }
    let u = reqwest::Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not carry credentials".into());
    }
    if u.fragment().is_some() {
        return Err("must not have a fragment".into());
    }
    let host = match u.host() {
        Some(h) => h,
        None => return Err("must name a host".into()),
    };
    if !allow_private {
        let why = match host {
            url::Host::Ipv4(ip) => refused_address(IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => refused_address(IpAddr::V6(ip)),
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                (d == "localhost" || d.ends_with(".localhost") || d.ends_with(".internal"))
                    .then_some("a local name")
            }
        };
        if let Some(why) = why {
            return Err(format!(
                "names {why}; such destinations are refused unless \
                 webhooks.allow_private_destinations is set"
            ));
        }
    }
    Ok(u.to_string())
}

/// A new subscription secret: `whsec_` and the base64 of 24 random bytes (the HMAC key).
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut key = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut key);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Encrypts and decrypts subscription secrets under the configured key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(***)")
    }
}

impl SecretBox {
    /// A box for the base64 of a 32-byte key (`webhooks.secret_key`).
    pub fn from_base64(key: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| format!("webhooks.secret_key is not base64: {e}"))?;
        Self::from_bytes(&bytes)
    }

    pub fn from_bytes(key: &[u8]) -> Result<Self, String> {
        if key.len() != 32 {
            return Err(format!(
                "webhooks.secret_key must be 32 bytes (base64), not {}",
                key.len()
            ));
        }
        Ok(Self {
            cipher: XChaCha20Poly1305::new_from_slice(key).expect("32-byte key"),
        })
    }

    /// A new random key, base64 (what a data directory keeps when none is configured).
    pub fn generate_key() -> String {
        base64::engine::general_purpose::STANDARD
            .encode(XChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// `v1:` and the base64 of nonce and ciphertext.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ct = self
            .cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .expect("encryption of a short secret does not fail");
        let mut out = nonce.to_vec();
        out.extend(ct);
        format!(
            "v1:{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    /// The plaintext of [`SecretBox::seal`]'s output; none when it was sealed under
    /// another key or altered.
    pub fn open(&self, sealed: &str) -> Option<String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed.strip_prefix("v1:")?)
            .ok()?;
        if raw.len() < 24 {
            return None;
        }
        let (nonce, ct) = raw.split_at(24);
        let pt = self
            .cipher
            .decrypt(chacha20poly1305::XNonce::from_slice(nonce), ct)
            .ok()?;
        String::from_utf8(pt).ok()
    }
}

/// The `webhook-signature` header of Standard Webhooks 1.0: `v1,` and the base64
/// HMAC-SHA256 of `{id}.{timestamp}.{body}` under each secret's key (the base64 after
/// `whsec_`), space-separated, so a receiver verifies with the old or the new secret while a
/// rotation is under way. A secret that does not decode is skipped.
pub fn sign(secrets: &[String], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut out = Vec::new();
    for s in secrets {
        let Ok(key) =
            base64::engine::general_purpose::STANDARD.decode(s.strip_prefix("whsec_").unwrap_or(s))
        else {
            continue;
        };
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        out.push(format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        ));
    }
    out.join(" ")
}

/// Resolves a destination's name and, unless private destinations are allowed, drops the
/// refused addresses: a name that resolves only to them cannot be reached (a public name
/// pointed at 127.0.0.1 or the metadata address after the subscription was taken).
#[derive(Clone)]
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || refused_address(a.ip()).is_none())
                .collect();
            if addrs.is_empty() {
                return Err(
                    format!("{host} resolves to no address a webhook may be delivered to").into(),
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client deliveries use: no redirects (a 3xx is the answer), a whole-request
/// timeout, and the resolver that keeps private addresses out.
pub fn delivery_client(allow_private: bool, timeout: std::time::Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .dns_resolver(std::sync::Arc::new(GuardedResolver { allow_private }))
        .user_agent(concat!("cellplane-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with these settings builds")
}

/// What one delivery attempt got.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Attempt {
    /// A 2xx answer within the timeout.
    pub delivered: bool,
    /// The answer's status code, when there was one.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// Why it failed without an answer (connection, timeout, refused destination).
    pub error: Option<String>,
    /// The `webhook-id` it carried.
    pub message_id: String,
}

/// Whether subscription `w` takes an event of `event_type` about `tenant_id`.
pub fn subscribed(
    w: &crate::persistence::WebhookRow,
    event_type: &str,
    tenant_id: Option<&str>,
) -> bool {
    w.events.iter().any(|e| e == "*" || e == event_type)
        && (w.tenant_id.is_none() || w.tenant_id.as_deref() == tenant_id)
}

/// The secrets that sign now: the current one, and the previous one until its grace period
/// ends. None when a sealed secret does not open with this key.
pub fn signing_secrets(
    sealer: &SecretBox,
    current: &str,
    previous: Option<&str>,
    previous_until: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Vec<String>> {
    let mut out = vec![sealer.open(current)?];
    if let (Some(prev), Some(until)) = (previous, previous_until) {
        if crate::persistence::parse_time(until).is_some_and(|t| t > now) {
            out.push(sealer.open(prev)?);
        }
    }
    Some(out)
}

/// What one attempt got, with what retrying it needs.
#[derive(Debug, Clone)]
pub struct Sent {
    pub attempt: Attempt,
    /// The answer's `Retry-After`, when it had one.
    pub retry_after: Option<std::time::Duration>,
    /// No answer within the timeout.
    pub timed_out: bool,
}

/// How an attempt ended, as delivery records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx within the timeout.
    Delivered,
    /// 410: the destination asks for no more deliveries; the subscription is disabled.
    Gone,
    /// 429, 502, 503, 504: retried, after `Retry-After` when given.
    Throttled,
    Timeout,
    /// Any other answer, or no connection.
    Failed,
}

impl Outcome {
    pub fn of(sent: &Sent) -> Outcome {
        if sent.attempt.delivered {
            return Outcome::Delivered;
        }
        if sent.timed_out {
            return Outcome::Timeout;
        }
        match sent.attempt.status {
            Some(410) => Outcome::Gone,
            Some(429 | 502 | 503 | 504) => Outcome::Throttled,
            _ => Outcome::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Gone => "gone",
            Outcome::Throttled => "throttled",
            Outcome::Timeout => "timeout",
            Outcome::Failed => "failed",
        }
    }
}

/// `Retry-After` as seconds or an HTTP date, from `now`; none when unreadable or past.
pub fn parse_retry_after(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - now).to_std().ok()
}

/// `ms` with ±10 % jitter, so retries of many deliveries that failed together spread out.
pub fn with_jitter(ms: u64) -> u64 {
    use rand::Rng;
    if ms < 10 {
        return ms;
    }
    let spread = ms / 10;
    rand::thread_rng().gen_range(ms - spread..=ms + spread)
}

/// Posts `body` to `url`, signed with `secrets` (Standard Webhooks headers, a fresh
/// timestamp). The URL is checked again first: a subscription taken before the rules
/// changed gets no request.
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    allow_private: bool,
    secrets: &[String],
    msg_id: &str,
    body: &[u8],
) -> Attempt {
    send(client, url, allow_private, secrets, msg_id, body)
        .await
        .attempt
}

/// [`deliver`], with what a retry needs.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    allow_private: bool,
    secrets: &[String],
    msg_id: &str,
    body: &[u8],
) -> Sent {
    let started = std::time::Instant::now();
    let failed = |e: String, timed_out: bool| Sent {
        attempt: Attempt {
            delivered: false,
            status: None,
            latency_ms: started.elapsed().as_millis() as u64,
            error: Some(e),
            message_id: msg_id.to_string(),
        },
        retry_after: None,
        timed_out,
    };
    if let Err(e) = check_url(url, allow_private) {
        return failed(format!("the destination {e}"), false);
    }
    let ts = chrono::Utc::now().timestamp();
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sign(secrets, msg_id, ts, body))
        .body(body.to_vec())
        .send()
        .await;
    match sent {
        Ok(r) => Sent {
            retry_after: r
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now())),
            timed_out: false,
            attempt: Attempt {
                delivered: r.status().is_success(),
                status: Some(r.status().as_u16()),
                latency_ms: started.elapsed().as_millis() as u64,
                error: None,
                message_id: msg_id.to_string(),
            },
        },
        Err(e) => {
            let timed_out = e.is_timeout();
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why.push_str(": ");
                why.push_str(&s.to_string());
                src = s.source();
            }
            failed(why, timed_out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of the Standard Webhooks specification (also what its reference
    // libraries test), recomputed with Python's hmac module.
    #[test]
    fn signatures_match_the_specification_example() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let sig = sign(
            std::slice::from_ref(&secret),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let two = sign(
            &[secret.clone(), new_secret()],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert!(two.starts_with(&format!("{sig} v1,")), "{two}");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-04T08:49:30Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Fri, 04 Dec 2026 08:49:37 GMT", now),
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Fri, 04 Dec 2026 08:49:00 GMT", now),
            None
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn jitter_stays_within_a_tenth() {
        assert_eq!(with_jitter(0), 0);
        for _ in 0..100 {
            let j = with_jitter(5_000);
            assert!((4_500..=5_500).contains(&j), "{j}");
        }
        let spread: std::collections::BTreeSet<u64> = (0..50).map(|_| with_jitter(5_000)).collect();
        assert!(spread.len() > 1, "no jitter at all");
    }

    #[test]
    fn outcomes_follow_the_status() {
        let sent = |status: Option<u16>, delivered: bool, timed_out: bool| Sent {
            attempt: Attempt {
                delivered,
                status,
                latency_ms: 1,
                error: None,
                message_id: "m".into(),
            },
            retry_after: None,
            timed_out,
        };
        assert_eq!(
            Outcome::of(&sent(Some(204), true, false)),
            Outcome::Delivered
        );
        assert_eq!(Outcome::of(&sent(Some(410), false, false)), Outcome::Gone);
        for s in [429, 502, 503, 504] {
            assert_eq!(
                Outcome::of(&sent(Some(s), false, false)),
                Outcome::Throttled
            );
        }
        assert_eq!(Outcome::of(&sent(Some(500), false, false)), Outcome::Failed);
        assert_eq!(Outcome::of(&sent(Some(301), false, false)), Outcome::Failed);
        assert_eq!(Outcome::of(&sent(None, false, true)), Outcome::Timeout);
        assert_eq!(Outcome::of(&sent(None, false, false)), Outcome::Failed);
    }

    #[test]
    fn private_link_local_and_metadata_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "127.8.9.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.10.10",
            "169.254.169.254",
            "100.64.0.1",
            "100.100.100.200",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "ff02::1",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert!(refused_address(ip).is_some(), "{a} should be refused");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "2001:db8::1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(refused_address(ip), None, "{a} should be allowed");
        }
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        assert!(check_url("https://hooks.example.com/in?x=1", false).is_ok());
        for (u, why) in [
            ("ftp://example.com/", "http or https"),
            ("https://user:pw@example.com/", "credentials"),
            ("https://user@example.com/", "credentials"),
            ("not a url", "is not a URL"),
            ("http://127.0.0.1:9000/", "loopback"),
            ("http://[::1]:9000/", "loopback"),
            ("http://localhost/", "local name"),
            ("http://api.localhost/", "local name"),
            ("http://169.254.169.254/latest/meta-data", "metadata"),
            ("http://10.0.0.5/", "private"),
            ("https://example.com/#frag", "fragment"),
        ] {
            let e = check_url(u, false).unwrap_err();
            assert!(e.contains(why), "{u}: {e}");
        }
        assert!(check_url("http://127.0.0.1:9000/hook", true).is_ok());
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(check_url(&long, true).unwrap_err().contains("2048"));
    }

    #[test]
    fn secrets_are_sealed_and_opened_only_with_their_key() {
        let key = SecretBox::generate_key();
        let b = SecretBox::from_base64(&key).unwrap();
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        let sealed = b.seal(&s);
        assert!(!sealed.contains(&s[6..]));
        assert_ne!(sealed, b.seal(&s), "a fresh nonce each time");
        assert_eq!(b.open(&sealed).as_deref(), Some(s.as_str()));
        let other = SecretBox::from_base64(&SecretBox::generate_key()).unwrap();
        assert_eq!(other.open(&sealed), None);
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push('A');
        assert_eq!(b.open(&tampered), None);
        assert!(SecretBox::from_base64("c2hvcnQ=").is_err());
    }
}
