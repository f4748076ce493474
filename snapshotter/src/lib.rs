//! Beam: a containerd snapshotter that starts containers before their image is downloaded.
//!
//! Modules, in the direction data flows (dependencies point one way only):
//! - [`format`]: the Beam layer format (chunks and index), pure, no I/O;
//! - [`convert`]: tar layers into Beam layers, and whole images into Beam artifacts;
//! - [`oci`], [`remote`], [`layout`], [`store`]: OCI types, registries, OCI layouts, and one
//!   interface over both;
//! - [`unpack`]: Beam layers back into a root filesystem.

pub mod blob;
pub mod cache;
pub mod config;
pub mod containerd;
pub mod convert;
pub mod daemon;
pub mod doctor;
pub mod fetch;
pub use beam_format as format;
pub mod access_trace;
pub mod fs;
pub mod hosts;
pub mod labels;
pub mod layout;
pub mod metrics;
pub mod mount;
pub mod mounter;
pub mod node_setup;
pub mod oci;
pub mod pull;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod takeover;
pub mod unpack;
