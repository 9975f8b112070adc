//! Nodes of custom-node packs, one module each, named as ComfyUI names the pack's module
//! (`custom_nodes.<pack>`): [`gguf`] is city96's ComfyUI-GGUF, [`controlnet_aux`] Fannovel16's
//! comfyui_controlnet_aux, [`ipadapter`] cubiq's ComfyUI_IPAdapter_plus, [`ic_light`] kijai's
//! ComfyUI-IC-Light, [`kjnodes`] kijai's ComfyUI-KJNodes and [`was`] WAS Node Suite (the nodes of
//! those two that relighting workflows use), [`inpaint_nodes`] Acly's comfyui-inpaint-nodes (its
//! mask and fill nodes).

pub mod controlnet_aux;
pub mod gguf;
pub mod ic_light;
pub mod inpaint_nodes;
pub mod ipadapter;
pub mod kjnodes;
pub mod was;

use easel_engine::NodeRegistry;

/// Adds the nodes of every pack to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    gguf::register(registry);
    controlnet_aux::register(registry);
    ipadapter::register(registry);
    ic_light::register(registry);
    kjnodes::register(registry);
    was::register(registry);
    inpaint_nodes::register(registry);
}
