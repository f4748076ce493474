//! Test harness for Beam: real registries (`docker-registry`), a recording and fault-injecting
//! HTTP proxy in front of them, a private containerd, OCI image layouts built from tars, and
//! directory tree comparison. No mocks: every helper runs the real
//! program, and every process, mount and directory it makes is cleaned up on drop.

pub mod autoconvert;
pub mod beam;
pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod fixture;
pub mod lazy_registry;
pub mod oci_layout;
pub mod proxy;
pub mod registry;
pub mod snapshots_client;
pub mod takeover;
pub mod tls;
pub mod tree;
pub mod util;

pub use containerd::{Containerd, ContainerdOptions};
pub use daemon::BeamDaemon;
pub use fixture::Fixture;
pub use oci_layout::{Compression, ImageConfig, LayerSpec};
pub use proxy::{Fault, Proxy};
pub use registry::Registry;
