//! Event sources. A source turns something outside into CloudEvents and hands them to an
//! [`Emit`]; it never delivers to subscribers itself.

pub mod apiserver;
pub mod ping;

use wasmesh_core::Event;

/// Why a sink did not take events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmitError {
    /// Not now (a full queue or log, a failing disk, an unreachable sink): sending the same
    /// again later may work.
    #[error("{0}")]
    Later(String),
    /// Never (more than the sink takes at all, not a valid event): sending the same again
    /// cannot help.
    #[error("{0}")]
    Never(String),
}

/// Where a source sends its events: a broker in this process, or an HTTP sink.
#[async_trait::async_trait]
pub trait Emit: Send + Sync {
    /// Sends one event; an error says why it was not accepted.
    async fn emit(&self, event: Event) -> Result<(), EmitError>;

    /// Sends events in order, together where the sink can take them together (a broker:
    /// one append). On an error some may have been accepted; the caller sends them all again
    /// (at least once).
    async fn emit_all(&self, events: Vec<Event>) -> Result<(), EmitError> {
        for e in events {
            self.emit(e).await?;
        }
        Ok(())
    }
}
