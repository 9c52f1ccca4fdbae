//! One client connection on the tenant listener, driven by one task: read a request head,
//! run the phases (resolve, pick, filter), write the rewritten head and the body to a
//! pooled cell connection, read the response head, relay head and body back, repeat while
//! both sides keep the connection alive. Bodies are copied through as bytes; only their
//! framing is followed (to know where a message ends). One reusable timer per connection
//! bounds every wait: the next request (idle), a request head, the cell's answer, each body
//! read or write.

use crate::config::UnderscoreTrusted;
use crate::h1::{self, Chunked, Framing, HeadError, MAX_HEADERS};
use crate::metrics::RouterCounters;
use crate::proxy::{
    commit, wait_for_release, Admitted, InFlight, Phases, ProxyError, RouterState, Target,
};
use crate::table::{RouteEntry, TenantRuntime};
use crate::upstream::{Conn, UpstreamError};
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

/// Waits on a client connection.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// Between requests on a keep-alive connection.
    pub idle: Duration,
    /// From the first byte of a request head to its end.
    pub head: Duration,
    /// For each read or write of a body, on either side.
    pub body: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(75),
            head: Duration::from_secs(30),
            body: Duration::from_secs(60),
        }
    }
}

enum Fail {
    Eof,
    Timeout,
    Stopped,
    Io,
}

/// The waits of one connection: the timer, and shutdown (only looked at while idle).
struct Waits {
    timer: Pin<Box<Sleep>>,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Waits {
    fn arm(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<Fail> {
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Fail::Timeout),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads what is there (at least one byte) into `buf`.
    async fn read(
        &mut self,
        io: &TcpStream,
        buf: &mut BytesMut,
        deadline: tokio::time::Instant,
        idle: bool,
    ) -> Result<usize, Fail> {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(8 * 1024);
        }
        std::future::poll_fn(|cx| loop {
            let room = buf.capacity() - buf.len();
            match io.try_read_buf(buf) {
                Ok(0) => return Poll::Ready(Err(Fail::Eof)),
                Ok(n) => {
                    if n < room {
                        // A short read took all there was: forget the readiness now rather
                        // than learn it from a read that fails with EAGAIN (what tokio's
                        // own `poll_read` does). Data arriving later raises it again, and
                        // a close seen by the poller is never forgotten.
                        let _ = io.try_io(tokio::io::Interest::READABLE, || {
                            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                        });
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Err(Fail::Io)),
            }
            match io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(Fail::Io)),
                Poll::Pending => {}
            }
            if idle && self.stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Fail::Stopped));
            }
            return self.arm(deadline, cx).map(Err);
        })
        .await
    }

    async fn write_all(
        &mut self,
        io: &mut TcpStream,
        mut data: &[u8],
        deadline: tokio::time::Instant,
    ) -> Result<(), Fail> {
        std::future::poll_fn(|cx| {
            while !data.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, data) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(Fail::Io)),
                    Poll::Ready(Ok(n)) => data = &data[n..],
                    Poll::Pending => return self.arm(deadline, cx).map(Err),
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }
}

fn after(d: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + d
}

/// What one request head asks for, owned (the head itself borrows the read buffer).
struct Meta {
    head_len: usize,
    framing: Framing,
    keep_alive: bool,
    http10: bool,
    is_head: bool,
    /// May be sent again (RFC 9110 §9.2.2) when a reused cell connection fails.
    idempotent: bool,
    expect_continue: bool,
}

impl Meta {
    fn of(req: &h1::Request<'_, '_>) -> Self {
        Self {
            head_len: req.head_len,
            framing: req.framing,
            keep_alive: req.keep_alive,
            http10: req.http10,
            is_head: req.is_head(),
            idempotent: matches!(
                req.method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
            expect_continue: req.expect_continue,
        }
    }
}

/// What to do with a request, decided from its head alone.
enum Step<'s> {
    /// The request, its route, its in-flight count (with the tenant's runtime), the
    /// correlation id, and the tenant and environment it is metered under.
    Forward(
        Meta,
        RouteEntry,
        Option<InFlight<'s>>,
        String,
        (String, String),
    ),
    Answer(Meta, ProxyError, String),
    Hold(Target, Option<Arc<TenantRuntime>>),
    Bad(HeadError),
}

fn decide<'s, P: Phases>(
    phases: &P,
    state: &'s RouterState,
    req: &h1::Request<'_, '_>,
    held: Option<(Target, Admitted<'s>)>,
    out: &mut Vec<u8>,
) -> Step<'s> {
    // Before any phase, whatever the phases do: with `refuse`, a field that reads as a
    // trusted header (`X_Tenant_ID`) gets 400. With `strip` it is dropped by the head
    // written for the cell.
    if let Some((name, trusted)) = req.trusted_twin {
        if state.cfg.underscore_trusted_headers == UnderscoreTrusted::Refuse {
            let e = ProxyError::BadRequest(format!(
                "the {name} field reads as {trusted}, which only the router sets; \
                 send no such field"
            ));
            return Step::Answer(Meta::of(req), e, state.correlation_id());
        }
    }
    let (target, admitted) = match held {
        Some(x) => x,
        None => {
            let target = match phases.resolve(state, req) {
                Ok(t) => t,
                Err(e) => return Step::Answer(Meta::of(req), e, state.correlation_id()),
            };
            let admitted = {
                let snap = state.table.load();
                commit(phases, state, &snap, &target, true)
            };
            (target, admitted)
        }
    };
    match admitted {
        Admitted::Forward(route, flight) => {
            phases.filter_request(req, &route, &target, out);
            Step::Forward(
                Meta::of(req),
                route,
                flight,
                target.correlation_id,
                (target.tenant, target.env),
            )
        }
        Admitted::Refuse(e) => Step::Answer(Meta::of(req), e, target.correlation_id),
        Admitted::Hold(rt, _) => Step::Hold(target, rt),
    }
}

/// Bytes of a body at the start of `buf` that belong to the message, and whether they
/// complete it; `left` and `chunk` carry the framing state across calls.
fn body_part(
    framing: Framing,
    buf: &[u8],
    left: &mut u64,
    chunk: &mut Chunked,
    data: Option<&mut Vec<u8>>,
) -> Result<(usize, bool), h1::ChunkError> {
    Ok(match framing {
        Framing::None => (0, true),
        Framing::Length(_) => {
            let n = (*left).min(buf.len() as u64);
            *left -= n;
            (n as usize, *left == 0)
        }
        Framing::Chunked => {
            let n = chunk.feed(buf, data)?;
            (n, chunk.is_done())
        }
        Framing::Close => (buf.len(), false),
    })
}

/// A final response head from a cell, as far as the relay needs it.
struct RespHead {
    code: u16,
    framing: Framing,
    /// The cell keeps the connection open after this response.
    keep_alive: bool,
    relay: h1::Relay,
    usage_units: u64,
}

/// Why no response head was read.
enum HeadFail {
    /// The wait for it failed (closed, reset, timed out).
    Wait(Fail),
    /// What came is not a usable response head.
    Bad(String),
}

struct Session<'a, P: Phases> {
    phases: &'a P,
    state: &'a RouterState,
    limits: &'a ClientLimits,
    stop: &'a tokio_util::sync::CancellationToken,
    io: TcpStream,
    /// Bytes from the client not yet consumed (pipelined requests stay here).
    rbuf: BytesMut,
    /// Bytes from the cell not yet consumed.
    ubuf: BytesMut,
    /// What is written next (to either side).
    wbuf: Vec<u8>,
    waits: Waits,
}

/// Serves one client connection until it closes, fails, idles out or the router stops.
pub async fn serve_connection<P: Phases>(
    phases: &P,
    state: &RouterState,
    limits: &ClientLimits,
    stop: &tokio_util::sync::CancellationToken,
    io: TcpStream,
) {
    let mut s = Session {
        phases,
        state,
        limits,
        stop,
        io,
        rbuf: BytesMut::with_capacity(4 * 1024),
        ubuf: BytesMut::new(),
        wbuf: Vec::with_capacity(2 * 1024),
        waits: Waits {
            timer: Box::pin(tokio::time::sleep(limits.idle)),
            stopped: Box::pin(stop.clone().cancelled_owned()),
        },
    };
    while s.one().await {}
    let _ = s.io.shutdown().await;
}

impl<P: Phases> Session<'_, P> {
    /// One request; false when the connection is done.
    async fn one(&mut self) -> bool {
        let mut started = None;
        // Set at the first byte of the head: the whole head must arrive by then.
        let mut head_deadline = None;
        let mut held: Option<(Target, Admitted<'_>)> = None;
        let step = loop {
            if !self.rbuf.is_empty() {
                let first = *started.get_or_insert_with(Instant::now);
                head_deadline.get_or_insert_with(|| {
                    tokio::time::Instant::from_std(first) + self.limits.head
                });
                self.wbuf.clear();
                let step = {
                    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match h1::parse_request(&self.rbuf, &mut hs) {
                        Err(HeadError::Partial) => None,
                        Err(e) => Some(Step::Bad(e)),
                        Ok(req) => Some(decide(
                            self.phases,
                            self.state,
                            &req,
                            held.take(),
                            &mut self.wbuf,
                        )),
                    }
                };
                match step {
                    None => {}
                    Some(Step::Hold(target, rt)) => {
                        // Boxed: a rare path whose state would otherwise enlarge every
                        // request's future. The head is parsed again after the wait.
                        let pick =
                            Box::pin(wait_for_release(self.phases, self.state, &target, rt)).await;
                        held = Some((target, pick));
                        continue;
                    }
                    Some(step) => break step,
                }
            }
            let (deadline, idle) = match head_deadline {
                None => (after(self.limits.idle), true),
                Some(d) => (d, false),
            };
            if let Err(f) = self
                .waits
                .read(&self.io, &mut self.rbuf, deadline, idle)
                .await
            {
                if matches!(f, Fail::Timeout) && !idle {
                    let e = ProxyError::RequestTimeout;
                    self.answer_and_close(&e, &self.state.correlation_id())
                        .await;
                }
                return false;
            }
        };
        let started = started.unwrap_or_else(Instant::now);
        let (e, answer) = match step {
            Step::Bad(e) => {
                let e = match e {
                    HeadError::TooLarge => ProxyError::HeadTooLarge,
                    HeadError::Bad(m) => ProxyError::BadRequest(m),
                    HeadError::Partial => unreachable!("a partial head is read further"),
                };
                (e, None)
            }
            Step::Answer(meta, e, corr) => (e, Some((meta, corr))),
            Step::Forward(meta, route, flight, corr, who) => {
                return self.forward(meta, route, flight, corr, who, started).await;
            }
            Step::Hold(..) => unreachable!("a held request waits above"),
        };
        self.phases.log(
            self.state,
            None,
            e.status().as_u16(),
            started.elapsed(),
            Some(&e),
        );
        match answer {
            Some((meta, corr)) => self.answer(meta, &e, &corr).await,
            // A head that cannot be read leaves nothing to resynchronize on: close.
            None => {
                let corr = self.state.correlation_id();
                self.answer_and_close(&e, &corr).await;
                false
            }
        }
    }

    /// Answers with a problem document. The request's body is skipped when it is all
    /// here already; otherwise the connection is closed after the answer.
    async fn answer(&mut self, meta: Meta, e: &ProxyError, corr: &str) -> bool {
        let mut left = match meta.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunk = Chunked::new();
        let rest = &self.rbuf[meta.head_len..];
        let skip = match body_part(meta.framing, rest, &mut left, &mut chunk, None) {
            Ok((n, true)) => Some(n),
            _ => None,
        };
        let close = skip.is_none() || !meta.keep_alive || self.stop.is_cancelled();
        self.rbuf.advance(meta.head_len + skip.unwrap_or(0));
        self.wbuf.clear();
        e.write_response(corr, close, &mut self.wbuf);
        let ok = self
            .waits
            .write_all(&mut self.io, &self.wbuf, after(self.limits.body))
            .await
            .is_ok();
        ok && !close
    }

    async fn answer_and_close(&mut self, e: &ProxyError, corr: &str) {
        self.wbuf.clear();
        e.write_response(corr, true, &mut self.wbuf);
        let _ = self
            .waits
            .write_all(&mut self.io, &self.wbuf, after(self.limits.body))
            .await;
    }

    /// Logs and answers a request that could not be forwarded; the connection closes.
    async fn failed(
        &mut self,
        route: &RouteEntry,
        rt: Option<&TenantRuntime>,
        err: ProxyError,
        corr: &str,
        started: Instant,
    ) -> bool {
        if !matches!(err, ProxyError::UpstreamTimeout(_)) {
            tracing::warn!(cell_id = %route.cell.cell_id, correlation_id = %corr,
                error = %err, "forwarding failed");
        }
        self.phases.log(
            self.state,
            Some((route, rt)),
            err.status().as_u16(),
            started.elapsed(),
            Some(&err),
        );
        self.answer_and_close(&err, corr).await;
        false
    }

    async fn forward(
        &mut self,
        meta: Meta,
        route: RouteEntry,
        mut flight: Option<InFlight<'_>>,
        corr: String,
        who: (String, String),
        started: Instant,
    ) -> bool {
        let rt = flight.as_ref().and_then(InFlight::runtime);
        let cell = &route.cell;
        let cell_error = |reason: &str| ProxyError::Upstream {
            cell: cell.cell_id.to_string(),
            reason: reason.to_string(),
        };
        // The body bytes already here go out with the head.
        let mut left = match meta.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunk = Chunked::new();
        let rest = &self.rbuf[meta.head_len..];
        let (n, mut body_done) = match body_part(meta.framing, rest, &mut left, &mut chunk, None) {
            Ok(x) => x,
            Err(e) => {
                let e = ProxyError::BadRequest(e.to_string());
                self.phases
                    .log(self.state, None, 400, started.elapsed(), Some(&e));
                self.answer_and_close(&e, &corr).await;
                return false;
            }
        };
        self.wbuf.extend_from_slice(&rest[..n]);
        self.rbuf.advance(meta.head_len + n);
        let mut request_bytes = n as u64;
        if meta.expect_continue && !body_done {
            let cont = b"HTTP/1.1 100 Continue\r\n\r\n";
            if self
                .waits
                .write_all(&mut self.io, cont, after(self.limits.body))
                .await
                .is_err()
            {
                return false;
            }
        }
        let deadline = after(self.state.cfg.upstream_timeout);
        let mut retried = false;
        let (mut conn, head) = loop {
            let got = if retried {
                Box::pin(cell.upstream.connect(deadline)).await
            } else {
                cell.upstream.checkout(deadline).await
            };
            let mut conn: Conn = match got {
                Ok(c) => c,
                Err(UpstreamError::Timeout) => {
                    let e = ProxyError::UpstreamTimeout(cell.cell_id.to_string());
                    return self.failed(&route, rt, e, &corr, started).await;
                }
                Err(e) => {
                    crate::health::record(cell, Err(e.to_string()), self.state.cfg.health_fails);
                    let e = cell_error(&e.to_string());
                    return self.failed(&route, rt, e, &corr, started).await;
                }
            };
            // An idempotent request that is whole in `wbuf` is sent again if a reused
            // connection turns out to be closed before any of the response arrives (the
            // cell closed it while idle); anything else gets 502 rather than a repeat.
            let may_retry = conn.reused && body_done && meta.idempotent && !retried;
            if self
                .waits
                .write_all(&mut conn.io, &self.wbuf, deadline)
                .await
                .is_err()
            {
                if may_retry {
                    retried = true;
                    continue;
                }
                let e = cell_error("sending the request failed");
                return self.failed(&route, rt, e, &corr, started).await;
            }
            let streamed = !body_done;
            while !body_done {
                let got = self
                    .waits
                    .read(&self.io, &mut self.rbuf, after(self.limits.body), false)
                    .await;
                if got.is_err() {
                    // The client went away (or stalled) mid-body: nothing to answer.
                    return false;
                }
                let (n, done) =
                    match body_part(meta.framing, &self.rbuf, &mut left, &mut chunk, None) {
                        Ok(x) => x,
                        Err(_) => return false,
                    };
                body_done = done;
                request_bytes += n as u64;
                let part = self.rbuf.split_to(n);
                if self
                    .waits
                    .write_all(&mut conn.io, &part, after(self.limits.body))
                    .await
                    .is_err()
                {
                    let e = cell_error("sending the request body failed");
                    return self.failed(&route, rt, e, &corr, started).await;
                }
            }
            // The cell's time to answer runs from the end of a streamed body.
            let answer_by = if streamed {
                after(self.state.cfg.upstream_timeout)
            } else {
                deadline
            };
            self.ubuf.clear();
            match self
                .read_response_head(&mut conn, &meta, &corr, answer_by)
                .await
            {
                Ok(head) => break (conn, head),
                Err(HeadFail::Wait(Fail::Eof | Fail::Io)) if may_retry && self.ubuf.is_empty() => {
                    retried = true;
                    continue;
                }
                Err(HeadFail::Wait(Fail::Timeout)) => {
                    let e = ProxyError::UpstreamTimeout(cell.cell_id.to_string());
                    return self.failed(&route, rt, e, &corr, started).await;
                }
                Err(HeadFail::Wait(_)) => {
                    let e = cell_error("the connection closed before a response");
                    return self.failed(&route, rt, e, &corr, started).await;
                }
                Err(HeadFail::Bad(reason)) => {
                    return self
                        .failed(&route, rt, cell_error(&reason), &corr, started)
                        .await;
                }
            }
        };
        // The head for the client is in `wbuf`, the response head consumed from `ubuf`.
        let RespHead {
            code,
            framing,
            keep_alive: cell_keep_alive,
            relay,
            usage_units,
        } = head;
        // Counted before the response's last byte goes out (see `usage`).
        let mut metered = false;
        let mut response_bytes = 0u64;
        let state: &RouterState = self.state;
        let usage = &state.usage;
        let answered = tokio::time::Instant::now();
        let meter = |response_bytes: u64| {
            if let Some(u) = usage {
                let at = answered.into_std();
                u.record(
                    &who.0,
                    &who.1,
                    request_bytes,
                    response_bytes,
                    usage_units,
                    at,
                );
            }
        };
        RouterCounters::inc(self.state.counters.forwarded.local());
        self.phases.log(
            self.state,
            Some((&route, rt)),
            code,
            answered.into_std().saturating_duration_since(started),
            None,
        );
        let mut write_by = answered + self.limits.body;
        // The body, as far as it is here, goes out with the head; then the rest.
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunk = Chunked::new();
        loop {
            let data = relay.dechunk.then_some(&mut self.wbuf);
            let (n, done) = match body_part(framing, &self.ubuf, &mut left, &mut chunk, data) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cell_id = %cell.cell_id, correlation_id = %corr,
                        error = %e, "cell sent a malformed body; closing the client connection");
                    return false;
                }
            };
            if !relay.dechunk {
                self.wbuf.extend_from_slice(&self.ubuf[..n]);
            }
            self.ubuf.advance(n);
            response_bytes += n as u64;
            if done && !metered {
                metered = true;
                meter(response_bytes);
            }
            if done {
                // The exchange with the cell is over: a drain no longer waits on it.
                drop(flight.take());
            }
            if !self.wbuf.is_empty() {
                if self
                    .waits
                    .write_all(&mut self.io, &self.wbuf, write_by)
                    .await
                    .is_err()
                {
                    return false;
                }
                self.wbuf.clear();
            }
            if done {
                break;
            }
            write_by = after(self.limits.body);
            match self
                .waits
                .read(&conn.io, &mut self.ubuf, after(self.limits.body), false)
                .await
            {
                Ok(_) => {}
                Err(Fail::Eof) if framing == Framing::Close => break,
                Err(_) => {
                    tracing::warn!(cell_id = %cell.cell_id, correlation_id = %corr,
                        "cell connection ended mid-body; closing the client connection");
                    return false;
                }
            }
        }
        if !metered {
            // A close-delimited body ends at the cell's EOF, after its last byte went out.
            meter(response_bytes);
        }
        if cell_keep_alive && self.ubuf.is_empty() {
            cell.upstream.checkin(conn);
        } else {
            let _ = conn.io.shutdown().await;
        }
        !relay.close
    }

    /// Reads until `ubuf` starts with a final (non-1xx) response head, consumes it and
    /// writes the head for the client into `wbuf`. Interim responses are dropped (the
    /// router answers `Expect` itself and does not upgrade connections).
    async fn read_response_head(
        &mut self,
        conn: &mut Conn,
        meta: &Meta,
        corr: &str,
        deadline: tokio::time::Instant,
    ) -> Result<RespHead, HeadFail> {
        loop {
            if !self.ubuf.is_empty() {
                let parsed = {
                    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match h1::parse_response(&self.ubuf, &mut hs, meta.is_head) {
                        Ok(r) if r.code == 101 => {
                            return Err(HeadFail::Bad("the cell switched protocols".into()))
                        }
                        Ok(r) if (100..200).contains(&r.code) => Some((r.head_len, None)),
                        Ok(r) => {
                            let relay =
                                r.relay(meta.http10, meta.keep_alive, self.stop.is_cancelled());
                            self.wbuf.clear();
                            if r.needs_date() {
                                h1::with_date(|date| {
                                    r.write_head(relay, meta.http10, corr, date, &mut self.wbuf)
                                });
                            } else {
                                r.write_head(relay, meta.http10, corr, b"", &mut self.wbuf);
                            }
                            let head = RespHead {
                                code: r.code,
                                framing: r.framing,
                                keep_alive: r.keep_alive,
                                relay,
                                usage_units: r.usage_units,
                            };
                            Some((r.head_len, Some(head)))
                        }
                        Err(HeadError::Partial) => None,
                        Err(HeadError::Bad(m)) => return Err(HeadFail::Bad(m)),
                        Err(HeadError::TooLarge) => {
                            return Err(HeadFail::Bad("response head too large".into()))
                        }
                    }
                };
                if let Some((n, head)) = parsed {
                    self.ubuf.advance(n);
                    if let Some(head) = head {
                        return Ok(head);
                    }
                    continue;
                }
            }
            self.waits
                .read(&conn.io, &mut self.ubuf, deadline, false)
                .await
                .map_err(HeadFail::Wait)?;
        }
    }
}
