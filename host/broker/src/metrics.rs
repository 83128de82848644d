//! The data plane's counters, named once here, and their Prometheus text exposition (the admin
//! API serves it at `GET /metrics`): where every event went, so that a lost or dropped one can
//! be found (ingress answers by status, events no trigger matched, each trigger's deliveries,
//! retries, dead letters, drops and Wasm-filter refusals, queue depths, the durable log).
//! Counting is a relaxed atomic add where it happens; nothing is kept per event.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// One trigger's counters; kept by name across rebuilds of its workers.
#[derive(Debug, Default)]
pub struct TriggerStats {
    /// Delivered: the subscriber accepted the event (with or without a reply).
    pub delivered: AtomicU64,
    /// Attempts that failed and were retried (or, over JetStream, handed back for a retry).
    pub retried: AtomicU64,
    /// Given up on and accepted by the dead-letter sink.
    pub dead_lettered: AtomicU64,
    /// Given up on with no dead-letter sink, or one that failed too: the event is gone (logged).
    pub dropped: AtomicU64,
    /// Refused by the trigger's Wasm filter.
    pub filtered: AtomicU64,
    /// Replies published back into the broker.
    pub replies: AtomicU64,
}

/// A trigger's counters at one moment, as the admin API shows them with its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggerCounts {
    pub delivered: u64,
    pub dead_lettered: u64,
    pub dropped: u64,
    pub filtered: u64,
    pub retries: u64,
    pub replies: u64,
    /// Events waiting in its queues in memory.
    pub queued: u64,
}

impl TriggerStats {
    pub fn counts(&self, queued: u64) -> TriggerCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TriggerCounts {
            delivered: get(&self.delivered),
            dead_lettered: get(&self.dead_lettered),
            dropped: get(&self.dropped),
            filtered: get(&self.filtered),
            retries: get(&self.retried),
            replies: get(&self.replies),
            queued,
        }
    }
}

/// One broker's counters.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Events accepted (answered 202, or published by a source or a reply).
    pub accepted: AtomicU64,
    /// Accepted events that no trigger's native filter matched.
    pub unmatched: AtomicU64,
}

/// Ingress answers by status code.
#[derive(Debug, Default)]
pub struct IngressStats {
    codes: [AtomicU64; CODES.len() + 1],
}

const CODES: [u16; 8] = [200, 202, 400, 404, 405, 413, 429, 503];

impl IngressStats {
    pub fn count(&self, status: u16) {
        let i = CODES
            .iter()
            .position(|c| *c == status)
            .unwrap_or(CODES.len());
        self.codes[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Builds the exposition text: each metric's `# HELP` and `# TYPE` once, then its samples.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn ingress(&mut self, s: &IngressStats) {
        self.family(
            "wasmesh_ingress_responses_total",
            "counter",
            "Broker ingress responses by HTTP status code.",
        );
        for (i, code) in CODES.iter().enumerate() {
            let code = code.to_string();
            self.sample(
                "wasmesh_ingress_responses_total",
                &[("code", &code)],
                s.codes[i].load(Ordering::Relaxed),
            );
        }
        self.sample(
            "wasmesh_ingress_responses_total",
            &[("code", "other")],
            s.codes[CODES.len()].load(Ordering::Relaxed),
        );
    }

    /// `brokers`: (namespace, name, counters), in the order to print.
    pub fn brokers(&mut self, brokers: &[(String, String, &BrokerStats)]) {
        for (name, help, unmatched) in [
            (
                "wasmesh_broker_events_accepted_total",
                "Events a broker accepted (from ingress, sources and replies).",
                false,
            ),
            (
                "wasmesh_broker_events_unmatched_total",
                "Accepted events that no trigger of the broker matched.",
                true,
            ),
        ] {
            self.family(name, "counter", help);
            for (ns, broker, s) in brokers {
                let labels = [("namespace", ns.as_str()), ("broker", broker.as_str())];
                let counter = if unmatched { &s.unmatched } else { &s.accepted };
                self.sample(name, &labels, counter.load(Ordering::Relaxed));
            }
        }
    }

    /// `triggers`: (namespace, name, broker, counters, events queued in memory now).
    pub fn triggers(&mut self, triggers: &[(String, String, String, &TriggerStats, u64)]) {
        self.family(
            "wasmesh_trigger_deliveries_total",
            "counter",
            "Events a trigger finished, by outcome: delivered, dead_lettered, dropped (no dead-letter sink, or it failed too), filtered (its Wasm filter refused them).",
        );
        for (ns, name, broker, s, _) in triggers {
            for (outcome, counter) in [
                ("delivered", &s.delivered),
                ("dead_lettered", &s.dead_lettered),
                ("dropped", &s.dropped),
                ("filtered", &s.filtered),
            ] {
                let labels = [
                    ("namespace", ns.as_str()),
                    ("trigger", name.as_str()),
                    ("broker", broker.as_str()),
                    ("outcome", outcome),
                ];
                self.sample(
                    "wasmesh_trigger_deliveries_total",
                    &labels,
                    counter.load(Ordering::Relaxed),
                );
            }
        }
        let families: [(&str, &str, &str); 3] = [
            (
                "wasmesh_trigger_retries_total",
                "counter",
                "Delivery attempts that failed and were retried.",
            ),
            (
                "wasmesh_trigger_replies_total",
                "counter",
                "Replies a trigger's subscriber returned that went back into the broker.",
            ),
            (
                "wasmesh_trigger_queued_events",
                "gauge",
                "Events waiting in a trigger's queues in memory.",
            ),
        ];
        for (i, (metric, kind, help)) in families.into_iter().enumerate() {
            self.family(metric, kind, help);
            for (ns, name, broker, s, queued) in triggers {
                let value = match i {
                    0 => s.retried.load(Ordering::Relaxed),
                    1 => s.replies.load(Ordering::Relaxed),
                    _ => *queued,
                };
                let labels = [
                    ("namespace", ns.as_str()),
                    ("trigger", name.as_str()),
                    ("broker", broker.as_str()),
                ];
                self.sample(metric, &labels, value);
            }
        }
    }

    /// The embedded log: events and bytes held, fsyncs and the events they made durable.
    pub fn log(&mut self, events: u64, bytes: u64, syncs: u64, synced: u64) {
        for (name, kind, help, value) in [
            (
                "wasmesh_log_events",
                "gauge",
                "Events the durable log holds.",
                events,
            ),
            (
                "wasmesh_log_bytes",
                "gauge",
                "Bytes of events the durable log holds.",
                bytes,
            ),
            (
                "wasmesh_log_syncs_total",
                "counter",
                "Group commits (fdatasync) of appended events.",
                syncs,
            ),
            (
                "wasmesh_log_synced_events_total",
                "counter",
                "Events made durable by those group commits.",
                synced,
            ),
        ] {
            self.family(name, kind, help);
            self.sample(name, &[], value);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_labels_and_counts_unknown_codes_as_other() {
        let ingress = IngressStats::default();
        ingress.count(202);
        ingress.count(202);
        ingress.count(418);
        let t = TriggerStats::default();
        add(&t.delivered, 3);
        let mut e = Exposition::default();
        e.ingress(&ingress);
        e.triggers(&[("ns".into(), "a\"b".into(), "default".into(), &t, 5)]);
        let text = e.finish();
        assert!(
            text.contains("wasmesh_ingress_responses_total{code=\"202\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("wasmesh_ingress_responses_total{code=\"other\"} 1\n"));
        assert!(text.contains(
            "wasmesh_trigger_deliveries_total{namespace=\"ns\",trigger=\"a\\\"b\",broker=\"default\",outcome=\"delivered\"} 3\n"
        ));
        assert!(text.contains(
            "wasmesh_trigger_queued_events{namespace=\"ns\",trigger=\"a\\\"b\",broker=\"default\"} 5\n"
        ));
        assert_eq!(
            text.matches("# TYPE wasmesh_trigger_retries_total counter")
                .count(),
            1
        );
    }
}
