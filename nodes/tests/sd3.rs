//! SD3 and SD3.5: the MMDiT against its formulas in f64, its configuration read from the
//! weights, SD3's text conditioning (CLIP-L ⧺ CLIP-G padded to 4096, T5 appended; pooled
//! CLIP-L ⧺ CLIP-G) as ComfyUI's `SD3ClipModel` makes it, one flow step through the nodes, LoRA
//! in kohya's and diffusers' names, and GGUF.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::reference::{
    add_gated, assert_close_to_reference, modulate, rms_norm, sinusoid, softmax_attention, values, values64, wave,
    FileWeights, Rows,
};
use common::{fixture_json, floats, j, max_abs_difference, one_euler_step, setup, sizes, Setup};
use easel_engine::Value;
use easel_models::architectures::dit_patches::{CallInfo, DitBlock, DitPatchedCall};
use easel_models::architectures::mmdit::{Mmdit, MmditConfig, MmditInput};
use easel_models::sampling::noise::prepare_noise;
use easel_models::testmodels::{
    mmdit_layout, tiny_clip_l, tiny_mmdit, tiny_mmdit_35, tiny_sd3_clip_g, write_checkpoint, TINY_SD35, TINY_SD35_Q8_0,
    TINY_SD3_CHECKPOINT, TINY_SD3_CLIP_G, TINY_SD3_CLIP_L, TINY_SD3_T5, TINY_SD3_VAE,
};
use easel_models::weights::{MappedWeights, SafetensorsFile, Weights};
use easel_nodes::conditioning::{CondEntry, Conditioning};
use easel_nodes::model::clip::Clip;
use easel_nodes::model::diffusion_model::{DiffusionNetwork, Model};
use easel_nodes::model::skip_layer_guidance::skipping;
use serde_json::json;

/// The inputs of the formula tests: a 16×3×5 latent (odd sides: padded), 3 text tokens of
/// 4096, the timestep 700 (σ 0.7).
struct Inputs {
    x: Tensor,
    context: Tensor,
    y: Tensor,
    timesteps: Tensor,
}

fn inputs(config: &MmditConfig) -> Inputs {
    Inputs {
        x: wave(&[1, 16, 3, 5], 0.71),
        context: wave(&[1, 3, 4096], 0.37),
        y: wave(&[1, config.adm_in_channels.unwrap()], 0.53),
        timesteps: Tensor::new(&[700f32], &Device::Cpu).unwrap(),
    }
}

fn load(file: Arc<dyn MappedWeights>) -> Mmdit {
    let config = MmditConfig::infer(file.as_ref(), "").unwrap();
    Mmdit::new(config, Weights::from_file(file, DType::F32, &Device::Cpu)).unwrap()
}

/// The model's prediction for `inputs`, with the block replacements of `patches` if any.
fn predict(mmdit: &Mmdit, inputs: &Inputs, patches: Option<DitPatchedCall>) -> Tensor {
    mmdit
        .forward(&MmditInput {
            x: &inputs.x,
            timesteps: &inputs.timesteps,
            context: &inputs.context,
            y: Some(&inputs.y),
            control: &[],
            patches,
        })
        .unwrap()
}

fn write_tiny_mmdit(dir: &std::path::Path, config: &MmditConfig) -> std::path::PathBuf {
    let path = dir.join("tiny_mmdit.safetensors");
    write_checkpoint(&path, &mmdit_layout(config, "").unwrap()).unwrap();
    path
}

/// Stability's MMDiT forward pass written out in f64 loops over the weights of a file.
struct Reference<'a> {
    weights: FileWeights<'a>,
    config: MmditConfig,
}

impl Reference<'_> {
    fn mlp(&self, x: &[f64], name: &str) -> Vec<f64> {
        self.weights.mlp(x, &format!("{name}.0"), &format!("{name}.2"))
    }

    /// Queries, keys or values (`part`) of every token per head, RMS-normalised by `norm`'s
    /// weight where the model has query/key norms.
    fn heads(&self, qkv: &Rows, part: usize, norm: Option<String>) -> Vec<Rows> {
        let hidden = 64 * self.config.depth;
        let scale = norm
            .filter(|_| self.config.qk_norm)
            .map(|name| self.weights.tensor(&name));
        (0..self.config.depth)
            .map(|h| {
                qkv.iter()
                    .map(|row| {
                        let x = &row[part * hidden + h * 64..part * hidden + (h + 1) * 64];
                        match &scale {
                            Some(scale) => rms_norm(x, scale),
                            None => x.to_vec(),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Queries, keys and values of the attention `attention` of `tokens` modulated by `shift`
    /// and `scale`.
    fn project(&self, tokens: &Rows, shift: &[f64], scale: &[f64], attention: &str) -> [Vec<Rows>; 3] {
        let qkv = self
            .weights
            .linear(&modulate(tokens, shift, scale), &format!("{attention}.qkv"));
        [
            self.heads(&qkv, 0, Some(format!("{attention}.ln_q.weight"))),
            self.heads(&qkv, 1, Some(format!("{attention}.ln_k.weight"))),
            self.heads(&qkv, 2, None),
        ]
    }

    /// The prediction, joint block `skip` passed over where given.
    fn forward(&self, inputs: &Inputs, skip: Option<usize>) -> Vec<f64> {
        let x = values64(&inputs.x);
        let (channels, height, width) = (16, 3, 5);
        // Padded circularly: row 3 is row 0, column 5 column 0.
        let latent = |c: usize, r: usize, col: usize| x[(c * height + r % height) * width + col % width];
        let (rows, cols) = (2, 3);
        let patches: Rows = (0..rows * cols)
            .map(|p| {
                let (r, col) = (p / cols, p % cols);
                (0..channels * 4)
                    .map(|f| latent(f / 4, 2 * r + (f % 4) / 2, 2 * col + f % 2))
                    .collect()
            })
            .collect();
        let hidden = 64 * self.config.depth;
        let max = self.config.pos_embed_max_size;
        let (top, left) = ((max - rows) / 2, (max - cols) / 2);
        let positions = self.weights.tensor("pos_embed");
        let mut img = self.weights.linear(&patches, "x_embedder.proj");
        for (p, token) in img.iter_mut().enumerate() {
            let cell = (top + p / cols) * max + left + p % cols;
            for (v, position) in token.iter_mut().zip(&positions[cell * hidden..(cell + 1) * hidden]) {
                *v += position;
            }
        }
        let t = f64::from(values(&inputs.timesteps)[0]);
        let c: Vec<f64> = self
            .mlp(&sinusoid(t), "t_embedder.mlp")
            .iter()
            .zip(self.mlp(&values64(&inputs.y), "y_embedder.mlp"))
            .map(|(a, b)| a + b)
            .collect();
        let context: Rows = values64(&inputs.context).chunks(4096).map(<[f64]>::to_vec).collect();
        let mut txt = self.weights.linear(&context, "context_embedder");
        for n in (0..self.config.blocks).filter(|&n| Some(n) != skip) {
            let last = n + 1 == self.config.blocks;
            let second = self.config.x_block_self_attention.contains(&n);
            let (context_block, x_block) = (
                format!("joint_blocks.{n}.context_block"),
                format!("joint_blocks.{n}.x_block"),
            );
            let ctx_mod = self.weights.modulation(
                &c,
                &format!("{context_block}.adaLN_modulation.1"),
                if last { 2 } else { 6 },
            );
            let x_mod =
                self.weights
                    .modulation(&c, &format!("{x_block}.adaLN_modulation.1"), if second { 9 } else { 6 });
            let [ctx_q, ctx_k, ctx_v] = self.project(&txt, &ctx_mod[0], &ctx_mod[1], &format!("{context_block}.attn"));
            let [x_q, x_k, x_v] = self.project(&img, &x_mod[0], &x_mod[1], &format!("{x_block}.attn"));
            let joined = |a: Vec<Rows>, b: Vec<Rows>| -> Vec<Rows> {
                a.into_iter()
                    .zip(b)
                    .map(|(a, b)| a.into_iter().chain(b).collect())
                    .collect()
            };
            let attention = softmax_attention(&joined(ctx_q, x_q), &joined(ctx_k, x_k), &joined(ctx_v, x_v));
            let (txt_attention, img_attention) = attention.split_at(txt.len());
            let projected = self
                .weights
                .linear(&img_attention.to_vec(), &format!("{x_block}.attn.proj"));
            let mut new_img = img.clone();
            add_gated(&mut new_img, &projected, &x_mod[2]);
            if second {
                let [q, k, v] = self.project(&img, &x_mod[6], &x_mod[7], &format!("{x_block}.attn2"));
                let out = self
                    .weights
                    .linear(&softmax_attention(&q, &k, &v), &format!("{x_block}.attn2.proj"));
                add_gated(&mut new_img, &out, &x_mod[8]);
            }
            self.weights.add_gated_mlp(
                &mut new_img,
                &x_mod,
                &format!("{x_block}.mlp.fc1"),
                &format!("{x_block}.mlp.fc2"),
            );
            if !last {
                let projected = self
                    .weights
                    .linear(&txt_attention.to_vec(), &format!("{context_block}.attn.proj"));
                add_gated(&mut txt, &projected, &ctx_mod[2]);
                self.weights.add_gated_mlp(
                    &mut txt,
                    &ctx_mod,
                    &format!("{context_block}.mlp.fc1"),
                    &format!("{context_block}.mlp.fc2"),
                );
            }
            img = new_img;
        }
        let final_mod = self.weights.modulation(&c, "final_layer.adaLN_modulation.1", 2);
        let out = self
            .weights
            .linear(&modulate(&img, &final_mod[0], &final_mod[1]), "final_layer.linear");
        let mut result = vec![0.0; channels * height * width];
        for (p, features) in out.iter().enumerate() {
            let (r, col) = (p / cols, p % cols);
            // Each patch's features are (patch row, patch column, channel).
            for (f, value) in features.iter().enumerate() {
                let (row, column, c) = (2 * r + f / (2 * channels), 2 * col + (f / channels) % 2, f % channels);
                if row < height && column < width {
                    result[(c * height + row) * width + column] = *value;
                }
            }
        }
        result
    }
}

#[test]
fn mmdit_config_is_inferred_from_the_weights() {
    for config in [tiny_mmdit(), tiny_mmdit_35()] {
        let dir = tempfile::tempdir().unwrap();
        let file = SafetensorsFile::open(&write_tiny_mmdit(dir.path(), &config)).unwrap();
        assert_eq!(MmditConfig::infer(&file, "").unwrap(), config);
    }
}

/// SD3 medium's layout (the last text block only attends) and SD3.5 medium's (query/key RMS
/// norms, a second self-attention in the first image block) against the formulas.
#[test]
fn mmdit_forward_matches_the_formulas_written_out() {
    for config in [tiny_mmdit(), tiny_mmdit_35()] {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(SafetensorsFile::open(&write_tiny_mmdit(dir.path(), &config)).unwrap());
        let inputs = inputs(&config);
        let ours = predict(&load(file.clone()), &inputs, None);
        assert_eq!(ours.dims(), &[1, 16, 3, 5]);
        let expected = Reference {
            weights: FileWeights(&file),
            config,
        }
        .forward(&inputs, None);
        assert_close_to_reference(&ours, &expected);
    }
}

/// SkipLayerGuidanceSD3's patch on joint block 0 (ComfyUI's `("double_block", 0)` replacement
/// returning its inputs) passes the block's image and text tokens through.
#[test]
fn a_skipped_joint_block_passes_its_tokens_through() {
    let config = tiny_mmdit_35();
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(SafetensorsFile::open(&write_tiny_mmdit(dir.path(), &config)).unwrap());
    let inputs = inputs(&config);
    let skipping = skipping(&[DitBlock::Double(0)]);
    let info = CallInfo {
        original_shape: [1, 16, 3, 5],
        sigma: 0.7,
        parts: Vec::new(),
    };
    let patches = DitPatchedCall {
        patches: &skipping.dit,
        info: &info,
    };
    let ours = predict(&load(file.clone()), &inputs, Some(patches));
    let expected = Reference {
        weights: FileWeights(&file),
        config,
    }
    .forward(&inputs, Some(0));
    assert_close_to_reference(&ours, &expected);
}

/// A node's single output.
fn output(setup: &Setup, class: &str, inputs: Vec<(&str, Value)>) -> Value {
    setup.call(class, inputs).unwrap().remove(0)
}

fn checkpoint(setup: &Setup) -> Vec<Value> {
    setup
        .call(
            "CheckpointLoaderSimple",
            vec![("ckpt_name", j(json!(TINY_SD3_CHECKPOINT)))],
        )
        .unwrap()
}

/// The one entry of a conditioning value.
fn entry(value: &Value) -> CondEntry {
    value.downcast::<Conditioning>().unwrap().0[0].clone()
}

fn encode(setup: &Setup, clip: &Value, text: &str) -> CondEntry {
    entry(&output(
        setup,
        "CLIPTextEncode",
        vec![("clip", clip.clone()), ("text", j(json!(text)))],
    ))
}

/// A CLIP of `clip`'s family with only its encoders at `keep`.
fn only(clip: &Value, keep: &[usize]) -> Value {
    let clip = clip.downcast::<Clip>().unwrap();
    let encoders = keep.iter().map(|&index| clip.encoders[index].clone()).collect();
    Value::object(Clip {
        encoders,
        ..clip.clone()
    })
}

/// The checkpoint's CLIP gives ComfyUI's SD3 conditioning: CLIP-L's and CLIP-G's penultimate
/// hidden states side by side (64 + 96 channels of the tiny ones), zeros up to 4096, then T5's
/// 77 tokens; the pooled vector is CLIP-L's (unprojected) then CLIP-G's (projected). Each part
/// equals that encoder's own conditioning; missing encoders leave zeros where ComfyUI does.
#[test]
fn sd3_conditioning_joins_the_three_encoders_as_comfyui_does() {
    let setup = setup();
    let clip = checkpoint(&setup).remove(1);
    let full = encode(&setup, &clip, "a red fox");
    let (l_width, g_width) = (tiny_clip_l().hidden_size, tiny_sd3_clip_g().hidden_size);
    assert_eq!(full.cross_attention.dims(), &[1, 154, 4096]);
    assert_eq!(full.pooled.as_ref().unwrap().dims(), &[1, l_width + g_width]);
    let clip_part = full.cross_attention.narrow(1, 0, 77).unwrap();
    let padding = clip_part
        .narrow(2, l_width + g_width, 4096 - l_width - g_width)
        .unwrap();
    assert_eq!(
        padding.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );

    let alone = |keep: &[usize]| encode(&setup, &only(&clip, keep), "a red fox");
    let (l, g, t5) = (alone(&[0]), alone(&[1]), alone(&[2]));
    let narrow = |t: &Tensor, dim, start, len| t.narrow(dim, start, len).unwrap();
    // CLIP-L alone: its states then zeros; its pooled vector then CLIP-G's zeros (1280).
    assert_eq!(l.cross_attention.dims(), &[1, 77, 4096]);
    assert_eq!(
        max_abs_difference(
            &narrow(&clip_part, 2, 0, l_width),
            &narrow(&l.cross_attention, 2, 0, l_width)
        ),
        0.0
    );
    assert_eq!(l.pooled.as_ref().unwrap().dims(), &[1, l_width + 1280]);
    // CLIP-G alone sits after CLIP-L's 768 channels.
    assert_eq!(
        max_abs_difference(
            &narrow(&clip_part, 2, l_width, g_width),
            &narrow(&g.cross_attention, 2, 768, g_width)
        ),
        0.0
    );
    assert_eq!(
        narrow(&g.cross_attention, 2, 0, 768)
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let pooled = full.pooled.as_ref().unwrap();
    assert_eq!(
        max_abs_difference(
            &narrow(pooled, 1, l_width, g_width),
            &narrow(g.pooled.as_ref().unwrap(), 1, 768, g_width)
        ),
        0.0
    );
    // T5 alone: its 77 tokens (padded to SD3's minimum) and the zero pooled vector of CLIP-L
    // and CLIP-G as ComfyUI sizes them (768 + 1280).
    assert_eq!(t5.cross_attention.dims(), &[1, 77, 4096]);
    assert_eq!(
        max_abs_difference(&narrow(&full.cross_attention, 1, 77, 77), &t5.cross_attention),
        0.0
    );
    assert_eq!(t5.pooled.as_ref().unwrap().dims(), &[1, 2048]);
}

/// CLIPTextEncodeSD3: an empty prompt without padding is left out (T5 encodes its end token
/// alone; both CLIP prompts empty leave the CLIP part and the pooled vector out), with padding
/// it is the empty prompt's.
#[test]
fn clip_text_encode_sd3_leaves_out_empty_prompts_without_padding() {
    let setup = setup();
    let clip = checkpoint(&setup).remove(1);
    let encode_sd3 = |l: &str, g: &str, t5: &str, padding: &str| {
        entry(&output(
            &setup,
            "CLIPTextEncodeSD3",
            vec![
                ("clip", clip.clone()),
                ("clip_l", j(json!(l))),
                ("clip_g", j(json!(g))),
                ("t5xxl", j(json!(t5))),
                ("empty_padding", j(json!(padding))),
            ],
        ))
    };
    let nothing = encode_sd3("", "", "", "none");
    assert_eq!(nothing.cross_attention.dims(), &[1, 1, 4096]);
    // Zeros as wide as the encoders' pooled vectors (ComfyUI's 768 + 1280 for the real ones).
    let pooled = nothing.pooled.as_ref().unwrap();
    assert_eq!(pooled.dims(), &[1, 64 + 96]);
    assert_eq!(
        pooled.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
    assert_eq!(
        encode_sd3("", "", "", "empty_prompt").cross_attention.dims(),
        &[1, 154, 4096]
    );
    // CLIP prompts without T5's: the CLIP part and T5's end token.
    let clip_only = encode_sd3("a fox", "a fox", "", "none");
    assert_eq!(clip_only.cross_attention.dims(), &[1, 78, 4096]);
    // The same text in every slot is what CLIPTextEncode gives.
    let same = encode_sd3("a fox", "a fox", "a fox", "none");
    let plain = encode(&setup, &clip, "a fox");
    assert_eq!(max_abs_difference(&same.cross_attention, &plain.cross_attention), 0.0);
}

/// CLIPTextEncodeSD3 on the tiny checkpoint's CLIP against ComfyUI's `CLIPTextEncodeSD3` and
/// `SD3ClipModel` on the same weights (`fixtures/generate_sd3_conditioning.py`): the shapes
/// (CLIP's chunks evened out, T5's tokens appended, empty prompts left out or padded), the
/// pooled vector, every token's norm and the channels at the encoders' seams. With nothing
/// encoded ComfyUI's zero pooled vector is 768 + 1280 wide, the real encoders' widths; Easel's
/// is as wide as the CLIP's own encoders.
#[test]
fn clip_text_encode_sd3_matches_comfyui() {
    let setup = setup();
    let clip = checkpoint(&setup).remove(1);
    let fixture = fixture_json("sd3_conditioning.json");
    let channels = sizes(&fixture["channels"]);
    let close = |ours: f32, theirs: f32, what: &str| {
        assert!(
            (ours - theirs).abs() <= 1e-4 * theirs.abs().max(1.0),
            "{what}: {ours} vs ComfyUI's {theirs}"
        );
    };
    for case in fixture["cases"].as_array().unwrap() {
        let text = |key: &str| case[key].as_str().unwrap();
        let ours = entry(&output(
            &setup,
            "CLIPTextEncodeSD3",
            vec![
                ("clip", clip.clone()),
                ("clip_l", j(json!(text("clip_l")))),
                ("clip_g", j(json!(text("clip_g")))),
                ("t5xxl", j(json!(text("t5xxl")))),
                ("empty_padding", j(json!(text("empty_padding")))),
            ],
        ));
        let label = format!(
            "{:?}",
            [text("clip_l"), text("clip_g"), text("t5xxl"), text("empty_padding")]
        );
        let hidden = ours.cross_attention.squeeze(0).unwrap();
        assert_eq!(hidden.dims(), &sizes(&case["shape"])[..], "{label}");
        let pooled = values(ours.pooled.as_ref().unwrap());
        let theirs = floats(&case["pooled"]);
        if theirs.iter().all(|&v| v == 0.0) {
            assert!(pooled.iter().all(|&v| v == 0.0), "{label}: a zero pooled vector");
        } else {
            assert_eq!(pooled.len(), theirs.len(), "{label}");
            for (ours, theirs) in pooled.iter().zip(&theirs) {
                close(*ours, *theirs, &format!("{label} pooled"));
            }
        }
        let norms = values(&hidden.sqr().unwrap().sum(1).unwrap().sqrt().unwrap());
        for (ours, theirs) in norms.iter().zip(floats(&case["token_norms"])) {
            close(*ours, theirs, &format!("{label} token norm"));
        }
        let hidden = hidden.to_vec2::<f32>().unwrap();
        for (token, theirs) in case["channels"].as_array().unwrap().iter().enumerate() {
            for (&channel, theirs) in channels.iter().zip(floats(theirs)) {
                close(
                    hidden[token][channel],
                    theirs,
                    &format!("{label} token {token} channel {channel}"),
                );
            }
        }
    }
}

/// KSampler's one Euler step on the tiny SD3 (σ 1 → 0, cfg 1): the denoised latent is
/// noise − velocity at timestep 1000, out of model space as x/1.5305 + 0.0609.
#[test]
fn one_flow_step_through_the_nodes_follows_comfyui() {
    let setup = setup();
    let outputs = checkpoint(&setup);
    let (model, clip) = (&outputs[0], &outputs[1]);
    let positive = output(
        &setup,
        "CLIPTextEncode",
        vec![("clip", clip.clone()), ("text", j(json!("a fox")))],
    );
    let latent = output(
        &setup,
        "EmptySD3LatentImage",
        vec![
            ("width", j(json!(64))),
            ("height", j(json!(48))),
            ("batch_size", j(json!(1))),
        ],
    );
    let sampled = one_euler_step(&setup, model, &positive, &positive, &latent, 1.0);
    let entry = entry(&positive);
    let shape = [1, 16, 6, 8];
    let noise = Tensor::from_vec(prepare_noise(7, &shape, None), &shape[..], &Device::Cpu).unwrap();
    let network = model.downcast::<Model>().unwrap();
    let DiffusionNetwork::Mmdit(mmdit) = &network.0.network else {
        panic!("an MMDiT");
    };
    let velocity = mmdit
        .forward(&MmditInput {
            x: &noise,
            timesteps: &Tensor::new(&[1000f32], &Device::Cpu).unwrap(),
            context: &entry.cross_attention,
            y: entry.pooled.as_ref(),
            control: &[],
            patches: None,
        })
        .unwrap();
    let expected = (((&noise - &velocity).unwrap() / 1.5305).unwrap() + 0.0609).unwrap();
    assert!(max_abs_difference(&sampled, &expected) < 1e-4);
}

/// The split files (UNETLoader's SD3.5, TripleCLIPLoader in any order, VAELoader) load, and
/// the SD3.5 MMDiT as GGUF Q8_0 predicts close to its safetensors.
#[test]
fn split_sd35_files_and_gguf_load() {
    let setup = setup();
    let names = [TINY_SD3_T5, TINY_SD3_CLIP_L, TINY_SD3_CLIP_G];
    let clip = output(
        &setup,
        "TripleCLIPLoader",
        vec![
            ("clip_name1", j(json!(names[0]))),
            ("clip_name2", j(json!(names[1]))),
            ("clip_name3", j(json!(names[2]))),
        ],
    );
    let split = encode(&setup, &clip, "a red fox");
    let whole = encode(&setup, &checkpoint(&setup)[1], "a red fox");
    assert_eq!(max_abs_difference(&split.cross_attention, &whole.cross_attention), 0.0);
    let dual = output(
        &setup,
        "DualCLIPLoader",
        vec![
            ("clip_name1", j(json!(TINY_SD3_T5))),
            ("clip_name2", j(json!(TINY_SD3_CLIP_L))),
            ("type", j(json!("sd3"))),
        ],
    );
    // CLIP-L and T5: CLIP-G's pooled part is 1280 zeros.
    assert_eq!(
        encode(&setup, &dual, "a red fox").pooled.unwrap().dims(),
        &[1, 64 + 1280]
    );
    output(&setup, "VAELoader", vec![("vae_name", j(json!(TINY_SD3_VAE)))]);

    let predict_with = |class: &str, name: &str| -> Tensor {
        let mut loader_inputs = vec![("unet_name", j(json!(name)))];
        if class == "UNETLoader" {
            loader_inputs.push(("weight_dtype", j(json!("default"))));
        }
        let model = output(&setup, class, loader_inputs);
        let model = model.downcast::<Model>().unwrap();
        let DiffusionNetwork::Mmdit(mmdit) = &model.0.network else {
            panic!("an MMDiT");
        };
        assert!(mmdit.config().qk_norm && mmdit.config().x_block_self_attention == [0]);
        predict(mmdit, &inputs(mmdit.config()), None)
    };
    let dense = predict_with("UNETLoader", TINY_SD35);
    let quantized = predict_with("UnetLoaderGGUF", TINY_SD35_Q8_0);
    let scale = dense.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_abs_difference(&dense, &quantized) < 0.02 * scale);
}

/// A rank-2 LoRA on joint block 0's image query, key and value, written in kohya's names (one
/// fused matrix) and in diffusers' (`to_q`, `to_k`, `to_v` separately) changes the model the
/// same way, and changes it.
#[test]
fn sd3_lora_in_kohya_and_diffusers_names_patch_the_same_weights() {
    let setup = setup();
    let model = checkpoint(&setup).remove(0);
    let hidden = 64 * tiny_mmdit().depth;
    let rank = 2;
    let down = wave(&[rank, hidden], 0.11);
    let up = wave(&[3 * hidden, rank], 0.23);
    let loras = setup
        .services
        .get::<easel_nodes::paths::Paths>()
        .unwrap()
        .models
        .join("loras");
    let write = |name: &str, tensors: Vec<(String, Tensor)>| {
        let tensors: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&tensors, loras.join(name)).unwrap();
    };
    write(
        "sd3_kohya.safetensors",
        vec![
            (
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight".into(),
                down.clone(),
            ),
            (
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight".into(),
                up.clone(),
            ),
        ],
    );
    let mut diffusers = Vec::new();
    for (index, part) in ["to_q", "to_k", "to_v"].into_iter().enumerate() {
        let name = format!("transformer.transformer_blocks.0.attn.{part}");
        diffusers.push((format!("{name}.lora_A.weight"), down.clone()));
        diffusers.push((
            format!("{name}.lora_B.weight"),
            up.narrow(0, index * hidden, hidden).unwrap(),
        ));
    }
    write("sd3_diffusers.safetensors", diffusers);
    let patched = |name: &str| {
        let model = output(
            &setup,
            "LoraLoaderModelOnly",
            vec![
                ("model", model.clone()),
                ("lora_name", j(json!(name))),
                ("strength_model", j(json!(1.0))),
            ],
        );
        let model = model.downcast::<Model>().unwrap();
        let DiffusionNetwork::Mmdit(mmdit) = &model.0.network else {
            panic!("an MMDiT");
        };
        predict(mmdit, &inputs(mmdit.config()), None)
    };
    let kohya = patched("sd3_kohya.safetensors");
    let diffusers = patched("sd3_diffusers.safetensors");
    let DiffusionNetwork::Mmdit(base) = &model.downcast::<Model>().unwrap().0.network else {
        panic!("an MMDiT");
    };
    let unpatched = predict(base, &inputs(base.config()), None);
    assert!(max_abs_difference(&kohya, &unpatched) > 1e-4);
    assert!(max_abs_difference(&kohya, &diffusers) < 1e-6);
}
