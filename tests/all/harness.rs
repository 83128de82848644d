//! The harness for tests of the real `wasmesh serve`: start it on `127.0.0.1:0`, read the bound
//! address from its output, talk HTTP to it, and capture what subscribers receive with a real
//! HTTP server on loopback. Helpers wait for conditions; nothing sleeps a fixed time.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Waits up to `timeout` for `cond`, polling; panics with `what` on time-out.
pub(crate) fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a `wasmesh serve` of `dir`'s YAML files (data in `dir/data`, admin API off) that is
/// expected not to start, and returns what it wrote on stderr.
pub(crate) fn serve_refused(dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmesh"))
        .arg("serve")
        .arg("-f")
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .args(extra)
        .output()
        .expect("run wasmesh serve");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it started: {err}");
    err
}

/// Appends what `pipe` gives to `into` as it comes (on a thread of its own), until it closes.
pub(crate) fn gather(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock()
                .expect("lock")
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
}

/// A running `wasmesh serve`, stopped on drop.
pub(crate) struct Serve {
    child: Child,
    pub(crate) addr: SocketAddr,
    /// The admin API (unless started with `--admin-listen off`).
    pub(crate) admin: Option<SocketAddr>,
    data_dir: std::path::PathBuf,
    files_dir: std::path::PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    _dir: Option<tempfile::TempDir>,
}

impl Serve {
    /// Writes `files` (name, YAML) into a fresh directory and serves it with `extra` flags.
    pub(crate) fn start(files: &[(&str, &str)], extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write yaml");
        }
        Self::start_in(dir, extra)
    }

    /// Serves an existing directory of YAML files.
    pub(crate) fn start_dir(dir: tempfile::TempDir) -> Serve {
        Self::start_in(dir, &[])
    }

    fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Serve {
        let mut serve = Self::start_at(dir.path(), extra);
        serve._dir = Some(dir);
        serve
    }

    /// Serves the YAML files in `dir` with the data directory `dir/data`, which outlives this
    /// process (for restarts on the same data).
    pub(crate) fn start_at(dir: &Path, extra: &[&str]) -> Serve {
        Self::start_replica(dir, &dir.join("data"), extra)
    }

    /// Serves the YAML files in `dir` with its own data directory `data` (replicas of the
    /// same files each have one).
    pub(crate) fn start_replica(dir: &Path, data: &Path, extra: &[&str]) -> Serve {
        Self::start_with_env(dir, data, extra, &[])
    }

    /// [`start_replica`](Self::start_replica) with environment variables `env` set.
    pub(crate) fn start_with_env(
        dir: &Path,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasmesh"))
            .arg("serve")
            .arg("-f")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(if extra.contains(&"--admin-listen") {
                &[][..]
            } else {
                &["--admin-listen", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start wasmesh serve");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().expect("stderr"));
        let mut addr = None;
        let mut admin = None;
        let mut line = String::new();
        while addr.is_none() {
            line.clear();
            let n = err_lines.read_line(&mut line).expect("read stderr");
            assert!(
                n > 0,
                "wasmesh serve exited early:\n{}",
                stderr.lock().expect("lock")
            );
            stderr.lock().expect("lock").push_str(&line);
            if let Some(rest) = line
                .trim()
                .strip_prefix("wasmesh: ingress listening on http://")
            {
                addr = Some(rest.parse().expect("address"));
            }
            if let Some(rest) = line.trim().strip_prefix("wasmesh: admin API listening on ") {
                let url = rest.split_whitespace().next().unwrap_or_default();
                let host = url.split("://").nth(1).unwrap_or_default();
                admin = Some(host.parse().expect("admin address"));
            }
        }
        let e = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in err_lines.lines().map_while(Result::ok) {
                let mut e = e.lock().expect("lock");
                e.push_str(&line);
                e.push('\n');
            }
        });
        gather(child.stdout.take().expect("stdout"), Arc::clone(&stdout));
        Serve {
            child,
            addr: addr.expect("address"),
            admin,
            data_dir: data.to_path_buf(),
            files_dir: dir.to_path_buf(),
            stdout,
            stderr,
            _dir: None,
        }
    }

    /// Its data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the YAML files it serves.
    pub(crate) fn files_dir(&self) -> &Path {
        &self.files_dir
    }

    /// The admin token the server generated into its data directory.
    pub(crate) fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string()
    }

    /// A request to the admin API with the right token.
    pub(crate) fn admin(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.admin_token());
        request(
            self.admin.expect("admin API"),
            method,
            path,
            &[("authorization", &auth)],
            body,
        )
    }

    /// Uploads a module through the admin API and applies it as Function `default/sub` with
    /// `config`; returns the module's digest.
    #[allow(dead_code)]
    pub(crate) fn swap_sub(&self, module: &[u8], config: serde_json::Value) -> String {
        self.try_swap_sub(module, config)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`swap_sub`](Self::swap_sub), saying what the admin API answered when it refused.
    #[allow(dead_code)]
    pub(crate) fn try_swap_sub(
        &self,
        module: &[u8],
        config: serde_json::Value,
    ) -> Result<String, String> {
        let r = self.admin("POST", "/v1/modules", module);
        if r.status != 201 {
            return Err(format!("upload: {} {}", r.status, r.text()));
        }
        let digest = serde_json::from_slice::<serde_json::Value>(&r.body).expect("json")["digest"]
            .as_str()
            .expect("digest")
            .to_string();
        let body = serde_json::json!({
            "apiVersion": "wasmesh.dev/v1alpha1", "kind": "Function",
            "metadata": {"name": "sub", "namespace": "default"},
            "spec": {"module": digest, "config": config},
        });
        let r = self.admin("POST", "/v1/apply", body.to_string().as_bytes());
        if r.status != 200 {
            return Err(format!("apply: {} {}", r.status, r.text()));
        }
        Ok(digest)
    }

    /// True once Function `default/sub` runs the module `digest`.
    #[allow(dead_code)]
    pub(crate) fn sub_runs(&self, digest: &str) -> bool {
        let f: serde_json::Value =
            serde_json::from_slice(&self.admin("GET", "/v1/functions/default/sub", b"").body)
                .unwrap_or_default();
        f["status"]["digest"] == digest
    }

    /// What the server printed from byte `offset` on (benches poll with it).
    #[allow(dead_code)]
    pub(crate) fn stdout_from(&self, offset: usize) -> String {
        self.stdout.lock().expect("lock")[offset..].to_string()
    }

    pub(crate) fn stdout(&self) -> String {
        self.stdout.lock().expect("lock").clone()
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().expect("lock").clone()
    }

    /// Waits until the host's log (stderr) contains `text`.
    pub(crate) fn wait_log(&self, text: &str) {
        wait_for(
            &format!("log line `{text}`"),
            Duration::from_secs(20),
            || self.stderr().contains(text),
        );
    }

    /// A request to this server.
    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        request(self.addr, method, path, headers, body)
    }
}

impl Serve {
    /// The process id (benches/apiserver.rs reads its memory).
    #[allow(dead_code)]
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for the graceful shutdown to finish.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// The names of the server's threads (`/proc/<pid>/task/*/comm`: 15 bytes at most).
    #[allow(dead_code)]
    pub(crate) fn thread_names(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .map(|name| name.trim_end().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How often the server's thread `name` has given up the CPU of its own accord (slept,
    /// waited): `voluntary_ctxt_switches` of `/proc/<pid>/task/<tid>/status`.
    #[allow(dead_code)]
    pub(crate) fn thread_wakeups(&self, name: &str) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).ok()?;
        for t in tasks.filter_map(Result::ok) {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                return status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok());
            }
        }
        None
    }

    /// Sends `signal` (`TERM`, `INT`, ...) without waiting.
    #[allow(dead_code)]
    pub(crate) fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Whether the process has ended within `limit`.
    #[allow(dead_code)]
    pub(crate) fn exits_within(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// SIGKILL: no shutdown, no flush.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read off the wire.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Like [`request`], for a server that may be killed: `Err` when no connection could be made,
/// `Ok(None)` when the request was sent but no answer came back.
pub(crate) fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Option<u16>, ()> {
    let mut s = TcpStream::connect(addr).map_err(|_| ())?;
    Ok(send_on(&mut s, addr, method, path, headers, body))
}

/// Writes one request with exactly these headers and reads the whole response.
fn exchange(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(raw)
}

fn send_on(
    s: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<u16> {
    let raw = exchange(s, addr, method, path, headers, body).ok()?;
    let line = String::from_utf8_lossy(&raw);
    line.lines().next()?.split_whitespace().nth(1)?.parse().ok()
}

/// A plain HTTP/1.1 request over a fresh connection: exactly these headers on the wire.
pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(addr).expect("connect");
    let raw = exchange(&mut s, addr, method, path, headers, body).expect("exchange");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A binary-mode CloudEvent request's headers.
pub(crate) fn ce_headers<'a>(id: &'a str, ty: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "/test"),
        ("ce-type", ty),
        ("content-type", "application/json"),
    ]
}

/// One request a capture server received.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    pub(crate) path: String,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Vec<u8>,
}

/// What a capture server answers: status, headers, body.
pub(crate) type Reply = (u16, Vec<(String, String)>, Vec<u8>);
type Responder = dyn Fn(&Captured) -> Reply + Send + Sync;

/// A subscriber on loopback that records every request and answers with `respond`.
pub(crate) struct Capture {
    pub(crate) addr: SocketAddr,
    seen: Arc<Mutex<Vec<Captured>>>,
    _runtime: tokio::runtime::Runtime,
}

/// A one-thread runtime serving HTTP/1.1 on a free loopback port, each request answered by
/// `handle`; the server lives as long as the runtime.
pub(crate) fn loopback_server<H, Fut, B>(handle: H) -> (tokio::runtime::Runtime, SocketAddr)
where
    H: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = Arc::new(handle);
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handle = Arc::clone(&handle);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (runtime, addr)
}

impl Capture {
    /// Answers 200 with no body to everything.
    pub(crate) fn ok() -> Capture {
        Self::start(|_| (200, Vec::new(), Vec::new()))
    }

    pub(crate) fn start(respond: impl Fn(&Captured) -> Reply + Send + Sync + 'static) -> Capture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Responder> = Arc::new(respond);
        let s = Arc::clone(&seen);
        let (runtime, addr) = loopback_server(move |req: hyper::Request<Incoming>| {
            let s = Arc::clone(&s);
            let respond = Arc::clone(&respond);
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let captured = Captured {
                    path: parts.uri.path().to_string(),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                    body: body.to_vec(),
                };
                let (status, headers, body) = respond(&captured);
                s.lock().expect("lock").push(captured);
                let mut resp = hyper::Response::builder().status(status);
                for (k, v) in headers {
                    resp = resp.header(k, v);
                }
                resp.body(Full::new(Bytes::from(body))).expect("response")
            }
        });
        Capture {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything received on `path` so far.
    pub(crate) fn on(&self, path: &str) -> Vec<Captured> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `path` has received at least `n` requests; returns them.
    pub(crate) fn wait(&self, path: &str, n: usize) -> Vec<Captured> {
        wait_for(
            &format!("{n} request(s) on {path}"),
            Duration::from_secs(20),
            || self.on(path).len() >= n,
        );
        self.on(path)
    }
}

/// The headers of a binary-mode `com.example.response` replying to the request `c` (id
/// `reply-<its id>`, JSON data).
#[allow(dead_code)]
pub(crate) fn response_headers(c: &Captured) -> Vec<(String, String)> {
    vec![
        ("ce-specversion".to_string(), "1.0".to_string()),
        ("ce-id".to_string(), format!("reply-{}", c.headers["ce-id"])),
        ("ce-source".to_string(), "/replier".to_string()),
        ("ce-type".to_string(), "com.example.response".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
    ]
}

/// A default broker with two triggers: `com.example.request` events to `replier`, and
/// `com.example.response` events (its replies) to `sink`.
#[allow(dead_code)]
pub(crate) fn request_response_triggers(replier: &str, sink: &str) -> String {
    broker_with_triggers(&[
        (
            "requests",
            "  filters:\n  - exact: {type: com.example.request}\n",
            replier,
        ),
        (
            "responses",
            "  filters:\n  - exact: {type: com.example.response}\n",
            sink,
        ),
    ])
}

/// A default broker in namespace `default` and triggers to the given URIs: (name, filter YAML
/// under `spec:`, subscriber URI).
pub(crate) fn broker_with_triggers(triggers: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n  namespace: default\n",
    );
    for (name, spec, uri) in triggers {
        yaml.push_str(&format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  broker: default\n{spec}  subscriber:\n    uri: {uri}\n"
        ));
    }
    yaml
}

/// A capture server, and `wasmesh serve` (with `flags`) running a broker `default` whose one
/// trigger, `all`, delivers every event to the capture's `/all`.
pub(crate) fn one_trigger_to_capture(flags: &[&str]) -> (Capture, Serve) {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[("all", "", &sub.url("/all"))]);
    let serve = Serve::start(&[("b.yaml", &yaml)], flags);
    (sub, serve)
}

/// A broker `default`, a Function `sub` running `module` with config `tag`, and a trigger `all`
/// delivering every event to it.
#[allow(dead_code)] // Not every user of the harness needs it.
pub(crate) fn function_subscriber(module: &str, tag: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1
kind: Broker
metadata: {{name: default, namespace: default}}
---
apiVersion: wasmesh.dev/v1alpha1
kind: Function
metadata: {{name: sub, namespace: default}}
spec: {{module: '{module}', config: {{tag: {tag}}}}}
---
apiVersion: eventing.knative.dev/v1
kind: Trigger
metadata: {{name: all, namespace: default}}
spec:
  broker: default
  subscriber: {{ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: sub}}}}
"
    )
}

/// The path of the repository root joined with `rel`.
pub(crate) fn repo(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// Percent-encodes a header value as the HTTP binding says.
pub(crate) fn encode(v: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'%')
        .add(0x7f);
    percent_encoding::utf8_percent_encode(v, SET).to_string()
}

/// A `nats-server -js` on loopback, stopped on drop.
pub(crate) struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    pub(crate) fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut n = NatsServer {
            child: None,
            port,
            dir,
        };
        n.run();
        n
    }

    fn run(&mut self) {
        // Debian puts it in /usr/sbin, which a user's PATH may not have.
        let program = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = Command::new(program)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian's nats-server package; .ci/setup installs it)");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        wait_for("nats-server to listen", Duration::from_secs(20), || {
            TcpStream::connect(addr).is_ok()
        });
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it and starts it again on the same port and store.
    pub(crate) fn restart(&mut self, down_for: Duration) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        std::thread::sleep(down_for);
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A request header's value as text ("" when missing).
#[allow(dead_code)]
pub(crate) fn request_header(req: &hyper::Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

/// An HTTP subscriber on loopback that holds each delivery `hold` and records: the (subject,
/// id) of each delivery as it arrives, and the most deliveries in flight at once, in all and
/// of one subject, since the last reset.
#[allow(dead_code)]
pub(crate) struct HoldingSubscriber {
    pub(crate) addr: SocketAddr,
    pub(crate) arrived: Arc<Mutex<Vec<(String, String)>>>,
    pub(crate) done: Arc<AtomicUsize>,
    pub(crate) most: Arc<AtomicUsize>,
    pub(crate) most_of_a_key: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

#[allow(dead_code)]
impl HoldingSubscriber {
    pub(crate) fn start(hold: Duration) -> HoldingSubscriber {
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let (done, most, most_of_a_key): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            Default::default();
        let in_flight = Arc::new(Mutex::new((0usize, HashMap::<String, usize>::new())));
        let state = (
            Arc::clone(&arrived),
            Arc::clone(&done),
            Arc::clone(&most),
            Arc::clone(&most_of_a_key),
        );
        let (runtime, addr) = loopback_server(move |req: hyper::Request<hyper::body::Incoming>| {
            let (arrived, done, most, most_of_a_key) = state.clone();
            let in_flight = Arc::clone(&in_flight);
            let (subject, id) = (
                request_header(&req, "ce-subject"),
                request_header(&req, "ce-id"),
            );
            async move {
                arrived.lock().expect("lock").push((subject.clone(), id));
                {
                    let mut f = in_flight.lock().expect("lock");
                    f.0 += 1;
                    most.fetch_max(f.0, Ordering::SeqCst);
                    let of_key = f.1.entry(subject.clone()).or_default();
                    *of_key += 1;
                    most_of_a_key.fetch_max(*of_key, Ordering::SeqCst);
                }
                tokio::time::sleep(hold).await;
                {
                    let mut f = in_flight.lock().expect("lock");
                    f.0 -= 1;
                    *f.1.entry(subject).or_default() -= 1;
                }
                done.fetch_add(1, Ordering::SeqCst);
                hyper::Response::builder()
                    .status(202)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("response")
            }
        });
        HoldingSubscriber {
            addr,
            arrived,
            done,
            most,
            most_of_a_key,
            _runtime: runtime,
        }
    }

    /// The numbers `n` of the ids `<phase>-<key>-<n>` that arrived for `key`, in order.
    pub(crate) fn sequence(&self, phase: &str, key: &str) -> Vec<usize> {
        let prefix = format!("{phase}-{key}-");
        self.arrived
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|(_, id)| id.strip_prefix(&prefix)?.parse().ok())
            .collect()
    }
}

/// Sends `rounds` events for each of `keys` (subject `key`, id `<phase>-<key>-<n>`), round-robin
/// over `serves`; every one must be accepted.
#[allow(dead_code)]
pub(crate) fn send_keyed(serves: &[&Serve], phase: &str, keys: &[&str], rounds: usize) {
    let mut i = 0;
    for n in 0..rounds {
        for key in keys {
            let id = format!("{phase}-{key}-{n}");
            let mut h = ce_headers(&id, "t");
            h.push(("ce-subject", key));
            let r = serves[i % serves.len()].request("POST", "/default/default", &h, b"{}");
            assert_eq!(r.status, 202, "{}", r.text());
            i += 1;
        }
    }
}

#[allow(dead_code)]
pub(crate) fn slow_trigger(sub: &HoldingSubscriber, delivery: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: all, namespace: default}}\n\
         spec:\n  broker: default\n  subscriber: {{uri: 'http://{}/'}}\n{delivery}",
        sub.addr
    )
}

#[allow(dead_code)]
pub(crate) const ORDERED: &str = "  delivery:\n    ordering: ordered\n    partitionKey: subject\n    concurrency: 4\n    timeout: PT1S\n";

/// Waits until every event of phases `f` and `g` (`rounds` per key) arrived; then checks that
/// no key ever goes back (an event may come twice, never after a later one of its key) and that
/// each key's `f` events all came before its first `g` event.
#[allow(dead_code)]
pub(crate) fn in_order_and_complete(sub: &HoldingSubscriber, keys: &[&str], rounds: usize) {
    wait_for(
        "every accepted event delivered",
        Duration::from_secs(60),
        || {
            keys.iter().all(|k| {
                (0..rounds)
                    .all(|i| sub.sequence("f", k).contains(&i) && sub.sequence("g", k).contains(&i))
            })
        },
    );
    for phase in ["f", "g"] {
        for key in keys {
            let seen = sub.sequence(phase, key);
            assert!(
                seen.windows(2).all(|w| w[0] <= w[1]),
                "{phase}-{key} never goes back: {seen:?}"
            );
        }
    }
    let arrived = sub.arrived.lock().expect("lock").clone();
    for key in keys {
        let last_f = arrived
            .iter()
            .rposition(|(k, id)| k == key && id.starts_with("f-"));
        let first_g = arrived
            .iter()
            .position(|(k, id)| k == key && id.starts_with("g-"));
        assert!(last_f < first_g, "{key}: every f before any g");
    }
}

/// Applies the trigger of [`slow_trigger`] with `delivery` through `serve`'s admin API.
#[allow(dead_code)]
pub(crate) fn apply_slow_trigger(serve: &Serve, sub: &HoldingSubscriber, delivery: &str) {
    let yaml = slow_trigger(sub, delivery);
    let trigger = yaml.split("---\n").nth(1).expect("trigger");
    let r = serve.admin("POST", "/v1/apply", trigger.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An ordered trigger (`ORDERED`, to a subscriber holding each event `hold`) served with
/// `flags` is rebuilt (concurrency 4 -> 8) while its first events are delivered, then more are
/// sent: checks that every event arrived and every key stayed in order; returns the subscriber.
#[allow(dead_code)]
pub(crate) fn ordered_trigger_rebuilt_under_load(
    hold: Duration,
    flags: &[&str],
) -> HoldingSubscriber {
    let sub = HoldingSubscriber::start(hold);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("b.yaml"), slow_trigger(&sub, ORDERED)).expect("yaml");
    let serve = Serve::start_at(dir.path(), flags);
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    send_keyed(&[&serve], "f", &keys, 6);
    wait_for("deliveries under way", Duration::from_secs(30), || {
        !sub.arrived.lock().expect("lock").is_empty()
    });
    apply_slow_trigger(
        &serve,
        &sub,
        &ORDERED.replace("concurrency: 4", "concurrency: 8"),
    );
    send_keyed(&[&serve], "g", &keys, 6);
    in_order_and_complete(&sub, &keys, 6);
    sub
}

/// One keep-alive HTTP/1.1 connection posting binary-mode events.
#[allow(dead_code)] // The benchmarks use it.
pub(crate) struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[allow(dead_code)]
impl KeepAlive {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self {
            stream,
            buf: vec![0; 4096],
        }
    }

    /// Posts one event; true on 202.
    pub(crate) fn post(&mut self, id: &str) -> bool {
        self.post_with(id, "")
    }

    /// Posts one event with the subject `subject`; true on 202.
    pub(crate) fn post_subject(&mut self, id: &str, subject: &str) -> bool {
        self.post_with(id, &format!("ce-subject: {subject}\r\n"))
    }

    /// Posts one event with `headers` (complete lines) added; true on 202.
    fn post_with(&mut self, id: &str, headers: &str) -> bool {
        let req = format!(
            "POST /default/default HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /bench\r\nce-type: t\r\n{headers}content-type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        if self.stream.write_all(req.as_bytes()).is_err() {
            return false;
        }
        // The answer is small: read until the end of its head and its (short) body.
        let mut got = Vec::new();
        loop {
            let Ok(n) = self.stream.read(&mut self.buf) else {
                return false;
            };
            if n == 0 {
                return false;
            }
            got.extend_from_slice(&self.buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    return head.starts_with("http/1.1 202");
                }
            }
        }
    }
}
