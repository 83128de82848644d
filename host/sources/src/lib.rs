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
}
