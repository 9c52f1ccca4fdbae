//! HTTP/1.1 on the wire for the tenant listener: request and response heads parsed in
//! place with `httparse` (no header map, no allocation per header), the head forwarded to
//! a cell written straight from the client's bytes, and the body framing (RFC 9112 §6)
//! tracked so that body bytes are copied through untouched. What a proxy must not pass on
//! is dropped on the way: hop-by-hop headers and what `Connection` lists, the headers only
//! the router may set and their underscore twins (see `trusted_twin`), ambiguous framing
//! (`Content-Length` with `Transfer-Encoding`, conflicting lengths), which is refused rather
//! than guessed at.

use std::fmt::Write as _;

/// Longest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a head.
pub const MAX_HEADERS: usize = 100;
/// Most distinct options one message's `Connection` fields may list.
const MAX_LISTED: usize = 8;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Responses only: the body ends when the cell closes the connection.
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// More bytes are needed.
    Partial,
    /// The head is longer than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// Not valid HTTP/1.x, or framing a proxy must not guess at.
    Bad(String),
}

/// What a header field is to the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    Expect,
    /// Hop-by-hop: never forwarded.
    HopByHop,
    XTenantId,
    XTenantEnv,
    XCorrelationId,
    /// A name that reads as one of the router's trusted headers once `_` is read as `-`
    /// (`X_Tenant_ID`, `x-tenant_env`): never forwarded. The trusted header's name.
    TrustedTwin(&'static str),
    Date,
    /// A cell's usage report for the response (`X-Usage-Units`): metered, not relayed.
    XUsageUnits,
}

fn kind(name: &str) -> Kind {
    let eq = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if eq("te") => Kind::HopByHop,
        4 if eq("host") => Kind::Host,
        4 if eq("date") => Kind::Date,
        6 if eq("expect") => Kind::Expect,
        7 if eq("upgrade") || eq("trailer") => Kind::HopByHop,
        10 if eq("connection") => Kind::Connection,
        10 if eq("keep-alive") => Kind::HopByHop,
        11 if eq("x-tenant-id") => Kind::XTenantId,
        11 if trusted_twin(name, "x-tenant-id") => Kind::TrustedTwin("X-Tenant-ID"),
        12 if eq("x-tenant-env") => Kind::XTenantEnv,
        13 if eq("x-usage-units") => Kind::XUsageUnits,
        12 if trusted_twin(name, "x-tenant-env") => Kind::TrustedTwin("X-Tenant-Env"),
        14 if eq("content-length") => Kind::ContentLength,
        16 if eq("proxy-connection") => Kind::HopByHop,
        16 if eq("x-correlation-id") => Kind::XCorrelationId,
        16 if trusted_twin(name, "x-correlation-id") => Kind::TrustedTwin("X-Correlation-ID"),
        17 if eq("transfer-encoding") => Kind::TransferEncoding,
        18 if eq("proxy-authenticate") => Kind::HopByHop,
        19 if eq("proxy-authorization") => Kind::HopByHop,
        _ => Kind::Plain,
    }
}

/// Whether `name` is `trusted` (lowercase, with `-`) compared case-insensitively with `_`
/// read as `-`. CGI-style stacks (`HTTP_X_TENANT_ID`) and some frameworks fold `X_Tenant_ID`
/// and `X-Tenant-ID` into one variable, so a client's `X_Tenant_ID` would pass for the
/// router's `X-Tenant-ID`. Byte compares, no allocation; only called for names of the
/// trusted headers' lengths that are not the trusted header itself.
fn trusted_twin(name: &str, trusted: &str) -> bool {
    name.len() == trusted.len()
        && name
            .bytes()
            .zip(trusted.bytes())
            .all(|(a, t)| a.to_ascii_lowercase() == t || (a == b'_' && t == b'-'))
}

/// Header names a `Connection` field lists (RFC 9110 §7.6.1), dropped when forwarding.
/// `close` and `keep-alive` are options, not fields; framing fields and `Host` are never
/// dropped on a client's say-so.
#[derive(Debug, Default, Clone, Copy)]
struct Listed<'b> {
    names: [&'b str; MAX_LISTED],
    n: usize,
    close: bool,
    keep_alive: bool,
}

impl<'b> Listed<'b> {
    fn add(&mut self, value: &'b [u8]) -> Result<(), HeadError> {
        let value = std::str::from_utf8(value)
            .map_err(|_| HeadError::Bad("Connection is not valid text".into()))?;
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case("close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                self.keep_alive = true;
            } else if !matches!(
                kind(token),
                Kind::Host | Kind::ContentLength | Kind::TransferEncoding
            ) && !self.contains(token)
            {
                if self.n == MAX_LISTED {
                    return Err(HeadError::Bad("Connection lists too many options".into()));
                }
                self.names[self.n] = token;
                self.n += 1;
            }
        }
        Ok(())
    }

    fn contains(&self, name: &str) -> bool {
        self.names[..self.n]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, HeadError> {
    let bad = || HeadError::Bad("Content-Length is not a single non-negative integer".into());
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match seen {
        Some(m) if m != n => Err(HeadError::Bad("conflicting Content-Length fields".into())),
        _ => Ok(n),
    }
}

/// Whether a `Transfer-Encoding` value ends with `chunked`.
fn ends_chunked(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

fn parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        other => HeadError::Bad(format!("malformed request head: {other}")),
    }
}

/// A parsed request head; every slice borrows the client's read buffer.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    pub method: &'b str,
    /// The path and query to forward (origin-form, also from an absolute-form target).
    pub path: &'b str,
    pub http10: bool,
    headers: &'h [httparse::Header<'b>],
    /// The Host header, or the authority of an absolute-form target (which wins).
    pub host: Option<&'b str>,
    absolute: bool,
    pub tenant_header: Option<&'b str>,
    pub env_header: Option<&'b str>,
    pub correlation_id: Option<&'b str>,
    /// The first field whose name is an underscore twin of a trusted header, and the
    /// trusted header it reads as (`("X_Tenant_ID", "X-Tenant-ID")`). Such fields are never
    /// forwarded; with `--underscore-trusted-headers refuse` the request is answered 400.
    pub trusted_twin: Option<(&'b str, &'static str)>,
    pub framing: Framing,
    /// The client may send another request on this connection afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the router answers it itself before reading the body.
    pub expect_continue: bool,
    listed: Listed<'b>,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
}

impl Request<'_, '_> {
    /// `HEAD` (its response never has a body).
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// Parses a request head at the start of `buf`.
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [httparse::Header<'b>],
) -> Result<Request<'h, 'b>, HeadError> {
    let mut req = httparse::Request::new(storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(e) => return Err(parse_error(e)),
    };
    if head_len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let method = req.method.unwrap_or("GET");
    let target = req.path.unwrap_or("/");
    let http10 = req.version == Some(0);
    let headers: &'h [httparse::Header<'b>] = req.headers;
    if method == "CONNECT" {
        return Err(HeadError::Bad("CONNECT is not supported".into()));
    }
    let (mut host, absolute, path) = match split_absolute(target) {
        Some((authority, path)) => (Some(authority), true, path),
        None => (None, false, target),
    };
    let mut host_fields = 0;
    let (mut tenant_header, mut env_header, mut correlation_id) = (None, None, None);
    let mut trusted_twin = None;
    let (mut length, mut chunked, mut te) = (None, false, false);
    let mut expect_continue = false;
    let mut listed = Listed::default();
    let text = |v: &'b [u8]| std::str::from_utf8(v).ok().map(str::trim);
    for h in headers {
        match kind(h.name) {
            Kind::Host => {
                host_fields += 1;
                if !absolute {
                    host = text(h.value);
                }
            }
            Kind::XTenantId => tenant_header = tenant_header.or(text(h.value)),
            Kind::XTenantEnv => env_header = env_header.or(text(h.value)),
            Kind::XCorrelationId => correlation_id = correlation_id.or(text(h.value)),
            Kind::TrustedTwin(trusted) => trusted_twin = trusted_twin.or(Some((h.name, trusted))),
            Kind::ContentLength => length = Some(content_length(h.value, length)?),
            Kind::TransferEncoding => {
                te = true;
                chunked = ends_chunked(h.value);
            }
            Kind::Connection => listed.add(h.value)?,
            Kind::Expect => {
                if text(h.value).is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                    expect_continue = true;
                } else {
                    return Err(HeadError::Bad(
                        "only Expect: 100-continue is supported".into(),
                    ));
                }
            }
            _ => {}
        }
    }
    if host_fields > 1 {
        return Err(HeadError::Bad("more than one Host field".into()));
    }
    let framing = match (te, length) {
        (true, Some(_)) => {
            return Err(HeadError::Bad(
                "both Transfer-Encoding and Content-Length".into(),
            ))
        }
        (true, None) if http10 => {
            return Err(HeadError::Bad(
                "Transfer-Encoding in an HTTP/1.0 request".into(),
            ))
        }
        (true, None) if !chunked => {
            return Err(HeadError::Bad(
                "a request's Transfer-Encoding must end with chunked".into(),
            ))
        }
        (true, None) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::None,
    };
    let keep_alive = if http10 {
        listed.keep_alive && !listed.close
    } else {
        !listed.close
    };
    Ok(Request {
        method,
        path,
        http10,
        headers,
        host,
        absolute,
        tenant_header,
        env_header,
        correlation_id,
        trusted_twin,
        framing,
        keep_alive,
        // An HTTP/1.0 client gets no interim response (RFC 9110 §15.2): it sends the body
        // without waiting for one.
        expect_continue: expect_continue && !http10 && framing != Framing::None,
        listed,
        head_len,
    })
}

/// `http://authority/path` → (authority, path); `None` for origin-form (and `*`).
fn split_absolute(target: &str) -> Option<(&str, &str)> {
    let rest = if target.len() > 7 && target[..7].eq_ignore_ascii_case("http://") {
        &target[7..]
    } else if target.len() > 8 && target[..8].eq_ignore_ascii_case("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    Some((authority, if path.is_empty() { "/" } else { path }))
}

/// The router's identity headers on a forwarded request.
pub struct Identity<'a> {
    pub tenant: &'a str,
    pub env: &'a str,
    pub correlation_id: &'a str,
}

/// Writes the head sent to the cell: origin-form `path`, the client's fields minus
/// hop-by-hop, listed, trusted (and their underscore twins) and framing ones, then `Host`
/// (the cell's authority when the client sent none), the identity headers and the framing
/// of the body as forwarded.
pub fn write_request_head(
    req: &Request<'_, '_>,
    path: &str,
    cell_authority: &str,
    id: &Identity<'_>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    // `http://host?q` has an empty path: origin-form needs the `/` (RFC 9112 §3.2.1).
    if !path.starts_with('/') && path != "*" {
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers {
        let keep = match kind(h.name) {
            Kind::Plain | Kind::Date => !req.listed.contains(h.name),
            Kind::Host => !req.absolute,
            // The client's codings as sent (`gzip, chunked` stays that): the body is
            // forwarded as it came.
            Kind::TransferEncoding => req.framing == Framing::Chunked,
            // Hop-by-hop fields, `Content-Length` (written below), the identity headers
            // the router sets below and their underscore twins (`X_Tenant_ID`).
            _ => false,
        };
        if keep {
            field(out, h.name.as_bytes(), h.value);
        }
    }
    if req.absolute || req.host.is_none() {
        let host = if req.absolute {
            req.host.unwrap_or(cell_authority)
        } else {
            cell_authority
        };
        field(out, b"host", host.as_bytes());
    }
    field(out, b"x-tenant-id", id.tenant.as_bytes());
    field(out, b"x-tenant-env", id.env.as_bytes());
    field(out, b"x-correlation-id", id.correlation_id.as_bytes());
    match req.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked | Framing::None | Framing::Close => {}
    }
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [0u8; 20];
    out.extend_from_slice(u64_digits(n, &mut buf));
}

/// The decimal digits of `n`, written at the end of `buf` (no allocation, no `fmt`).
pub fn u64_digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A parsed response head from a cell.
#[derive(Debug)]
pub struct Response<'h, 'b> {
    pub code: u16,
    reason: &'b str,
    headers: &'h [httparse::Header<'b>],
    pub framing: Framing,
    /// The cell keeps the connection open after this response.
    pub keep_alive: bool,
    has_correlation_id: bool,
    has_date: bool,
    /// `Transfer-Encoding` was sent: it overrides any `Content-Length`, which is then
    /// dropped (RFC 9112 §6.3).
    te: bool,
    chunked_te_value: bool,
    listed: Listed<'b>,
    pub head_len: usize,
    /// The application units the cell reported (`X-Usage-Units`; 0 when absent or not a
    /// number).
    pub usage_units: u64,
}

/// Parses a response head at the start of `buf`; `head_request` when it answers a HEAD.
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut [httparse::Header<'b>],
    head_request: bool,
) -> Result<Response<'h, 'b>, HeadError> {
    let mut resp = httparse::Response::new(storage);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(e) => {
            return Err(HeadError::Bad(format!(
                "malformed response head from the cell: {e}"
            )))
        }
    };
    let code = resp.code.unwrap_or(502);
    let reason = resp.reason.unwrap_or("");
    let http10 = resp.version == Some(0);
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let (mut length, mut te, mut chunked) = (None, false, false);
    let (mut has_correlation_id, mut has_date) = (false, false);
    let mut listed = Listed::default();
    let mut usage_units = 0;
    for h in headers {
        match kind(h.name) {
            Kind::ContentLength => {
                length = Some(content_length(h.value, length).map_err(|e| match e {
                    HeadError::Bad(m) => HeadError::Bad(format!("cell response: {m}")),
                    other => other,
                })?)
            }
            Kind::TransferEncoding => {
                te = true;
                chunked = ends_chunked(h.value);
            }
            Kind::Connection => listed.add(h.value)?,
            Kind::XCorrelationId => has_correlation_id = true,
            Kind::Date => has_date = true,
            Kind::XUsageUnits => {
                usage_units = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            }
            _ => {}
        }
    }
    let bodiless = head_request || (100..200).contains(&code) || code == 204 || code == 304;
    let framing = if bodiless {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = framing != Framing::Close
        && if http10 {
            listed.keep_alive && !listed.close
        } else {
            !listed.close
        };
    Ok(Response {
        code,
        reason,
        headers,
        framing,
        keep_alive,
        has_correlation_id,
        has_date,
        te,
        chunked_te_value: te && chunked,
        listed,
        head_len,
        usage_units,
    })
}

/// How the router sends a response body on to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    /// Decode a chunked body and send only its data (an HTTP/1.0 client cannot read
    /// chunked); the connection is closed after it.
    pub dechunk: bool,
    /// Close the client connection after this response.
    pub close: bool,
}

impl Response<'_, '_> {
    /// How to relay this response to a client that wants `keep_alive` (HTTP/1.0 when
    /// `http10`); `stopping` when the router is shutting down.
    pub fn relay(&self, http10: bool, keep_alive: bool, stopping: bool) -> Relay {
        let dechunk = http10 && self.framing == Framing::Chunked;
        Relay {
            dechunk,
            close: !keep_alive || stopping || dechunk || self.framing == Framing::Close,
        }
    }

    /// The cell sent no `Date`: [`Response::write_head`] adds the router's.
    pub fn needs_date(&self) -> bool {
        !self.has_date
    }

    /// Writes the head sent to the client: the cell's status and fields minus hop-by-hop
    /// and listed ones, plus the correlation id and `Date` when the cell sent none.
    pub fn write_head(
        &self,
        relay: Relay,
        http10: bool,
        correlation_id: &str,
        date: &[u8],
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(b"HTTP/1.1 ");
        push_u64(out, u64::from(self.code));
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in self.headers {
            let keep = match kind(h.name) {
                Kind::TransferEncoding => !relay.dechunk,
                Kind::ContentLength => !self.te,
                // Hop-by-hop, and the cell's usage report (metered, not relayed).
                Kind::Connection | Kind::HopByHop | Kind::XUsageUnits => false,
                _ => !self.listed.contains(h.name),
            };
            if keep {
                field(out, h.name.as_bytes(), h.value);
            }
        }
        if !self.has_correlation_id {
            field(out, b"x-correlation-id", correlation_id.as_bytes());
        }
        if !self.has_date {
            field(out, b"date", date);
        }
        if relay.close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        debug_assert!(!relay.dechunk || self.chunked_te_value);
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes a complete response the router makes itself.
#[allow(clippy::too_many_arguments)]
pub fn write_own_response(
    code: u16,
    reason: &str,
    content_type: &str,
    correlation_id: &str,
    retry_after: Option<u64>,
    close: bool,
    date: &[u8],
    body: &[u8],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    field(out, b"content-type", content_type.as_bytes());
    out.extend_from_slice(b"content-length: ");
    push_u64(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    field(out, b"x-correlation-id", correlation_id.as_bytes());
    if let Some(s) = retry_after {
        out.extend_from_slice(b"retry-after: ");
        push_u64(out, s);
        out.extend_from_slice(b"\r\n");
    }
    field(out, b"date", date);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Where a chunked body's parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Follows a chunked body (RFC 9112 §7.1) byte by byte to find where it ends, optionally
/// collecting the data of its chunks. Chunk extensions and trailer fields are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of extensions or trailers seen (bounded).
    extra: usize,
}

const MAX_CHUNK_EXTRA: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(&'static str);

impl Default for Chunked {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunked {
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size,
            size: 0,
            digits: 0,
            extra: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes the bytes of `input` that belong to the body (never past its end) and
    /// returns how many; with `data`, appends the chunks' payload to it.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                ChunkState::Size => {
                    let v = match b {
                        b'0'..=b'9' => Some(b - b'0'),
                        b'a'..=b'f' => Some(b - b'a' + 10),
                        b'A'..=b'F' => Some(b - b'A' + 10),
                        _ => None,
                    };
                    match v {
                        Some(v) => {
                            if self.digits == 15 {
                                return Err(ChunkError("chunk size too large"));
                            }
                            self.size = self.size * 16 + u64::from(v);
                            self.digits += 1;
                        }
                        None if self.digits == 0 => return Err(ChunkError("missing chunk size")),
                        None => match b {
                            b'\r' => self.state = ChunkState::SizeLf,
                            b';' | b' ' | b'\t' => self.state = ChunkState::Ext,
                            _ => return Err(ChunkError("bad chunk size")),
                        },
                    }
                    i += 1;
                }
                ChunkState::Ext => {
                    match b {
                        b'\r' => self.state = ChunkState::SizeLf,
                        b'\n' => return Err(ChunkError("bare LF")),
                        _ => self.bump()?,
                    }
                    i += 1;
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after chunk size"));
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let n = (self.size.min((input.len() - i) as u64)) as usize;
                    if let Some(d) = data.as_deref_mut() {
                        d.extend_from_slice(&input[i..i + n]);
                    }
                    i += n;
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    let want = if self.state == ChunkState::DataCr {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if b != want {
                        return Err(ChunkError("expected CRLF after chunk data"));
                    }
                    i += 1;
                    if self.state == ChunkState::DataCr {
                        self.state = ChunkState::DataLf;
                    } else {
                        self.state = ChunkState::Size;
                        self.digits = 0;
                    }
                }
                ChunkState::TrailerStart => {
                    if b == b'\r' {
                        self.state = ChunkState::EndLf;
                    } else {
                        self.bump()?;
                        self.state = ChunkState::TrailerLine;
                    }
                    i += 1;
                }
                ChunkState::TrailerLine => {
                    match b {
                        b'\r' => self.state = ChunkState::TrailerLf,
                        b'\n' => return Err(ChunkError("bare LF")),
                        _ => self.bump()?,
                    }
                    i += 1;
                }
                ChunkState::TrailerLf | ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF"));
                    }
                    i += 1;
                    if self.state == ChunkState::EndLf {
                        self.state = ChunkState::Done;
                        return Ok(i);
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }

    fn bump(&mut self) -> Result<(), ChunkError> {
        self.extra += 1;
        if self.extra > MAX_CHUNK_EXTRA {
            return Err(ChunkError("chunk extensions or trailers too long"));
        }
        Ok(())
    }
}

/// The `Date` value, formatted once per second per thread.
pub fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if c.0 != secs || c.1.is_empty() {
            c.1.clear();
            let _ = write!(c.1, "{}", httpdate::HttpDate::from(now));
            c.0 = secs;
        }
        f(c.1.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<(String, Framing, bool, bool), HeadError> {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(raw.as_bytes(), &mut hs)?;
        let mut out = Vec::new();
        let id = Identity {
            tenant: "acme",
            env: "prod",
            correlation_id: "c-1",
        };
        write_request_head(&r, r.path, "127.0.0.1:9000", &id, &mut out);
        Ok((
            String::from_utf8(out).unwrap(),
            r.framing,
            r.keep_alive,
            r.expect_continue,
        ))
    }

    #[test]
    fn forwarded_heads_drop_what_a_proxy_must_not_pass() {
        let (head, framing, keep, _) = req(concat!(
            "POST /v1/kv/x?y=1 HTTP/1.1\r\nHost: acme.localhost\r\nX-Tenant-ID: evil\r\n",
            "x-tenant-env: dev\r\nX-Correlation-Id: mine\r\nConnection: keep-alive, X-Secret\r\n",
            "X-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nAccept: */*\r\n",
            "Content-Length: 3\r\n\r\nabc"
        ))
        .unwrap();
        assert_eq!(framing, Framing::Length(3));
        assert!(keep);
        assert_eq!(
            head,
            concat!(
                "POST /v1/kv/x?y=1 HTTP/1.1\r\nHost: acme.localhost\r\nAccept: */*\r\n",
                "x-tenant-id: acme\r\nx-tenant-env: prod\r\nx-correlation-id: c-1\r\n",
                "content-length: 3\r\n\r\n"
            )
        );
    }

    #[test]
    fn underscore_twins_of_trusted_headers_are_dropped() {
        let raw = concat!(
            "GET / HTTP/1.1\r\nHost: acme.localhost\r\nX_Tenant_ID: evil\r\n",
            "x-tenant_env: dev\r\nX_CORRELATION_id: mine\r\nx_Tenant-Id: evil2\r\n",
            "X_Tenant_IDs: kept\r\nX_Tenant: kept\r\nX-Other_Name: kept\r\n\r\n"
        );
        let (head, ..) = req(raw).unwrap();
        assert_eq!(
            head,
            concat!(
                "GET / HTTP/1.1\r\nHost: acme.localhost\r\nX_Tenant_IDs: kept\r\n",
                "X_Tenant: kept\r\nX-Other_Name: kept\r\nx-tenant-id: acme\r\n",
                "x-tenant-env: prod\r\nx-correlation-id: c-1\r\n\r\n"
            )
        );
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(raw.as_bytes(), &mut hs).unwrap();
        assert_eq!(r.trusted_twin, Some(("X_Tenant_ID", "X-Tenant-ID")));
        // A twin is not a source of the tenant, environment or correlation id.
        assert_eq!(
            (r.tenant_header, r.env_header, r.correlation_id),
            (None, None, None)
        );
        let r = parse_request(b"GET / HTTP/1.1\r\nX-TENANT-ID: a\r\n\r\n", &mut hs).unwrap();
        assert_eq!((r.trusted_twin, r.tenant_header), (None, Some("a")));
        for (name, trusted) in [
            ("x_tenant_env", "X-Tenant-Env"),
            ("X-Correlation_ID", "X-Correlation-ID"),
        ] {
            let raw = format!("GET / HTTP/1.1\r\n{name}: v\r\n\r\n");
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let r = parse_request(raw.as_bytes(), &mut hs).unwrap();
            assert_eq!(r.trusted_twin, Some((name, trusted)));
        }
    }

    #[test]
    fn framing_and_keep_alive_follow_rfc_9112() {
        let (head, framing, ..) =
            req("GET http://acme.localhost:8080/a?b HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        assert_eq!(framing, Framing::None);
        assert!(head.starts_with("GET /a?b HTTP/1.1\r\nhost: acme.localhost:8080\r\n"));
        let (head, ..) = req("GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(head.contains("host: 127.0.0.1:9000\r\n"));
        let (_, framing, keep, expect) = req(concat!(
            "PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n",
            "Expect: 100-continue\r\nConnection: close\r\n\r\n"
        ))
        .unwrap();
        assert_eq!((framing, keep, expect), (Framing::Chunked, false, true));
        let (_, _, keep, _) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!keep);
        let (_, _, keep, _) = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(keep);
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: teapot\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(req(bad), Err(HeadError::Bad(_))), "{bad:?}");
        }
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\n"),
            Err(HeadError::Partial)
        );
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: y\r\n"))
            .collect();
        assert_eq!(
            req(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::TooLarge)
        );
    }

    fn resp(raw: &str, head: bool, http10: bool, keep: bool) -> (Framing, bool, Relay, String) {
        let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_response(raw.as_bytes(), &mut hs, head).unwrap();
        let relay = r.relay(http10, keep, false);
        let mut out = Vec::new();
        r.write_head(relay, http10, "c-1", b"D", &mut out);
        (
            r.framing,
            r.keep_alive,
            relay,
            String::from_utf8(out).unwrap(),
        )
    }

    #[test]
    fn response_framing_and_relay() {
        let (f, k, relay, head) = resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: t\r\n\r\nok",
            false,
            false,
            true,
        );
        assert_eq!((f, k, relay.close), (Framing::Length(2), true, false));
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-correlation-id: c-1\r\ndate: D\r\n\r\n"
        );
        let (f, ..) = resp(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            true,
            false,
            true,
        );
        assert_eq!(f, Framing::None, "HEAD");
        let (f, ..) = resp(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            false,
            true,
        );
        assert_eq!(f, Framing::None);
        let (f, k, relay, head) = resp("HTTP/1.1 200 OK\r\n\r\n", false, false, true);
        assert_eq!((f, k, relay.close), (Framing::Close, false, true));
        assert!(head.ends_with("connection: close\r\n\r\n"));
        let (f, k, relay, head) = resp(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Correlation-ID: up\r\nDate: X\r\n\r\n",
            false,
            true,
            true,
        );
        assert_eq!((f, k), (Framing::Chunked, true));
        assert!(relay.dechunk && relay.close);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nX-Correlation-ID: up\r\nDate: X\r\nconnection: close\r\n\r\n"
        );
        let (_, k, ..) = resp(
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            false,
            true,
        );
        assert!(!k, "an HTTP/1.0 cell closes unless it says keep-alive");
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut c = Chunked::new();
            let mut data = Vec::new();
            let end = body.len() - 4;
            let a = c.feed(&body[..split], Some(&mut data)).unwrap();
            assert_eq!(a, split.min(end));
            let b = c.feed(&body[split..], Some(&mut data)).unwrap();
            assert!(c.is_done(), "split {split}");
            assert_eq!(a + b, end);
            assert_eq!(data, b"Wikipedia");
        }
        for bad in [
            &b"x\r\n"[..],
            b"4\nWiki",
            b"4\r\nWikiX\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            assert!(Chunked::new().feed(bad, None).is_err(), "{bad:?}");
        }
    }
}
