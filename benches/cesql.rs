//! Per-event cost of compiled CESQL filters against the equivalent native dialect filters, in
//! one run, on the seed's busybox Event (1 KiB of JSON data, four extensions):
//!
//! 1. `type LIKE 'dev.knative.%' AND EXISTS subject`  vs  `all: [prefix type, subject present]`
//! 2. `type IN (10 values)` (the match last)          vs  `any: [exact type] x 10`
//! 3. `LEFT(type, 12) = 'dev.knative.'` (a function)  vs  `prefix: {type: dev.knative.}`
//!
//! `cargo bench -p wasmesh --bench cesql`; figures go to docs/BENCHMARKS.md.

use std::hint::black_box;
use std::time::Instant;

use wasmesh_core::Event;
use wasmesh_core::cesql::Expression;
use wasmesh_core::filter::{Attr, Filter};

fn seed_event() -> Event {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/seed-event.json"
    );
    wasmesh_core::event::parse_json(&std::fs::read(path).expect("seed event")).expect("valid")
}

/// Median ns per call over 15 rounds of `n` calls.
fn time(n: u32, mut f: impl FnMut() -> bool) -> f64 {
    let mut rounds: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

fn main() {
    let event = seed_event();
    let types: Vec<String> = (1..10)
        .map(|i| format!("com.example.type{i}"))
        .chain(std::iter::once(
            "dev.knative.apiserver.resource.add".to_string(),
        ))
        .collect();
    let in_list = format!(
        "type IN ({})",
        types
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let cases: Vec<(&str, String, Filter)> = vec![
        (
            "LIKE prefix AND EXISTS",
            "type LIKE 'dev.knative.%' AND EXISTS subject".to_string(),
            Filter::All(vec![
                Filter::Prefix(vec![(Attr::Type, "dev.knative.".into())]),
                Filter::Attributes(vec![(Attr::Subject, String::new())]),
            ]),
        ),
        (
            "IN list of 10",
            in_list,
            Filter::Any(
                types
                    .iter()
                    .map(|t| Filter::Exact(vec![(Attr::Type, t.clone())]))
                    .collect(),
            ),
        ),
        (
            "string function LEFT",
            "LEFT(type, 12) = 'dev.knative.'".to_string(),
            Filter::Prefix(vec![(Attr::Type, "dev.knative.".into())]),
        ),
    ];
    let n = 2_000_000;
    println!(
        "{:<26} {:>12} {:>12} {:>8}",
        "case", "CESQL ns", "native ns", "ratio"
    );
    // `CESQL_CASE=<part of a case name>` runs one case (for a profiler).
    let only = std::env::var("CESQL_CASE").unwrap_or_default();
    for (name, expr, native) in cases.iter().filter(|c| c.0.contains(only.as_str())) {
        let compiled = Expression::parse_filter(expr).expect("parses");
        assert!(compiled.matches(&event), "{expr} matches the seed event");
        assert!(native.matches(&event), "{name}: the native filter matches");
        let c = time(n, || compiled.matches(black_box(&event)));
        let d = time(n, || native.matches(black_box(&event)));
        println!("{name:<26} {c:>12.1} {d:>12.1} {:>8.2}", c / d);
    }
}
