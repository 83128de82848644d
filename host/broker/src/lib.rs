//! The wasmesh broker: CloudEvents ingress over HTTP, the data plane (`mesh`: where events wait,
//! in memory, in the durable log or in JetStream, behind one seam; native and Wasm filters;
//! delivery with retries and backoff; dead letters and replies).

pub mod codec;
pub mod delivery;
pub mod ingress;
pub mod listen;
pub mod log;
pub mod mesh;
pub mod metrics;
pub mod nats;
pub mod output;
pub mod passthrough;
mod record;
pub mod sink;
pub mod slot;

pub use delivery::DeliveryPolicy;
pub use ingress::{IngressConfig, serve};
pub use mesh::{BrokerKey, Mesh, MeshConfig, PublishError, SendToError, TriggerSpecRuntime};
pub use output::FunctionOutput;
pub use sink::Sink;
pub use slot::{FunctionSlot, RolloutPolicy, Version};
