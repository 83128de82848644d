//! Clients that hold connections without using them: idle connections are closed after the
//! read timeout, a body that does not arrive gets 408, and a server out of file descriptors
//! waits for connections to close instead of spinning on `accept`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Capture, Serve, broker_with_triggers, ce_headers, wait_for};

/// Reads until the server closes the connection (or `limit` passes); returns what it sent.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(all),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(format!(
                    "still open after {limit:?} ({e}); got {:?}",
                    String::from_utf8_lossy(&all)
                ));
            }
        }
    }
}

fn serve_with_read_timeout() -> (Serve, Capture) {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[("all", "", &sub.url("/all"))]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &["--read-timeout", "1s"]);
    (serve, sub)
}

#[test]
fn idle_connections_are_closed_and_a_body_that_does_not_arrive_gets_408() {
    let (serve, sub) = serve_with_read_timeout();

    // Connected, and never a byte sent.
    let mut silent = TcpStream::connect(serve.addr).expect("connect");
    // One request answered, then nothing (an idle keep-alive connection).
    let mut idle = TcpStream::connect(serve.addr).expect("connect");
    idle.write_all(b"OPTIONS /default/default HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    // A header, then only 3 of the 100 bytes of body it announces.
    let mut slow = TcpStream::connect(serve.addr).expect("connect");
    slow.write_all(
        b"POST /default/default HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\nce-id: slow\r\n\
          ce-source: /test\r\nce-type: t\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nabc",
    )
    .expect("write");

    let limit = Duration::from_secs(20);
    let silent_got = read_until_closed(&mut silent, limit).expect("silent connection");
    assert!(silent_got.is_empty(), "{silent_got:?}");
    let idle_got = String::from_utf8(read_until_closed(&mut idle, limit).expect("idle connection"))
        .expect("utf-8");
    assert!(idle_got.starts_with("HTTP/1.1 200"), "{idle_got}");
    assert_eq!(
        idle_got.matches("HTTP/1.1").count(),
        1,
        "one answer, then closed: {idle_got}"
    );
    let slow_got =
        String::from_utf8(read_until_closed(&mut slow, limit).expect("slow body")).expect("utf-8");
    assert!(slow_got.starts_with("HTTP/1.1 408"), "{slow_got}");
    assert!(slow_got.contains("--read-timeout"), "{slow_got}");

    // Nothing of the slow request was accepted; the server goes on serving.
    let ok = serve.request("POST", "/default/default", &ce_headers("fine", "t"), b"{}");
    assert_eq!(ok.status, 202, "{}", ok.text());
    sub.wait("/all", 1);
    std::thread::sleep(Duration::from_millis(200));
    let ids: Vec<String> = sub
        .on("/all")
        .iter()
        .filter_map(|c| c.headers.get("ce-id").cloned())
        .collect();
    assert_eq!(ids, ["fine"]);
}

#[test]
fn out_of_file_descriptors_the_server_waits_and_logs_once() {
    let (serve, _sub) = serve_with_read_timeout();
    let pid = serve.pid().to_string();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc")
        .count();
    // Room for a few connections more than it has open now.
    let limit = format!("--nofile={}:", open + 8);
    let set = Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .status()
        .expect("prlimit (util-linux)");
    assert!(set.success(), "prlimit failed");

    // More connections than it has descriptors for: the rest wait in the listen backlog while
    // every accept fails with EMFILE.
    let held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(serve.addr).expect("connect"))
        .collect();
    serve.wait_log("cannot accept connections");
    // Before, the accept loop retried at once and logged each failure: millions of lines a
    // second. Now it pauses between tries and logs again only after ten seconds, even while
    // connections that time out let a few new ones in.
    std::thread::sleep(Duration::from_millis(1500));
    let warnings = serve.stderr().matches("cannot accept connections").count();
    assert_eq!(warnings, 1, "{}", tail(&serve.stderr()));

    // The idle connections time out one after the other, and the server takes clients again.
    drop(held);
    wait_for("a request accepted again", Duration::from_secs(30), || {
        serve
            .request("POST", "/default/default", &ce_headers("after", "t"), b"{}")
            .status
            == 202
    });
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
