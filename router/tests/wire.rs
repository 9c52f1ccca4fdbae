//! HTTP/1.1 on the wire, end to end: the router binary between a raw TCP client and
//! hand-written cells that record the exact bytes they receive and answer with exact bytes.
//! Framing (chunked both ways, HEAD/204/304, close-delimited, big bodies), pipelining,
//! `Expect: 100-continue`, refused heads, header filtering both ways, interim responses,
//! client timeouts and absolute-form targets.

mod common;

use common::{cell_socket, spawn, write_routes, Router};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for any expected byte.
const WAIT: Duration = Duration::from_secs(5);
const TENANT: &str = "acme.example.test";

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the complete chunked body at the start of `buf` (trailers included), or
/// `None` while it is incomplete. Panics on a malformed body.
fn chunked_len(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let eol = pos + find(&buf[pos..], b"\r\n")?;
        let line = std::str::from_utf8(&buf[pos..eol]).expect("chunk size line is text");
        let hex = line.split([';', ' ', '\t']).next().unwrap();
        let size = usize::from_str_radix(hex, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
        pos = eol + 2;
        if size == 0 {
            loop {
                let eol = pos + find(&buf[pos..], b"\r\n")?;
                let blank = eol == pos;
                pos = eol + 2;
                if blank {
                    return Some(pos);
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return None;
        }
        assert_eq!(&buf[pos + size..pos + size + 2], b"\r\n", "chunk data ends");
        pos += size + 2;
    }
}

/// The data of a complete chunked body.
fn dechunk(mut buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = find(buf, b"\r\n").unwrap();
        let line = std::str::from_utf8(&buf[..eol]).unwrap();
        let size = usize::from_str_radix(line.split([';', ' ']).next().unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&buf[eol + 2..eol + 2 + size]);
        buf = &buf[eol + 2 + size + 2..];
    }
}

/// A message head as received, through the blank line.
#[derive(Debug, Clone)]
struct Head {
    raw: String,
}

impl Head {
    fn start(&self) -> &str {
        self.raw.split("\r\n").next().unwrap()
    }

    fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.raw
            .split("\r\n")
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or((l, ""));
                (n, v.trim())
            })
    }

    /// Every value of the fields named `name` (any case).
    fn all(&self, name: &str) -> Vec<&str> {
        self.fields()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    /// The value of the one field named `name`; panics if there are several.
    fn get(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "several {name} fields in {:?}", self.raw);
        all.first().copied()
    }

    /// The head with the values of the fields the router fills in per request
    /// (`x-correlation-id`, `date`) replaced by `*`.
    fn norm(&self) -> String {
        self.raw
            .split("\r\n")
            .map(|l| match l.split_once(':') {
                Some((n, _))
                    if n.eq_ignore_ascii_case("x-correlation-id")
                        || n.eq_ignore_ascii_case("date") =>
                {
                    format!("{n}: *")
                }
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn status(&self) -> u16 {
        self.start().split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn method(&self) -> &str {
        self.start().split(' ').next().unwrap()
    }

    fn target(&self) -> &str {
        self.start().split(' ').nth(1).unwrap()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    None,
    Length(usize),
    Chunked,
    Close,
}

fn frame(head: &Head, request: bool, bodiless: bool) -> Frame {
    if bodiless {
        return Frame::None;
    }
    let te = head.all("transfer-encoding");
    if te
        .last()
        .is_some_and(|v| v.rsplit(',').next().unwrap().trim() == "chunked")
    {
        return Frame::Chunked;
    }
    match head.all("content-length").first() {
        Some(n) => Frame::Length(n.parse().unwrap()),
        None if request => Frame::None,
        None => Frame::Close,
    }
}

#[derive(Debug)]
enum ReadErr {
    /// The peer closed before a message started.
    Eof,
    /// The peer closed or failed mid-message, or nothing came in time.
    Broken(String),
}

impl std::fmt::Display for ReadErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadErr::Eof => f.write_str("EOF before a message"),
            ReadErr::Broken(m) => f.write_str(m),
        }
    }
}

/// One side of a TCP connection with its unread bytes.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(s: TcpStream) -> Self {
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        Self { s, buf: Vec::new() }
    }

    /// Reads once more into `buf`; the number of bytes (0 at EOF).
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn head(&mut self) -> Result<Head, ReadErr> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let raw = String::from_utf8(self.buf.drain(..i + 4).collect())
                    .map_err(|e| ReadErr::Broken(format!("head is not text: {e}")))?;
                return Ok(Head { raw });
            }
            match self.fill() {
                Ok(0) if self.buf.is_empty() => return Err(ReadErr::Eof),
                Ok(0) => {
                    return Err(ReadErr::Broken(format!(
                        "EOF mid-head after {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(ReadErr::Broken(format!(
                        "{e} waiting for a head; have {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )))
                }
            }
        }
    }

    /// The body as it is on the wire (chunked bodies not decoded).
    fn body(&mut self, frame: Frame) -> Result<Vec<u8>, ReadErr> {
        loop {
            let end = match frame {
                Frame::None => Some(0),
                Frame::Length(n) => (self.buf.len() >= n).then_some(n),
                Frame::Chunked => chunked_len(&self.buf),
                Frame::Close => None,
            };
            if let Some(n) = end {
                return Ok(self.buf.drain(..n).collect());
            }
            match self.fill() {
                Ok(0) if frame == Frame::Close => return Ok(std::mem::take(&mut self.buf)),
                Ok(0) => {
                    return Err(ReadErr::Broken(format!(
                        "EOF mid-body ({frame:?}) after {} bytes",
                        self.buf.len()
                    )))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(ReadErr::Broken(format!(
                        "{e} waiting for a body ({frame:?}); have {} bytes",
                        self.buf.len()
                    )))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client.

struct Resp {
    head: Head,
    body: Vec<u8>,
}

impl Resp {
    fn status(&self) -> u16 {
        self.head.status()
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    /// A problem document with `status`, on a connection the router closes.
    fn problem(&self, status: u16, kind: &str) -> serde_json::Value {
        assert_eq!(self.status(), status, "{}", self.head.raw);
        assert_eq!(
            self.head.get("content-type"),
            Some("application/problem+json")
        );
        assert_eq!(
            self.head.get("content-length"),
            Some(self.body.len().to_string().as_str())
        );
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(
            v["type"],
            format!("https://cellplane.dev/problems/{kind}"),
            "{v}"
        );
        v
    }
}

struct Client {
    w: Wire,
}

fn connect(r: &Router) -> Client {
    Client {
        w: Wire::new(TcpStream::connect(r.addr()).unwrap()),
    }
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.w.s.write_all(bytes).unwrap();
    }

    fn read(&mut self, head_request: bool) -> Resp {
        let head = self
            .w
            .head()
            .unwrap_or_else(|e| panic!("response head: {e}"));
        let code = head.status();
        let bodiless = head_request || (100..200).contains(&code) || code == 204 || code == 304;
        let body = self
            .w
            .body(frame(&head, false, bodiless))
            .unwrap_or_else(|e| panic!("response body after {:?}: {e}", head.raw));
        Resp { head, body }
    }

    /// The next response (to a request other than HEAD).
    fn response(&mut self) -> Resp {
        self.read(false)
    }

    /// The next response, to a HEAD request.
    fn head_response(&mut self) -> Resp {
        self.read(true)
    }

    /// Sends `req` and reads the response.
    fn call(&mut self, req: &str) -> Resp {
        self.send(req.as_bytes());
        self.response()
    }

    /// The router closes the connection: no byte more, then EOF.
    fn eof(&mut self) {
        assert!(
            self.w.buf.is_empty(),
            "unread bytes {:?}",
            String::from_utf8_lossy(&self.w.buf)
        );
        match self.w.fill() {
            Ok(0) => {}
            Ok(_) => panic!(
                "bytes after the last response: {:?}",
                String::from_utf8_lossy(&self.w.buf)
            ),
            Err(e) => panic!("the router did not close the connection: {e}"),
        }
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {TENANT}\r\n\r\n")
}

// ---------------------------------------------------------------------------------------
// The cells.

/// A request as a cell received it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which connection of the cell (0 = the first accepted).
    conn: usize,
    /// Which request on that connection (0 = the first).
    nth: usize,
    head: Head,
    /// The body as on the wire (a chunked body with its framing).
    body: Vec<u8>,
}

/// What a cell does after a request: write these pieces (30 ms apart) and keep the
/// connection, write them and close, or close without answering.
enum Reply {
    Keep(Vec<Vec<u8>>),
    Close(Vec<Vec<u8>>),
    Hangup,
}

/// `200 OK` with `body`; only the head when `seen` is a HEAD request.
fn ok(seen: &Seen, body: &str) -> Reply {
    let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    if seen.head.method() != "HEAD" {
        r.push_str(body);
    }
    Reply::Keep(vec![r.into_bytes()])
}

/// `200 OK` echoing the request: `{target}:{body}`.
fn echo(seen: &Seen) -> Reply {
    let body = format!(
        "{}:{}",
        seen.head.target(),
        String::from_utf8_lossy(&seen.body)
    );
    ok(seen, &body)
}

fn one(bytes: impl Into<Vec<u8>>) -> Reply {
    Reply::Keep(vec![bytes.into()])
}

type Answer = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A cell on its own thread: records every request and answers it with `answer`.
#[derive(Clone)]
struct Cell {
    seen: Arc<Mutex<Vec<Seen>>>,
    conns: Arc<AtomicUsize>,
}

impl Cell {
    fn start(
        listener: TcpListener,
        answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let cell = Cell {
            seen: Arc::default(),
            conns: Arc::default(),
        };
        let answer: Arc<Answer> = Arc::new(answer);
        let c = cell.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { return };
                let conn = c.conns.fetch_add(1, Ordering::SeqCst);
                let (c, answer) = (c.clone(), answer.clone());
                std::thread::spawn(move || c.serve(Wire::new(s), conn, answer));
            }
        });
        cell
    }

    fn serve(&self, mut w: Wire, conn: usize, answer: Arc<Answer>) {
        // Idle pooled connections wait for as long as the router keeps them.
        w.s.set_read_timeout(None).unwrap();
        for nth in 0.. {
            let Ok(head) = w.head() else { return };
            let Ok(body) = w.body(frame(&head, true, false)) else {
                return;
            };
            let seen = Seen {
                conn,
                nth,
                head,
                body,
            };
            self.seen.lock().unwrap().push(seen.clone());
            let (pieces, close) = match answer(&seen) {
                Reply::Keep(p) => (p, false),
                Reply::Close(p) => (p, true),
                Reply::Hangup => (Vec::new(), true),
            };
            for (i, p) in pieces.iter().enumerate() {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(30));
                }
                if w.s.write_all(p).is_err() {
                    return;
                }
            }
            if close {
                let _ = w.s.shutdown(Shutdown::Both);
                return;
            }
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// The only request the cell got.
    fn only(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        seen[0].clone()
    }

    /// The cell got no request and no connection (after a moment for stragglers).
    fn untouched(&self) {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(self.seen().len(), 0, "{:#?}", self.seen());
        assert_eq!(self.conns(), 0);
    }
}

/// A router serving `acme`/`prod` from one cell, probing off, one worker.
struct Setup {
    _dir: tempfile::TempDir,
    router: Router,
    cell: Cell,
}

impl Setup {
    fn client(&self) -> Client {
        connect(&self.router)
    }
}

fn setup(extra: &[&str], answer: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Setup {
    let (dir, state, listener, port) = cell_socket();
    let cell = Cell::start(listener, answer);
    write_routes(&state, &[("acme", "prod", port)]);
    let mut args = vec!["--workers", "1", "--health-interval-ms", "0"];
    args.extend_from_slice(extra);
    let router = spawn(&state, &args);
    Setup {
        _dir: dir,
        router,
        cell,
    }
}

/// The head a cell gets for a request with only `Host: acme.example.test` besides
/// `fields` (as sent), `framing` being the router's framing line (or "").
fn forwarded(start: &str, fields: &str, framing: &str) -> String {
    format!(
        "{start}\r\nHost: {TENANT}\r\n{fields}x-tenant-id: acme\r\nx-tenant-env: prod\r\n\
         x-correlation-id: *\r\n{framing}\r\n"
    )
}

/// Deterministic bytes.
fn pattern(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, expected {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. Chunked request bodies.

// A chunked request body (a chunk extension, CRLFs inside chunk data, a trailer field)
// reaches the cell byte for byte under the router's `transfer-encoding: chunked`, whether
// it comes with the head or trickles in after it; the cell connection is reused after it.
#[test]
fn chunked_request_body_reaches_the_cell_byte_exact() {
    let t = setup(&[], |s| ok(s, "got"));
    let body: &[u8] =
        b"4;name=val\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t1\r\n\r\n";
    let head = format!(
        "POST /v1/upload?a=1 HTTP/1.1\r\nHost: {TENANT}\r\nTransfer-Encoding: chunked\r\n\
         Content-Type: text/plain\r\n\r\n"
    );
    let mut c = t.client();
    // All in one write.
    let mut req = head.clone().into_bytes();
    req.extend_from_slice(body);
    c.send(&req);
    let r = c.response();
    assert_eq!((r.status(), r.text()), (200, "got"));
    // The head first, then the body in pieces cut inside a size line, data and the trailer.
    c.send(head.as_bytes());
    for piece in [&body[..2], &body[2..24], &body[24..60], &body[60..]] {
        std::thread::sleep(Duration::from_millis(60));
        c.send(piece);
    }
    let r = c.response();
    assert_eq!((r.status(), r.text()), (200, "got"));
    let seen = t.cell.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.head.norm(),
            forwarded(
                "POST /v1/upload?a=1 HTTP/1.1",
                "Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n",
                ""
            )
        );
        assert_eq!(
            String::from_utf8_lossy(&s.body),
            String::from_utf8_lossy(body)
        );
        assert_eq!(s.conn, 0, "one cell connection for both");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Chunked responses.

const CHUNKED_HEAD: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Cell: c1\r\n\r\n";
const CHUNKS_1: &str = "5;e=1\r\nhello\r\n";
const CHUNKS_2: &str = "6\r\n world\r\n0\r\nx-t: 1\r\n\r\n";

fn chunked_reply(_: &Seen) -> Reply {
    Reply::Keep(vec![
        format!("{CHUNKED_HEAD}{CHUNKS_1}").into_bytes(),
        CHUNKS_2.as_bytes().to_vec(),
    ])
}

// To an HTTP/1.1 client a chunked response is relayed as it came (extension and trailer
// included) and the connection stays open for the next request.
#[test]
fn chunked_response_is_relayed_byte_exact_to_http11() {
    let t = setup(&[], chunked_reply);
    let mut c = t.client();
    for path in ["/a", "/b"] {
        let r = c.call(&get(path));
        assert_eq!(
            r.head.norm(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Cell: c1\r\n\
             x-correlation-id: *\r\ndate: *\r\n\r\n"
        );
        assert_eq!(r.text(), format!("{CHUNKS_1}{CHUNKS_2}"));
    }
    assert_eq!(t.cell.seen().len(), 2);
    assert_eq!(t.cell.conns(), 1);
}

// An HTTP/1.0 client cannot read chunked: it gets the chunks' data without a
// Transfer-Encoding field, and the connection is closed to end the body, even when the
// client asked for keep-alive. The cell gets the request as HTTP/1.1.
#[test]
fn chunked_response_is_decoded_for_http10_and_the_connection_closed() {
    let t = setup(&[], chunked_reply);
    for keep in ["", "Connection: keep-alive\r\n"] {
        let mut c = t.client();
        c.send(format!("GET /old HTTP/1.0\r\nHost: {TENANT}\r\n{keep}\r\n").as_bytes());
        let r = c.response();
        assert_eq!(
            r.head.norm(),
            "HTTP/1.1 200 OK\r\nX-Cell: c1\r\nx-correlation-id: *\r\ndate: *\r\n\
             connection: close\r\n\r\n",
            "{keep:?}"
        );
        // Read to EOF: the router closed the connection.
        assert_eq!(r.text(), "hello world", "{keep:?}");
        c.eof();
    }
    for s in t.cell.seen() {
        assert_eq!(s.head.start(), "GET /old HTTP/1.1");
        assert!(s.head.get("connection").is_none());
    }
}

// ---------------------------------------------------------------------------------------
// 3. Bodiless responses.

// HEAD, 204 and 304 responses have no body whatever their Content-Length says: the client
// gets the head alone and the next request on the same connection (and the same cell
// connection) is answered.
#[test]
fn head_204_and_304_responses_end_at_their_head() {
    let t = setup(&[], |s| match s.head.target() {
        "/head" => one("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\n"),
        "/204" => one("HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"),
        "/304" => one("HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n"),
        _ => echo(s),
    });
    let mut c = t.client();
    c.send(format!("HEAD /head HTTP/1.1\r\nHost: {TENANT}\r\n\r\n").as_bytes());
    let r = c.head_response();
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\
         x-correlation-id: *\r\ndate: *\r\n\r\n"
    );
    assert_eq!(c.call(&get("/after-head")).text(), "/after-head:");
    let r = c.call(&get("/204"));
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 204 No Content\r\nx-a: 1\r\nx-correlation-id: *\r\ndate: *\r\n\r\n"
    );
    assert_eq!(c.call(&get("/after-204")).text(), "/after-204:");
    c.send(
        format!("GET /304 HTTP/1.1\r\nHost: {TENANT}\r\nIf-None-Match: \"v1\"\r\n\r\n").as_bytes(),
    );
    let r = c.response();
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\
         x-correlation-id: *\r\ndate: *\r\n\r\n"
    );
    assert!(r.body.is_empty());
    assert_eq!(c.call(&get("/after-304")).text(), "/after-304:");
    let seen = t.cell.seen();
    let starts: Vec<_> = seen.iter().map(|s| s.head.start().to_string()).collect();
    assert_eq!(
        starts,
        [
            "HEAD /head HTTP/1.1",
            "GET /after-head HTTP/1.1",
            "GET /204 HTTP/1.1",
            "GET /after-204 HTTP/1.1",
            "GET /304 HTTP/1.1",
            "GET /after-304 HTTP/1.1",
        ]
    );
    assert_eq!(
        t.cell.conns(),
        1,
        "the cell connection was left clean each time"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Pipelining.

// Requests sent in one write (one with a body, one HEAD) are answered in order on the same
// connection; each reaches the cell whole and only once.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let t = setup(&[], echo);
    let mut c = t.client();
    c.send(
        format!(
            "POST /one HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: 3\r\n\r\nabc\
             HEAD /two HTTP/1.1\r\nHost: {TENANT}\r\n\r\n\
             GET /three HTTP/1.1\r\nHost: {TENANT}\r\n\r\n"
        )
        .as_bytes(),
    );
    let r1 = c.response();
    assert_eq!((r1.status(), r1.text()), (200, "/one:abc"));
    let r2 = c.head_response();
    assert_eq!(r2.status(), 200);
    assert_eq!(r2.head.get("content-length"), Some("5"));
    let r3 = c.response();
    assert_eq!((r3.status(), r3.text()), (200, "/three:"));
    // Nothing more arrives, and the connection still serves.
    assert!(c.w.buf.is_empty());
    assert_eq!(c.call(&get("/four")).text(), "/four:");
    let seen = t.cell.seen();
    let got: Vec<_> = seen
        .iter()
        .map(|s| (s.head.start().to_string(), s.body.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("POST /one HTTP/1.1".to_string(), b"abc".to_vec()),
            ("HEAD /two HTTP/1.1".to_string(), vec![]),
            ("GET /three HTTP/1.1".to_string(), vec![]),
            ("GET /four HTTP/1.1".to_string(), vec![]),
        ]
    );
    assert_eq!(
        seen[0].head.norm(),
        forwarded("POST /one HTTP/1.1", "", "content-length: 3\r\n")
    );
}

// ---------------------------------------------------------------------------------------
// 5. Expect: 100-continue.

// The router answers `Expect: 100-continue` itself once the head is accepted; the body sent
// after it reaches the cell, which never sees the expectation. A body that came with the
// head gets no 100 (the final response is the first thing the client reads).
#[test]
fn expect_100_continue_is_answered_by_the_router() {
    let t = setup(&[], echo);
    let mut c = t.client();
    c.send(
        format!(
            "PUT /up HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: 11\r\n\
             Expect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    let cont = c.w.head().unwrap();
    assert_eq!(cont.raw, "HTTP/1.1 100 Continue\r\n\r\n");
    assert!(c.w.buf.is_empty());
    c.send(b"hello world");
    let r = c.response();
    assert_eq!((r.status(), r.text()), (200, "/up:hello world"));
    // Chunked, the same.
    c.send(
        format!(
            "PUT /up2 HTTP/1.1\r\nHost: {TENANT}\r\nExpect: 100-Continue\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(c.w.head().unwrap().raw, "HTTP/1.1 100 Continue\r\n\r\n");
    c.send(b"3\r\nabc\r\n0\r\n\r\n");
    let r = c.response();
    assert_eq!((r.status(), r.text()), (200, "/up2:3\r\nabc\r\n0\r\n\r\n"));
    // The body with the head: straight to the final response.
    let r = c.call(&format!(
        "PUT /up3 HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: 2\r\n\
         Expect: 100-continue\r\n\r\nhi"
    ));
    assert_eq!((r.status(), r.text()), (200, "/up3:hi"));
    let seen = t.cell.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].head.norm(),
        forwarded("PUT /up HTTP/1.1", "", "content-length: 11\r\n")
    );
    assert_eq!(
        seen[1].head.norm(),
        forwarded("PUT /up2 HTTP/1.1", "Transfer-Encoding: chunked\r\n", "")
    );
    for s in &seen {
        assert!(s.head.get("expect").is_none(), "{}", s.head.raw);
    }
}

// An HTTP/1.0 client cannot get a 1xx response (RFC 9110 §15.2: "A server MUST NOT send a
// 1xx response to an HTTP/1.0 client"; §10.1.1: a 100-continue expectation in an HTTP/1.0
// request MUST be ignored): the first thing it reads is the final response.
#[test]
fn expect_from_an_http10_client_gets_no_interim_response() {
    let t = setup(&[], echo);
    let mut c = t.client();
    c.send(
        format!(
            "PUT /old HTTP/1.0\r\nHost: {TENANT}\r\nContent-Length: 5\r\n\
             Expect: 100-continue\r\n\r\n"
        )
        .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(300));
    c.send(b"hello");
    let r = c.response();
    assert_eq!(
        (r.status(), r.text()),
        (200, "/old:hello"),
        "{}",
        r.head.raw
    );
}

// ---------------------------------------------------------------------------------------
// 6. Refused heads.

// Heads a proxy must not guess at are answered by the router (400, or 431 for more than 100
// fields) with a problem document and `connection: close`, the connection is closed, and
// none of them reaches the cell. A head with exactly 100 fields is forwarded whole.
#[test]
fn ambiguous_or_malformed_heads_are_refused_and_never_reach_the_cell() {
    let t = setup(&[], echo);
    let many = |n: usize| -> String { (0..n).map(|i| format!("x-f{i}: v{i}\r\n")).collect() };
    let cases = [
        (
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n".to_string(),
            400,
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n".to_string(),
            400,
        ),
        (
            "Content-Length: 3\r\nContent-Length: 4\r\n".to_string(),
            400,
        ),
        ("Content-Length: 3, 4\r\n".to_string(), 400),
        ("Bad Header: x\r\n".to_string(), 400),
        ("NoColonHere\r\n".to_string(), 400),
        ("X-Space : before colon\r\n".to_string(), 400),
        // Host plus 100 more: 101 fields.
        (many(100), 431),
    ];
    for (fields, status) in &cases {
        let mut c = t.client();
        c.send(format!("POST /x HTTP/1.1\r\nHost: {TENANT}\r\n{fields}\r\n").as_bytes());
        let r = c.response();
        let kind = if *status == 431 {
            "head-too-large"
        } else {
            "bad-request"
        };
        r.problem(*status, kind);
        assert_eq!(r.head.get("connection"), Some("close"), "{fields:?}");
        c.eof();
    }
    t.cell.untouched();
    // Host plus 99 more: 100 fields, forwarded.
    let mut c = t.client();
    let r = c.call(&format!(
        "GET /ok HTTP/1.1\r\nHost: {TENANT}\r\n{}\r\n",
        many(99)
    ));
    assert_eq!((r.status(), r.text()), (200, "/ok:"));
    let s = t.cell.only();
    assert_eq!(s.head.norm(), forwarded("GET /ok HTTP/1.1", &many(99), ""));
}

// ---------------------------------------------------------------------------------------
// 7. Close-delimited responses.

// A response with neither Content-Length nor chunked ends when the cell closes: the client
// gets all of it with `connection: close`, then EOF.
#[test]
fn a_close_delimited_response_is_relayed_whole_then_closed() {
    let t = setup(&[], |_| {
        Reply::Close(vec![
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nfirst part, ".to_vec(),
            b"second part".to_vec(),
        ])
    });
    let mut c = t.client();
    let r = c.call(&get("/stream"));
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 200 OK\r\nx-a: 1\r\nx-correlation-id: *\r\ndate: *\r\nconnection: close\r\n\r\n"
    );
    // Read to EOF.
    assert_eq!(r.text(), "first part, second part");
    c.eof();
    assert_eq!(t.cell.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------
// 8. Header filtering.

// Hop-by-hop and Connection-listed request fields never reach the cell, and the identity
// fields are the router's: X-Tenant-ID is the Host's tenant whatever the client claims, a
// client correlation id that is not a valid one is replaced. The cell's hop-by-hop and
// listed fields never reach the client, which gets the correlation id and a Date when the
// cell sent none, and the cell's own when it did.
#[test]
fn hop_by_hop_and_identity_headers_are_filtered_both_ways() {
    let t = setup(&[], |s| {
        match s.head.target() {
        "/h" => one(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nKeep-Alive: timeout=5, max=100\r\n\
             Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Cell: c1\r\n\r\nok",
        ),
        _ => one(
            "HTTP/1.1 200 OK\r\nX-Correlation-ID: cell-1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\
             content-length: 2\r\n\r\nok",
        ),
    }
    });
    let mut c = t.client();
    let r = c.call(&format!(
        "GET /h HTTP/1.1\r\nHost: {TENANT}\r\nConnection: keep-alive, X-Secret\r\n\
         X-Secret: s\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Connection: keep-alive\r\n\
         X-Tenant-ID: globex\r\nx-tenant-id: initech\r\nX-Tenant-Env: prod\r\n\
         X-Correlation-ID: not valid!\r\nAccept: */*\r\nX-Keep: 1\r\n\r\n"
    ));
    let s = t.cell.only();
    assert_eq!(
        s.head.norm(),
        forwarded("GET /h HTTP/1.1", "Accept: */*\r\nX-Keep: 1\r\n", "")
    );
    let corr = s.head.get("x-correlation-id").unwrap();
    assert!(corr.starts_with("rt-"), "{corr}");
    // The client's response.
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nX-Cell: c1\r\nx-correlation-id: *\r\n\
         date: *\r\n\r\n"
    );
    assert_eq!(r.head.get("x-correlation-id"), Some(corr));
    let date = httpdate::parse_http_date(r.head.get("date").unwrap()).unwrap();
    let skew = std::time::SystemTime::now()
        .duration_since(date)
        .unwrap_or_default();
    assert!(skew < Duration::from_secs(10), "{skew:?}");
    assert_eq!(r.text(), "ok");
    // A valid client correlation id is carried through (as the router's own field), and the
    // cell's own correlation id and Date are the client's.
    let r = c.call(&format!(
        "GET /own HTTP/1.1\r\nHost: {TENANT}\r\nX-Correlation-ID: wire-abc.1\r\n\
         X-Tenant-ID: globex\r\n\r\n"
    ));
    let s = t.cell.seen()[1].clone();
    assert_eq!(
        s.head.raw,
        format!(
            "GET /own HTTP/1.1\r\nHost: {TENANT}\r\nx-tenant-id: acme\r\nx-tenant-env: prod\r\n\
             x-correlation-id: wire-abc.1\r\n\r\n"
        )
    );
    assert_eq!(
        r.head.raw,
        "HTTP/1.1 200 OK\r\nX-Correlation-ID: cell-1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n\
         content-length: 2\r\n\r\n"
    );
}

// A client field whose name reads as a trusted header once `_` is read as `-` (any case,
// any mix of `_` and `-`) never reaches the cell: CGI-style cells read `X_Tenant_ID` and
// `X-Tenant-ID` as the same HTTP_X_TENANT_ID, so a tenant could pass for another. By
// default (`--underscore-trusted-headers strip`) such fields are dropped and the request is
// forwarded with the router's own identity headers; other underscore fields pass. A twin
// is never a source of the tenant either.
#[test]
fn underscore_twins_of_trusted_headers_never_reach_the_cell() {
    let t = setup(&[], echo);
    let mut c = t.client();
    let r = c.call(&format!(
        "GET /u HTTP/1.1\r\nHost: {TENANT}\r\nX_Tenant_ID: other-tenant\r\n\
         x_tenant_env: dev\r\nX_Correlation_ID: mine\r\nX-Tenant_Id: other-tenant\r\n\
         x_TENANT-env: dev\r\nx-correlation_ID: mine2\r\nX_Keep: 1\r\n\
         X_Tenant_IDs: 2\r\n\r\n"
    ));
    assert_eq!((r.status(), r.text()), (200, "/u:"));
    let s = t.cell.only();
    assert_eq!(
        s.head.norm(),
        forwarded("GET /u HTTP/1.1", "X_Keep: 1\r\nX_Tenant_IDs: 2\r\n", "")
    );
    let corr = s.head.get("x-correlation-id").unwrap();
    assert!(corr.starts_with("rt-"), "{corr}");
    // No tenant in the Host: the twin does not name one (X-Tenant-ID would).
    let r = c.call(
        "GET /u HTTP/1.1\r\nHost: example.test\r\nX_Tenant_ID: acme\r\nX-Tenant_ENV: prod\r\n\r\n",
    );
    r.problem(404, "unknown-tenant");
    assert_eq!(t.cell.seen().len(), 1);
}

// With `--underscore-trusted-headers refuse` a request with an underscore twin of a trusted
// header is answered 400 bad-request (a problem document naming the field) and never
// reaches the cell; the connection stays usable. The client's own `X-Tenant-ID` is not a
// twin: it is stripped as always.
#[test]
fn underscore_twins_are_refused_with_400_when_configured() {
    let t = setup(&["--underscore-trusted-headers", "refuse"], echo);
    let mut c = t.client();
    for twin in [
        "X_Tenant_ID: other-tenant",
        "x-tenant_env: dev",
        "X_CORRELATION_id: mine",
    ] {
        let r = c.call(&format!(
            "GET /r HTTP/1.1\r\nHost: {TENANT}\r\nAccept: */*\r\n{twin}\r\n\r\n"
        ));
        let p = r.problem(400, "bad-request");
        let name = twin.split(':').next().unwrap();
        assert!(p["detail"].as_str().unwrap().contains(name), "{p}");
        assert_eq!(r.head.get("connection"), None, "{twin}");
    }
    let r = c.call(&format!(
        "POST /r HTTP/1.1\r\nHost: {TENANT}\r\nX_Tenant_ID: other-tenant\r\n\
         Content-Length: 3\r\n\r\nabc"
    ));
    r.problem(400, "bad-request");
    t.cell.untouched();
    let r = c.call(&format!(
        "GET /ok HTTP/1.1\r\nHost: {TENANT}\r\nX-Tenant-ID: globex\r\n\r\n"
    ));
    assert_eq!((r.status(), r.text()), (200, "/ok:"));
    assert_eq!(
        t.cell.only().head.norm(),
        forwarded("GET /ok HTTP/1.1", "", "")
    );
}

// ---------------------------------------------------------------------------------------
// 9. Interim responses from the cell.

// 1xx responses of the cell (103 Early Hints, a stray 100) are dropped: the client gets only
// the final response, and the connection stays in step for the next request.
#[test]
fn interim_responses_from_the_cell_are_dropped() {
    let t = setup(&[], |s| match s.head.target() {
        "/hints" => Reply::Keep(vec![
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        ]),
        "/both" => one(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: <a>\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
        ),
        _ => echo(s),
    });
    let mut c = t.client();
    let r = c.call(&get("/hints"));
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-correlation-id: *\r\ndate: *\r\n\r\n"
    );
    assert_eq!(r.text(), "ok");
    let r = c.call(&get("/both"));
    assert_eq!(
        r.head.norm(),
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-correlation-id: *\r\ndate: *\r\n\r\n"
    );
    assert_eq!(r.text(), "yes");
    assert!(c.w.buf.is_empty());
    assert_eq!(c.call(&get("/next")).text(), "/next:");
    assert_eq!(t.cell.conns(), 1);
}

// ---------------------------------------------------------------------------------------
// 10. Big bodies.

const MIB: usize = 1024 * 1024;

// A 1 MiB request body and a 1 MiB response body (with Content-Length, then chunked in
// 64 KiB chunks, then that decoded for an HTTP/1.0 client) pass through intact.
#[test]
fn one_mib_bodies_pass_through_intact() {
    let t = setup(&[], |s| {
        let chunked = || {
            let mut out = Vec::new();
            for part in pattern(MIB, 2).chunks(64 * 1024) {
                out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                out.extend_from_slice(part);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
            out
        };
        match s.head.target() {
            "/big" => {
                let mut r =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {MIB}\r\n\r\n").into_bytes();
                r.extend_from_slice(&pattern(MIB, 1));
                one(r)
            }
            _ => {
                let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                r.extend_from_slice(&chunked());
                one(r)
            }
        }
    });
    let sent = pattern(MIB, 7);
    let mut c = t.client();
    let mut req = format!("POST /big HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: {MIB}\r\n\r\n")
        .into_bytes();
    req.extend_from_slice(&sent);
    c.send(&req);
    let r = c.response();
    assert_eq!(r.status(), 200);
    same_bytes(&r.body, &pattern(MIB, 1), "response body");
    let s = t.cell.only();
    assert_eq!(
        s.head.norm(),
        forwarded(
            "POST /big HTTP/1.1",
            "",
            &format!("content-length: {MIB}\r\n")
        )
    );
    same_bytes(&s.body, &sent, "request body at the cell");
    // Chunked to HTTP/1.1, as is.
    let r = c.call(&get("/big-chunked"));
    assert_eq!(r.head.get("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body.len(), MIB + 16 * 9 + 5);
    same_bytes(&dechunk(&r.body), &pattern(MIB, 2), "chunked response data");
    // Chunked to HTTP/1.0, decoded.
    let mut c = t.client();
    c.send(format!("GET /big-chunked HTTP/1.0\r\nHost: {TENANT}\r\n\r\n").as_bytes());
    let r = c.response();
    assert!(r.head.get("transfer-encoding").is_none());
    same_bytes(&r.body, &pattern(MIB, 2), "decoded response body");
}

// ---------------------------------------------------------------------------------------
// 11. Client timeouts.

// A client that starts a head and stalls gets 408 once the header timeout has passed, and
// the connection is closed; the request never reaches the cell. A head that is complete in
// time, though sent in pieces, is served.
#[test]
fn a_stalled_head_gets_408_after_the_header_timeout() {
    let t = setup(&["--client-header-timeout-ms", "300"], echo);
    let mut c = t.client();
    c.send(b"GET /x HTTP/1.1\r\nHost: acme.exa");
    let t0 = Instant::now();
    let r = c.response();
    let took = t0.elapsed();
    r.problem(408, "request-timeout");
    assert_eq!(r.head.get("connection"), Some("close"));
    c.eof();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    t.cell.untouched();
    let mut c = t.client();
    c.send(b"GET /y HTTP/1.1\r\nHost: acme.exa");
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"mple.test\r\n\r\n");
    assert_eq!(c.response().text(), "/y:");
}

// The header timeout bounds the whole head from its first byte (see `--client-header-
// timeout-ms`: "Time a client has to send a whole request head once it started one"): a
// client that drips a byte every 100 ms is answered 408 well before it stops dripping.
#[test]
fn the_header_timeout_counts_from_the_first_byte() {
    let t = setup(&["--client-header-timeout-ms", "300"], echo);
    let mut c = t.client();
    let mut drip = c.w.s.try_clone().unwrap();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        let head = format!("GET /x HTTP/1.1\r\nHost: {TENANT}\r\nX-Slow: ");
        let bytes = head.bytes().chain(std::iter::repeat(b'a')).take(40);
        for b in bytes {
            if drip.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = c.response();
    let took = t0.elapsed();
    assert_eq!(r.status(), 408);
    assert!(
        took < Duration::from_millis(1500),
        "408 only after {took:?}"
    );
    t.cell.untouched();
}

// The cell's time to answer (`--upstream-timeout-ms`, 2 s here) runs from the end of a
// request body the client streams, not from the start of the request: a body that takes
// longer than that to arrive is still answered by the cell, not 504.
#[test]
fn a_slowly_streamed_body_does_not_use_up_the_cells_time_to_answer() {
    let t = setup(&[], echo);
    let mut c = t.client();
    c.send(
        format!("PUT /slow HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: 10\r\n\r\n").as_bytes(),
    );
    let t0 = Instant::now();
    for b in b"0123456789" {
        std::thread::sleep(Duration::from_millis(250));
        c.send(&[*b]);
    }
    let r = c.response();
    assert!(t0.elapsed() > Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        (r.status(), r.text()),
        (200, "/slow:0123456789"),
        "{}",
        r.head.raw
    );
}

// An idle keep-alive connection is closed (no bytes, EOF) once the idle timeout has passed,
// counted afresh after each response; a connection that never sends anything the same.
#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let t = setup(&["--client-idle-timeout-ms", "300"], echo);
    let mut c = t.client();
    for i in 0..3 {
        assert_eq!(c.call(&get(&format!("/{i}"))).text(), format!("/{i}:"));
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(c.call(&get("/last")).text(), "/last:");
    let t0 = Instant::now();
    c.eof();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let mut c = t.client();
    let t0 = Instant::now();
    c.eof();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(t.cell.seen().len(), 4);
}

// ---------------------------------------------------------------------------------------
// 12. Absolute-form targets.

/// Two cells: `acme` on the first, `globex` on the second.
fn two_cells() -> (tempfile::TempDir, Router, Cell, Cell) {
    let (dir, state, l1, p1) = cell_socket();
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let p2 = l2.local_addr().unwrap().port();
    let acme = Cell::start(l1, echo);
    let globex = Cell::start(l2, echo);
    write_routes(&state, &[("acme", "prod", p1), ("globex", "prod", p2)]);
    let r = spawn(&state, &["--workers", "1", "--health-interval-ms", "0"]);
    (dir, r, acme, globex)
}

// An absolute-form target names the tenant (its authority wins over Host) and is sent to
// the cell in origin form, with the authority as Host.
#[test]
fn an_absolute_form_target_is_routed_by_its_authority() {
    let (_dir, r, acme, globex) = two_cells();
    let mut c = connect(&r);
    let cases = [
        (
            "GET http://acme.example.test/v1/x HTTP/1.1\r\nHost: other\r\n\r\n",
            "GET /v1/x HTTP/1.1\r\nhost: acme.example.test\r\n",
        ),
        (
            "GET http://acme.example.test:8080/v1/x?q=1 HTTP/1.1\r\nHost: globex.example.test\r\n\r\n",
            "GET /v1/x?q=1 HTTP/1.1\r\nhost: acme.example.test:8080\r\n",
        ),
        (
            "GET http://acme.example.test HTTP/1.1\r\nHost: globex.example.test\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: acme.example.test\r\n",
        ),
    ];
    for (req, _) in &cases {
        let resp = c.call(req);
        assert_eq!(resp.status(), 200, "{req:?}: {}", resp.head.raw);
    }
    let seen = acme.seen();
    assert_eq!(seen.len(), cases.len());
    for (s, (_, want)) in seen.iter().zip(&cases) {
        assert_eq!(
            s.head.norm(),
            format!("{want}x-tenant-id: acme\r\nx-tenant-env: prod\r\nx-correlation-id: *\r\n\r\n")
        );
    }
    globex.untouched();
}

// RFC 9112 §3.2.1: when the target URI's path is empty the origin-form is "/" (then the
// query): `http://acme.example.test?q=1` is sent to the cell as `/?q=1`, never `?q=1`.
#[test]
fn an_absolute_form_target_without_a_path_gets_slash() {
    let (_dir, r, acme, _globex) = two_cells();
    let mut c = connect(&r);
    let resp = c.call("GET http://acme.example.test?q=1 HTTP/1.1\r\nHost: other\r\n\r\n");
    assert_eq!(resp.status(), 200);
    assert_eq!(acme.only().head.start(), "GET /?q=1 HTTP/1.1");
}

// ---------------------------------------------------------------------------------------
// Framing a proxy must not pass on as it came.

// RFC 9112 §6.3: a message with both Transfer-Encoding and Content-Length is framed by the
// Transfer-Encoding, and "an intermediary that chooses to forward the message MUST first
// remove the received Content-Length field". The client must never get both.
#[test]
fn a_cell_response_with_length_and_chunked_is_not_relayed_with_both() {
    let t = setup(&[], |_| {
        one(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n",
        )
    });
    let mut c = t.client();
    let r = c.call(&get("/x"));
    assert_eq!(r.status(), 200);
    assert!(
        r.head.get("content-length").is_none(),
        "relayed with both: {:?}",
        r.head.raw
    );
    assert_eq!(r.text(), "5\r\nhello\r\n0\r\n\r\n");
    let mut c = t.client();
    c.send(format!("GET /x HTTP/1.0\r\nHost: {TENANT}\r\n\r\n").as_bytes());
    let r = c.response();
    assert!(r.head.get("content-length").is_none(), "{:?}", r.head.raw);
    assert_eq!(r.text(), "hello");
}

// A request body with `Transfer-Encoding: gzip, chunked` is gzip data in chunks: the router
// may refuse it (501/400) or forward it with its codings, but must not tell the cell it is
// only chunked (the cell would take gzip bytes as the content).
#[test]
fn transfer_codings_before_chunked_are_not_dropped() {
    let t = setup(&[], echo);
    let mut c = t.client();
    let r = c.call(&format!(
        "POST /z HTTP/1.1\r\nHost: {TENANT}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
         3\r\nxyz\r\n0\r\n\r\n"
    ));
    match r.status() {
        400 | 501 => t.cell.untouched(),
        _ => {
            let s = t.cell.only();
            let te = s.head.all("transfer-encoding").join(", ");
            assert!(te.contains("gzip"), "the cell got {:?}", s.head.raw);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Retrying on a reused cell connection.

/// A cell that reads the second request on its first connection and closes it unanswered;
/// everything else is echoed.
fn hang_up_on_the_second_request(s: &Seen) -> Reply {
    if s.conn == 0 && s.nth == 1 {
        Reply::Hangup
    } else {
        echo(s)
    }
}

// A reused cell connection that closes without a byte of response is replaced and an
// idempotent request sent again on a new one: the client gets the answer.
#[test]
fn a_get_is_retried_when_a_reused_cell_connection_closes_before_answering() {
    let t = setup(&[], hang_up_on_the_second_request);
    let mut c = t.client();
    assert_eq!(c.call(&get("/1")).text(), "/1:");
    let r = c.call(&get("/2"));
    assert_eq!((r.status(), r.text()), (200, "/2:"));
    let got: Vec<_> = t
        .cell
        .seen()
        .iter()
        .map(|s| (s.conn, s.head.target().to_string()))
        .collect();
    assert_eq!(
        got,
        [
            (0, "/1".to_string()),
            (0, "/2".to_string()),
            (1, "/2".to_string())
        ]
    );
}

// RFC 9110 §9.2.2: "A proxy MUST NOT automatically retry non-idempotent requests." A POST
// the cell read in full before closing may have been acted on: the client gets an error and
// the cell sees the POST once.
#[test]
fn a_post_is_not_retried_after_the_cell_read_it() {
    let t = setup(&[], hang_up_on_the_second_request);
    let mut c = t.client();
    assert_eq!(c.call(&get("/1")).text(), "/1:");
    let r = c.call(&format!(
        "POST /pay HTTP/1.1\r\nHost: {TENANT}\r\nContent-Length: 3\r\n\r\n100"
    ));
    let posts = t
        .cell
        .seen()
        .iter()
        .filter(|s| s.head.method() == "POST")
        .count();
    assert_eq!(posts, 1, "the cell got the POST {posts} times");
    r.problem(502, "cell-unreachable");
}
