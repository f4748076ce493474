//! Conversion of OCI layers into Beam layers: [`tree`] turns tar entries into a checked tree,
//! [`layer`] streams one tar into a chunk blob and an index, [`entrypoint`] finds what the
//! image's entrypoint loads (its prefetch list), [`image`] does every layer of an
//! image and publishes the Beam artifact.

pub mod entrypoint;
pub mod follows;
pub mod image;
pub mod layer;
pub mod stack;
pub mod tar_stream;
pub mod tree;

pub use layer::{convert_layer, ConvertOptions, ConvertStats, ConvertedLayer};
