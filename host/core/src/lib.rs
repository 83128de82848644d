//! The core of wasmesh: the CloudEvent model (over cloudevents-sdk) and, as the project grows,
//! the resource kinds and filter dialects. No I/O and no async runtime live here.

pub mod display;
pub mod event;

pub use cloudevents::event::{ExtensionValue, SpecVersion};
pub use cloudevents::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventBuilderV10,
};
