//! A minimal HTTP/1.1 server answering `GET /metrics` and `GET /healthz` on METRICS_ADDR.
//!
//! This module owns the socket, the connections and the HTTP framing. It reads the daemon's
//! state through two calls only, [`Metrics::encode`] and [`Health::check`], and must not change
//! either: it decides nothing about what is counted or what health means.
//!
//! The server runs on a thread of its own, with one short-lived thread per connection (at most
//! 16; a new connection closes the oldest idle one, so idle clients cannot starve a probe),
//! rather than on the daemon's tokio runtime: the runtime is built without tokio's
//! `net` feature, and a thread apart keeps answering `/healthz` with "stalled" when the
//! daemon's loop is stuck in a blocking call on a hung NFS server, which is when it matters.
//! It reads no more than a request head, within a size limit and a deadline, and closes every
//! connection after one answer. Why it is ours rather than a crate's: docs/DECISIONS.md.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, warn};

use super::{Health, Metrics};

/// The largest request head (request line and headers) read. A scraper sends a few hundred
/// bytes; anything much larger is not a scraper.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long a client has to send its whole request head. Bounds what a slow or silent client
/// can hold.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long writing an answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// After answering, how long (and how much) the rest of a request is read and dropped, so that
/// closing does not reset the connection before the client has read the answer.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(500);
const DRAIN_BYTES: usize = 64 * 1024;

/// Connections served at once. A scraper needs one; the limit bounds the threads that slow
/// clients can hold. A connection beyond it closes the oldest one still waiting for its
/// request, so idle clients cannot starve a health probe; only when every one is busy
/// answering is the newcomer told 503.
const MAX_CONNECTIONS: usize = 16;

/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so that the loop does not spin while it lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The content type of `/metrics`: what `prometheus-client` writes (with its `# EOF` line).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Why the metrics server cannot start. Fatal at start-up, like an invalid configuration value.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The address cannot be listened on (taken, not this host's, privileged port).
    #[error("cannot serve metrics on METRICS_ADDR={addr}: {source}; {}", bind_hint(.source))]
    Bind { addr: SocketAddr, source: io::Error },
    /// The server's thread cannot be started (out of threads or memory).
    #[error("cannot start the metrics server for METRICS_ADDR={addr}: {source}")]
    Thread { addr: SocketAddr, source: io::Error },
}

/// What to do about an address that cannot be bound.
fn bind_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::AddrInUse => {
            "another program, or another hyper2kvm instance, listens there: give each instance its own \
             port, or leave METRICS_ADDR unset to serve no metrics"
        }
        io::ErrorKind::AddrNotAvailable => "no interface of this host has that address; use one it has, e.g. 127.0.0.1",
        io::ErrorKind::PermissionDenied => {
            "ports below 1024 need a privilege the daemon does not have; use a higher port"
        }
        _ => "set METRICS_ADDR to another address, or leave it unset to serve no metrics",
    }
}

/// The HTTP server of `/metrics` and `/healthz`. Stops when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and serves from a thread of its own. A bind failure names the address and
    /// METRICS_ADDR.
    pub(crate) fn start(addr: SocketAddr, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Server, MetricsError> {
        let listener = Arc::new(TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?);
        let stop = Arc::new(AtomicBool::new(false));
        let site = Site { metrics, health };
        let thread = {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::Builder::new()
                .name("metrics-http".into())
                .spawn(move || accept_loop(&listener, &stop, &Arc::new(site)))
                .map_err(|source| MetricsError::Thread { addr, source })?
        };
        Ok(Server { listener, stop, thread: Some(thread) })
    }

    /// Stops accepting and waits for the accept loop to end. Connections being answered finish
    /// on their own threads, within their deadlines.
    pub(crate) fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else { return };
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket makes a blocked accept(2) return at once on Linux;
        // std has no call for it. The descriptor is valid: `self.listener` holds it open.
        let woken = unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) } == 0;
        if woken {
            let _ = thread.join();
        } else {
            // Nothing can wake the loop: leave it blocked rather than hang the daemon's exit.
            debug!(error = %io::Error::last_os_error(), "could not shut the metrics listener down");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// What the server serves.
struct Site {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, site: &Arc<Site>) {
    let active = Arc::new(Connections::default());
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => dispatch(stream, site, &active),
            // About one connection only (it went away before it was accepted): carry on.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                warn!(error = %e, "the metrics server could not accept a connection; retrying");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// The connections being served, oldest first, each with a handle to close it.
#[derive(Default)]
struct Connections {
    slots: std::sync::Mutex<Vec<Slot>>,
    next_id: AtomicU64,
}

struct Slot {
    id: u64,
    /// A clone of the connection's socket: shutting it down ends the thread's read at once.
    stream: TcpStream,
    /// Still waiting for the request head (rather than answering it).
    reading: bool,
}

impl Connections {
    /// Admits `stream`, closing the oldest connection still waiting for its request when all
    /// slots are taken. `None` when every slot is busy answering.
    fn admit(&self, stream: &TcpStream) -> Option<u64> {
        let mut slots = self.slots.lock().ok()?;
        if slots.len() >= MAX_CONNECTIONS {
            let oldest_idle = slots.iter().position(|slot| slot.reading)?;
            let evicted = slots.remove(oldest_idle);
            let _ = evicted.stream.shutdown(Shutdown::Both);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        slots.push(Slot { id, stream: stream.try_clone().ok()?, reading: true });
        Some(id)
    }

    /// The connection `id` has its request and is being answered: it is no longer evictable.
    fn answering(&self, id: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(slot) = slots.iter_mut().find(|slot| slot.id == id) {
                slot.reading = false;
            }
        }
    }

    fn remove(&self, id: u64) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|slot| slot.id != id);
        }
    }
}

/// Frees a connection's slot when its thread ends.
struct Admitted {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

fn dispatch(stream: TcpStream, site: &Arc<Site>, connections: &Arc<Connections>) {
    let Some(id) = connections.admit(&stream) else {
        // Busy answering slow readers: say so without reading, and close.
        let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
        let busy = Response::text(503, "busy\n");
        let _ = write_response(&mut &stream, &busy, false);
        return;
    };
    let admitted = Admitted { connections: connections.clone(), id };
    let site = site.clone();
    let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
        let answering = || admitted.connections.answering(admitted.id);
        serve_connection(stream, &site, answering);
    });
    if let Err(e) = spawned {
        // The closure, its stream and its slot were dropped with the error.
        debug!(error = %e, "could not start a thread for a metrics connection");
    }
}

/// Answers one request on `stream`, then closes it; `answering` is told when the request head
/// is in.
fn serve_connection(stream: TcpStream, site: &Site, answering: impl FnOnce()) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut reader = DeadlineReader { stream: &stream, deadline: Instant::now() + READ_TIMEOUT };
    let head = read_head(&mut reader, MAX_HEAD_BYTES);
    answering();
    let (response, head_only) = match head {
        Ok(head) => match parse_request(&head) {
            Ok(request) => (route(&request, site), request.method == "HEAD"),
            Err(e) => (Response::refusal(&e), false),
        },
        // Nobody left to answer.
        Err(RequestError::Closed | RequestError::Io(_)) => return,
        Err(e) => (Response::refusal(&e), false),
    };
    if write_response(&mut &stream, &response, head_only).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    drain(&stream);
}

/// Reads and drops what the client still sends, briefly, so that the close is orderly.
fn drain(stream: &TcpStream) {
    let mut reader = DeadlineReader { stream, deadline: Instant::now() + DRAIN_TIMEOUT };
    let mut buffer = [0u8; 4096];
    let mut left = DRAIN_BYTES;
    while left > 0 {
        match reader.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// A socket whose reads fail with `TimedOut` once `deadline` has passed: one deadline for the
/// whole request head, so a client trickling a byte at a time cannot hold a connection longer.
struct DeadlineReader<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// Why a request gets no regular answer.
#[derive(Debug, Error, PartialEq, Eq)]
enum RequestError {
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed request line")]
    Malformed,
    #[error("HTTP version not supported")]
    Version,
    #[error("request not complete in time")]
    Timeout,
    #[error("connection closed before the request was complete")]
    Closed,
    #[error("read error: {0:?}")]
    Io(io::ErrorKind),
}

/// Reads up to the end of the request head (the empty line after the headers), at most
/// `limit` bytes. Empty lines before the request line are skipped, as RFC 9112 §2.2 asks, but
/// count towards the limit. Returns the head without its final empty line.
fn read_head(reader: &mut impl Read, limit: usize) -> Result<Vec<u8>, RequestError> {
    let mut head = Vec::with_capacity(1024);
    let mut total = 0usize;
    let mut buffer = [0u8; 2048];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => return Err(RequestError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(RequestError::Timeout)
            }
            Err(e) => return Err(RequestError::Io(e.kind())),
        };
        total = total.saturating_add(n);
        let mut chunk = &buffer[..n];
        if head.is_empty() {
            let start = chunk.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(chunk.len());
            chunk = &chunk[start..];
        }
        // The end marker may straddle two reads.
        let search_from = head.len().saturating_sub(2);
        head.extend_from_slice(chunk);
        if let Some(end) = head_end(&head, search_from) {
            // What came after the head in this read does not count.
            if total - (head.len() - end) > limit {
                return Err(RequestError::TooLarge);
            }
            head.truncate(end);
            return Ok(head);
        }
        if total > limit {
            return Err(RequestError::TooLarge);
        }
    }
}

/// Where the head in `buffer` ends: the index just after the last header line's `\n`, when
/// an empty line (`\r\n` or a bare `\n`) follows it. Searches from `from`.
fn head_end(buffer: &[u8], from: usize) -> Option<usize> {
    (from..buffer.len()).find_map(|i| {
        if buffer[i] != b'\n' {
            return None;
        }
        match buffer.get(i + 1..) {
            Some([b'\n', ..]) | Some([b'\r', b'\n', ..]) => Some(i + 1),
            _ => None,
        }
    })
}

/// The parts of a request line the server uses.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    /// The path, without the query.
    path: &'a str,
}

/// Parses the request line (`METHOD SP target SP HTTP/1.x`) of a request head. Only the
/// request line matters here: headers are neither needed nor trusted.
fn parse_request(head: &[u8]) -> Result<Request<'_>, RequestError> {
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(end) => &head[..end],
        None => head,
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Visible ASCII and single spaces only: no control bytes, no UTF-8, no TLS handshake.
    if line.is_empty() || !line.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
        return Err(RequestError::Malformed);
    }
    let line = std::str::from_utf8(line).map_err(|_| RequestError::Malformed)?;
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(RequestError::Malformed),
    };
    if method.len() > 32 || !method.bytes().all(is_token_byte) {
        return Err(RequestError::Malformed);
    }
    match version.strip_prefix("HTTP/").map(str::as_bytes) {
        Some(b"1.0" | b"1.1") => {}
        Some([major, b'.', minor]) if major.is_ascii_digit() && minor.is_ascii_digit() => {
            return Err(RequestError::Version)
        }
        _ => return Err(RequestError::Malformed),
    }
    Ok(Request { method, path: request_path(target)? })
}

/// The path of a request target: origin form (`/metrics?x`), absolute form
/// (`http://host:9109/metrics`, which proxies send) or `*`.
fn request_path(target: &str) -> Result<&str, RequestError> {
    let path = if target.starts_with('/') || target == "*" {
        target
    } else {
        let rest = strip_prefix_ignoring_case(target, "http://")
            .or_else(|| strip_prefix_ignoring_case(target, "https://"))
            .ok_or(RequestError::Malformed)?;
        rest.find('/').map_or("/", |slash| &rest[slash..])
    };
    Ok(path.split(['?', '#']).next().unwrap_or(path))
}

/// `text` without `prefix`, compared case-insensitively (URI schemes are).
fn strip_prefix_ignoring_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// RFC 9110 `tchar`: the bytes a method name may have.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An answer.
#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response { status, content_type: TEXT, body: body.into().into_bytes() }
    }

    fn refusal(error: &RequestError) -> Response {
        let status = match error {
            RequestError::TooLarge => 431,
            RequestError::Version => 505,
            RequestError::Timeout => 408,
            RequestError::Malformed | RequestError::Closed | RequestError::Io(_) => 400,
        };
        Response::text(status, format!("{error}\n"))
    }
}

/// What a request gets. GET and HEAD (which RFC 9110 asks every server to take where it takes
/// GET) are the only methods.
fn route(request: &Request<'_>, site: &Site) -> Response {
    let known = matches!(request.path, "/metrics" | "/healthz");
    if !known {
        return Response::text(404, "not found: try /metrics or /healthz\n");
    }
    if !matches!(request.method, "GET" | "HEAD") {
        return Response::text(405, "method not allowed: use GET\n");
    }
    if request.path == "/healthz" {
        return match site.health.check() {
            Ok(()) => Response::text(200, "ok\n"),
            Err(why) => Response::text(503, format!("{why}\n")),
        };
    }
    match site.metrics.encode() {
        Ok(text) => Response { status: 200, content_type: OPENMETRICS, body: text.into_bytes() },
        Err(_) => Response::text(500, "the metrics could not be encoded\n"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes `response`, without its body for a HEAD request. Always `Connection: close`: one
/// request per connection keeps the server simple and a scraper does not need more.
fn write_response(out: &mut impl Write, response: &Response, head_only: bool) -> io::Result<()> {
    let mut bytes = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        bytes.push_str("Allow: GET, HEAD\r\n");
    }
    bytes.push_str("\r\n");
    let mut bytes = bytes.into_bytes();
    if !head_only {
        bytes.extend_from_slice(&response.body);
    }
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &[u8]) -> Result<(String, String), RequestError> {
        parse_request(head).map(|r| (r.method.to_owned(), r.path.to_owned()))
    }

    fn ok(method: &str, path: &str) -> Result<(String, String), RequestError> {
        Ok((method.to_owned(), path.to_owned()))
    }

    #[test]
    fn request_lines_that_scrapers_and_people_send() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n"), ok("GET", "/metrics"));
        assert_eq!(parse(b"GET /healthz HTTP/1.0"), ok("GET", "/healthz"));
        assert_eq!(parse(b"HEAD /metrics HTTP/1.1\n"), ok("HEAD", "/metrics"));
        assert_eq!(parse(b"GET /metrics?name[]=x HTTP/1.1\r\n"), ok("GET", "/metrics"));
        assert_eq!(parse(b"GET http://host:9109/metrics HTTP/1.1\r\n"), ok("GET", "/metrics"));
        assert_eq!(parse(b"GET HTTPS://host HTTP/1.1\r\n"), ok("GET", "/"));
        assert_eq!(parse(b"OPTIONS * HTTP/1.1\r\n"), ok("OPTIONS", "*"));
        // A valid token, though no method of ours: routed to 405, not refused as garbage.
        assert_eq!(parse(b"get /metrics HTTP/1.1\r\n"), ok("get", "/metrics"));
    }

    #[test]
    fn malformed_request_lines_are_refused() {
        for garbage in [
            &b""[..],
            b"\r\n",
            b"GET",
            b"GET /metrics",
            b"GET /metrics HTTP/1.1 extra",
            b"GET  /metrics HTTP/1.1",
            b" GET /metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1 ",
            b"GET /metrics\tHTTP/1.1",
            b"GET /met\0rics HTTP/1.1",
            b"GET /m\xc3\xa9trics HTTP/1.1",
            b"G(T /metrics HTTP/1.1",
            b"GET metrics HTTP/1.1",
            b"GET ftp://host/metrics HTTP/1.1",
            b"GET /metrics HTTP/1.1x",
            b"GET /metrics http/1.1",
            b"GET /metrics SPDY/3",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\xff\xfe\xfd",
        ] {
            assert_eq!(parse(garbage), Err(RequestError::Malformed), "{:?}", String::from_utf8_lossy(garbage));
        }
        let long_method = format!("{} / HTTP/1.1", "X".repeat(33));
        assert_eq!(parse(long_method.as_bytes()), Err(RequestError::Malformed));
        assert_eq!(parse(b"GET /metrics HTTP/2.0"), Err(RequestError::Version));
        assert_eq!(parse(b"GET /metrics HTTP/0.9"), Err(RequestError::Version));
    }

    /// Hands out its data a few bytes per read, like a slow client.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn request_heads_are_read_to_their_empty_line() {
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nbody that is not read";
        for step in [1, 2, 3, 7, 4096] {
            let head = read_head(&mut Trickle { data: request, step }, MAX_HEAD_BYTES).unwrap();
            assert_eq!(head, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", "step {step}");
        }
        assert_eq!(read_head(&mut &b"GET / HTTP/1.0\n\n"[..], 100).unwrap(), b"GET / HTTP/1.0\n");
        // Empty lines before the request line are skipped.
        assert_eq!(read_head(&mut &b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"[..], 100).unwrap(), b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn oversized_endless_or_cut_requests_are_refused() {
        // An endless header line, and endless empty lines, stop at the limit.
        assert_eq!(read_head(&mut io::repeat(b'a'), MAX_HEAD_BYTES), Err(RequestError::TooLarge));
        assert_eq!(read_head(&mut io::repeat(b'\n'), MAX_HEAD_BYTES), Err(RequestError::TooLarge));
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'y', MAX_HEAD_BYTES));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(read_head(&mut &big[..], MAX_HEAD_BYTES), Err(RequestError::TooLarge));
        assert_eq!(read_head(&mut Trickle { data: &big, step: 100 }, MAX_HEAD_BYTES), Err(RequestError::TooLarge));
        // Just within the limit is fine.
        let fits = b"GET / HTTP/1.1\r\n\r\n";
        assert!(read_head(&mut &fits[..], fits.len()).is_ok());
        // Cut short.
        assert_eq!(read_head(&mut &b"GET /metrics HTTP/1.1\r\nHost"[..], MAX_HEAD_BYTES), Err(RequestError::Closed));
        assert_eq!(read_head(&mut &b""[..], MAX_HEAD_BYTES), Err(RequestError::Closed));
    }

    struct Failing(io::ErrorKind);

    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(self.0.into())
        }
    }

    #[test]
    fn read_errors_and_timeouts_are_told_apart() {
        assert_eq!(read_head(&mut Failing(io::ErrorKind::TimedOut), 100), Err(RequestError::Timeout));
        assert_eq!(read_head(&mut Failing(io::ErrorKind::WouldBlock), 100), Err(RequestError::Timeout));
        assert_eq!(
            read_head(&mut Failing(io::ErrorKind::ConnectionReset), 100),
            Err(RequestError::Io(io::ErrorKind::ConnectionReset))
        );
        assert_eq!(Response::refusal(&RequestError::Timeout).status, 408);
        assert_eq!(Response::refusal(&RequestError::TooLarge).status, 431);
        assert_eq!(Response::refusal(&RequestError::Version).status, 505);
        assert_eq!(Response::refusal(&RequestError::Malformed).status, 400);
    }

    fn site() -> Site {
        Site { metrics: Arc::new(Metrics::new()), health: Arc::new(Health::new(Duration::from_secs(60))) }
    }

    fn get(site: &Site, method: &str, path: &str) -> Response {
        route(&Request { method, path }, site)
    }

    #[test]
    fn routes() {
        let site = site();
        assert_eq!(get(&site, "GET", "/").status, 404);
        assert_eq!(get(&site, "GET", "/metrics/").status, 404);
        assert_eq!(get(&site, "POST", "/nowhere").status, 404);
        assert_eq!(get(&site, "POST", "/metrics").status, 405);
        assert_eq!(get(&site, "get", "/healthz").status, 405);
        let metrics = get(&site, "GET", "/metrics");
        assert_eq!((metrics.status, metrics.content_type), (200, OPENMETRICS));
        assert!(String::from_utf8(metrics.body).unwrap().ends_with("# EOF\n"));
        assert_eq!(get(&site, "HEAD", "/metrics").status, 200);

        let mut out = Vec::new();
        write_response(&mut out, &get(&site, "DELETE", "/metrics"), false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{text}");
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n") && text.contains("\r\nConnection: close\r\n"), "{text}");
        let mut out = Vec::new();
        write_response(&mut out, &Response::text(200, "ok\n"), true).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with("Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn health_follows_the_main_loop() {
        let site = site();
        let health = |site: &Site| {
            let r = get(site, "GET", "/healthz");
            (r.status, String::from_utf8(r.body).unwrap())
        };
        assert_eq!(health(&site), (503, "starting\n".into()));
        site.health.alive();
        assert_eq!(health(&site), (200, "ok\n".into()));
        site.health.stopping();
        site.health.alive();
        assert_eq!(health(&site), (503, "stopping\n".into()));

        let stalled = Health::new(Duration::from_millis(20));
        stalled.alive();
        assert_eq!(stalled.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(50));
        assert!(stalled.check().unwrap_err().starts_with("stalled"));
        stalled.alive();
        assert_eq!(stalled.check(), Ok(()));
    }

    /// Sends `request` to `addr`, returns the whole answer (the server closes).
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn the_server_answers_over_tcp_and_stops() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        let server = Server::start("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new()), health.clone()).unwrap();
        let addr = server.listener.local_addr().unwrap();
        // A silent client holds one connection; the others are still answered.
        let _silent = TcpStream::connect(addr).unwrap();
        assert!(exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503 "));
        health.alive();
        let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nok\n"), "{answer}");
        let answer = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(answer.contains(OPENMETRICS) && answer.ends_with("# EOF\n"), "{answer}");
        let answer = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
        assert!(
            exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").starts_with("HTTP/1.1 405 ")
        );
        assert!(exchange(addr, b"GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(exchange(addr, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n\n").starts_with("HTTP/1.1 400 "));
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'z', 3 * MAX_HEAD_BYTES));
        assert!(exchange(addr, &huge).starts_with("HTTP/1.1 431 "));

        let began = Instant::now();
        server.stop();
        assert!(began.elapsed() < Duration::from_secs(2), "stopping took {:?}", began.elapsed());
        assert!(TcpStream::connect(addr).is_err(), "still listening after stop");
    }

    /// Idle clients (connected, sending nothing) must not starve a health probe: it is
    /// answered 200 at once however many of them hold a connection open.
    #[test]
    fn health_is_answered_while_idle_clients_hold_connections() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        health.alive();
        let server = Server::start("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new()), health).unwrap();
        let addr = server.listener.local_addr().unwrap();
        let mut idle = Vec::new();
        for held in [8, 64] {
            while idle.len() < held {
                idle.push(TcpStream::connect(addr).unwrap());
            }
            // Let the server accept them all before the probe.
            std::thread::sleep(Duration::from_millis(200));
            let began = Instant::now();
            let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
            let took = began.elapsed();
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "with {held} idle connections: {answer}");
            assert!(took < Duration::from_secs(1), "with {held} idle connections /healthz took {took:?}");
        }
    }

    /// A client that pipelines scrapes and reads none of the answers must not hold up a
    /// health probe either (a server answering from one loop blocks in its write: see
    /// docs/DECISIONS.md, the tiny_http measurement).
    #[test]
    fn health_is_answered_while_a_client_pipelines_without_reading() {
        let health = Arc::new(Health::new(Duration::from_secs(60)));
        health.alive();
        let server = Server::start("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new()), health).unwrap();
        let addr = server.listener.local_addr().unwrap();
        let hog = TcpStream::connect(addr).unwrap();
        hog.set_nonblocking(true).unwrap();
        let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
        let sent = (&hog).write(&requests).unwrap();
        assert!(sent > 0, "nothing of the pipelined requests was sent");
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..3 {
            let began = Instant::now();
            let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
            let took = began.elapsed();
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(took < Duration::from_secs(1), "/healthz took {took:?}");
        }
    }

    #[test]
    fn a_taken_address_is_a_start_up_error_naming_the_key() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = Server::start(addr, Arc::new(Metrics::new()), Arc::new(Health::new(Duration::from_secs(1))))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(&format!("cannot serve metrics on METRICS_ADDR={addr}: ")), "{error}");
        assert!(error.contains("another hyper2kvm instance"), "{error}");
    }
}
