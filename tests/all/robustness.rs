//! Outside input never panics the host: the parsers that read what comes from outside (HTTP
//! requests in each content mode, YAML declarations, CESQL expressions, durations, PingSource
//! schedules) are fed thousands of inputs made by mutating valid ones, and each must answer
//! `Ok` or `Err`. The mutations are pseudo-random from fixed seeds, so a failure names an input
//! that reproduces.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::harness::repo;

/// xorshift64*: enough randomness for mutations, and the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that often break parsers: quotes, brackets, separators, escapes, multi-byte UTF-8
/// starts, control characters.
const NASTY: &[u8] = b"\"'{}[]:,-#&*!|>%@`\\\n\t\r\0 \xc3\xe2\xf0\xff0.e+";

/// `seed` changed in one to four places: a byte replaced, removed or inserted, or a piece of it
/// repeated, cut short or moved.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if at < v.len() => v[at] = *rng.pick(NASTY),
            1 if at < v.len() => {
                v.remove(at);
            }
            2 => v.insert(at, *rng.pick(NASTY)),
            3 => {
                let end = (at + rng.below(16)).min(v.len());
                let piece = v[at..end].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, piece);
            }
            4 => v.truncate(at),
            _ if at < v.len() => v[at] = rng.next() as u8,
            _ => {}
        }
    }
    v
}

/// How many inputs a parser accepted and refused: at least 1% each, or the mutations did not
/// reach past its first check (or never broke anything).
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
}

impl Tally {
    /// Runs `f` (true: the input was accepted) on `input`; a panic fails the test and names the
    /// input.
    fn run(&mut self, what: &str, input: &[u8], f: impl FnOnce() -> bool) {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(true) => self.accepted += 1,
            Ok(false) => self.refused += 1,
            Err(_) => panic!(
                "{what} panicked on input {:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    fn check(&self, what: &str) {
        let total = self.accepted + self.refused;
        assert!(
            self.accepted * 100 >= total && self.refused * 100 >= total,
            "{what}: {} accepted, {} refused: the inputs miss one side",
            self.accepted,
            self.refused
        );
    }
}

const EVENT: &str = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":"x","time":"2026-01-01T00:00:00Z","dataschema":"https://example.com/s","datacontenttype":"application/json","myext":"v","n":5,"b":true,"data":{"a":[1,2,{"b":"c"}]}}"#;

/// Inputs per parser: 3,000, or `WASMESH_FUZZ_ROUNDS` for a longer search; the seeds change
/// with `WASMESH_FUZZ_SEED`.
fn rounds() -> usize {
    std::env::var("WASMESH_FUZZ_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3000)
}

fn rng(seed: u64) -> Rng {
    let extra: u64 = std::env::var("WASMESH_FUZZ_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    Rng(seed ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

#[test]
fn http_requests_in_every_content_mode() {
    let mut rng = rng(0x9E37_79B9_7F4A_7C15);
    let structured = {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        h
    };
    let batch_ct = {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents-batch+json"),
        );
        h
    };
    let batch = format!("[{EVENT},{EVENT}]");
    let (mut st, mut ba, mut bi) = (Tally::default(), Tally::default(), Tally::default());
    for _ in 0..rounds() {
        let body = mutate(&mut rng, EVENT.as_bytes());
        st.run("structured mode", &body, || {
            wasmesh_broker::codec::decode(&structured, Bytes::from(body.clone())).is_ok()
        });
        let body = mutate(&mut rng, batch.as_bytes());
        ba.run("batch mode", &body, || {
            wasmesh_broker::codec::decode(&batch_ct, Bytes::from(body.clone())).is_ok()
        });
        // Binary mode: each header mutated (names and values), the body anything.
        let mut h = HeaderMap::new();
        let mut described = Vec::new();
        for (name, value) in [
            ("ce-specversion", *rng.pick(&["1.0", "0.3", "1.0"])),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("ce-time", "2026-01-01T00:00:00Z"),
            ("ce-dataschema", "https://example.com/s"),
            ("ce-schemaurl", "https://example.com/s"),
            ("ce-datacontentencoding", "base64"),
            ("ce-myext", "a%20b%e2%82%ac"),
            ("content-type", "application/json; charset=utf-8"),
        ] {
            let name = if rng.below(8) == 0 {
                mutate(&mut rng, name.as_bytes())
            } else {
                name.as_bytes().to_vec()
            };
            let value = if rng.below(3) == 0 {
                mutate(&mut rng, value.as_bytes())
            } else {
                value.as_bytes().to_vec()
            };
            if rng.below(10) == 0 {
                continue; // A header left out.
            }
            // Only what an HTTP server would hand over: valid names and values.
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(&name.to_ascii_lowercase()),
                HeaderValue::from_bytes(&value),
            ) {
                described.extend_from_slice(&name);
                described.push(b'=');
                described.extend_from_slice(&value);
                described.push(b' ');
                h.append(n, v);
            }
        }
        let body = mutate(&mut rng, b"{\"a\":1}");
        described.extend_from_slice(&body);
        bi.run("binary mode", &described, || {
            let Ok(events) = wasmesh_broker::codec::decode(&h, Bytes::from(body.clone())) else {
                return false;
            };
            // What was accepted is delivered: it must encode in both modes too.
            for e in &events {
                let _ = wasmesh_broker::codec::encode_binary(e, &mut HeaderMap::new());
                let _ = wasmesh_broker::codec::encode_structured(e);
            }
            true
        });
    }
    st.check("structured mode");
    ba.check("batch mode");
    bi.check("binary mode");
}

#[test]
fn yaml_declarations() {
    let mut rng = rng(0xD1B5_4A32_D192_ED03);
    let mut seeds = Vec::new();
    for dir in [
        "manifests/hello",
        "manifests/kubernetes",
        "tests/yaml/invalid",
    ] {
        for entry in std::fs::read_dir(repo(dir)).expect("dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "yaml") {
                seeds.push(std::fs::read(path).expect("read"));
            }
        }
    }
    assert!(seeds.len() >= 10, "found the YAML seeds");
    let mut yaml = Tally::default();
    for _ in 0..rounds() {
        let seed = &seeds[rng.below(seeds.len())];
        let text = mutate(&mut rng, seed);
        let text = String::from_utf8_lossy(&text).into_owned();
        yaml.run("YAML", text.as_bytes(), || {
            wasmesh_core::yaml::parse_documents("fuzz.yaml", &text).is_ok()
        });
    }
    yaml.check("YAML");
}

#[test]
fn cesql_expressions_and_durations() {
    let mut rng = rng(0x94D0_49BB_1331_11EB);
    let expressions = [
        "type LIKE 'dev.knative.%' AND NOT (source = '/x' OR EXISTS subject)",
        "CONCAT(id, '-', UPPER(type)) IN ('A', 'B') OR INT('12') + 3 * -4 % 5 >= ABS(-7)",
        "BOOL(myext) = TRUE AND SUBSTRING(source, 1, 3) <> 'abc' AND LENGTH(id) / 0 = 1",
        "'it''s' = \"quoted \\\" string\" XOR 0x1 = 1",
    ];
    let event: wasmesh_core::Event = serde_json::from_str(EVENT).expect("event");
    let (mut cesql, mut durations) = (Tally::default(), Tally::default());
    for _ in 0..rounds() {
        let expression = *rng.pick(&expressions);
        let source = mutate(&mut rng, expression.as_bytes());
        let text = String::from_utf8_lossy(&source).into_owned();
        cesql.run("CESQL", text.as_bytes(), || {
            let Ok(e) = wasmesh_core::cesql::Expression::parse_filter(&text) else {
                return false;
            };
            let _ = e.matches(&event);
            true
        });
        let duration = *rng.pick(&["PT0.2S", "P1DT2H3M4.5S", "P2W", "100ms"]);
        let d = mutate(&mut rng, duration.as_bytes());
        let text = String::from_utf8_lossy(&d).into_owned();
        durations.run("durations", text.as_bytes(), || {
            let _ = wasmesh_core::duration::parse_iso8601(&text);
            wasmesh_core::duration::parse_flexible(&text).is_ok()
        });
    }
    cesql.check("CESQL");
    durations.check("durations");
}

/// PingSource schedules: Knative's cron and croner's extensions (`L`, `W`, `#`, seconds,
/// `CRON_TZ=`), mutated, and fields made of pieces that parsers of ranges and steps trip on.
#[test]
fn ping_schedules() {
    let mut rng = rng(0xBF58_476D_1CE4_E5B9);
    let schedules = [
        "*/5 * * * *",
        "CRON_TZ=Europe/Paris 0 9 * * MON-FRI",
        "0 0 L * *",
        "*/10 * * * * *",
        "0 12 1W,15 JAN-MAR 5#3",
        "@hourly",
    ];
    let pieces = [
        "*",
        "0",
        "7",
        "31",
        "60",
        "99999999999999999999",
        "-1",
        "L",
        "W",
        "#",
        "?",
        "/",
        ",",
        "-",
        "5#9",
        "L-40",
        "SUN",
        "DEC",
        "0/0",
        "2-1/3",
    ];
    let mut cron = Tally::default();
    for round in 0..rounds() {
        let schedule = if round % 2 == 0 {
            let seed = *rng.pick(&schedules);
            String::from_utf8_lossy(&mutate(&mut rng, seed.as_bytes())).into_owned()
        } else {
            (0..5 + rng.below(2))
                .map(|_| {
                    (0..1 + rng.below(3))
                        .map(|_| *rng.pick(&pieces))
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let spec: wasmesh_core::resources::PingSourceSpec = serde_json::from_value(
            serde_json::json!({"schedule": schedule, "sink": {"uri": "http://127.0.0.1:9/"}}),
        )
        .expect("spec");
        cron.run("schedules", schedule.as_bytes(), || {
            wasmesh_core::ping::Ping::check(&spec).is_ok()
        });
    }
    cron.check("schedules");
}
