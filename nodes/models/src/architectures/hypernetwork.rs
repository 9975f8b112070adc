//! Hypernetworks (A1111's, as ComfyUI's `load_hypernetwork_patch` applies them in
//! `comfy_extras/nodes_hypernetwork.py`): for some attention widths, two small MLPs that change
//! an attention's key and value inputs, `k ← k + strength·mlp₀(k)`, `v ← v + strength·mlp₁(v)`,
//! wherever the key input is that wide (self-attention and cross-attention alike).
//!
//! Each MLP is its `.weight` tensors in order: a linear layer, then (unless the activation is
//! `linear`, and for the last layer only with `activate_output`) the activation, then with
//! `is_layer_norm` a layer norm (the next `.weight`). Dropout is left out: it is off at
//! inference (ComfyUI leaves its modules in training mode, so its dropout is random).
//!
//! The file is safetensors with the A1111 state dict flattened, `<width>.<0 key | 1 value>.<layer>`
//! (`768.0.linear.0.weight`), and the options as metadata (`activation_func`, `is_layer_norm`,
//! `activate_output`). Pickled `.pt` hypernetworks need a pickle reader that builds nested
//! objects, which Easel does not have yet.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;

use super::unet_patches::{AttentionInputs, AttentionKind, AttentionSite, UNetPatch};

/// Why a hypernetwork could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HypernetworkError {
    #[error(
        "this is a pickled PyTorch hypernetwork; Easel reads pickled hypernetworks once its safe pickle \
         reader arrives (issue 26): use a .safetensors hypernetwork"
    )]
    Pickled,
    #[error("not a safetensors hypernetwork: {0}")]
    Format(String),
    #[error("hypernetwork layer '{0}' has a weight but no bias")]
    MissingBias(String),
    #[error("hypernetwork layer '{name}' has shape {shape:?}, which does not fit its place")]
    Shape { name: String, shape: Vec<usize> },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The activations ComfyUI accepts (`swish` is PyTorch's Hardswish there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Linear,
    Relu,
    LeakyRelu,
    Elu,
    Hardswish,
    Tanh,
    Sigmoid,
    Softsign,
    Mish,
}

impl Activation {
    /// The activation of an `activation_func` name; `None` for one ComfyUI does not know.
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "linear" => Activation::Linear,
            "relu" => Activation::Relu,
            "leakyrelu" => Activation::LeakyRelu,
            "elu" => Activation::Elu,
            "swish" => Activation::Hardswish,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "softsign" => Activation::Softsign,
            "mish" => Activation::Mish,
            _ => return None,
        })
    }

    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Linear => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(x, 0.01),
            Activation::Elu => x.elu(1.0),
            // x·relu6(x + 3)/6
            Activation::Hardswish => (x * (x + 3.0)?.clamp(0f32, 6f32)?)? / 6.0,
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(x),
            Activation::Softsign => x / (x.abs()? + 1.0)?,
            // x·tanh(softplus(x)), softplus(x) = x above 20 (PyTorch's threshold).
            Activation::Mish => {
                let softplus = (x.exp()? + 1.0)?.log()?;
                let softplus = x.gt(20f32)?.where_cond(x, &softplus)?;
                x * softplus.tanh()?
            }
        }
    }
}

/// One layer of a hypernetwork MLP.
enum Layer {
    Linear(candle_nn::Linear),
    Activation(Activation),
    Norm(candle_nn::LayerNorm),
}

/// One MLP: its layers in order.
struct Mlp(Vec<Layer>);

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Linear(linear) => linear.forward(&h)?,
                Layer::Activation(activation) => activation.forward(&h)?,
                Layer::Norm(norm) => norm.forward(&h)?,
            };
        }
        Ok(h)
    }
}

/// The options of a hypernetwork (A1111's `activation_func`, `is_layer_norm`,
/// `activate_output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypernetworkOptions {
    pub activation: Activation,
    pub layer_norm: bool,
    pub activate_output: bool,
}

/// A hypernetwork at a strength: for each width it has, the key and value MLPs.
pub struct Hypernetwork {
    by_width: BTreeMap<usize, [Mlp; 2]>,
    strength: f64,
}

/// A layer name's numbers compared as numbers (`linear.10` after `linear.9`).
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(number) => (number, String::new()),
            Err(_) => (u64::MAX, part.to_string()),
        })
        .collect()
}

impl Hypernetwork {
    /// The options a safetensors hypernetwork's metadata gives (ComfyUI's defaults for those it
    /// does not); for an activation ComfyUI does not know, its name as the error.
    pub fn options(
        metadata: Option<&std::collections::HashMap<String, String>>,
    ) -> Result<HypernetworkOptions, String> {
        let get = |key: &str| {
            metadata
                .and_then(|metadata| metadata.get(key))
                .map(|value| value.as_str())
        };
        let flag = |key: &str| matches!(get(key), Some("true" | "True" | "1"));
        let name = get("activation_func").unwrap_or("linear");
        let activation = Activation::from_name(name).ok_or_else(|| name.to_string())?;
        Ok(HypernetworkOptions {
            activation,
            layer_norm: flag("is_layer_norm"),
            activate_output: flag("activate_output"),
        })
    }

    /// The hypernetwork in the safetensors `bytes`, with its options, at `strength`.
    pub fn from_safetensors(
        bytes: &[u8],
        options: HypernetworkOptions,
        strength: f64,
    ) -> Result<Hypernetwork, HypernetworkError> {
        let file = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|error| HypernetworkError::Format(error.to_string()))?;
        let load = |name: &str| -> Result<Tensor, HypernetworkError> {
            let view = file
                .tensor(name)
                .map_err(|error| HypernetworkError::Format(error.to_string()))?;
            let tensor = Tensor::from_raw_buffer(
                view.data(),
                safetensors_dtype(view.dtype())?,
                view.shape(),
                &Device::Cpu,
            )?;
            Ok(tensor.to_dtype(DType::F32)?)
        };
        // Width → MLP index → its `.weight` layer names.
        let mut layers: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
        for name in file.names() {
            let mut parts = name.splitn(3, '.');
            let (Some(width), Some(which), Some(layer)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(width), Ok(which @ (0 | 1))) = (width.parse::<usize>(), which.parse::<usize>()) else {
                continue;
            };
            if let Some(layer) = layer.strip_suffix(".weight") {
                layers.entry((width, which)).or_default().push(layer.to_string());
            }
        }
        let mut built: BTreeMap<usize, [Option<Mlp>; 2]> = BTreeMap::new();
        for ((width, which), mut names) in layers {
            names.sort_by_key(|name| natural_key(name));
            let mut mlp = Vec::new();
            let mut index = 0;
            while index < names.len() {
                // As ComfyUI counts: with layer norms, the last linear layer is not the last name.
                let last = index + 1 == names.len();
                let (weight, bias) = Self::parameters(&load, width, which, &names[index])?;
                if weight.rank() != 2 {
                    return Err(HypernetworkError::Shape {
                        name: format!("{width}.{which}.{}.weight", names[index]),
                        shape: weight.dims().to_vec(),
                    });
                }
                mlp.push(Layer::Linear(candle_nn::Linear::new(weight, Some(bias))));
                if options.activation != Activation::Linear && (!last || options.activate_output) {
                    mlp.push(Layer::Activation(options.activation));
                }
                if options.layer_norm {
                    index += 1;
                    let Some(norm) = names.get(index) else {
                        return Err(HypernetworkError::Format(format!(
                            "MLP {width}.{which} ends without the layer norm after its last linear layer"
                        )));
                    };
                    let (weight, bias) = Self::parameters(&load, width, which, norm)?;
                    mlp.push(Layer::Norm(candle_nn::LayerNorm::new(weight, bias, 1e-5)));
                }
                index += 1;
            }
            built.entry(width).or_default()[which] = Some(Mlp(mlp));
        }
        let by_width = built
            .into_iter()
            .filter_map(|(width, [key, value])| Some((width, [key?, value?])))
            .collect();
        Ok(Hypernetwork { by_width, strength })
    }

    fn parameters(
        load: &impl Fn(&str) -> Result<Tensor, HypernetworkError>,
        width: usize,
        which: usize,
        layer: &str,
    ) -> Result<(Tensor, Tensor), HypernetworkError> {
        let stem = format!("{width}.{which}.{layer}");
        let weight = load(&format!("{stem}.weight"))?;
        let bias = load(&format!("{stem}.bias")).map_err(|_| HypernetworkError::MissingBias(stem))?;
        Ok((weight, bias))
    }

    /// The widths this hypernetwork changes attentions of.
    pub fn widths(&self) -> Vec<usize> {
        self.by_width.keys().copied().collect()
    }

    /// `(q, k, v)` patched: k and v changed by the MLPs of k's width, if it has them.
    pub fn patch(&self, inputs: AttentionInputs) -> candle_core::Result<AttentionInputs> {
        let width = inputs.context.dim(candle_core::D::Minus1)?;
        let Some([key, value]) = self.by_width.get(&width) else {
            return Ok(inputs);
        };
        let change = |mlp: &Mlp, x: &Tensor| -> candle_core::Result<Tensor> {
            let dtype = x.dtype();
            let x = x.to_dtype(DType::F32)?;
            (&x + (mlp.forward(&x)? * self.strength)?)?.to_dtype(dtype)
        };
        Ok(AttentionInputs {
            context: change(key, &inputs.context)?,
            value: change(value, &inputs.value)?,
            query: inputs.query,
        })
    }
}

fn safetensors_dtype(dtype: safetensors::Dtype) -> Result<DType, HypernetworkError> {
    Ok(match dtype {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        other => return Err(HypernetworkError::Format(format!("tensors of type {other:?}"))),
    })
}

/// Whether `bytes` look like a pickled PyTorch file (a zip archive, or a bare pickle).
pub fn is_pickled(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.first() == Some(&0x80)
}

impl UNetPatch for Hypernetwork {
    fn attention_inputs(
        &self,
        _kind: AttentionKind,
        _site: &AttentionSite,
        inputs: AttentionInputs,
    ) -> candle_core::Result<AttentionInputs> {
        self.patch(inputs)
    }
}
