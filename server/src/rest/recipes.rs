//! From a generation request to an API-format prompt. Each family and mode has a bundled,
//! versioned workflow (`workflows/rest/v1/`); its nodes say in `_meta.easel` which inputs a
//! request field sets (`{"steps": "steps"}` on a KSampler, `{"prompt": "text"}` on the positive
//! CLIPTextEncode). Split model files replace the checkpoint loader by UNet, text-encoder and VAE
//! loaders, and LoRAs are chained behind whatever loads the model. Which inputs each field set is
//! kept, so a validation error on an input names the request field behind it.

use super::catalog::Style;
use super::request::{ControlKind, Family, GenerateRequest, Mode};
use super::RestError;
use serde_json::{json, Map, Value as Json};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

/// The version of the workflows requests are built from (their folder), recorded on each task.
pub const WORKFLOW_VERSION: &str = "v1";

/// The bundled workflow serving a family and mode, or a 501 naming what is missing.
pub fn workflow_for(request: &GenerateRequest) -> Result<&'static str, RestError> {
    if request.family == Family::Sd3 && request.ip_adapter.is_some() {
        return Err(RestError::not_yet("ip_adapter", "IP-Adapter for SD3"));
    }
    if !request.controlnets.is_empty() && request.refiner.is_some() {
        return Err(RestError::not_yet("controlnets", "ControlNet with a refiner"));
    }
    if request.ip_adapter.is_some() && request.family == Family::Flux {
        return Err(RestError::not_yet("ip_adapter", "IP-Adapter for FLUX"));
    }
    if request.ip_adapter.is_some() && request.refiner.is_some() {
        return Err(RestError::not_yet("ip_adapter", "IP-Adapter with a refiner"));
    }
    let flux = request.family == Family::Flux;
    Ok(match request.mode {
        Mode::Text2Img if request.refiner.is_some() => "sdxl_refiner_text2img",
        Mode::Text2Img if flux => "flux_text2img",
        Mode::Text2Img => "sd_text2img",
        Mode::Img2Img if flux => "flux_img2img",
        Mode::Img2Img => "sd_img2img",
        Mode::Inpaint if flux => "flux_inpaint",
        Mode::Inpaint => "sd_inpaint",
        Mode::Outpaint if flux => "flux_outpaint",
        Mode::Outpaint => "sd_outpaint",
        Mode::Upscale => return Err(RestError::not_yet("mode", "The upscale mode (upscale models)")),
        Mode::ObjectRemove => {
            return Err(RestError::not_yet(
                "mode",
                "The object_remove mode (the Fooocus inpaint patch)",
            ))
        }
        Mode::Relight if request.family == Family::Sd15 => "sd_relight",
        Mode::Relight => {
            return Err(RestError::field(
                "family",
                "IC-Light relights with SD1.5 models: mode relight works with family sd15",
            ))
        }
    })
}

/// What a prompt is built from beyond the request: the resolved names and values.
pub struct Ingredients<'a> {
    /// The checkpoint when the request names no split files.
    pub checkpoint: Option<&'a str>,
    pub seed: u64,
    /// The stored input images, as LoadImage names them.
    pub image: Option<&'a str>,
    pub mask: Option<&'a str>,
    /// The styles to apply, in order.
    pub styles: &'a [Style],
    /// Saved images' `filename_prefix`.
    pub output_prefix: &'a str,
    /// Each ControlNet's image, as LoadImage names it.
    pub control_images: &'a [&'a str],
    /// The IP-Adapter's image prompts and negative ones, as LoadImage names them.
    pub ip_adapter_images: &'a [String],
    pub ip_adapter_negatives: &'a [String],
    /// For each ControlNet, whether it is a union ControlNet given an inpaint hint (its masked
    /// pixels are marked black rather than -1).
    pub union_inpaint_controls: &'a [bool],
    /// The Depth Anything V2 checkpoint `depth` ControlNets estimate depth with (the pack's name).
    pub depth_checkpoint: Option<&'a str>,
    /// The relight mode's light map and "fbc" background, as LoadImage names them.
    pub light_image: Option<&'a str>,
    pub background: Option<&'a str>,
}

/// A prompt built from a request, and which request field set each `(node, input)`.
pub struct BuiltPrompt {
    pub prompt: Json,
    /// `(node, input, field)`.
    fields: Vec<(Cow<'static, str>, &'static str, &'static str)>,
}

impl BuiltPrompt {
    /// Adds `node` to `nodes` under the next free id, its `inputs` set by request `field`;
    /// its id.
    fn add_node(
        &mut self,
        nodes: &mut Map<String, Json>,
        node: Json,
        field: &'static str,
        inputs: &[&'static str],
    ) -> String {
        let id = next_id(nodes);
        for input in inputs {
            self.fields.push((Cow::Owned(id.clone()), input, field));
        }
        nodes.insert(id.clone(), node);
        id
    }

    /// The request field behind a node's input, if a field set it.
    pub fn field_of(&self, node: &str, input: &str) -> Option<&'static str> {
        self.fields
            .iter()
            .find(|(id, name, _)| id == node && *name == input)
            .map(|(_, _, field)| *field)
    }
}

/// A bundled workflow ready to fill in: its nodes without their manifests, and what the
/// manifests said.
struct Template {
    nodes: Map<String, Json>,
    /// Each input a request field sets, in the order of the nodes.
    targets: Vec<Target>,
    /// The node whose manifest takes `model`.
    loader: Option<String>,
}

/// An input a request field sets.
struct Target {
    field: String,
    node: String,
    input: String,
}

impl Template {
    fn of(workflow: Json) -> Option<Template> {
        let Json::Object(mut nodes) = workflow else {
            return None;
        };
        let mut targets = Vec::new();
        let mut loader = None;
        for (id, node) in nodes.iter_mut() {
            let Some(Json::Object(manifest)) = node
                .get_mut("_meta")
                .and_then(|meta| meta.as_object_mut()?.remove("easel"))
            else {
                continue;
            };
            for (field, inputs) in manifest {
                if field == "model" {
                    loader = Some(id.clone());
                }
                let inputs = match inputs {
                    Json::String(one) => vec![one],
                    Json::Array(list) => list
                        .into_iter()
                        .filter_map(|input| input.as_str().map(str::to_string))
                        .collect(),
                    _ => Vec::new(),
                };
                targets.extend(inputs.into_iter().map(|input| Target {
                    field: field.clone(),
                    node: id.clone(),
                    input,
                }));
            }
        }
        Some(Template { nodes, targets, loader })
    }
}

/// The template of a bundled workflow (`workflows/rest/VERSION/NAME.json`), read once.
fn template(name: &str) -> Option<&'static Template> {
    static TEMPLATES: LazyLock<HashMap<String, Template>> = LazyLock::new(|| {
        let folder = format!("rest/{WORKFLOW_VERSION}/");
        crate::api::bundled_workflows()
            .filter_map(|(path, workflow)| {
                let name = path.strip_prefix(&folder)?.strip_suffix(".json")?;
                Some((name.to_string(), Template::of(workflow.clone())?))
            })
            .collect()
    });
    TEMPLATES.get(name)
}

/// Fills the bundled workflow `name` (from [`workflow_for`]) in from a request.
pub fn build(request: &GenerateRequest, name: &str, ingredients: &Ingredients<'_>) -> Result<BuiltPrompt, RestError> {
    let template =
        template(name).ok_or_else(|| RestError::invalid(None, format!("the bundled workflow {name} is missing")))?;
    let mut nodes = template.nodes.clone();
    let (mut prompt, mut negative) = (request.prompt.clone(), request.negative_prompt.clone());
    for style in ingredients.styles {
        (prompt, negative) = style.apply(&prompt, &negative);
    }
    let texts = Texts { prompt, negative };
    let mut built = BuiltPrompt {
        prompt: Json::Null,
        fields: Vec::with_capacity(template.targets.len()),
    };
    // The targets follow the nodes' order: one pass sets them all.
    let mut targets = template.targets.iter().peekable();
    for (id, node) in nodes.iter_mut() {
        while let Some(target) = targets.next_if(|target| target.node == *id) {
            let Some(value) = field_value(&target.field, &target.input, request, ingredients, &texts) else {
                continue;
            };
            let Some(inputs) = node.get_mut("inputs").and_then(Json::as_object_mut) else {
                continue;
            };
            match inputs.get_mut(&target.input) {
                Some(slot) => *slot = value,
                None => {
                    inputs.insert(target.input.clone(), value);
                }
            }
            built.fields.push((
                Cow::Borrowed(target.node.as_str()),
                target.input.as_str(),
                target.field.as_str(),
            ));
        }
    }
    let loader = template
        .loader
        .as_deref()
        .ok_or_else(|| RestError::invalid(None, "the bundled workflow has no model loader"))?;
    let (model, clip) = match &request.unet {
        Some(unet) => split_loaders(request, unet, loader, &mut nodes, &mut built)?,
        None => (json!([loader, 0]), json!([loader, 1])),
    };
    chain_loras(request, model, clip, &mut nodes, &mut built);
    chain_ip_adapter(request, ingredients, &mut nodes, &mut built);
    chain_controlnets(request, ingredients, &mut nodes, &mut built);
    chain_relight(request, ingredients, &mut nodes, &mut built);
    built.prompt = Json::Object(nodes);
    Ok(built)
}

/// The prompt texts, with the styles applied.
struct Texts {
    prompt: String,
    negative: String,
}

/// The value request field `field` gives `input`; `None` when the request leaves it to the
/// workflow.
fn field_value(
    field: &str,
    input: &str,
    request: &GenerateRequest,
    ingredients: &Ingredients<'_>,
    texts: &Texts,
) -> Option<Json> {
    let outpaint = request.outpaint;
    Some(match field {
        "model" => Json::from(ingredients.checkpoint?),
        "refiner" => Json::from(request.refiner.as_deref()?),
        "prompt" => Json::from(texts.prompt.as_str()),
        "negative_prompt" => Json::from(texts.negative.as_str()),
        "width" => Json::from(request.width),
        "height" => Json::from(request.height),
        "batch_size" => Json::from(request.batch_size),
        "steps" => Json::from(request.steps),
        "base_steps" => Json::from((f64::from(request.steps) * request.refine_switch).round() as u32),
        "cfg" => Json::from(request.cfg),
        "sampler" => Json::from(request.sampler.as_str()),
        "scheduler" => Json::from(request.scheduler.as_str()),
        "seed" => Json::from(ingredients.seed),
        "denoise" => Json::from(request.denoise),
        "image" => Json::from(ingredients.image?),
        "mask" => Json::from(ingredients.mask?),
        // Each side of the extension is an input of its own.
        "outpaint" => Json::from(match input {
            "left" => outpaint.left,
            "top" => outpaint.top,
            "right" => outpaint.right,
            "bottom" => outpaint.bottom,
            "feathering" => outpaint.feathering,
            _ => return None,
        }),
        "output" => Json::from(ingredients.output_prefix),
        "relight" => {
            let relight = request.relight.as_ref()?;
            let (width, height) = relight_size(request)?;
            match input {
                "model_path" => Json::from(relight.model.as_str()),
                "image" => Json::from(ingredients.light_image?),
                "width" => Json::from(width),
                "height" => Json::from(height),
                "min" => Json::from(relight.remap_min),
                "max" => Json::from(relight.remap_max),
                "blend_factor" => Json::from(relight.light_strength),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// The size the relight mode works at: the subject's, each side down to a multiple of 8.
fn relight_size(request: &GenerateRequest) -> Option<(u32, u32)> {
    let image = request.image.as_ref()?;
    let side = |length: u32| (length / 8).max(1) * 8;
    Some((side(image.width), side(image.height)))
}

/// The next free numeric node id.
fn next_id(nodes: &Map<String, Json>) -> String {
    let highest = nodes.keys().filter_map(|id| id.parse::<u64>().ok()).max().unwrap_or(0);
    (highest + 1).to_string()
}

/// Points every link to `from` at `to` (except in `skip`).
fn relink(nodes: &mut Map<String, Json>, from: &Json, to: &Json, skip: &str) {
    for (id, node) in nodes.iter_mut() {
        if id == skip {
            continue;
        }
        if let Some(inputs) = node["inputs"].as_object_mut() {
            for value in inputs.values_mut() {
                if value == from {
                    *value = to.clone();
                }
            }
        }
    }
}

/// Replaces the checkpoint loader by loaders of split files; the MODEL and CLIP links they give.
fn split_loaders(
    request: &GenerateRequest,
    unet: &str,
    loader: &str,
    nodes: &mut Map<String, Json>,
    built: &mut BuiltPrompt,
) -> Result<(Json, Json), RestError> {
    let gguf = |name: &str| name.to_ascii_lowercase().ends_with(".gguf");
    let unet_node = if gguf(unet) {
        json!({"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": unet}, "_meta": {"title": "Unet Loader (GGUF)"}})
    } else {
        json!({"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}, "_meta": {"title": "Load Diffusion Model"}})
    };
    let unet_id = built.add_node(nodes, unet_node, "unet", &["unet_name"]);
    let clip_node = match (request.family, request.clip.as_slice()) {
        (Family::Sd15, [one]) => {
            let class = if gguf(one) { "CLIPLoaderGGUF" } else { "CLIPLoader" };
            json!({"class_type": class, "inputs": {"clip_name": one, "type": "stable_diffusion", "device": "default"}, "_meta": {"title": "Load CLIP"}})
        }
        // SD3 runs with any of its three encoders, as ComfyUI's `sd3_clip` does.
        (Family::Sd3, [one]) => {
            let class = if gguf(one) { "CLIPLoaderGGUF" } else { "CLIPLoader" };
            json!({"class_type": class, "inputs": {"clip_name": one, "type": "sd3", "device": "default"}, "_meta": {"title": "Load CLIP"}})
        }
        (Family::Sd3, [first, second, third]) => {
            let class = if [first, second, third].iter().any(|name| gguf(name)) {
                "TripleCLIPLoaderGGUF"
            } else {
                "TripleCLIPLoader"
            };
            json!({"class_type": class, "inputs": {"clip_name1": first, "clip_name2": second, "clip_name3": third}, "_meta": {"title": "TripleCLIPLoader"}})
        }
        (Family::Sdxl | Family::Sd3 | Family::Flux, [first, second]) => {
            let any_gguf = gguf(first) || gguf(second);
            let kind = match request.family {
                Family::Flux => "flux",
                Family::Sd3 => "sd3",
                _ => "sdxl",
            };
            let mut inputs = json!({"clip_name1": first, "clip_name2": second, "type": kind});
            let class = if any_gguf {
                "DualCLIPLoaderGGUF"
            } else {
                inputs["device"] = json!("default");
                "DualCLIPLoader"
            };
            json!({"class_type": class, "inputs": inputs, "_meta": {"title": "DualCLIPLoader"}})
        }
        (family, _) => {
            let wanted = match family {
                Family::Sd15 => "one text encoder (CLIP-L)",
                Family::Flux => "two text encoders (CLIP-L and T5-XXL)",
                Family::Sd3 => "one to three text encoders (CLIP-L, CLIP-G, T5-XXL)",
                Family::Sdxl => "two text encoders (CLIP-L and CLIP-G)",
            };
            return Err(RestError::field(
                "clip",
                format!("family {} needs {wanted}", family.name()),
            ));
        }
    };
    let clip_id = built.add_node(
        nodes,
        clip_node,
        "clip",
        &["clip_name", "clip_name1", "clip_name2", "clip_name3"],
    );
    let vae = request.vae.as_deref().unwrap_or_default();
    let vae_id = built.add_node(
        nodes,
        json!({"class_type": "VAELoader", "inputs": {"vae_name": vae}, "_meta": {"title": "Load VAE"}}),
        "vae",
        &["vae_name"],
    );
    nodes.remove(loader);
    for (output, id) in [(0, &unet_id), (1, &clip_id), (2, &vae_id)] {
        relink(nodes, &json!([loader, output]), &json!([id, 0]), "");
    }
    Ok((json!([unet_id, 0]), json!([clip_id, 0])))
}

/// Puts the request's LoRAs, in order, between the model and text-encoder loaders and everything
/// that uses them.
fn chain_loras(
    request: &GenerateRequest,
    mut model: Json,
    mut clip: Json,
    nodes: &mut Map<String, Json>,
    built: &mut BuiltPrompt,
) {
    for lora in &request.loras {
        let node = json!({
            "class_type": "LoraLoader",
            "inputs": {
                "lora_name": lora.name, "strength_model": lora.strength_model,
                "strength_clip": lora.strength_clip, "model": model, "clip": clip,
            },
            "_meta": {"title": "Load LoRA"},
        });
        let id = built.add_node(nodes, node, "loras", &["lora_name", "strength_model", "strength_clip"]);
        let (lora_model, lora_clip) = (json!([id, 0]), json!([id, 1]));
        relink(nodes, &model, &lora_model, &id);
        relink(nodes, &clip, &lora_clip, &id);
        (model, clip) = (lora_model, lora_clip);
    }
}

/// Puts the request's IP-Adapter between the model and every sampler: its model and CLIP
/// vision encoder loaded, its images loaded and batched (ImageBatch), IPAdapterAdvanced applying
/// them to the model the sampler took.
fn chain_ip_adapter(
    request: &GenerateRequest,
    ingredients: &Ingredients<'_>,
    nodes: &mut Map<String, Json>,
    built: &mut BuiltPrompt,
) {
    const FIELD: &str = "ip_adapter";
    let Some(ip_adapter) = &request.ip_adapter else {
        return;
    };
    let samplers: Vec<String> = nodes
        .iter()
        .filter(|(_, node)| {
            ["KSampler", "KSamplerAdvanced"]
                .iter()
                .any(|class| node["class_type"] == *class)
        })
        .map(|(id, _)| id.clone())
        .collect();
    let loader = built.add_node(
        nodes,
        json!({"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": ip_adapter.model}, "_meta": {"title": "IPAdapter Model Loader"}}),
        FIELD,
        &["ipadapter_file"],
    );
    let encoder = built.add_node(
        nodes,
        json!({"class_type": "CLIPVisionLoader", "inputs": {"clip_name": ip_adapter.clip_vision}, "_meta": {"title": "Load CLIP Vision"}}),
        FIELD,
        &["clip_name"],
    );
    // The images loaded and joined into one batch, in order.
    let mut batched = |names: &[String], title: &str| -> Option<Json> {
        let mut batch: Option<Json> = None;
        for name in names {
            let loaded = built.add_node(
                nodes,
                json!({"class_type": "LoadImage", "inputs": {"image": name}, "_meta": {"title": title}}),
                FIELD,
                &["image"],
            );
            batch = Some(match batch {
                None => json!([loaded, 0]),
                Some(previous) => {
                    let joined = json!({"class_type": "ImageBatch", "inputs": {"image1": previous, "image2": [loaded, 0]}, "_meta": {"title": "Batch Images"}});
                    json!([built.add_node(nodes, joined, FIELD, &[]), 0])
                }
            });
        }
        batch
    };
    let Some(images) = batched(ingredients.ip_adapter_images, "Load Image (image prompt)") else {
        return;
    };
    let negative = batched(ingredients.ip_adapter_negatives, "Load Image (negative image prompt)");
    for sampler in samplers {
        let mut apply = json!({
            "class_type": "IPAdapterAdvanced",
            "inputs": {
                "model": nodes[&sampler]["inputs"]["model"].clone(), "ipadapter": [loader, 0], "image": images.clone(),
                "weight": ip_adapter.weight, "weight_type": ip_adapter.weight_type,
                "combine_embeds": ip_adapter.combine_embeds, "start_at": ip_adapter.start_at,
                "end_at": ip_adapter.end_at, "embeds_scaling": ip_adapter.embeds_scaling,
                "clip_vision": [encoder, 0],
            },
            "_meta": {"title": "IPAdapter Advanced"},
        });
        if let Some(negative) = &negative {
            apply["inputs"]["image_negative"] = negative.clone();
        }
        let settings = [
            "weight",
            "weight_type",
            "combine_embeds",
            "start_at",
            "end_at",
            "embeds_scaling",
        ];
        let applied = built.add_node(nodes, apply, FIELD, &settings);
        nodes[&sampler]["inputs"]["model"] = json!([applied, 0]);
    }
}

/// The resolution (shorter side) of the depth maps `depth` ControlNets get: the pack's default;
/// ControlNetApplyAdvanced resizes them to the latent's size.
const DEPTH_RESOLUTION: u32 = 512;

/// Puts the request's ControlNets, in order, between the prompts and every sampler that takes
/// them: for each, its image loaded (and turned into Canny edges for `canny`, a depth map for
/// `depth`, marked with the request's mask for `inpaint`), its model loaded and applied to both
/// prompts (ControlNetApplyAdvanced, given the workflow's VAE), after the ControlNets before it.
fn chain_controlnets(
    request: &GenerateRequest,
    ingredients: &Ingredients<'_>,
    nodes: &mut Map<String, Json>,
    built: &mut BuiltPrompt,
) {
    const SAMPLERS: [&str; 2] = ["KSampler", "KSamplerAdvanced"];
    const FIELD: &str = "controlnets";
    let samplers: Vec<String> = nodes
        .iter()
        .filter(|(_, node)| SAMPLERS.iter().any(|class| node["class_type"] == *class))
        .map(|(id, _)| id.clone())
        .collect();
    let vae = nodes
        .values()
        .find(|node| node["class_type"] == "VAEDecode")
        .map(|node| node["inputs"]["vae"].clone());
    for sampler in samplers {
        let (mut positive, mut negative) = (
            nodes[&sampler]["inputs"]["positive"].clone(),
            nodes[&sampler]["inputs"]["negative"].clone(),
        );
        let controls = request.controlnets.iter().zip(ingredients.control_images).enumerate();
        for (index, (control, image)) in controls {
            let union_inpaint = ingredients.union_inpaint_controls.get(index).copied().unwrap_or(false);
            let loaded = built.add_node(
                nodes,
                json!({"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": "Load Image (control)"}}),
                FIELD,
                &["image"],
            );
            let hint = match control.kind {
                ControlKind::Canny => {
                    let canny = json!({
                        "class_type": "Canny",
                        "inputs": {"image": [loaded, 0], "low_threshold": 0.4, "high_threshold": 0.8},
                        "_meta": {"title": "Canny"},
                    });
                    json!([built.add_node(nodes, canny, FIELD, &[]), 0])
                }
                ControlKind::Inpaint => {
                    let mask = json!({
                        "class_type": "LoadImageMask",
                        "inputs": {"image": ingredients.mask, "channel": "red"},
                        "_meta": {"title": "Load Image (as Mask)"},
                    });
                    let mask = built.add_node(nodes, mask, "mask", &["image"]);
                    let marked = json!({
                        "class_type": "InpaintPreprocessor",
                        "inputs": {"image": [loaded, 0], "mask": [mask, 0], "black_pixel_for_xinsir_cn": union_inpaint},
                        "_meta": {"title": "Inpaint Preprocessor"},
                    });
                    json!([built.add_node(nodes, marked, FIELD, &[]), 0])
                }
                ControlKind::Depth => {
                    let depth = json!({
                        "class_type": "DepthAnythingV2Preprocessor",
                        "inputs": {"image": [loaded, 0], "ckpt_name": ingredients.depth_checkpoint, "resolution": DEPTH_RESOLUTION},
                        "_meta": {"title": "Depth Anything V2 - Relative"},
                    });
                    json!([built.add_node(nodes, depth, FIELD, &[]), 0])
                }
                ControlKind::Plain => json!([loaded, 0]),
            };
            let mut loader = built.add_node(
                nodes,
                json!({"class_type": "ControlNetLoader", "inputs": {"control_net_name": control.model}, "_meta": {"title": "Load ControlNet Model"}}),
                FIELD,
                &["control_net_name"],
            );
            // A union ControlNet is told which control its image is (other models ignore it).
            if let Some(union_type) = control.kind.union_type() {
                let typed = json!({
                    "class_type": "SetUnionControlNetType",
                    "inputs": {"control_net": [loader, 0], "type": union_type},
                    "_meta": {"title": "SetUnionControlNetType"},
                });
                loader = built.add_node(nodes, typed, FIELD, &[]);
            }
            let mut apply = json!({
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {
                    "positive": positive, "negative": negative, "control_net": [loader, 0], "image": hint,
                    "strength": control.strength, "start_percent": control.start_percent,
                    "end_percent": control.end_percent,
                },
                "_meta": {"title": "Apply ControlNet"},
            });
            // ControlNets that take latents encode their image with the workflow's VAE.
            if let Some(vae) = &vae {
                apply["inputs"]["vae"] = vae.clone();
            }
            let applied = built.add_node(nodes, apply, FIELD, &["strength", "start_percent", "end_percent"]);
            (positive, negative) = (json!([applied, 0]), json!([applied, 1]));
        }
        let inputs = &mut nodes[&sampler]["inputs"];
        inputs["positive"] = positive;
        inputs["negative"] = negative;
    }
}

/// What the relight workflow leaves to the request: the "fbc" background (loaded, scaled and
/// encoded for ICLightConditioning), the subject's mask (greying the background out when it is
/// not kept, and pasting the relit subject onto the original or the repainted background), and
/// the colour blends (WAS Node Suite's Image Blending Mode) that carry the subject's own colours
/// back onto the relit picture.
fn chain_relight(
    request: &GenerateRequest,
    ingredients: &Ingredients<'_>,
    nodes: &mut Map<String, Json>,
    built: &mut BuiltPrompt,
) {
    const FIELD: &str = "relight";
    let (Some(relight), Some((width, height))) = (&request.relight, relight_size(request)) else {
        return;
    };
    let find = |class: &str, title: Option<&str>| {
        nodes
            .iter()
            .find(|(_, node)| node["class_type"] == class && title.is_none_or(|title| node["_meta"]["title"] == title))
            .map(|(id, _)| id.clone())
    };
    let (Some(subject), Some(conditioning), Some(decode), Some(save)) = (
        find("ImageScale", Some("Upscale Image (subject)")),
        find("ICLightConditioning", None),
        find("VAEDecode", None),
        find("SaveImage", None),
    ) else {
        return;
    };
    let vae = nodes[&decode]["inputs"]["vae"].clone();
    let subject = json!([subject, 0]);
    let relit = json!([decode, 0]);
    // Loaded and scaled to the working size (cropping the centre, as the subject is).
    let scaled = |nodes: &mut Map<String, Json>, built: &mut BuiltPrompt, image: Json, title: &str| {
        let scale = json!({
            "class_type": "ImageScale",
            "inputs": {"image": image, "upscale_method": "lanczos", "width": width, "height": height, "crop": "center"},
            "_meta": {"title": title},
        });
        json!([built.add_node(nodes, scale, FIELD, &[]), 0])
    };
    if let Some(background) = ingredients.background {
        let loaded = json!({"class_type": "LoadImage", "inputs": {"image": background}, "_meta": {"title": "Load Image (background)"}});
        let loaded = built.add_node(nodes, loaded, FIELD, &["image"]);
        let scaled = scaled(nodes, built, json!([loaded, 0]), "Upscale Image (background)");
        let encode = json!({"class_type": "VAEEncode", "inputs": {"pixels": scaled, "vae": vae}, "_meta": {"title": "VAE Encode (background)"}});
        let encoded = built.add_node(nodes, encode, FIELD, &[]);
        nodes[&conditioning]["inputs"]["opt_background"] = json!([encoded, 0]);
    }
    let mask = ingredients.mask.map(|mask| {
        let loaded = json!({"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}, "_meta": {"title": "Load Image (as Mask)"}});
        let loaded = built.add_node(nodes, loaded, "mask", &["image"]);
        let as_image = json!({"class_type": "MaskToImage", "inputs": {"mask": [loaded, 0]}, "_meta": {"title": "Convert Mask to Image"}});
        let as_image = built.add_node(nodes, as_image, FIELD, &[]);
        let scaled = scaled(nodes, built, json!([as_image, 0]), "Upscale Image (mask)");
        let as_mask = json!({"class_type": "ImageToMask", "inputs": {"image": scaled, "channel": "red"}, "_meta": {"title": "Convert Image to Mask"}});
        json!([built.add_node(nodes, as_mask, FIELD, &[]), 0])
    });
    // A new background: the model sees the subject on IC-Light's neutral grey.
    if let (false, Some(mask)) = (relight.keep_background, &mask) {
        let grey = json!({
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": 0x7F7F7F},
            "_meta": {"title": "EmptyImage (grey)"},
        });
        let grey = built.add_node(nodes, grey, FIELD, &[]);
        let cut_out = json!({
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": [grey, 0], "source": subject.clone(), "x": 0, "y": 0, "resize_source": false, "mask": mask.clone()},
            "_meta": {"title": "ImageCompositeMasked (subject on grey)"},
        });
        let cut_out = built.add_node(nodes, cut_out, FIELD, &[]);
        relink(nodes, &subject, &json!([cut_out, 0]), &cut_out);
    }
    let mut picture = relit.clone();
    for (mode, percentage) in &relight.blends {
        let blend = json!({
            "class_type": "Image Blending Mode",
            "inputs": {"image_a": picture, "image_b": subject.clone(), "mode": mode, "blend_percentage": percentage},
            "_meta": {"title": "Image Blending Mode"},
        });
        picture = json!([built.add_node(nodes, blend, FIELD, &["mode", "blend_percentage"]), 0]);
    }
    if let Some(mask) = mask {
        // The relit subject pasted onto the original background, or onto the repainted one.
        let mut destination = if relight.keep_background { subject } else { relit };
        if relight.keep_background && request.batch_size > 1 {
            let repeat = json!({
                "class_type": "RepeatImageBatch",
                "inputs": {"image": destination, "amount": request.batch_size},
                "_meta": {"title": "RepeatImageBatch"},
            });
            destination = json!([built.add_node(nodes, repeat, "batch_size", &["amount"]), 0]);
        }
        let paste = json!({
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": destination, "source": picture, "x": 0, "y": 0, "resize_source": false, "mask": mask},
            "_meta": {"title": "ImageCompositeMasked (relit subject)"},
        });
        picture = json!([built.add_node(nodes, paste, FIELD, &[]), 0]);
    }
    nodes[&save]["inputs"]["images"] = picture;
}
