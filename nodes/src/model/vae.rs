//! ComfyUI's `VAE` value: the autoencoder, shared between nodes.

use std::fmt;
use std::sync::Arc;

use easel_engine::NodeObject;
use easel_models::architectures::vae::Vae;
use easel_models::weights::WeightSource;

/// The VAE socket.
#[derive(Clone)]
pub struct VaeModel {
    pub network: Arc<Vae>,
    /// What the network was built from (VAESave and CheckpointSave write it out).
    pub source: WeightSource,
}

impl fmt::Debug for VaeModel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<comfy.sd.VAE>")
    }
}

impl NodeObject for VaeModel {
    fn type_name(&self) -> &'static str {
        "VAE"
    }
}
