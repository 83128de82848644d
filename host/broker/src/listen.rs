//! What every HTTP listener of wasmesh shares (ingress, metrics, the admin API): an accept loop
//! that survives running out of file descriptors, and connections that cannot be held open by
//! a client that sends nothing.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
