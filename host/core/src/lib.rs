//! The core of wasmesh: the CloudEvent model (over cloudevents-sdk), the resource kinds users
//! declare and their validation, YAML reading with located errors, and the native filter
//! dialects. No I/O and no async runtime live here.

pub mod cesql;
pub mod display;
pub mod duration;
pub mod event;
pub mod filter;
pub mod ping;
pub mod resources;
pub mod yaml;

pub use cloudevents::event::{ExtensionValue, SpecVersion};
pub use cloudevents::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV03, EventBuilderV10,
};
