//! Which tenant (and environment) a request is for: from the Host subdomain
//! (`{tenant}.{base_domain}`), the `X-Tenant-ID` header or a `/t/{tenant}/` path prefix, tried
//! in the configured order; the first source that names a tenant wins, so with `host` first a
//! client cannot pick another tenant with a header. Pure: no table, no I/O.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Host,
    Header,
    Path,
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "host" => Ok(Source::Host),
            "header" => Ok(Source::Header),
            "path" => Ok(Source::Path),
            other => Err(format!(
                "unknown tenant source {other:?} (host, header or path)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Resolver {
    order: Vec<Source>,
    /// `.{base_domain}`, lowercase.
    suffix: String,
}

/// The outcome of resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<'a> {
    pub tenant: Cow<'a, str>,
    pub env: Cow<'a, str>,
    pub source: Source,
    /// With [`Source::Path`], the path to forward (the `/t/{tenant}` prefix removed).
    pub forward_path: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "no tenant in the request: use a {0} host, an X-Tenant-ID header or a /t/{{tenant}}/ path"
    )]
    NoTenant(String),
    #[error("X-Tenant-Env {0:?} is not a valid environment name")]
    BadEnv(String),
    #[error("{0} does not name a valid tenant id")]
    BadTenant(&'static str),
}

pub fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=63).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

impl Resolver {
    pub fn new(order: Vec<Source>, base_domain: &str) -> Self {
        let base = base_domain.trim().trim_matches('.').to_ascii_lowercase();
        Self {
            order,
            suffix: format!(".{base}"),
        }
    }

    pub fn base_domain(&self) -> &str {
        &self.suffix[1..]
    }

    /// Resolves from the Host header value, the X-Tenant-ID and X-Tenant-Env values and
    /// the request path.
    pub fn resolve<'a>(
        &self,
        host: Option<&'a str>,
        tenant_header: Option<&'a str>,
        env_header: Option<&'a str>,
        path: &'a str,
    ) -> Result<Resolved<'a>, ResolveError> {
        let env: Cow<'a, str> = match env_header.map(str::trim) {
            None | Some("") => Cow::Borrowed("prod"),
            Some(e) if valid_id(e) => Cow::Borrowed(e),
            Some(e) => return Err(ResolveError::BadEnv(e.chars().take(64).collect())),
        };
        for source in &self.order {
            match source {
                Source::Host => {
                    if let Some(t) = host.and_then(|h| self.tenant_of_host(h)) {
                        if !valid_id(&t) {
                            return Err(ResolveError::BadTenant("the Host subdomain"));
                        }
                        return Ok(Resolved {
                            tenant: t,
                            env,
                            source: Source::Host,
                            forward_path: None,
                        });
                    }
                }
                Source::Header => {
                    if let Some(t) = tenant_header.map(str::trim).filter(|t| !t.is_empty()) {
                        if !valid_id(t) {
                            return Err(ResolveError::BadTenant("X-Tenant-ID"));
                        }
                        return Ok(Resolved {
                            tenant: Cow::Borrowed(t),
                            env,
                            source: Source::Header,
                            forward_path: None,
                        });
                    }
                }
                Source::Path => {
                    if let Some(rest) = path.strip_prefix("/t/") {
                        let (t, fwd) = match rest.find('/') {
                            Some(i) => (&rest[..i], &rest[i..]),
                            None => (rest, "/"),
                        };
                        if !valid_id(t) {
                            return Err(ResolveError::BadTenant("the /t/{tenant}/ path"));
                        }
                        return Ok(Resolved {
                            tenant: Cow::Borrowed(t),
                            env,
                            source: Source::Path,
                            forward_path: Some(fwd),
                        });
                    }
                }
            }
        }
        Err(ResolveError::NoTenant(format!("*{}", self.suffix)))
    }

    /// `acme.example.com[:port]` with base `example.com` → `acme`. Only one label.
    fn tenant_of_host<'a>(&self, host: &'a str) -> Option<Cow<'a, str>> {
        let host = match host.rfind(':') {
            Some(i) if !host.ends_with(']') => &host[..i],
            _ => host,
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.len() <= self.suffix.len() {
            return None;
        }
        let split = host.len() - self.suffix.len();
        if !host.is_char_boundary(split) || !host[split..].eq_ignore_ascii_case(&self.suffix) {
            return None;
        }
        let label = &host[..split];
        if label.contains('.') {
            return None;
        }
        if label.bytes().any(|b| b.is_ascii_uppercase()) {
            Some(Cow::Owned(label.to_ascii_lowercase()))
        } else {
            Some(Cow::Borrowed(label))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Resolver {
        Resolver::new(
            vec![Source::Host, Source::Header, Source::Path],
            "localhost",
        )
    }

    #[test]
    fn host_wins_over_header_in_default_order() {
        let got = r()
            .resolve(
                Some("acme.localhost:8080"),
                Some("globex"),
                None,
                "/v1/kv/x",
            )
            .unwrap();
        assert_eq!(got.tenant, "acme");
        assert_eq!(got.source, Source::Host);
        assert_eq!(got.env, "prod");
    }

    #[test]
    fn header_then_path() {
        let got = r()
            .resolve(Some("127.0.0.1:8080"), Some("globex"), Some("dev"), "/")
            .unwrap();
        assert_eq!((got.tenant.as_ref(), got.env.as_ref()), ("globex", "dev"));
        let got = r()
            .resolve(Some("127.0.0.1"), None, None, "/t/initech/v1/kv/a?x=1")
            .unwrap();
        assert_eq!(got.tenant, "initech");
        assert_eq!(got.forward_path, Some("/v1/kv/a?x=1"));
        let got = r().resolve(None, None, None, "/t/initech").unwrap();
        assert_eq!(got.forward_path, Some("/"));
    }

    #[test]
    fn order_is_configurable() {
        let r = Resolver::new(vec![Source::Header, Source::Host], "localhost");
        let got = r
            .resolve(Some("acme.localhost"), Some("globex"), None, "/")
            .unwrap();
        assert_eq!(got.tenant, "globex");
    }

    #[test]
    fn rejects_what_is_not_a_tenant() {
        assert!(matches!(
            r().resolve(Some("localhost"), None, None, "/"),
            Err(ResolveError::NoTenant(_))
        ));
        assert!(matches!(
            r().resolve(Some("a.b.localhost"), None, None, "/"),
            Err(ResolveError::NoTenant(_))
        ));
        assert!(matches!(
            r().resolve(Some("evil-localhost"), None, None, "/"),
            Err(ResolveError::NoTenant(_))
        ));
        assert_eq!(
            r().resolve(Some("x.localhost"), None, None, "/"),
            Err(ResolveError::BadTenant("the Host subdomain"))
        );
        assert!(matches!(
            r().resolve(Some("acme.localhost"), None, Some("Prod!"), "/"),
            Err(ResolveError::BadEnv(_))
        ));
        assert_eq!(
            r().resolve(Some("ACME.LocalHost"), None, None, "/")
                .unwrap()
                .tenant,
            "acme"
        );
    }
}
