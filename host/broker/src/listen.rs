//! What every HTTP listener of wasmesh shares (ingress, metrics, the admin API): an accept loop
//! that survives running out of file descriptors, and connections that cannot be held open by
//! a client that sends nothing.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send a request's header (and, at ingress, its body) unless
/// configured: an idle keep-alive connection is closed after it too.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the accept loop waits after an error that is not about one connection (no file
/// descriptor or memory left): the condition lasts, and retrying at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How often a lasting accept error is logged again.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Accepts connections on a listener, pausing after errors that last (out of file descriptors,
/// out of memory) instead of retrying in a busy loop, and logging them at most once per
/// `ACCEPT_LOG_EVERY` (connections that close let a few through meanwhile, so the condition
/// comes and goes while it lasts).
pub struct Acceptor {
    listener: TcpListener,
    /// Names the listener in the log (`ingress`, `admin API`, ...).
    name: &'static str,
    /// When an accept error was last logged.
    logged: Option<Instant>,
    /// Accept errors since then.
    unlogged: u64,
}

impl Acceptor {
    /// Accepts on `listener`; `name` says which listener in the log.
    pub fn new(listener: TcpListener, name: &'static str) -> Self {
        Self {
            listener,
            name,
            logged: None,
            unlogged: 0,
        }
    }

    /// The next connection. Cancel-safe: a `select!` may drop it and call again.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                // The peer gave up before it was accepted: nothing lasts, take the next one.
                Err(e) if is_about_one_connection(&e) => {}
                Err(e) => {
                    if self
                        .logged
                        .is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY)
                    {
                        tracing::warn!(
                            listener = self.name,
                            error = %e,
                            failed_since_last_warning = self.unlogged,
                            "cannot accept connections (out of file descriptors? raise `ulimit -n`); \
                             new clients wait until connections close"
                        );
                        self.logged = Some(Instant::now());
                        self.unlogged = 0;
                    } else {
                        self.unlogged += 1;
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }
}

fn is_about_one_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// An HTTP/1 server connection builder that closes a connection whose client does not send a
/// complete request header within `read_timeout`, counted from when the connection opens or
/// its last response was sent (so idle keep-alive connections are closed too).
pub fn http1_builder(read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    builder
}

/// The most of a refused request's body that is read and dropped before the answer.
const DRAIN_MOST: u64 = 64 << 20;

/// The longest a refused request's body is read and dropped before the answer.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads and drops what is left of a request's body (up to `DRAIN_MOST` bytes, for up to
/// `DRAIN_TIME`) before the server answers without it (401, 404, 413, ...). A client still
/// sending then reads the answer: answering and closing with unread bytes makes the kernel reset
/// the connection, and the client sees a failed write ("error writing a body", "connection
/// reset") instead of the status. A body declared larger than that is not worth reading.
pub async fn drain(mut body: Incoming) {
    if body.size_hint().lower() > DRAIN_MOST {
        return;
    }
    let reading = async {
        let mut seen = 0u64;
        while seen <= DRAIN_MOST {
            match body.frame().await {
                Some(Ok(frame)) => {
                    seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, reading).await;
}

/// Why a request's body was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Longer than the limit (in bytes); the rest was drained (`drain`).
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(usize),
    /// The client broke off or sent a malformed body.
    #[error("cannot read the body: {0}")]
    Read(#[from] hyper::Error),
}

/// True when the client sent `Expect: 100-continue`: it sends the body only once told to, which
/// reading the body does (hyper answers `100 Continue` then). Refused before that, it sends none,
/// so there is nothing to drain.
pub fn waits_for_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Reads a body of at most `limit` bytes. A longer one is refused, its rest drained first so
/// that the client reads the refusal (`drain`); one declared longer is refused before it is
/// read, and drained only if the client is sending it anyway (no `Expect: 100-continue`).
pub async fn read_limited(
    headers: &http::HeaderMap,
    mut body: Incoming,
    limit: usize,
) -> Result<Bytes, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        if !waits_for_continue(headers) {
            drain(body).await;
        }
        return Err(BodyError::TooLarge(limit));
    }
    // One chunk (the usual small request) is kept as it came, without a copy.
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // Trailers.
        };
        len += data.len();
        if len > limit {
            drain(body).await;
            return Err(BodyError::TooLarge(limit));
        }
        match &first {
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// Answers `request` with `response` without using its body: the body is drained first (see
/// `drain`), so that a client still sending it reads `response`.
pub async fn refuse<B>(
    request: http::Request<Incoming>,
    response: http::Response<B>,
) -> http::Response<B> {
    if !waits_for_continue(request.headers()) {
        drain(request.into_body()).await;
    }
    response
}
