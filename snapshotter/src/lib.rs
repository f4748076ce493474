//! Beam: a containerd snapshotter that starts containers before their image is downloaded.
//!
//! Modules, bottom up: each uses only modules above it in this list (ARCHITECTURE.md draws
//! the exact arrows, and `tests/layering.rs` holds the code to them).
//! - [`format`]: the Beam layer format (the `beam-format` crate: chunks, index), pure, no I/O;
//! - [`crash`]: crash points for tests (`BEAM_CRASH_AT`);
//! - [`mountinfo`]: this process's mount table, read without touching a mount;
//! - [`labels`]: every snapshot label both `beam pull` and the daemon use;
//! - [`takeover`]: FUSE connections that outlive the daemon (fd holder, session takeover);
//! - [`containerd`]: client of containerd's own API, containerd versions;
//! - [`oci`]: OCI types and the Beam artifact;
//! - [`registry`]: the registry client, its typed failures, pull settings;
//! - [`hosts`]: containerd's `hosts.toml` directories;
//! - [`layout`]: OCI image layouts on disk;
//! - [`blob`]: where a layer's chunk blob is read by byte range;
//! - [`store`]: the image store over a registry or a layout; which Beam artifact serves an image;
//! - [`convert`]: tar layers into Beam layers, whole images into (bound) Beam artifacts;
//! - [`unpack`]: Beam layers back into a root filesystem;
//! - [`cache`]: verified chunks on local disk;
//! - [`fetch`]: Range requests, single flight, priorities, verification;
//! - [`fs`]: the FUSE filesystem of one layer;
//! - [`mounter`]: the mount syscalls behind a trait (and a recording fake for tests);
//! - [`mount`]: images and layers mounted lazily;
//! - [`access_trace`]: `beam record`, prefetch lists from a workload's access trace;
//! - [`snapshot`]: containerd's snapshot semantics over a redb database;
//! - [`metrics`]: OpenMetrics of the fetcher and the layers;
//! - [`daemon`]: beam-snapshotter's gRPC adapter, lazy layers, control API;
//! - [`config`]: beam-snapshotter's configuration;
//! - [`pull`], [`doctor`], [`node_setup`]: `beam pull`, `beam doctor`, `beam node-setup`;
//! - [`autoconvert`]: `beam autoconvert`, the service that converts every image pushed to a
//!   registry.

pub mod blob;
pub mod cache;
pub mod config;
pub mod containerd;
pub mod convert;
pub mod crash;
pub mod daemon;
pub mod doctor;
pub mod fetch;
pub mod follow;
pub use beam_format as format;
pub mod access_trace;
pub mod autoconvert;
pub mod fs;
pub mod hosts;
pub mod labels;
pub mod layout;
pub mod metrics;
pub mod mount;
pub mod mounter;
pub mod mountinfo;
pub mod node_setup;
pub mod oci;
pub mod pull;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod takeover;
pub mod unpack;
