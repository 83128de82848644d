//! PingSource: a CloudEvent on a cron schedule, as Knative's `sources.knative.dev/v1` does.
//!
//! Events have type `dev.knative.sources.ping` and source
//! `/apis/v1/namespaces/<ns>/pingsources/<name>`. Besides Knative's five-field cron (with
//! `CRON_TZ=` or `spec.timezone`), wasmesh accepts a sixth, leading field for seconds.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use wasmesh_core::ping::Ping;
use wasmesh_core::resources::{ObjectMeta, PingSourceSpec};
use wasmesh_core::{Event, EventBuilder, EventBuilderV10};

use crate::Emit;

/// The type of every ping event.
pub const PING_TYPE: &str = "dev.knative.sources.ping";

/// A PingSource ready to run.
#[derive(Debug, Clone)]
pub struct PingSource {
    namespace: String,
    name: String,
    ping: Ping,
    content_type: Option<String>,
    extensions: Vec<(String, String)>,
}

impl PingSource {
    /// Checks the schedule, the timezone and the data (`wasmesh_core::ping`, which reading the
    /// YAML already did); the error names the field.
    pub fn new(meta: &ObjectMeta, spec: &PingSourceSpec) -> Result<Self, String> {
        Ok(Self {
            namespace: meta.namespace().to_string(),
            name: meta.name.clone(),
            ping: Ping::check(spec).map_err(|e| e.to_string())?,
            content_type: spec.content_type.clone(),
            extensions: spec
                .ce_overrides
                .iter()
                .flat_map(|o| o.extensions.iter())
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect(),
        })
    }

    /// `/apis/v1/namespaces/<ns>/pingsources/<name>`.
    pub fn source(&self) -> String {
        format!(
            "/apis/v1/namespaces/{}/pingsources/{}",
            self.namespace, self.name
        )
    }

    /// The next firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.ping.next_after(after)
    }

    /// The event for the firing at `at`.
    pub fn event(&self, at: DateTime<Utc>) -> Event {
        let mut b = EventBuilderV10::new()
            // One id per source and tick: a tick emitted twice (a failover between replicas)
            // is one event, which the broker's store drops as a duplicate.
            .id(uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("{}#{}", self.source(), at.timestamp()).as_bytes(),
            )
            .to_string())
            .source(self.source())
            .ty(PING_TYPE)
            .time(at);
        for (k, v) in &self.extensions {
            b = b.extension(k, v.clone());
        }
        if let (Some(data), Some(ct)) = (&self.ping.data, &self.content_type) {
            b = b.data(ct.clone(), data.clone());
        }
        // Every field was checked in `new`; the builder only fails on a missing id/source/type.
        let mut event = b.build().unwrap_or_else(|_| Event::default());
        if let (Some(data), None) = (&self.ping.data, &self.content_type) {
            // Without a contentType Knative sends the data with no datacontenttype.
            event.set_data_unchecked(data.clone());
        }
        event
    }

    /// Fires on schedule until `stop` turns true. A send that fails is logged and retried a few
    /// times; the schedule itself never stops.
    pub async fn run(self, emit: Arc<dyn Emit>, stop: watch::Receiver<bool>) {
        self.run_from(emit, stop, Utc::now()).await
    }

    /// Fires every tick after `from` (ticks already past fire at once, oldest first), until
    /// `stop`.
    pub async fn run_from(
        self,
        emit: Arc<dyn Emit>,
        mut stop: watch::Receiver<bool>,
        from: DateTime<Utc>,
    ) {
        let mut last = from;
        loop {
            let Some(next) = self.next_after(last) else {
                tracing::error!(source = %self.source(), "the schedule has no next firing");
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            last = next;
            let event = self.event(next);
            let mut delay = Duration::from_millis(50);
            for attempt in 1..=5 {
                // A stop ends a send in progress too (a sink that does not answer).
                let sent = tokio::select! {
                    sent = emit.emit(event.clone()) => sent,
                    _ = stop.changed() => return,
                };
                match sent {
                    Ok(()) => break,
                    Err(crate::EmitError::Never(e)) => {
                        tracing::error!(source = %self.source(), error = %e, "ping event refused for good by the sink");
                        break;
                    }
                    Err(e) if attempt == 5 => {
                        tracing::error!(source = %self.source(), error = %e, "ping event not delivered");
                    }
                    Err(e) => {
                        tracing::warn!(source = %self.source(), error = %e, attempt, "ping event refused; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.changed() => return,
                        }
                        delay *= 2;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmesh_core::AttributesReader;

    fn spec(schedule: &str) -> PingSourceSpec {
        serde_yaml_ng::from_str(&format!(
            "schedule: \"{schedule}\"\ndata: '{{\"a\":1}}'\ncontentType: application/json\nsink: {{uri: 'http://127.0.0.1:1/'}}"
        ))
        .expect("valid spec")
    }

    fn meta() -> ObjectMeta {
        ObjectMeta {
            name: "p".into(),
            namespace: Some("ns".into()),
            ..Default::default()
        }
    }

    #[test]
    fn schedules_and_events() {
        let p = PingSource::new(&meta(), &spec("*/1 * * * *")).expect("valid");
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:30Z")
            .expect("t")
            .with_timezone(&Utc);
        assert_eq!(
            p.next_after(t0).expect("next").to_rfc3339(),
            "2026-01-01T00:01:00+00:00"
        );
        let ev = p.event(t0);
        assert_eq!(ev.ty(), PING_TYPE);
        assert_eq!(ev.source().as_str(), "/apis/v1/namespaces/ns/pingsources/p");
        assert_eq!(ev.datacontenttype(), Some("application/json"));

        let secs = PingSource::new(&meta(), &spec("*/5 * * * * *")).expect("seconds field");
        assert_eq!(
            secs.next_after(t0).expect("next").to_rfc3339(),
            "2026-01-01T00:00:35+00:00"
        );

        let paris = PingSource::new(&meta(), &spec("CRON_TZ=Europe/Paris 0 9 * * *")).expect("tz");
        assert_eq!(
            paris.next_after(t0).expect("next").to_rfc3339(),
            "2026-01-01T08:00:00+00:00"
        );
    }

    #[test]
    fn bad_schedules_say_why() {
        let e = PingSource::new(&meta(), &spec("every minute")).expect_err("bad");
        assert!(
            e.starts_with("spec.schedule: `every minute` is not a cron schedule"),
            "{e}"
        );
        let e =
            PingSource::new(&meta(), &spec("CRON_TZ=Mars/Olympus 0 9 * * *")).expect_err("bad tz");
        assert!(e.contains("`Mars/Olympus` is not a known time zone"), "{e}");
        let e = PingSource::new(&meta(), &spec("@every 10s")).expect_err("@every");
        assert!(e.contains("@every descriptor is not supported"), "{e}");
        let e = PingSource::new(&meta(), &spec("0 0 31 2 *")).expect_err("February 31st");
        assert!(e.contains("never fires"), "{e}");
    }

    /// A sink that takes every event and never answers.
    struct Silent(std::sync::atomic::AtomicUsize);

    #[async_trait::async_trait]
    impl crate::Emit for Silent {
        async fn emit(&self, _event: wasmesh_core::Event) -> Result<(), crate::EmitError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::pending().await
        }
    }

    /// A stop ends the source even while a send hangs (it used to wait for the send).
    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_send_that_hangs() {
        let p = PingSource::new(&meta(), &spec("* * * * *")).expect("valid");
        let silent = Arc::new(Silent(Default::default()));
        let (stop, stop_rx) = watch::channel(false);
        let past = Utc::now() - chrono::Duration::minutes(3);
        let run = tokio::spawn(p.run_from(silent.clone(), stop_rx, past));
        while silent.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the source stops while its send hangs")
            .expect("no panic");
        assert_eq!(silent.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    fn spec_yaml(yaml: &str) -> PingSourceSpec {
        serde_yaml_ng::from_str(&format!("{yaml}\nsink: {{uri: 'http://127.0.0.1:1/'}}"))
            .expect("valid spec")
    }

    /// Knative's defaults and checks: no schedule fires every minute; `application/json` data
    /// must be an object and goes out compact with its keys sorted; data without a contentType
    /// goes out without a datacontenttype.
    #[test]
    fn knatives_defaults_and_data_rules() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:30Z")
            .expect("t")
            .with_timezone(&Utc);
        let every_minute = PingSource::new(&meta(), &spec_yaml("data: hi")).expect("default");
        assert_eq!(
            every_minute.next_after(t0).expect("next").to_rfc3339(),
            "2026-01-01T00:01:00+00:00"
        );
        let ev = every_minute.event(t0);
        assert_eq!(ev.datacontenttype(), None);
        assert_eq!(
            wasmesh_core::event::data_bytes(&ev).as_deref(),
            Some(&b"hi"[..])
        );

        let json = PingSource::new(
            &meta(),
            &spec_yaml(
                "contentType: application/json\ndata: '{\"z\": 1, \"a\": {\"y\": 2, \"b\": 3}}'",
            ),
        )
        .expect("json");
        let ev = json.event(t0);
        assert_eq!(ev.datacontenttype(), Some("application/json"));
        assert_eq!(
            wasmesh_core::event::data_bytes(&ev).as_deref(),
            Some(&br#"{"a":{"y":2,"b":3},"z":1}"#[..])
        );

        for bad in [
            "contentType: application/json\ndata: 'not json'",
            "contentType: application/json\ndata: '[1, 2]'",
            "contentType: application/json\ndataBase64: 'WzFd'",
        ] {
            let e = PingSource::new(&meta(), &spec_yaml(bad)).expect_err(bad);
            assert!(e.contains("not a JSON object"), "{bad}: {e}");
        }
        let text = PingSource::new(&meta(), &spec_yaml("contentType: text/plain\ndata: '[1'"))
            .expect("text is not checked");
        assert_eq!(text.event(t0).datacontenttype(), Some("text/plain"));
    }
}
