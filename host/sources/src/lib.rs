//! Event sources. A source turns something outside into CloudEvents and hands them to an
//! [`Emit`]; it never delivers to subscribers itself.

pub mod apiserver;
pub mod ping;

use wasmesh_core::Event;

/// Where a source sends its events: a broker in this process, or an HTTP sink.
#[async_trait::async_trait]
pub trait Emit: Send + Sync {
    /// Sends one event; an error says why it was not accepted.
    async fn emit(&self, event: Event) -> Result<(), String>;

    /// Sends events in order, together where the sink can take them together (a broker:
    /// one append). On an error some may have been accepted; the caller sends them all again
    /// (at least once).
    async fn emit_all(&self, events: Vec<Event>) -> Result<(), String> {
        for e in events {
            self.emit(e).await?;
        }
        Ok(())
    }
}
