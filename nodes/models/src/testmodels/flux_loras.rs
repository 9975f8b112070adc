//! Tiny FLUX LoRAs (in `loras/`) for the tiny FLUX model: one set of weight changes written in
//! each naming people ship — kohya's over BFL's names (with an alpha), diffusers' PEFT names
//! (query, key and value apart, the single blocks' MLP input apart, the final modulation's
//! halves in diffusers' order) and XLabs' attention processors (the layers that format has) —
//! so that each must patch the same weights by the same amounts; and a control LoRA in BFL's
//! format (`flux1-depth-dev-lora`'s), which widens the model's input layer to take a control
//! image's latent beside the noise.

use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype as FileDtype;

use super::{flux_layout, half_bytes, tiny_flux, write_safetensors, TINY_LORA_ALPHA, TINY_LORA_RANK};
use crate::sampling::noise::CpuGenerator;

pub const TINY_FLUX_LORA_KOHYA: &str = "easel_tiny_flux_lora_kohya.safetensors";
pub const TINY_FLUX_LORA_DIFFUSERS: &str = "easel_tiny_flux_lora_diffusers.safetensors";
pub const TINY_FLUX_LORA_XLABS: &str = "easel_tiny_flux_lora_xlabs.safetensors";
/// BFL's control LoRA format: `img_in` widened from 64 to 128 input channels (with a bias
/// difference as `lora_B.bias`), the first double block's image qkv, and the first single
/// block's query and key norm scales set outright.
pub const TINY_FLUX_CONTROL_LORA: &str = "easel_tiny_flux_depth_dev_lora.safetensors";

/// The matrices the tiny FLUX LoRAs patch (BFL's names, without `.weight`), and whether XLabs'
/// format reaches them.
pub const TINY_FLUX_LORA_LAYERS: [(&str, bool); 5] = [
    ("double_blocks.0.img_attn.qkv", true),
    ("double_blocks.0.txt_attn.proj", true),
    ("double_blocks.0.img_mlp.0", false),
    ("single_blocks.0.linear1", false),
    ("final_layer.adaLN_modulation.1", false),
];

/// One layer's factors: up [rows, rank] and down [rank, cols], row-major, already multiplied
/// by alpha/rank where the file has no alpha.
struct Factors {
    up: Vec<f32>,
    down: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Factors {
    /// Up's rows `start..start + count`.
    fn up_rows(&self, start: usize, count: usize) -> Vec<f32> {
        self.up[start * TINY_LORA_RANK..(start + count) * TINY_LORA_RANK].to_vec()
    }
}

/// A file's tensors: (name, dtype, shape, bytes).
type Tensors = Vec<(String, FileDtype, Vec<usize>, Vec<u8>)>;

fn push_factors(tensors: &mut Tensors, (up_name, down_name): (String, String), up: &[f32], down: &[f32], cols: usize) {
    let rows = up.len() / TINY_LORA_RANK;
    tensors.push((
        up_name,
        FileDtype::F16,
        vec![rows, TINY_LORA_RANK],
        half_bytes(up.iter().copied()),
    ));
    tensors.push((
        down_name,
        FileDtype::F16,
        vec![TINY_LORA_RANK, cols],
        half_bytes(down.iter().copied()),
    ));
}

/// Writes the three tiny FLUX LoRAs into `loras`; their paths.
pub(super) fn write_flux_loras(loras: &Path) -> std::io::Result<Vec<PathBuf>> {
    let config = tiny_flux();
    let layout = flux_layout(&config, "").map_err(std::io::Error::other)?;
    let mut generator = CpuGenerator::new(11);
    let mut layers = Vec::new();
    for (layer, _) in TINY_FLUX_LORA_LAYERS {
        let weight = format!("{layer}.weight");
        let spec = layout
            .iter()
            .find(|spec| spec.name == weight)
            .ok_or_else(|| std::io::Error::other(format!("the tiny FLUX has no '{weight}'")))?;
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        // f16 values, so that the halved copies below stay exact.
        let mut draw = |count: usize| -> Vec<f32> {
            let values = generator.randn(count).into_iter().map(|v| v * 0.25);
            values.map(|v| half::f16::from_f32(v).to_f32()).collect()
        };
        let (up, down) = (draw(rows * TINY_LORA_RANK), draw(TINY_LORA_RANK * cols));
        layers.push((layer, Factors { up, down, rows, cols }));
    }
    let hidden = config.hidden_size;
    // The files without an alpha carry alpha/rank in their up factors.
    let scale = TINY_LORA_ALPHA / TINY_LORA_RANK as f32;
    let scaled = |values: Vec<f32>| -> Vec<f32> { values.into_iter().map(|v| v * scale).collect() };

    let mut kohya: Tensors = Vec::new();
    for (layer, factors) in &layers {
        let name = format!("lora_unet_{}", layer.replace('.', "_"));
        let names = (format!("{name}.lora_up.weight"), format!("{name}.lora_down.weight"));
        push_factors(&mut kohya, names, &factors.up, &factors.down, factors.cols);
        kohya.push((
            format!("{name}.alpha"),
            FileDtype::F32,
            vec![],
            TINY_LORA_ALPHA.to_le_bytes().to_vec(),
        ));
    }

    let mut diffusers: Tensors = Vec::new();
    let peft = |name: &str| {
        (
            format!("transformer.{name}.lora_B.weight"),
            format!("transformer.{name}.lora_A.weight"),
        )
    };
    for (layer, factors) in &layers {
        let parts: Vec<(String, Vec<f32>)> = match *layer {
            "double_blocks.0.img_attn.qkv" => ["to_q", "to_k", "to_v"]
                .iter()
                .enumerate()
                .map(|(index, part)| {
                    let rows = factors.up_rows(index * hidden, hidden);
                    (format!("transformer_blocks.0.attn.{part}"), rows)
                })
                .collect(),
            "single_blocks.0.linear1" => {
                let mut parts: Vec<(String, Vec<f32>)> = ["to_q", "to_k", "to_v"]
                    .iter()
                    .enumerate()
                    .map(|(index, part)| {
                        let rows = factors.up_rows(index * hidden, hidden);
                        (format!("single_transformer_blocks.0.attn.{part}"), rows)
                    })
                    .collect();
                let mlp = factors.up_rows(3 * hidden, factors.rows - 3 * hidden);
                parts.push(("single_transformer_blocks.0.proj_mlp".into(), mlp));
                parts
            }
            "double_blocks.0.txt_attn.proj" => {
                vec![("transformer_blocks.0.attn.to_add_out".into(), factors.up.clone())]
            }
            "double_blocks.0.img_mlp.0" => vec![("transformer_blocks.0.ff.net.0.proj".into(), factors.up.clone())],
            // diffusers holds scale then shift: its rows are BFL's halves swapped.
            _ => {
                let half = factors.rows / 2;
                let mut swapped = factors.up_rows(half, factors.rows - half);
                swapped.extend(factors.up_rows(0, half));
                vec![("norm_out.linear".into(), swapped)]
            }
        };
        for (name, up) in parts {
            push_factors(&mut diffusers, peft(&name), &scaled(up), &factors.down, factors.cols);
        }
    }

    let mut xlabs: Tensors = Vec::new();
    for (layer, factors) in layers.iter().filter(|(layer, _)| {
        TINY_FLUX_LORA_LAYERS
            .iter()
            .any(|(name, in_xlabs)| name == layer && *in_xlabs)
    }) {
        let processor = match *layer {
            "double_blocks.0.img_attn.qkv" => "double_blocks.0.processor.qkv_lora1",
            _ => "double_blocks.0.processor.proj_lora2",
        };
        let names = (format!("{processor}.up.weight"), format!("{processor}.down.weight"));
        push_factors(
            &mut xlabs,
            names,
            &scaled(factors.up.clone()),
            &factors.down,
            factors.cols,
        );
    }

    let mut control: Tensors = Vec::new();
    let mut draw = |count: usize| -> Vec<f32> { generator.randn(count).into_iter().map(|v| v * 0.25).collect() };
    let hidden_size = config.hidden_size;
    for (name, rows, cols) in [
        ("img_in", hidden_size, 2 * config.in_channels),
        ("double_blocks.0.img_attn.qkv", 3 * hidden_size, hidden_size),
    ] {
        let (up, down) = (draw(rows * TINY_LORA_RANK), draw(TINY_LORA_RANK * cols));
        let names = (format!("{name}.lora_B.weight"), format!("{name}.lora_A.weight"));
        push_factors(&mut control, names, &up, &down, cols);
    }
    let bias = draw(hidden_size);
    control.push((
        "img_in.lora_B.bias".into(),
        FileDtype::F16,
        vec![hidden_size],
        half_bytes(bias.into_iter()),
    ));
    let head = hidden_size / config.heads;
    for norm in ["key_norm", "query_norm"] {
        let scale = draw(head).into_iter().map(|v| 1.0 + v);
        control.push((
            format!("single_blocks.0.norm.{norm}.scale"),
            FileDtype::F16,
            vec![head],
            half_bytes(scale),
        ));
    }

    let mut written = Vec::new();
    for (name, tensors) in [
        (TINY_FLUX_LORA_KOHYA, kohya),
        (TINY_FLUX_LORA_DIFFUSERS, diffusers),
        (TINY_FLUX_LORA_XLABS, xlabs),
        (TINY_FLUX_CONTROL_LORA, control),
    ] {
        let path = loras.join(name);
        write_safetensors(&path, &tensors, None)?;
        written.push(path);
    }
    Ok(written)
}
