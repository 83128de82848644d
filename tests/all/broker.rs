//! The broker through the real `wasmesh serve`: ingress status codes, the HTTP binding's
//! conformance cases, percent-encoding, filters, replies, the TTL, retries and dead letters,
//! backpressure, and Wasm functions as subscribers and filters.

use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::harness::{Capture, Serve, broker_with_triggers, ce_headers, repo};

#[test]
fn ingress_answers_with_knatives_status_codes() {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[("all", "", &sub.url("/all"))]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &["--max-body", "1024"]);

    let ok = serve.request("POST", "/default/default", &ce_headers("1", "t"), b"{}");
    assert_eq!(ok.status, 202, "{}", ok.text());
    let slash = serve.request("POST", "/default/default/", &ce_headers("2", "t"), b"{}");
    assert_eq!(slash.status, 202, "a trailing slash is allowed");
    let encoded = serve.request("POST", "/default/def%61ult", &ce_headers("2e", "t"), b"{}");
    assert_eq!(
        encoded.status, 202,
        "the path is percent-decoded, as Go's server does"
    );
    sub.wait("/all", 3);
    let bad_utf8 = serve.request("POST", "/default/%ff", &ce_headers("2f", "t"), b"{}");
    assert_eq!(bad_utf8.status, 400, "{}", bad_utf8.text());

    let get = serve.request("GET", "/default/default", &[], b"");
    assert_eq!(get.status, 405);
    assert_eq!(get.headers["allow"], "POST, OPTIONS");
    let options = serve.request("OPTIONS", "/default/default", &[], b"");
    assert_eq!(options.status, 200);
    assert_eq!(options.headers["webhook-allowed-origin"], "*");
    assert_eq!(options.headers["webhook-allowed-rate"], "*");

    assert_eq!(
        serve
            .request("POST", "/", &ce_headers("3", "t"), b"{}")
            .status,
        404
    );
    assert_eq!(
        serve
            .request("POST", "/a/b/c", &ce_headers("3", "t"), b"{}")
            .status,
        400
    );
    let unknown = serve.request("POST", "/default/nope", &ce_headers("3", "t"), b"{}");
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.text().contains("default/nope"),
        "{}",
        unknown.text()
    );

    let mut no_id = ce_headers("x", "t");
    no_id.retain(|(k, _)| *k != "ce-id");
    let bad = serve.request("POST", "/default/default", &no_id, b"{}");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&bad.body).expect("json error body");
    assert_eq!(body["error"], "header `ce-id` is missing");

    let bad_structured = serve.request(
        "POST",
        "/default/default",
        &[("content-type", "application/cloudevents+json")],
        br#"{"specversion":"1.0","id":"1","type":"t"}"#,
    );
    assert_eq!(bad_structured.status, 400);
    assert!(
        bad_structured.text().contains("source"),
        "{}",
        bad_structured.text()
    );

    let big = vec![b'x'; 2048];
    assert_eq!(
        serve
            .request("POST", "/default/default", &ce_headers("4", "t"), &big)
            .status,
        413
    );
    // A body far larger than the connection buffers: the client, still sending, reads the
    // answer (the body is read and dropped first rather than cut off by a reset connection),
    // whether it is refused for its size or before it is read.
    let huge = vec![b'x'; 16 << 20];
    for (path, code) in [
        ("/default/default", 413),
        ("/default/nope", 404),
        ("/x", 400),
    ] {
        let r = serve.request("POST", path, &ce_headers("4", "t"), &huge);
        assert_eq!(r.status, code, "{path}: {}", r.text());
        // A client that waits for `100 Continue` before sending (curl does above 1 MiB) is
        // answered at once instead, and sends nothing.
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(serve.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\
             ce-specversion: 1.0\r\nce-id: 5\r\nce-source: /s\r\nce-type: t\r\n\r\n",
            huge.len()
        );
        s.write_all(head.as_bytes()).expect("send");
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).expect("an answer");
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(answer, format!("HTTP/1.1 {code}"), "{path}");
    }

    let mut ttl = ce_headers("5", "t");
    ttl.push(("ce-knativebrokerttl", "1"));
    let exhausted = serve.request("POST", "/default/default", &ttl, b"{}");
    assert_eq!(exhausted.status, 400);
    assert!(exhausted.text().contains("TTL"), "{}", exhausted.text());
    assert_eq!(sub.on("/all").len(), 3, "refused events were not delivered");
}

#[test]
fn a_full_queue_answers_429_and_loses_nothing_accepted() {
    // One slow subscriber, one delivery at a time: producers outrun it. In memory the
    // trigger's queue fills; with the durable log, the log's capacity.
    a_full_store_answers_429(&["--store", "memory", "--queue", "2", "--concurrency", "1"]);
    a_full_store_answers_429(&["--log-capacity", "3", "--concurrency", "1"]);
}

/// A trigger whose subscriber is a Function starts with one worker thread, not one per core,
/// and adds threads (up to one per core) when events wait: a thousand mostly idle triggers
/// hold about a thousand threads, not a thousand per core.
#[test]
fn wasm_triggers_start_with_one_thread_and_add_more_under_load() {
    let yaml = crate::harness::function_subscriber("builtin:event-display", "x");
    let serve = Serve::start(&[("f.yaml", &yaml)], &[]);
    let workers = || {
        serve
            .thread_names()
            .iter()
            .filter(|n| n.starts_with("wasm-all-"))
            .count()
    };
    assert_eq!(workers(), 1, "{:?}", serve.thread_names());
    let events: Vec<serde_json::Value> = (0..300)
        .map(|i| serde_json::json!({"specversion": "1.0", "id": format!("b-{i}"), "source": "/s", "type": "t"}))
        .collect();
    let h = [("content-type", "application/cloudevents-batch+json")];
    let r = serve.request(
        "POST",
        "/default/default",
        &h,
        &serde_json::to_vec(&events).expect("json"),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    crate::harness::wait_for("300 events displayed", Duration::from_secs(30), || {
        serve.stdout().matches("\n  id: b-").count() == 300
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The trigger's concurrency is 16 (serve's default).
    assert_eq!(workers(), cores.min(16), "{:?}", serve.thread_names());
    // Idle again, the added threads end (10 s without an event each), the first stays and
    // still delivers.
    if cores > 1 {
        crate::harness::wait_for("added threads to end", Duration::from_secs(60), || {
            workers() == 1
        });
    }
    let r = serve.request("POST", "/default/default", &ce_headers("after", "t"), b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    crate::harness::wait_for("the event after", Duration::from_secs(30), || {
        serve.stdout().contains("\n  id: after\n")
    });
    assert_eq!(workers(), 1, "{:?}", serve.thread_names());
}

/// An idle server does not wake a thousand times a second: with no Wasm call running, the
/// epoch ticker (a 1 ms tick while calls run) parks, and the next call wakes it.
#[test]
fn the_epoch_ticker_sleeps_while_no_wasm_runs() {
    let yaml = crate::harness::function_subscriber("builtin:event-display", "x");
    let serve = Serve::start(&[("f.yaml", &yaml)], &[]);
    let r = serve.request("POST", "/default/default", &ce_headers("e1", "t"), b"{}");
    assert_eq!(r.status, 202);
    crate::harness::wait_for("e1 displayed", Duration::from_secs(20), || {
        serve.stdout().contains("id: e1")
    });
    // Past the ticker's 100 idle ticks (on a busy machine they take longer) it stops waking;
    // then it must not wake in half a second (ticking, it would wake about 500 times).
    let wakeups = || serve.thread_wakeups("wasmesh-epoch").expect("the ticker");
    crate::harness::wait_for("the ticker to park", Duration::from_secs(20), || {
        let first = wakeups();
        std::thread::sleep(Duration::from_millis(50));
        wakeups() == first
    });
    let before = wakeups();
    std::thread::sleep(Duration::from_millis(500));
    let after = wakeups();
    assert!(after - before < 5, "{before} -> {after}");
    // The next call wakes it and is delivered.
    let r = serve.request("POST", "/default/default", &ce_headers("e2", "t"), b"{}");
    assert_eq!(r.status, 202);
    crate::harness::wait_for("e2 displayed", Duration::from_secs(20), || {
        serve.stdout().contains("id: e2")
    });
}

/// A batch with more events than a trigger's queue (in memory) or the log (durable) ever
/// holds would get 429 forever: it gets 413, naming the limit, and a smaller batch goes in.
#[test]
fn a_batch_larger_than_the_store_holds_gets_413_not_429() {
    for (flags, limit) in [
        (&["--store", "memory", "--queue", "4"][..], "--queue"),
        (&["--log-capacity", "4"][..], "more than the log holds"),
    ] {
        let (sub, serve) = crate::harness::one_trigger_to_capture(flags);
        let batch = |n: usize, tag: &str| {
            let events: Vec<serde_json::Value> = (0..n)
                .map(|i| {
                    serde_json::json!({"specversion": "1.0", "id": format!("{tag}-{i}"),
                                       "source": "/s", "type": "t"})
                })
                .collect();
            serde_json::to_vec(&events).expect("json")
        };
        let h = [("content-type", "application/cloudevents-batch+json")];
        let r = serve.request("POST", "/default/default", &h, &batch(10, "big"));
        assert_eq!(r.status, 413, "{flags:?}: {}", r.text());
        assert!(r.text().contains(limit), "{flags:?}: {}", r.text());
        let r = serve.request("POST", "/default/default", &h, &batch(3, "small"));
        assert_eq!(r.status, 202, "{flags:?}: {}", r.text());
        let got = sub.wait("/all", 3);
        assert!(
            got.iter().all(|c| c.headers["ce-id"].starts_with("small-")),
            "{flags:?}: nothing of the refused batch was delivered"
        );
    }
}

pub(crate) fn a_full_store_answers_429(flags: &[&str]) {
    let sub = Capture::start(|_| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        (200, Vec::new(), Vec::new())
    });
    let yaml = broker_with_triggers(&[("slow", "", &sub.url("/slow"))]);
    let serve = Serve::start(&[("b.yaml", &yaml)], flags);
    let mut accepted = Vec::new();
    let mut throttled = None;
    for i in 0..20 {
        let id = format!("e{i}");
        let r = serve.request("POST", "/default/default", &ce_headers(&id, "t"), b"{}");
        match r.status {
            202 => accepted.push(id),
            429 => {
                throttled = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let throttled = throttled.unwrap_or_else(|| {
        panic!(
            "a 429 once the queue is full ({flags:?}: {} accepted)\n{}",
            accepted.len(),
            serve.stderr()
        )
    });
    assert_eq!(throttled.headers["retry-after"], "1");
    let got = sub.wait("/slow", accepted.len());
    let ids: Vec<&str> = got.iter().map(|c| c.headers["ce-id"].as_str()).collect();
    for id in &accepted {
        assert!(ids.contains(&id.as_str()), "accepted {id} was delivered");
    }
}

fn conformance_events() -> Vec<serde_yaml_ng::Value> {
    let dir = repo("../shared/conformance/http-binding");
    let mut events = Vec::new();
    for file in ["v1.yaml", "v1_minimum.yaml"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("conformance file in ../shared");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
            if !v.is_null() {
                events.push(v);
            }
        }
    }
    events
}

fn yaml_str(v: &serde_yaml_ng::Value) -> String {
    match v {
        serde_yaml_ng::Value::String(s) => s.clone(),
        serde_yaml_ng::Value::Number(n) => {
            // YAML reads `specversion: 1.0` as a number.
            if n.as_f64() == Some(1.0) {
                "1.0".into()
            } else {
                n.to_string()
            }
        }
        other => serde_yaml_ng::to_string(other)
            .expect("yaml")
            .trim()
            .to_string(),
    }
}

#[test]
fn http_binding_conformance_cases_reach_the_subscriber_unchanged() {
    http_binding_conformance_cases_reach_the_subscriber_unchanged_on(&[]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`).
pub(crate) fn http_binding_conformance_cases_reach_the_subscriber_unchanged_on(store: &[&str]) {
    let (sub, serve) = crate::harness::one_trigger_to_capture(store);
    let cases = conformance_events();
    assert!(cases.len() >= 8, "found the conformance cases");
    let mut sent = 0;
    for (n, case) in cases.iter().enumerate() {
        let attrs = &case["ContextAttributes"];
        let data = case.get("Data").map(yaml_str).unwrap_or_default();
        let ct = attrs.get("datacontenttype").map(yaml_str);
        let mut exts: Vec<(String, String)> = attrs
            .get("Extensions")
            .and_then(|e| e.as_mapping())
            .map(|m| m.iter().map(|(k, v)| (yaml_str(k), yaml_str(v))).collect())
            .unwrap_or_default();
        exts.sort();
        for mode in ["binary", "structured"] {
            let id = format!("{}-{mode}-{n}", yaml_str(&attrs["id"]));
            let mut headers: Vec<(String, String)> = Vec::new();
            let body: Vec<u8> = if mode == "binary" {
                headers.push(("ce-specversion".into(), "1.0".into()));
                headers.push(("ce-id".into(), id.clone()));
                for key in ["type", "source", "time", "subject"] {
                    if let Some(v) = attrs.get(key) {
                        headers.push((format!("ce-{key}"), crate::harness::encode(&yaml_str(v))));
                    }
                }
                for (k, v) in &exts {
                    headers.push((format!("ce-{k}"), crate::harness::encode(v)));
                }
                if let Some(ct) = &ct {
                    headers.push(("content-type".into(), ct.clone()));
                }
                data.clone().into_bytes()
            } else {
                let mut obj = serde_json::Map::new();
                obj.insert("specversion".into(), "1.0".into());
                obj.insert("id".into(), id.clone().into());
                for key in ["type", "source", "time", "subject", "datacontenttype"] {
                    if let Some(v) = attrs.get(key) {
                        obj.insert(key.into(), yaml_str(v).into());
                    }
                }
                for (k, v) in &exts {
                    obj.insert(k.clone(), v.clone().into());
                }
                // No datacontenttype implies JSON in structured mode: the data is a JSON value.
                let json_ct = ct
                    .as_deref()
                    .is_none_or(|c| c.starts_with("application/json"));
                let parsed = serde_json::from_str::<serde_json::Value>(&data).ok();
                match (json_ct, parsed) {
                    (true, Some(v)) => obj.insert("data".into(), v),
                    _ => obj.insert("data".into(), data.clone().into()),
                };
                headers.push((
                    "content-type".into(),
                    "application/cloudevents+json; charset=utf-8".into(),
                ));
                serde_json::to_vec(&obj).expect("json")
            };
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = serve.request("POST", "/default/default", &h, &body);
            assert_eq!(r.status, 202, "case {id}: {}", r.text());
            sent += 1;
            let got = sub.wait("/all", sent);
            let c = got
                .iter()
                .find(|c| c.headers.get("ce-id") == Some(&id))
                .expect("delivered");
            for key in ["type", "source", "time", "subject"] {
                if let Some(v) = attrs.get(key) {
                    assert_eq!(
                        decode(&c.headers[&format!("ce-{key}")]),
                        yaml_str(v),
                        "case {id}: {key}"
                    );
                }
            }
            for (k, v) in &exts {
                assert_eq!(
                    decode(&c.headers[&format!("ce-{k}")]),
                    *v,
                    "case {id}: extension {k}"
                );
            }
            assert!(
                c.headers.contains_key("ce-knativearrivaltime"),
                "the broker's extension is added"
            );
            assert_eq!(
                c.headers.get("content-type"),
                ct.as_ref(),
                "case {id}: content type"
            );
            let json_ct = ct
                .as_deref()
                .is_none_or(|c| c.starts_with("application/json"));
            if json_ct && mode == "structured" {
                let a: serde_json::Value = serde_json::from_slice(&c.body).expect("json data");
                let b: serde_json::Value = serde_json::from_str(&data).expect("json data");
                assert_eq!(a, b, "case {id}: data");
            } else {
                assert_eq!(String::from_utf8_lossy(&c.body), data, "case {id}: data");
            }
        }
    }
}

/// One example of a scenario of `http-protocol-binding.feature`: the HTTP request as the
/// scenario writes it, and what it must parse to.
struct FeatureCase {
    name: String,
    request: String,
    attributes: Vec<(String, String)>,
    data: serde_json::Value,
}

/// Reads the Gherkin scenarios of the conformance feature file: each `Scenario Outline` with
/// its request, attribute table, JSON data and `Examples` (substituted into all three).
fn feature_cases() -> Vec<FeatureCase> {
    let path = repo("../shared/conformance/http-binding/http-protocol-binding.feature");
    let text = std::fs::read_to_string(path).expect("feature file in ../shared");
    let mut cases = Vec::new();
    for scenario in text.split("Scenario Outline:").skip(1) {
        let name = scenario
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let blocks: Vec<&str> = scenario.split("\"\"\"").collect();
        // blocks[1]: the request; blocks[3]: the data; the table sits in blocks[2].
        let (request, table, data) = (blocks[1], blocks[2], blocks[3]);
        let rows = |t: &str| -> Vec<Vec<String>> {
            t.lines()
                .map(str::trim)
                .filter(|l| l.starts_with('|'))
                .map(|l| {
                    l.trim_matches('|')
                        .split('|')
                        .map(|c| c.trim().to_string())
                        .collect()
                })
                .collect()
        };
        let attributes = rows(table);
        let examples = rows(blocks[4].split("Examples:").nth(1).expect("examples"));
        let (header, values) = examples.split_first().expect("an examples header");
        for row in values {
            let fill = |t: &str| {
                header
                    .iter()
                    .zip(row)
                    .fold(t.to_string(), |t, (k, v)| t.replace(&format!("<{k}>"), v))
            };
            cases.push(FeatureCase {
                name: fill(&name),
                request: fill(request),
                attributes: attributes
                    .iter()
                    .skip(1)
                    .map(|r| (r[0].clone(), fill(&r[1])))
                    .collect(),
                data: serde_json::from_str(data.trim()).expect("the scenario's JSON"),
            });
        }
    }
    cases
}

/// The scenarios of the conformance suite's `http-protocol-binding.feature`, sent as written
/// (headers and body of the scenario's request, to the broker's path): each reaches the
/// subscriber with the attributes and the data the scenario lists.
#[test]
fn http_binding_feature_scenarios_reach_the_subscriber() {
    let (sub, serve) = crate::harness::one_trigger_to_capture(&[]);
    let cases = feature_cases();
    assert!(cases.len() >= 4, "found the scenarios: {}", cases.len());
    for (n, case) in cases.iter().enumerate() {
        let text = case.request.trim_start_matches('\n');
        let indent = text.len() - text.trim_start().len();
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
            .collect();
        let blank = lines
            .iter()
            .position(|l| l.trim().is_empty())
            .expect("a body");
        let headers: Vec<(String, String)> = lines[1..blank]
            .iter()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            // The length is recomputed for the body as sent; the host is the broker's.
            .filter(|(k, _)| k != "content-length" && k != "host")
            .collect();
        let body = lines[blank + 1..].join("\n");
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let r = serve.request("POST", "/default/default", &h, body.trim().as_bytes());
        assert_eq!(r.status, 202, "{}: {}", case.name, r.text());
        let got = sub.wait("/all", n + 1);
        let c = &got[n];
        for (key, value) in &case.attributes {
            let seen = match key.as_str() {
                "datacontenttype" => c.headers.get("content-type").cloned(),
                _ => c.headers.get(&format!("ce-{key}")).map(|v| decode(v)),
            };
            assert_eq!(
                seen.as_deref(),
                Some(value.as_str()),
                "{}: {key}",
                case.name
            );
        }
        let data: serde_json::Value = serde_json::from_slice(&c.body).expect("JSON data");
        assert_eq!(data, case.data, "{}: data", case.name);
    }
}

fn decode(v: &str) -> String {
    percent_decode_str(v)
        .decode_utf8()
        .expect("utf-8")
        .into_owned()
}

#[test]
fn percent_encoded_headers_round_trip() {
    let (sub, serve) = crate::harness::one_trigger_to_capture(&[]);
    let mut h = ce_headers("pe", "t");
    h.push(("ce-note", "Euro%20%e2%82%ac%20%22quoted%22%20100%25"));
    assert_eq!(
        serve.request("POST", "/default/default", &h, b"{}").status,
        202
    );
    let c = &sub.wait("/all", 1)[0];
    assert_eq!(
        c.headers["ce-note"],
        "Euro%20%E2%82%AC%20%22quoted%22%20100%25"
    );
    assert_eq!(decode(&c.headers["ce-note"]), "Euro € \"quoted\" 100%");
    let mut bad = ce_headers("pe2", "t");
    bad.push(("ce-note", "%ff%fe"));
    let r = serve.request("POST", "/default/default", &bad, b"{}");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("UTF-8"), "{}", r.text());
    // UTF-8 that a sender did not percent-encode (Python's SDK sends it so) is taken as it is,
    // and goes on percent-encoded.
    let mut raw = ce_headers("pe3", "t");
    raw.push(("ce-subject", "gr\u{fc}\u{df}e 50%25"));
    let r = serve.request("POST", "/default/default", &raw, b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    let c = &sub.wait("/all", 2)[1];
    assert_eq!(c.headers["ce-id"], "pe3");
    assert_eq!(c.headers["ce-subject"], "gr%C3%BC%C3%9Fe%2050%25");
}

#[test]
fn triggers_route_by_filter_dialect() {
    triggers_route_by_filter_dialect_on(&[]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`).
pub(crate) fn triggers_route_by_filter_dialect_on(store: &[&str]) {
    let sub = Capture::ok();
    let triggers = [
        (
            "attrs",
            "  filter:\n    attributes:\n      type: com.example.a\n      kind: \"\"\n",
            "/attrs",
        ),
        (
            "exact",
            "  filters:\n  - exact: {type: com.example.a}\n",
            "/exact",
        ),
        (
            "prefix",
            "  filters:\n  - prefix: {type: com.example.}\n",
            "/prefix",
        ),
        ("suffix", "  filters:\n  - suffix: {type: .b}\n", "/suffix"),
        (
            "anynot",
            "  filters:\n  - any: [{exact: {type: com.example.b}}, {not: {prefix: {type: com.}}}]\n",
            "/anynot",
        ),
        (
            "allext",
            "  filters:\n  - all: [{exact: {kind: Pod}}, {prefix: {source: /te}}]\n",
            "/allext",
        ),
    ];
    let triggers: Vec<(&str, &str, String)> = triggers
        .iter()
        .map(|(n, f, p)| (*n, *f, sub.url(p)))
        .collect();
    let refs: Vec<(&str, &str, &str)> = triggers
        .iter()
        .map(|(n, f, u)| (*n, *f, u.as_str()))
        .collect();
    let serve = Serve::start(&[("b.yaml", &broker_with_triggers(&refs))], store);
    let send = |id: &str, ty: &str, kind: Option<&str>| {
        let mut h = ce_headers(id, ty);
        if let Some(k) = kind {
            h.push(("ce-kind", k));
        }
        assert_eq!(
            serve.request("POST", "/default/default", &h, b"{}").status,
            202
        );
    };
    send("a-pod", "com.example.a", Some("Pod"));
    send("a-none", "com.example.a", None);
    send("b", "com.example.b", None);
    send("other", "org.other", Some(""));
    send("done", "com.example.done", None);
    let ids = |path: &str, n: usize| {
        let mut v: Vec<String> = sub
            .wait(path, n)
            .iter()
            .map(|c| c.headers["ce-id"].clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ids("/attrs", 1),
        ["a-pod"],
        "missing extension fails; empty value needs presence"
    );
    assert_eq!(ids("/exact", 2), ["a-none", "a-pod"]);
    assert_eq!(ids("/prefix", 4), ["a-none", "a-pod", "b", "done"]);
    assert_eq!(ids("/suffix", 1), ["b"]);
    assert_eq!(ids("/anynot", 2), ["b", "other"]);
    assert_eq!(ids("/allext", 1), ["a-pod"]);
}

#[test]
fn http_subscriber_replies_go_back_into_the_broker() {
    http_subscriber_replies_go_back_into_the_broker_on(&[]);
    http_subscriber_replies_go_back_into_the_broker_on(&["--store", "memory"]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`). The request's trace and
/// Knative's pass-through headers reach the subscriber; other request headers do not.
pub(crate) fn http_subscriber_replies_go_back_into_the_broker_on(store: &[&str]) {
    let sub = Capture::start(|c| {
        if c.path == "/replier" {
            let mut headers = crate::harness::response_headers(c);
            headers.push(("x-request-id".to_string(), "resp-42".to_string()));
            (200, headers, b"{\"answer\":42}".to_vec())
        } else {
            (202, Vec::new(), Vec::new())
        }
    });
    let yaml = crate::harness::request_response_triggers(&sub.url("/replier"), &sub.url("/sink"));
    let serve = Serve::start(&[("b.yaml", &yaml)], store);
    let mut h = ce_headers("q1", "com.example.request");
    h.push((
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ));
    h.extend([
        ("x-request-id", "req-42"),
        ("knative-custom", "kept"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("authorization", "Bearer not-for-subscribers"),
    ]);
    assert_eq!(
        serve.request("POST", "/default/default", &h, b"{}").status,
        202
    );
    let got = sub.wait("/sink", 1);
    assert_eq!(got[0].headers["ce-id"], "reply-q1");
    assert_eq!(got[0].body, b"{\"answer\":42}");
    assert!(
        !got[0].headers.contains_key("ce-knativebrokerttl"),
        "subscribers never see the TTL"
    );
    let req = &sub.on("/replier")[0];
    assert_eq!(
        req.headers["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(req.headers["kn-namespace"], "default");
    assert_eq!(req.headers["x-request-id"], "req-42");
    assert_eq!(req.headers["knative-custom"], "kept");
    assert_eq!(
        req.headers["x-b3-traceid"],
        "80f198ee56343ba864fe8b2a57d3eff7"
    );
    assert!(!req.headers.contains_key("authorization"));
    // The reply goes on with the response's pass-through headers, as Knative's dispatcher
    // passes them: the response's x-request-id, not the request's other ones.
    assert_eq!(got[0].headers["x-request-id"], "resp-42");
    assert!(!got[0].headers.contains_key("knative-custom"));
}

#[test]
fn a_reply_loop_is_stopped_by_the_ttl() {
    a_reply_loop_is_stopped_by_the_ttl_on(&[]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`).
pub(crate) fn a_reply_loop_is_stopped_by_the_ttl_on(store: &[&str]) {
    let sub = Capture::start(|c| {
        let n = c.headers["ce-id"].len();
        let headers = vec![
            ("ce-specversion".to_string(), "1.0".to_string()),
            (
                "ce-id".to_string(),
                format!("{}x", &c.headers["ce-id"][..n]),
            ),
            ("ce-source".to_string(), "/loop".to_string()),
            ("ce-type".to_string(), "com.example.loop".to_string()),
        ];
        (200, headers, Vec::new())
    });
    let serve = Serve::start(
        &[(
            "b.yaml",
            &broker_with_triggers(&[("loop", "", &sub.url("/loop"))]),
        )],
        store,
    );
    let mut h = ce_headers("l", "com.example.loop");
    h.push(("ce-knativebrokerttl", "4"));
    h.push(("x-request-id", "loop-1"));
    assert_eq!(
        serve.request("POST", "/default/default", &h, b"{}").status,
        202
    );
    serve.wait_log("reply dropped: TTL exhausted");
    let ids: Vec<String> = sub
        .on("/loop")
        .iter()
        .map(|c| c.headers["ce-id"].clone())
        .collect();
    assert_eq!(
        ids,
        ["l", "lx", "lxx"],
        "TTL 4: three hops, then the loop ends"
    );
    // Responses without pass-through headers: each reply keeps the event's.
    for c in sub.on("/loop") {
        assert_eq!(
            c.headers["x-request-id"], "loop-1",
            "{}",
            c.headers["ce-id"]
        );
    }
}

fn retry_yaml(sub: &Capture, policy: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: flaky, namespace: default}}\n\
         spec:\n  subscriber: {{uri: '{}'}}\n  delivery:\n    retry: 2\n    backoffPolicy: {policy}\n    backoffDelay: PT0.01S\n    deadLetterSink: {{uri: '{}'}}\n",
        sub.url("/flaky"),
        sub.url("/dls")
    )
}

#[test]
fn retried_outcomes_then_dead_letter_with_error_extensions() {
    retried_outcomes_then_dead_letter_with_error_extensions_on(&[]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`).
pub(crate) fn retried_outcomes_then_dead_letter_with_error_extensions_on(store: &[&str]) {
    for policy in ["linear", "exponential"] {
        let sub = Capture::start(|c| match c.path.as_str() {
            "/flaky" => (503, Vec::new(), b"overloaded".to_vec()),
            _ => (202, Vec::new(), Vec::new()),
        });
        let serve = Serve::start(&[("b.yaml", &retry_yaml(&sub, policy))], store);
        // An id of its own per run: a store may drop a second event with the same source and
        // id as a duplicate (JetStream does).
        let id = format!("d1-{policy}");
        assert_eq!(
            serve
                .request("POST", "/default/default", &ce_headers(&id, "t"), b"{}")
                .status,
            202
        );
        let dead = sub.wait("/dls", 1);
        assert_eq!(
            sub.on("/flaky").len(),
            3,
            "{policy}: one attempt and two retries"
        );
        let d = &dead[0];
        assert_eq!(d.headers["ce-id"], id);
        assert_eq!(decode(&d.headers["ce-knativeerrordest"]), sub.url("/flaky"));
        assert_eq!(d.headers["ce-knativeerrorcode"], "503");
        assert_eq!(error_data(d), "overloaded");
    }
    // 400 is not retried: straight to the dead-letter sink.
    let sub = Capture::start(|c| match c.path.as_str() {
        "/flaky" => (400, Vec::new(), Vec::new()),
        _ => (202, Vec::new(), Vec::new()),
    });
    let serve = Serve::start(&[("b.yaml", &retry_yaml(&sub, "linear"))], store);
    assert_eq!(
        serve
            .request("POST", "/default/default", &ce_headers("d2", "t"), b"{}")
            .status,
        202
    );
    let dead = sub.wait("/dls", 1);
    assert_eq!(sub.on("/flaky").len(), 1);
    assert_eq!(dead[0].headers["ce-knativeerrorcode"], "400");
}

/// A subscriber's 2xx with a body that is not an event is an error (Knative's broker filter
/// answers 502). The subscriber is asked with `Prefer: reply`; a dead-letter sink is not, and its
/// 200 with any body is success, as Knative's dispatcher takes it (it was retried as a 502, and
/// the event counted as dropped).
#[test]
fn a_2xx_body_that_is_not_an_event_is_an_error() {
    let sub = Capture::start(|c| match c.path.as_str() {
        "/flaky" => (200, Vec::new(), b"not an event".to_vec()),
        _ => (200, Vec::new(), b"logged".to_vec()),
    });
    let serve = Serve::start(&[("b.yaml", &retry_yaml(&sub, "linear"))], &[]);
    assert_eq!(
        serve
            .request("POST", "/default/default", &ce_headers("n1", "t"), b"{}")
            .status,
        202
    );
    let dead = sub.wait("/dls", 1);
    assert_eq!(dead[0].headers["ce-knativeerrorcode"], "502");
    assert_eq!(sub.on("/flaky").len(), 3, "retried like a 502");
    assert!(
        sub.on("/flaky")
            .iter()
            .all(|r| r.headers["prefer"] == "reply")
    );
    assert!(!dead[0].headers.contains_key("prefer"));
    crate::harness::wait_for("the dead letter counted", Duration::from_secs(10), || {
        let r = serve.admin("GET", "/v1/triggers/default/flaky", b"");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        v["status"]["deliveries"]["deadLettered"] == 1
    });
    assert_eq!(sub.on("/dls").len(), 1, "the sink's 200 was taken at once");
}

const FUNCTIONS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {knative-eventing-injection: enabled}\n---\n\
apiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {name: event-display}\nspec: {module: builtin:event-display}\n---\n\
apiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {name: pod-started}\nspec: {module: builtin:pod-started}\n---\n\
apiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {name: knative-only}\nspec:\n  module: builtin:type-filter\n  config: {prefix: dev.knative.}\n";

#[test]
fn wasm_functions_subscribe_filter_reply_and_reject() {
    wasm_functions_subscribe_filter_reply_and_reject_on(&[]);
}

/// The same, with `store` flags (`--store nats://...` in `nats.rs`).
pub(crate) fn wasm_functions_subscribe_filter_reply_and_reject_on(store: &[&str]) {
    let sub = Capture::ok();
    let triggers = format!(
        "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: display}}\nspec:\n  wasmFilter: knative-only\n  subscriber:\n    ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: event-display}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: started}}\nspec:\n  filters: [{{prefix: {{type: dev.knative.apiserver}}}}]\n  subscriber:\n    ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: pod-started}}\n  delivery:\n    retry: 1\n    backoffDelay: PT0.01S\n    deadLetterSink: {{uri: '{}'}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: pods}}\nspec:\n  filters: [{{exact: {{type: com.example.pod.started}}}}]\n  subscriber: {{uri: '{}'}}\n",
        sub.url("/dls"),
        sub.url("/pods")
    );
    let serve = Serve::start(&[("f.yaml", &format!("{FUNCTIONS}{triggers}"))], store);
    let seed = std::fs::read(repo("tests/data/seed-event.json")).expect("seed event");
    let r = serve.request(
        "POST",
        "/default/default",
        &[
            ("content-type", "application/cloudevents+json"),
            ("x-request-id", "seed-1"),
        ],
        &seed,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // pod-started replied; the reply was routed to the HTTP trigger, with the pass-through
    // headers of the event it answers.
    let pods = sub.wait("/pods", 1);
    assert_eq!(pods[0].headers["ce-type"], "com.example.pod.started");
    assert_eq!(pods[0].headers["x-request-id"], "seed-1");
    assert_eq!(pods[0].body, br#"{"namespace":"default","pod":"busybox"}"#);
    // event-display printed the event (it passed the Wasm filter) exactly once, unprefixed.
    crate::harness::wait_for(
        "event-display output",
        std::time::Duration::from_secs(20),
        || {
            serve
                .stdout()
                .contains("  id: 716d4536-3b92-4fbb-98d9-14bfcf94683f\n")
        },
    );
    // An event the Wasm filter refuses is not displayed; a non-JSON apiserver event is
    // rejected by pod-started and dead-lettered with its reason.
    let mut h = ce_headers("not-json", "dev.knative.apiserver.resource.add");
    h.retain(|(k, _)| *k != "content-type");
    h.push(("content-type", "text/plain"));
    assert_eq!(
        serve
            .request("POST", "/default/default", &h, b"plain text")
            .status,
        202
    );
    assert_eq!(
        serve
            .request(
                "POST",
                "/default/default",
                &ce_headers("skip", "com.other"),
                b"{}"
            )
            .status,
        202
    );
    let dead = sub.wait("/dls", 1);
    assert_eq!(dead[0].headers["ce-id"], "not-json");
    assert_eq!(dead[0].headers["ce-knativeerrorcode"], "422");
    assert_eq!(
        decode(&dead[0].headers["ce-knativeerrordest"]),
        "function:default/pod-started"
    );
    crate::harness::wait_for(
        "not-json displayed",
        std::time::Duration::from_secs(20),
        || serve.stdout().contains("  id: not-json\n"),
    );
    assert!(
        !serve.stdout().contains("  id: skip\n"),
        "the Wasm filter kept com.other out"
    );
    assert_eq!(serve.stdout().matches("☁️  cloudevents.Event").count(), 2);
}

#[test]
fn the_hello_world_runs_from_manifests_hello() {
    let serve = HelloServe::start();
    // The PingSource fires every 5 seconds; event-display prints it.
    crate::harness::wait_for(
        "a ping event on stdout",
        std::time::Duration::from_secs(30),
        || serve.0.stdout().contains("type: dev.knative.sources.ping"),
    );
    let out = serve.0.stdout();
    assert!(
        out.starts_with("☁️  cloudevents.Event\nContext Attributes,\n  specversion: 1.0\n"),
        "{out}"
    );
    assert!(out.contains("source: /apis/v1/namespaces/default/pingsources/heartbeat"));
    assert!(out.contains("    \"message\": \"Hello from wasmesh\"\n"));
    let err = serve.0.stderr();
    assert!(
        err.contains("Broker default/default ready at http://"),
        "{err}"
    );
    assert!(
        err.contains("ServiceAccount/events-sa: accepted and ignored"),
        "{err}"
    );
}

struct HelloServe(Serve);

impl HelloServe {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(repo("manifests/hello")).expect("manifests/hello") {
            let p = entry.expect("entry").path();
            std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
        }
        HelloServe(Serve::start_dir(dir))
    }
}

#[test]
fn batch_mode_accepts_an_array_and_names_a_bad_element() {
    let (sub, serve) = crate::harness::one_trigger_to_capture(&[]);
    let batch = br#"[
        {"specversion":"1.0","id":"b1","source":"/s","type":"t","data":{"n":1}},
        {"specversion":"1.0","id":"b2","source":"/s","type":"t","datacontenttype":"text/plain","data":"two"},
        {"specversion":"1.0","id":"b3","source":"/s","type":"t"}
    ]"#;
    let ct = [("content-type", "application/cloudevents-batch+json")];
    assert_eq!(
        serve.request("POST", "/default/default", &ct, batch).status,
        202
    );
    let mut ids: Vec<String> = sub
        .wait("/all", 3)
        .iter()
        .map(|c| c.headers["ce-id"].clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["b1", "b2", "b3"]);
    let bad = br#"[{"specversion":"1.0","id":"ok","source":"/s","type":"t"},{"specversion":"1.0","id":"x","type":"t"}]"#;
    let r = serve.request("POST", "/default/default", &ct, bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("event 1"), "{}", r.text());
    assert_eq!(sub.on("/all").len(), 3, "a refused batch delivers nothing");
}

#[test]
fn wasmesh_send_posts_binary_and_structured_events() {
    let (sub, serve) = crate::harness::one_trigger_to_capture(&[]);
    let to = format!("http://{}/default/default", serve.addr);
    for (mode, id) in [("binary", "s1"), ("structured", "s2")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
            .args([
                "send",
                "--to",
                &to,
                "--type",
                "com.example.sent",
                "--source",
                "/cli",
                "--id",
                id,
            ])
            .args([
                "--data",
                r#"{"hello":"world"}"#,
                "--ext",
                "color=blue",
                "--mode",
                mode,
            ])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("202 Accepted"));
    }
    let got = sub.wait("/all", 2);
    for c in &got {
        assert_eq!(c.headers["ce-type"], "com.example.sent");
        assert_eq!(c.headers["ce-color"], "blue");
        let data: serde_json::Value = serde_json::from_slice(&c.body).expect("json");
        assert_eq!(data["hello"], "world");
    }
    let down = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
        .args([
            "send",
            "--to",
            "http://127.0.0.1:9/default/default",
            "--type",
            "t",
            "--source",
            "/s",
        ])
        .output()
        .expect("runs");
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is `wasmesh serve` running there?"));
}

#[test]
fn missing_references_are_reported_on_the_object_and_the_rest_runs() {
    let sub = Capture::ok();
    let yaml = format!(
        "{}---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: orphan}}\nspec:\n  subscriber:\n    ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: nope}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: lost}}\nspec:\n  broker: missing\n  subscriber: {{uri: 'http://127.0.0.1:9/'}}\n",
        broker_with_triggers(&[("fine", "", &sub.url("/fine"))])
    );
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let err = serve.stderr();
    assert!(
        err.contains("Trigger/default/orphan: not ready (FunctionDoesNotExist): Function default/nope does not exist"),
        "{err}"
    );
    assert!(err.contains("Trigger/default/lost: not ready (BrokerDoesNotExist): Broker default/missing does not exist"), "{err}");
    assert!(err.contains("Trigger/default/fine: Ready"), "{err}");
    assert_eq!(
        serve
            .request("POST", "/default/default", &ce_headers("f", "t"), b"{}")
            .status,
        202
    );
    sub.wait("/fine", 1);
}

#[test]
fn function_output_can_be_prefixed_with_its_name() {
    let yaml = format!(
        "{FUNCTIONS}---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: display}}\nspec:\n  subscriber:\n    ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: event-display}}\n"
    );
    let serve = Serve::start(&[("f.yaml", &yaml)], &["--prefix-output"]);
    assert_eq!(
        serve
            .request(
                "POST",
                "/default/default",
                &ce_headers("p1", "t"),
                b"{\"a\":1}"
            )
            .status,
        202
    );
    crate::harness::wait_for(
        "prefixed output",
        std::time::Duration::from_secs(20),
        || {
            serve
                .stdout()
                .contains("[default/event-display]   id: p1\n")
        },
    );
    assert!(
        serve
            .stdout()
            .starts_with("[default/event-display] ☁️  cloudevents.Event\n")
    );
}

/// An HTTPS subscriber on loopback (certificate for localhost): records the `ce-id` of each
/// event and answers 202. Returns its runtime and port.
fn https_subscriber(
    cert: &std::path::Path,
    key: &std::path::Path,
    seen: Arc<Mutex<Vec<String>>>,
) -> (tokio::runtime::Runtime, u16) {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let seen = Arc::clone(&seen);
                    async move {
                        seen.lock()
                            .expect("lock")
                            .push(crate::harness::request_header(&req, "ce-id"));
                        hyper::Response::builder()
                            .status(202)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (rt, port)
}

/// A trigger's subscriber and `wasmesh send` reach an `https` endpoint, checked against the CA
/// certificates that `SSL_CERT_FILE` names; a server that certificate does not vouch for gets
/// nothing: the delivery fails and goes to the dead-letter sink.
#[test]
fn https_subscribers_are_reached_with_their_certificates_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = crate::admin::self_signed(dir.path(), "subscriber");
    let (other, _) = crate::admin::self_signed(dir.path(), "someone-else");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_rt, port) = https_subscriber(&cert, &key, Arc::clone(&seen));
    let dls = Capture::start(|_| (202, Vec::new(), Vec::new()));
    let yaml = broker_with_triggers(&[(
        "secure",
        &format!(
            "  delivery:\n    retry: 0\n    deadLetterSink: {{uri: '{}'}}\n",
            dls.url("/dead")
        ),
        &format!("https://localhost:{port}/"),
    )]);
    // `yaml` served with `SSL_CERT_FILE` naming `ca`.
    let serve_trusting = |yaml: &str, ca: &std::path::Path| {
        let files = tempfile::tempdir().expect("tempdir");
        std::fs::write(files.path().join("b.yaml"), yaml).expect("yaml");
        let data = files.path().join("data");
        let serve = Serve::start_with_env(files.path(), &data, &[], &[("SSL_CERT_FILE", ca)]);
        (files, serve)
    };
    for (ca, expect_delivered) in [(&cert, true), (&other, false)] {
        let (_files, serve) = serve_trusting(&yaml, ca);
        let id = format!("tls-{expect_delivered}");
        let r = serve.request("POST", "/default/default", &ce_headers(&id, "t"), b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
        if expect_delivered {
            crate::harness::wait_for("delivered over TLS", Duration::from_secs(20), || {
                seen.lock().expect("lock").contains(&id)
            });
            // `wasmesh send` too, straight to the subscriber.
            let sent = std::process::Command::new(env!("CARGO_BIN_EXE_wasmesh"))
                .args(["send", "--to", &format!("https://localhost:{port}/")])
                .args(["--type", "t", "--source", "/s", "--id", "sent-over-tls"])
                .env("SSL_CERT_FILE", ca)
                .output()
                .expect("wasmesh send");
            assert!(
                sent.status.success(),
                "{}",
                String::from_utf8_lossy(&sent.stderr)
            );
            assert!(
                seen.lock()
                    .expect("lock")
                    .iter()
                    .any(|s| s == "sent-over-tls")
            );
        } else {
            let dead = dls.wait("/dead", 1);
            assert_eq!(dead[0].headers["ce-id"], id);
            assert_eq!(
                dead[0].headers["ce-knativeerrordest"],
                format!("https://localhost:{port}/")
            );
            assert!(!seen.lock().expect("lock").contains(&id));
        }
    }
    // A destination's own `CACerts` are trusted besides the system's; a PEM without a
    // certificate makes the trigger not ready, saying so.
    let pem: String = std::fs::read_to_string(&cert)
        .expect("pem")
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: pinned, namespace: default}}\n\
         spec:\n  broker: default\n  subscriber:\n    uri: https://localhost:{port}/\n    CACerts: |\n{pem}\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: garbled, namespace: default}}\n\
         spec:\n  broker: default\n  subscriber:\n    uri: https://localhost:{port}/\n    CACerts: not a certificate\n"
    );
    let (_files, serve) = serve_trusting(&yaml, &other);
    let r = serve.request(
        "POST",
        "/default/default",
        &ce_headers("pinned-1", "t"),
        b"{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    crate::harness::wait_for("delivered with CACerts", Duration::from_secs(20), || {
        seen.lock().expect("lock").iter().any(|s| s == "pinned-1")
    });
    let r = serve.admin("GET", "/v1/triggers/default/garbled", b"");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let ready = &v["status"]["conditions"][0];
    assert_eq!(ready["reason"], "InvalidSink", "{v}");
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.subscriber.CACerts: no certificate")),
        "{v}"
    );
}

/// `delivery.format: json` (Knative's) sends each event in structured mode.
#[test]
fn delivery_format_json_sends_structured_events() {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[
        ("json", "  delivery: {format: json}\n", &sub.url("/json")),
        (
            "binary",
            "  delivery: {format: binary}\n",
            &sub.url("/binary"),
        ),
    ]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let mut h = ce_headers("f1", "t");
    h.push(("content-type", "application/json"));
    let r = serve.request("POST", "/default/default", &h, b"{\"n\":1}");
    assert_eq!(r.status, 202, "{}", r.text());
    let json = sub.wait("/json", 1);
    assert_eq!(
        json[0].headers["content-type"],
        "application/cloudevents+json"
    );
    assert!(!json[0].headers.contains_key("ce-id"));
    let v: serde_json::Value = serde_json::from_slice(&json[0].body).expect("structured");
    assert_eq!(
        (v["id"].as_str(), v["data"]["n"].as_i64()),
        (Some("f1"), Some(1)),
        "{v}"
    );
    let binary = sub.wait("/binary", 1);
    assert_eq!(binary[0].headers["ce-id"], "f1");
    assert_eq!(binary[0].body, b"{\"n\":1}");
}

/// Current Knative's ways to get a namespace's `default` Broker without declaring it: the
/// namespace label `eventing.knative.dev/injection=enabled` and the Trigger annotation of the
/// same name (the seed's older `knative-eventing-injection` label is tested by the hello world).
#[test]
fn injection_by_namespace_label_or_trigger_annotation_creates_the_default_broker() {
    let sub = Capture::ok();
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: labelled\n  labels: {{eventing.knative.dev/injection: enabled}}\n\
---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: a, namespace: labelled}}\nspec:\n  subscriber: {{uri: '{}'}}\n\
---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: b\n  namespace: annotated\n  annotations: {{eventing.knative.dev/injection: enabled}}\nspec:\n  broker: default\n  subscriber: {{uri: '{}'}}\n",
        sub.url("/labelled"),
        sub.url("/annotated")
    );
    let serve = Serve::start(&[("inject.yaml", &yaml)], &[]);
    for (ns, id) in [("labelled", "l-1"), ("annotated", "a-1")] {
        let r = serve.request(
            "POST",
            &format!("/{ns}/default"),
            &ce_headers(id, "t"),
            b"{}",
        );
        assert_eq!(r.status, 202, "{ns}: {}", r.text());
        assert_eq!(sub.wait(&format!("/{ns}"), 1)[0].headers["ce-id"], id);
    }
    let r = serve.request("POST", "/other/default", &ce_headers("o-1", "t"), b"{}");
    assert_eq!(r.status, 404, "no injection there: {}", r.text());
}

/// CloudEvents 0.3, which older SDKs still send: accepted in binary and in structured mode, kept
/// through the durable log, delivered as 0.3 (`ce-schemaurl`, not `ce-dataschema`), and printed
/// by event-display as sdk-go prints a 0.3 event.
#[test]
fn cloudevents_0_3_events_are_accepted_and_delivered_as_0_3() {
    let sub = Capture::ok();
    let yaml = format!(
        "{}---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: display}}\nspec:\n  subscriber:\n    ref: {{apiVersion: serving.knative.dev/v1, kind: Service, name: event-display}}\n",
        broker_with_triggers(&[("http", "", &sub.url("/old"))]),
    ) + "---\napiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {name: event-display, namespace: default}\nspec: {module: builtin:event-display}\n";
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let r = serve.request(
        "POST",
        "/default/default",
        &[
            ("ce-specversion", "0.3"),
            ("ce-id", "old-1"),
            ("ce-source", "/old"),
            ("ce-type", "t"),
            ("ce-schemaurl", "https://example.com/schema"),
            ("content-type", "text/plain"),
        ],
        b"hi",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let r = serve.request(
        "POST",
        "/default/default",
        &[("content-type", "application/cloudevents+json")],
        br#"{"specversion":"0.3","id":"old-2","source":"/old","type":"t","schemaurl":"https://example.com/schema"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let got = sub.wait("/old", 2);
    for req in &got {
        assert_eq!(req.headers["ce-specversion"], "0.3", "{req:?}");
        assert_eq!(req.headers["ce-schemaurl"], "https://example.com/schema");
        assert!(!req.headers.contains_key("ce-dataschema"), "{req:?}");
    }
    crate::harness::wait_for(
        "event-display printed both",
        Duration::from_secs(20),
        || {
            let out = serve.stdout();
            out.contains("  id: old-1\n") && out.contains("  id: old-2\n")
        },
    );
    let out = serve.stdout();
    assert!(
        out.contains("  specversion: 0.3\n  type: t\n  source: /old\n  id: old-1\n  schemaurl: https://example.com/schema\n"),
        "{out}"
    );
}

/// Knative's samples deploy event-display as a Deployment behind a plain Kubernetes Service and
/// point the Trigger at that Service (`apiVersion: v1`): with a Function of the same name in
/// place of the Deployment, the Service document is accepted and ignored, the Trigger's ref
/// resolves to the Function, and the Broker's `spec.config` and class annotation are accepted,
/// as is the ConfigMap that `spec.config` names, and an EventType of Knative's registry.
#[test]
fn a_trigger_ref_to_a_kubernetes_service_reaches_the_function_of_its_name() {
    let yaml = "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n  namespace: default\n  annotations:\n    eventing.knative.dev/broker.class: MTChannelBasedBroker\nspec:\n  config:\n    apiVersion: v1\n    kind: ConfigMap\n    name: config-br-default-channel\n    namespace: knative-eventing\n\
---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {name: display, namespace: default}\nspec:\n  broker: default\n  filter:\n    attributes: {type: dev.knative.samples.helloworld}\n  subscriber:\n    ref: {apiVersion: v1, kind: Service, name: event-display}\n\
---\nkind: Service\napiVersion: v1\nmetadata: {name: event-display, namespace: default}\nspec:\n  selector: {app: event-display}\n  ports: [{protocol: TCP, port: 80, targetPort: 8080}]\n\
---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: config-br-default-channel, namespace: knative-eventing}\ndata:\n  channel-template-spec: |\n    apiVersion: messaging.knative.dev/v1\n    kind: InMemoryChannel\n\
---\napiVersion: eventing.knative.dev/v1beta2\nkind: EventType\nmetadata: {name: hello, namespace: default}\nspec:\n  type: dev.knative.samples.helloworld\n  source: https://example.com/hello\n  reference: {apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}\n\
---\napiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {name: event-display, namespace: default}\nspec:\n  module: builtin:event-display\n";
    let serve = Serve::start(&[("sample.yaml", yaml)], &[]);
    let r = serve.request(
        "POST",
        "/default/default",
        &ce_headers("hello-1", "dev.knative.samples.helloworld"),
        b"{\"msg\":\"Hello Knative!\"}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    crate::harness::wait_for("event-display printed it", Duration::from_secs(20), || {
        serve.stdout().contains("  id: hello-1\n")
    });
    for ignored in [
        "Service/event-display: accepted and ignored",
        "ConfigMap/config-br-default-channel: accepted and ignored",
        "EventType/hello: accepted and ignored",
    ] {
        assert!(serve.stderr().contains(ignored), "{}", serve.stderr());
    }
}

/// The admin API's `/metrics` says where every event went: ingress answers by code, events
/// accepted and unmatched per broker, and per trigger those delivered, retried, dead-lettered,
/// dropped (no dead-letter sink) and refused by its Wasm filter.
#[test]
fn metrics_say_where_every_event_went() {
    let sub = Capture::start(|c| match c.path.as_str() {
        "/fail" => (500, Vec::new(), b"down".to_vec()),
        _ => (202, Vec::new(), Vec::new()),
    });
    let trigger = |name: &str, ty: &str, path: &str, more: &str| {
        format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: {name}}}\nspec:\n  filters: [{{prefix: {{type: {ty}}}}}]\n  subscriber: {{uri: '{}'}}\n{more}",
            sub.url(path)
        )
    };
    let yaml = [
        FUNCTIONS.to_string(),
        trigger("ok", "t.ok", "/ok", ""),
        trigger(
            "failing",
            "t.fail",
            "/fail",
            &format!(
                "  delivery:\n    retry: 1\n    backoffDelay: PT0.01S\n    deadLetterSink: {{uri: '{}'}}\n",
                sub.url("/dead")
            ),
        ),
        trigger("nodls", "t.drop", "/fail", "  delivery: {retry: 0}\n"),
        trigger("wasm", "com.", "/ok", "  wasmFilter: knative-only\n"),
    ]
    .concat();
    let serve = Serve::start(&[("m.yaml", &yaml)], &["--metrics-listen", "127.0.0.1:0"]);
    for (id, ty) in [
        ("1", "t.ok"),
        ("2", "t.ok"),
        ("3", "t.fail"),
        ("4", "t.drop"),
        ("5", "com.other"),
        ("6", "nothing.matches"),
    ] {
        let r = serve.request("POST", "/default/default", &ce_headers(id, ty), b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let r = serve.request("POST", "/default/default", &[("ce-id", "x")], b"{}");
    assert_eq!(r.status, 400);
    let r = serve.request("POST", "/default/nope", &ce_headers("7", "t.ok"), b"{}");
    assert_eq!(r.status, 404);
    let expected = [
        "wasmesh_ingress_responses_total{code=\"202\"} 6\n",
        "wasmesh_ingress_responses_total{code=\"400\"} 1\n",
        "wasmesh_ingress_responses_total{code=\"404\"} 1\n",
        "wasmesh_broker_events_accepted_total{namespace=\"default\",broker=\"default\"} 6\n",
        "wasmesh_broker_events_unmatched_total{namespace=\"default\",broker=\"default\"} 1\n",
        "wasmesh_trigger_deliveries_total{namespace=\"default\",trigger=\"ok\",broker=\"default\",outcome=\"delivered\"} 2\n",
        "wasmesh_trigger_deliveries_total{namespace=\"default\",trigger=\"failing\",broker=\"default\",outcome=\"dead_lettered\"} 1\n",
        "wasmesh_trigger_retries_total{namespace=\"default\",trigger=\"failing\",broker=\"default\"} 1\n",
        "wasmesh_trigger_deliveries_total{namespace=\"default\",trigger=\"nodls\",broker=\"default\",outcome=\"dropped\"} 1\n",
        "wasmesh_trigger_deliveries_total{namespace=\"default\",trigger=\"wasm\",broker=\"default\",outcome=\"filtered\"} 1\n",
        "wasmesh_trigger_deliveries_total{namespace=\"default\",trigger=\"wasm\",broker=\"default\",outcome=\"delivered\"} 0\n",
        "wasmesh_trigger_queued_events{namespace=\"default\",trigger=\"ok\",broker=\"default\"} 0\n",
    ];
    let mut text = String::new();
    crate::harness::wait_for("the counters settle", Duration::from_secs(20), || {
        let r = serve.admin("GET", "/metrics", b"");
        assert_eq!(r.status, 200);
        text = r.text();
        expected.iter().all(|line| text.contains(line))
    });
    assert!(
        text.contains("# TYPE wasmesh_log_syncs_total counter\n"),
        "{text}"
    );
    let r = crate::harness::request(serve.admin.expect("admin"), "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 401, "the metrics need the admin token too");
    // `--metrics-listen`: the same text, for a scraper, without a token.
    let stderr = serve.stderr();
    let at: std::net::SocketAddr = stderr
        .lines()
        .find_map(|l| l.strip_prefix("wasmesh: metrics at http://"))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the metrics address is printed: {stderr}"));
    let scraped = crate::harness::request(at, "GET", "/metrics", &[], b"");
    assert_eq!(scraped.status, 200);
    assert!(scraped.text().contains(expected[5]), "{}", scraped.text());
    assert_eq!(
        crate::harness::request(at, "POST", "/metrics", &[], b"").status,
        405
    );
    assert_eq!(
        crate::harness::request(at, "GET", "/v1/triggers", &[], b"").status,
        404
    );
    // The same counts with the trigger's status, and in `wasmesh describe`.
    let r = serve.admin("GET", "/v1/triggers/default/failing", b"");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let d = &v["status"]["deliveries"];
    assert_eq!(
        (d["deadLettered"].as_u64(), d["retries"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    let cli = crate::admin::Cli::login(&serve);
    let (ok, out, err) = cli.run(&["get", "triggers", "-o", "wide"]);
    assert!(ok && out.contains("DEAD-LETTERED"), "{out}{err}");
    let failing: Vec<&str> = out
        .lines()
        .find(|l| l.contains(" failing "))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(failing[failing.len() - 3..], ["0", "1", "0"], "{out}");
    let (ok, out, err) = cli.run(&["describe", "trigger", "nodls"]);
    assert!(ok, "{err}");
    let line = |label: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
    };
    assert_eq!(line("Dropped:").as_deref(), Some("1"), "{out}");
    assert_eq!(line("Delivered:").as_deref(), Some("0"), "{out}");
}

/// Replies that their broker cannot take yet (the trigger they go to is full: 429 inside) are
/// published again with the replying trigger's backoff, and the event that caused each is
/// acknowledged only then: none is lost.
#[test]
fn replies_a_full_broker_refuses_are_tried_again_not_lost() {
    let replier = Capture::start(|c| {
        let headers = vec![
            ("ce-specversion".to_string(), "1.0".to_string()),
            ("ce-id".to_string(), format!("reply-{}", c.headers["ce-id"])),
            ("ce-source".to_string(), "/replier".to_string()),
            ("ce-type".to_string(), "t.resp".to_string()),
        ];
        (200, headers, Vec::new())
    });
    let slow = crate::harness::HoldingSubscriber::start(Duration::from_millis(200));
    let yaml = broker_with_triggers(&[
        (
            "requests",
            "  filters: [{exact: {type: t.req}}]\n  delivery: {retry: 20, backoffDelay: PT0.05S, backoffPolicy: linear}\n",
            &replier.url("/replier"),
        ),
        (
            "responses",
            "  filters: [{exact: {type: t.resp}}]\n  delivery: {concurrency: 1}\n",
            &format!("http://{}/", slow.addr),
        ),
    ]);
    // In memory, a trigger's queue is what fills (with the durable log, the log's capacity).
    let serve = Serve::start(&[("b.yaml", &yaml)], &["--store", "memory", "--queue", "2"]);
    for i in 0..8 {
        let r = serve.request(
            "POST",
            "/default/default",
            &ce_headers(&format!("q{i}"), "t.req"),
            b"",
        );
        assert_eq!(r.status, 202, "{}", r.text());
        crate::harness::wait_for("the request replied to", Duration::from_secs(10), || {
            replier.on("/replier").len() > i
        });
    }
    crate::harness::wait_for("every reply delivered", Duration::from_secs(30), || {
        let arrived = slow.arrived.lock().expect("lock");
        (0..8).all(|i| arrived.iter().any(|(_, id)| *id == format!("reply-q{i}")))
    });
    assert!(
        serve.stderr().contains("trying it again"),
        "the broker was full at least once: {}",
        serve.stderr()
    );
    drop(serve);
    // The same for a Wasm subscriber's replies (pod-started), which its worker thread publishes.
    let slow = crate::harness::HoldingSubscriber::start(Duration::from_millis(200));
    let triggers = format!(
        "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: started}}\nspec:\n  filters: [{{prefix: {{type: dev.knative.apiserver}}}}]\n  subscriber:\n    ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: pod-started}}\n  delivery: {{retry: 20, backoffDelay: PT0.05S, backoffPolicy: linear}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: pods}}\nspec:\n  filters: [{{exact: {{type: com.example.pod.started}}}}]\n  subscriber: {{uri: 'http://{}/'}}\n  delivery: {{concurrency: 1}}\n",
        slow.addr
    );
    let serve = Serve::start(
        &[("f.yaml", &format!("{FUNCTIONS}{triggers}"))],
        &["--store", "memory", "--queue", "2"],
    );
    let seed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo("tests/data/seed-event.json")).expect("seed"))
            .expect("json");
    for i in 0..8 {
        let mut event = seed.clone();
        event["id"] = format!("w{i}").into();
        // One at a time (again after a 429), each handled before the next: the replies pile
        // up, not the requests.
        loop {
            let r = serve.request(
                "POST",
                "/default/default",
                &[("content-type", "application/cloudevents+json")],
                event.to_string().as_bytes(),
            );
            if r.status != 429 {
                assert_eq!(r.status, 202, "{}", r.text());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let handled = format!(
            "wasmesh_trigger_deliveries_total{{namespace=\"default\",trigger=\"started\",broker=\"default\",outcome=\"delivered\"}} {}\n",
            i + 1
        );
        crate::harness::wait_for("pod-started handled it", Duration::from_secs(10), || {
            serve
                .admin("GET", "/metrics", b"")
                .text()
                .contains(&handled)
        });
    }
    crate::harness::wait_for(
        "every Wasm reply delivered",
        Duration::from_secs(30),
        || {
            let arrived = slow.arrived.lock().expect("lock");
            (0..8).all(|i| arrived.iter().any(|(_, id)| *id == format!("w{i}-started")))
        },
    );
    assert!(
        serve.stderr().contains("trying it again"),
        "{}",
        serve.stderr()
    );
}

/// A Wasm subscriber that fails every event, with long backoffs: the events waiting for their
/// retries count against the trigger's concurrency, as they do for an HTTP subscriber, so that
/// producers get 429 once the queue is full instead of the waiting events piling up in memory.
#[test]
fn events_retrying_on_a_failing_wasm_subscriber_hold_producers_back() {
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n\
         ---\napiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {{name: trap, namespace: default}}\nspec: {{module: '{}'}}\n\
         ---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: all, namespace: default}}\n\
         spec:\n  broker: default\n  subscriber: {{ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: trap}}}}\n\
         \x20 delivery: {{retry: 5, backoffDelay: PT30S, concurrency: 2}}\n",
        wasmesh_plugins::FIXTURE_TRAP
    );
    let serve = Serve::start(&[("t.yaml", &yaml)], &["--store", "memory", "--queue", "4"]);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..200 {
        let r = serve.request(
            "POST",
            "/default/default",
            &ce_headers(&format!("e{i}"), "t"),
            b"",
        );
        match r.status {
            202 => accepted += 1,
            429 => refused += 1,
            other => panic!("{other}: {}", r.text()),
        }
    }
    // At most: 2 waiting for a retry, one held by each worker thread, 4 queued.
    assert!(
        accepted <= 12 && refused >= 188,
        "accepted {accepted}, refused {refused}"
    );
}

/// Sends event `id` to `serve`'s default broker and waits for it at `dls` (path `/dls`);
/// returns its `knativeerrordata`.
fn dead_letter_of(serve: &Serve, dls: &Capture, id: &str) -> String {
    let r = serve.request("POST", "/default/default", &ce_headers(id, "t"), b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    let dead = dls.wait("/dls", 1);
    assert_eq!(dead[0].headers["ce-id"], id);
    error_data(&dead[0])
}

/// A dead letter's `knativeerrordata`, decoded (base64, as Knative sends it).
fn error_data(dead: &crate::harness::Captured) -> String {
    let data = base64::engine::general_purpose::STANDARD
        .decode(&dead.headers["ce-knativeerrordata"])
        .expect("base64");
    String::from_utf8_lossy(&data).into_owned()
}

/// A trigger's `delivery.timeout` bounds a Wasm subscriber's call too, as it bounds an HTTP
/// request: a Function that spins, with a deadline of its own of 5 s, is stopped at the
/// trigger's 200 ms and the event goes to the dead-letter sink saying so.
#[test]
fn a_triggers_timeout_bounds_a_wasm_subscriber() {
    let sub = Capture::ok();
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: wasmesh.dev/v1alpha1\nkind: Function\nmetadata: {{name: spin, namespace: default}}\n\
         spec: {{module: '{}', limits: {{timeout: 5s}}}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: spinning, namespace: default}}\n\
         spec:\n  subscriber: {{ref: {{apiVersion: wasmesh.dev/v1alpha1, kind: Function, name: spin}}}}\n  \
         delivery: {{timeout: PT0.2S, retry: 0, deadLetterSink: {{uri: '{}'}}}}\n",
        wasmesh_plugins::FIXTURE_SPIN,
        sub.url("/dls")
    );
    let serve = Serve::start(&[("t.yaml", &yaml)], &[]);
    let data = dead_letter_of(&serve, &sub, "spin-1");
    assert!(data.contains("deadline of 200 ms exceeded"), "{data}");
}

/// An HTTP subscriber that takes the request and never answers, under a trigger with no
/// `delivery.timeout`, is cut off at serve's `--delivery-timeout` (ten minutes unless set;
/// one second here) and the event goes on to the dead-letter sink, rather than holding a
/// delivery slot for ever.
#[test]
fn a_subscriber_that_never_answers_is_cut_off_without_a_trigger_timeout() {
    let silent = crate::harness::HoldingSubscriber::start(Duration::from_secs(3600));
    let dls = Capture::ok();
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata: {{name: default, namespace: default}}\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {{name: silent, namespace: default}}\n\
         spec:\n  subscriber: {{uri: 'http://{}/'}}\n  \
         delivery: {{retry: 0, deadLetterSink: {{uri: '{}'}}}}\n",
        silent.addr,
        dls.url("/dls")
    );
    let serve = Serve::start(
        &[("t.yaml", &yaml)],
        &["--store", "memory", "--delivery-timeout", "1s"],
    );
    let data = dead_letter_of(&serve, &dls, "mute-1");
    assert!(data.contains("timed out after 1000 ms"), "{data}");
    assert_eq!(silent.arrived.lock().expect("lock").len(), 1);
}

/// A subscriber's `Retry-After`, as Knative's dispatcher reads it: on a 429 or 503 only, in
/// delay-seconds or as an HTTP-date, and never waiting less than the trigger's backoff.
#[test]
fn retry_after_is_read_as_knative_reads_it() {
    let arrivals: Arc<Mutex<HashMap<String, Vec<std::time::Instant>>>> = Arc::default();
    let seen = Arc::clone(&arrivals);
    let sub = Capture::start(move |c| {
        let mut seen = seen.lock().expect("lock");
        let times = seen.entry(c.path.clone()).or_default();
        times.push(std::time::Instant::now());
        if times.len() > 1 {
            return (202, Vec::new(), Vec::new());
        }
        let in_a_second =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
        let (code, after) = match c.path.as_str() {
            "/seconds" => (429, "1".to_string()),
            "/date" => (503, in_a_second),
            "/zero" => (429, "0".to_string()),
            _ => (500, "3600".to_string()),
        };
        (code, vec![("retry-after".to_string(), after)], Vec::new())
    });
    let fast = "  delivery: {retry: 2, backoffDelay: PT0.01S}\n";
    let slow = "  delivery: {retry: 2, backoffDelay: PT1S, backoffPolicy: linear}\n";
    let yaml = broker_with_triggers(&[
        ("seconds", fast, &sub.url("/seconds")),
        ("date", fast, &sub.url("/date")),
        ("zero", slow, &sub.url("/zero")),
        ("other", fast, &sub.url("/other")),
    ]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let r = serve.request("POST", "/default/default", &ce_headers("ra-1", "t"), b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    for path in ["/seconds", "/date", "/zero", "/other"] {
        sub.wait(path, 2);
    }
    let gap = |path: &str| {
        let seen = arrivals.lock().expect("lock");
        seen[path][1] - seen[path][0]
    };
    assert!(
        gap("/seconds") >= Duration::from_secs(1),
        "{:?}",
        gap("/seconds")
    );
    assert!(
        gap("/date") >= Duration::from_millis(900),
        "{:?}",
        gap("/date")
    );
    assert!(
        gap("/zero") >= Duration::from_secs(1),
        "Retry-After 0 does not cut the 1 s backoff: {:?}",
        gap("/zero")
    );
    // A 500's Retry-After is not read: the retry came after the 10 ms backoff, not in an hour
    // (`sub.wait` above gives up after seconds).
}

/// The same object in two files: the last declaration counts (as `kubectl apply` of both
/// files would leave it), with a warning naming both places; a file named twice is read once.
#[test]
fn an_object_declared_twice_keeps_its_last_declaration_and_says_so() {
    let sub = Capture::ok();
    let first = broker_with_triggers(&[("all", "", &sub.url("/first"))]);
    let second = "apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata: {name: all, namespace: default}\nspec:\n  subscriber:\n    uri: "
        .to_string()
        + &sub.url("/second")
        + "\n";
    let serve = Serve::start(&[("a.yaml", &first), ("b.yaml", &second)], &[]);
    let warned = serve.stderr().lines().any(|l| {
        l.contains("Trigger/default/all is declared twice (")
            && l.contains("a.yaml:7 and ")
            && l.contains("b.yaml:1); the last declaration counts")
    });
    assert!(warned, "{}", serve.stderr());
    let r = serve.request(
        "POST",
        "/default/default",
        &ce_headers("twice-1", "t"),
        b"{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    sub.wait("/second", 1);
    assert!(
        sub.on("/first").is_empty(),
        "the first declaration is not running"
    );
}

/// JSON data nested deeper than anyone writes: event-display's indentation (which grows with
/// the square of the depth) used to exhaust the function's 16 MiB on every attempt, so the
/// event was retried and dropped; now it prints the data as it came, as Go's event-display does
/// once its JSON scanner gives up.
#[test]
fn event_display_prints_deeply_nested_json_as_it_came() {
    let yaml = crate::harness::function_subscriber("builtin:event-display", "x");
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let depth = 20_000;
    let data = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let r = serve.request(
        "POST",
        "/default/default",
        &ce_headers("deep-1", "t"),
        data.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    crate::harness::wait_for("event-display's output", Duration::from_secs(20), || {
        serve.stdout().contains("  id: deep-1\n")
    });
    let out = serve.stdout();
    assert!(
        out.contains(&format!("Data,\n  {data}")),
        "the data as it came"
    );
    assert!(
        !serve.stderr().contains("memory limit"),
        "{}",
        serve.stderr()
    );
}

/// A subscriber that answers 307 or 308 gets the event again at its `Location` (method and
/// body kept), as Go's client delivers it for Knative, up to 10 redirects; 301, 302 and 303,
/// which Go would follow as a bodiless GET, stay failures and go to the dead-letter sink.
#[test]
fn deliveries_follow_307_and_308() {
    let sub = Capture::start(|c| {
        let to = |code: u16, location: &str| {
            (
                code,
                vec![("location".to_string(), location.to_string())],
                Vec::new(),
            )
        };
        match c.path.as_str() {
            "/moved" => to(308, "/new"),
            "/loop" => to(307, "/loop"),
            "/gone" => to(301, "/new"),
            _ => (200, Vec::new(), Vec::new()),
        }
    });
    let dls = format!(
        "  delivery: {{retry: 0, deadLetterSink: {{uri: '{}'}}}}\n",
        sub.url("/dls")
    );
    let filtered = |ty: &str, more: &str| format!("  filters: [{{exact: {{type: {ty}}}}}]\n{more}");
    let yaml = broker_with_triggers(&[
        ("moved", &filtered("a", ""), &sub.url("/moved")),
        ("loop", &filtered("b", &dls), &sub.url("/loop")),
        ("gone", &filtered("c", &dls), &sub.url("/gone")),
    ]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    for (id, ty) in [("m1", "a"), ("l1", "b"), ("g1", "c")] {
        let r = serve.request(
            "POST",
            "/default/default",
            &ce_headers(id, ty),
            b"{\"n\":1}",
        );
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let got = sub.wait("/new", 1);
    assert_eq!(got[0].headers["ce-id"], "m1");
    assert_eq!(got[0].body, b"{\"n\":1}", "the body went along");
    let dead = sub.wait("/dls", 2);
    let code = |id: &str| {
        dead.iter()
            .find(|c| c.headers["ce-id"] == id)
            .map(|c| c.headers.get("ce-knativeerrorcode").cloned())
    };
    assert_eq!(code("g1"), Some(Some("301".to_string())), "{dead:?}");
    assert_eq!(
        code("l1"),
        Some(Some("500".to_string())),
        "a redirect loop is a transport error: 500, as Knative's dispatcher says"
    );
    assert_eq!(
        sub.on("/loop").len(),
        11,
        "the first request and 10 redirects"
    );
    assert_eq!(sub.on("/new").len(), 1, "the 301 was not followed");
}

/// An extension named `data` (`ce-data` in binary mode) is refused with 400: in the JSON format
/// the event's data is kept under that name, so the event could not be delivered in structured
/// mode, where its two `data` members would collide.
#[test]
fn an_extension_named_data_is_refused() {
    let sub = Capture::ok();
    let yaml = broker_with_triggers(&[("all", "", &sub.url("/all"))]);
    let serve = Serve::start(&[("b.yaml", &yaml)], &[]);
    let mut h = ce_headers("d1", "t");
    h.push(("ce-data", "oops"));
    let r = serve.request("POST", "/default/default", &h, b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("extension name `data` is reserved"),
        "{}",
        r.text()
    );
    let mut h = ce_headers("d2", "t");
    h.push(("ce-datax", "fine"));
    let r = serve.request("POST", "/default/default", &h, b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
}
