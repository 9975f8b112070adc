//! Hooks (scheduled LoRA): the keyframe nodes build ComfyUI's keyframes and follow them through
//! sampling step by step as ComfyUI does (`hooks.json`, from ComfyUI's own code by
//! `generate_hooks.py`), CLIP schedules split sampling where ComfyUI splits it, and on the tiny
//! SD1 model a hooked conditioning samples as the LoRA (or checkpoint) applied at each step's
//! strength does; default entries fill what the others leave; SetClipHooks encodes as the LoRA on
//! the text encoder does.

mod common;

use candle_core::Tensor;
use common::{fixture_json, flat, j, rewrite_f16_file, sd1_inputs, setup, Setup};
use easel_engine::Value;
use easel_models::sampling::schedule::SigmaSchedule;
use easel_models::testmodels::{TINY_SD1_CHECKPOINT, TINY_SD1_LORA};
use easel_nodes::conditioning::Conditioning;
use easel_nodes::hooks::keyframes::{clip_schedule, HookKeyframes, KeyframeCursor};
use easel_nodes::hooks::HookGroup;
use easel_nodes::latent::Latent;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};

/// The keyframes the fixture's node calls make, through Easel's nodes.
fn build_keyframes(setup: &Setup, calls: &Json) -> HookKeyframes {
    let mut previous: Option<Value> = None;
    for call in calls.as_array().unwrap() {
        let node = call["node"].as_str().unwrap();
        let mut inputs: Vec<(&str, Value)> = call["inputs"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, value)| (name.as_str(), j(value.clone())))
            .collect();
        if node != "CreateHookKeyframe" {
            inputs.push(("print_keyframes", j(json!(false))));
        }
        if let Some(previous) = previous.take() {
            inputs.push(("prev_hook_kf", previous));
        }
        previous = Some(setup.call(node, inputs).unwrap()[0].clone());
    }
    previous.unwrap().downcast::<HookKeyframes>().unwrap().clone()
}

#[test]
fn keyframes_follow_sampling_as_comfyui_moves_through_them() {
    let setup = setup();
    let fixture = fixture_json("hooks.json");
    let schedule = SigmaSchedule::sd_discrete();
    for group in fixture["keyframe_groups"].as_array().unwrap() {
        let name = group["name"].as_str().unwrap();
        let keyframes = build_keyframes(&setup, &group["calls"]);
        let expected = group["keyframes"].as_array().unwrap();
        assert_eq!(keyframes.keyframes().len(), expected.len(), "{name}");
        for (got, want) in keyframes.keyframes().iter().zip(expected) {
            assert!(
                (got.strength - want["strength"].as_f64().unwrap()).abs() < 1e-6,
                "{name}: {got:?}"
            );
            assert_eq!(got.start_percent, want["start_percent"].as_f64().unwrap(), "{name}");
            assert_eq!(
                u64::from(got.guarantee_steps),
                want["guarantee_steps"].as_u64().unwrap(),
                "{name}"
            );
        }
        for run in group["runs"].as_array().unwrap() {
            let sigmas: Vec<f32> = run["sigmas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_f64().unwrap() as f32)
                .collect();
            let max_sigma = sigmas.iter().copied().fold(f32::MIN, f32::max);
            let mut cursor = KeyframeCursor::new(&keyframes, &schedule);
            let strengths: Vec<f64> = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|sigma| {
                    cursor.advance(&keyframes, *sigma, max_sigma);
                    cursor.strength(&keyframes)
                })
                .collect();
            let want: Vec<f64> = run["strengths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_f64().unwrap())
                .collect();
            assert_eq!(strengths.len(), want.len());
            for (step, (got, want)) in strengths.iter().zip(&want).enumerate() {
                assert!((got - want).abs() < 1e-6, "{name} {run}: step {step}: {got} != {want}");
            }
        }
    }
}

#[test]
fn clip_schedules_split_sampling_where_comfyui_splits_it() {
    let setup = setup();
    let fixture = fixture_json("hooks.json");
    let groups = fixture["keyframe_groups"].as_array().unwrap();
    for case in fixture["clip_schedules"].as_array().unwrap() {
        let mut keyframes: Vec<HookKeyframes> = case["keyframes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| {
                let group = groups.iter().find(|group| group["name"] == *name).unwrap();
                build_keyframes(&setup, &group["calls"])
            })
            .collect();
        keyframes.push(HookKeyframes::default());
        let schedule = clip_schedule(&keyframes.iter().collect::<Vec<_>>());
        let expected = case["ranges"].as_array().unwrap();
        assert_eq!(schedule.len(), expected.len(), "{case}");
        for ((range, strengths), want) in schedule.iter().zip(expected) {
            assert!((range.0 - want["range"][0].as_f64().unwrap()).abs() < 1e-12, "{case}");
            assert!((range.1 - want["range"][1].as_f64().unwrap()).abs() < 1e-12, "{case}");
            for (got, want) in strengths.iter().zip(want["strengths"].as_array().unwrap()) {
                match (got, want.as_f64()) {
                    (None, None) => {}
                    (Some(got), Some(want)) => assert!((got.strength - want).abs() < 1e-6, "{case}"),
                    other => panic!("{case}: {other:?}"),
                }
            }
        }
    }
}

fn call(setup: &Setup, node: &str, inputs: Vec<(&str, Value)>) -> Vec<Value> {
    setup.call(node, inputs).unwrap()
}

/// A model-only LoRA hook at `strength`, switching from keyframe strength 1 to 0.25 halfway.
fn switching_lora_hook(setup: &Setup, strength: f64) -> Value {
    let hooks = call(
        setup,
        "CreateHookLoraModelOnly",
        vec![
            ("lora_name", j(json!(TINY_SD1_LORA))),
            ("strength_model", j(json!(strength))),
        ],
    );
    let first = call(
        setup,
        "CreateHookKeyframe",
        vec![("strength_mult", j(json!(1.0))), ("start_percent", j(json!(0.0)))],
    );
    let second = call(
        setup,
        "CreateHookKeyframe",
        vec![
            ("strength_mult", j(json!(0.25))),
            ("start_percent", j(json!(0.5))),
            ("prev_hook_kf", first[0].clone()),
        ],
    );
    call(
        setup,
        "SetHookKeyframes",
        vec![("hooks", hooks[0].clone()), ("hook_kf", second[0].clone())],
    )[0]
    .clone()
}

/// Both conditionings with `hooks` (PairConditioningSetProperties).
fn hooked_pair(setup: &Setup, positive: &Value, negative: &Value, hooks: &Value) -> (Value, Value) {
    let out = call(
        setup,
        "PairConditioningSetProperties",
        vec![
            ("positive_NEW", positive.clone()),
            ("negative_NEW", negative.clone()),
            ("strength", j(json!(1.0))),
            ("set_cond_area", j(json!("default"))),
            ("hooks", hooks.clone()),
        ],
    );
    (out[0].clone(), out[1].clone())
}

/// KSamplerAdvanced (euler, normal, cfg 4, seed 3) over steps `start..end` of 10.
#[allow(clippy::too_many_arguments)]
fn advanced(
    setup: &Setup,
    model: &Value,
    positive: &Value,
    negative: &Value,
    latent: &Value,
    (start, end): (u32, u32),
    add_noise: bool,
    leftover: bool,
) -> Value {
    let switch = |on: bool| j(json!(if on { "enable" } else { "disable" }));
    call(
        setup,
        "KSamplerAdvanced",
        vec![
            ("model", model.clone()),
            ("add_noise", switch(add_noise)),
            ("noise_seed", j(json!(3))),
            ("steps", j(json!(10))),
            ("cfg", j(json!(4.0))),
            ("sampler_name", j(json!("euler"))),
            ("scheduler", j(json!("normal"))),
            ("positive", positive.clone()),
            ("negative", negative.clone()),
            ("latent_image", latent.clone()),
            ("start_at_step", j(json!(start))),
            ("end_at_step", j(json!(end))),
            ("return_with_leftover_noise", switch(leftover)),
        ],
    )[0]
    .clone()
}

fn samples(latent: &Value) -> Tensor {
    latent.downcast::<Latent>().unwrap().samples.clone()
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn lora_model(setup: &Setup, model: &Value, strength: f64) -> Value {
    call(
        setup,
        "LoraLoaderModelOnly",
        vec![
            ("model", model.clone()),
            ("lora_name", j(json!(TINY_SD1_LORA))),
            ("strength_model", j(json!(strength))),
        ],
    )[0]
    .clone()
}

/// The hook's strength is 0.8 for the first half of 10 normal steps (ComfyUI's fixture puts the
/// switch at step 5) and 0.8·0.25 after: sampling equals sampling the first five steps with the
/// LoRA at 0.8 and the rest with it at 0.2.
#[test]
fn a_scheduled_lora_hook_samples_each_step_at_its_keyframes_strength() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let model = &loaded[0];
    let hooks = switching_lora_hook(&setup, 0.8);
    let (hooked_positive, hooked_negative) = hooked_pair(&setup, &positive, &negative, &hooks);
    let hooked = advanced(
        &setup,
        model,
        &hooked_positive,
        &hooked_negative,
        &latent,
        (0, 10),
        true,
        false,
    );

    let strong = lora_model(&setup, model, 0.8);
    let weak = lora_model(&setup, model, 0.2);
    let first = advanced(&setup, &strong, &positive, &negative, &latent, (0, 5), true, true);
    let staged = advanced(&setup, &weak, &positive, &negative, &first, (5, 10), false, false);
    let difference = max_difference(&samples(&hooked), &samples(&staged));
    assert!(
        difference < 1e-4,
        "scheduled hook differs from staged LoRA by {difference}"
    );

    let constant = advanced(&setup, &strong, &positive, &negative, &latent, (0, 10), true, false);
    let unscheduled = max_difference(&samples(&hooked), &samples(&constant));
    assert!(unscheduled > 1e-3, "the schedule changed nothing ({unscheduled})");

    // Hooks on the positive side only: the negative side samples with the model as it is.
    let only_positive = advanced(
        &setup,
        model,
        &hooked_positive,
        &negative,
        &latent,
        (0, 10),
        true,
        false,
    );
    assert!(max_difference(&samples(&only_positive), &samples(&hooked)) > 1e-4);
}

/// A copy of the tiny checkpoint with every weight changed, as `name` in the checkpoints folder.
fn altered_checkpoint(setup: &Setup, name: &str) {
    let folder = setup.services.get::<Paths>().unwrap().models.join("checkpoints");
    rewrite_f16_file(
        &folder.join(TINY_SD1_CHECKPOINT),
        &folder.join(name),
        safetensors::Dtype::F16,
        |value, bytes| bytes.extend(half::f16::from_f32(value * 0.8 + 0.01).to_le_bytes()),
    );
}

/// CreateHookModelAsLora at strength 1 turns the model into the other checkpoint: sampling with
/// the hook equals sampling the other checkpoint.
#[test]
fn a_checkpoint_hook_at_full_strength_samples_as_that_checkpoint() {
    let setup = setup();
    altered_checkpoint(&setup, "altered.safetensors");
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let hooks = call(
        &setup,
        "CreateHookModelAsLoraModelOnly",
        vec![
            ("ckpt_name", j(json!("altered.safetensors"))),
            ("strength_model", j(json!(1.0))),
        ],
    );
    let (hooked_positive, hooked_negative) = hooked_pair(&setup, &positive, &negative, &hooks[0]);
    let hooked = advanced(
        &setup,
        &loaded[0],
        &hooked_positive,
        &hooked_negative,
        &latent,
        (0, 4),
        true,
        false,
    );
    let other = call(
        &setup,
        "CheckpointLoaderSimple",
        vec![("ckpt_name", j(json!("altered.safetensors")))],
    );
    let direct = advanced(&setup, &other[0], &positive, &negative, &latent, (0, 4), true, false);
    let difference = max_difference(&samples(&hooked), &samples(&direct));
    assert!(
        difference < 1e-3,
        "checkpoint hook differs from the checkpoint by {difference}"
    );
    let base = advanced(&setup, &loaded[0], &positive, &negative, &latent, (0, 4), true, false);
    assert!(max_difference(&samples(&base), &samples(&direct)) > 1e-2);
}

/// A default entry predicts where the masked entry leaves weight: the same as giving it the
/// complementary mask.
#[test]
fn default_conditioning_fills_what_the_other_entries_leave() {
    let setup = setup();
    let (loaded, positive, negative, latent) = sd1_inputs(&setup, 1);
    let solid = |value: f64| {
        call(
            &setup,
            "SolidMask",
            vec![
                ("value", j(json!(value))),
                ("width", j(json!(64))),
                ("height", j(json!(64))),
            ],
        )[0]
        .clone()
    };
    let half = call(
        &setup,
        "MaskComposite",
        vec![
            ("destination", solid(0.0)),
            (
                "source",
                call(
                    &setup,
                    "SolidMask",
                    vec![
                        ("value", j(json!(1.0))),
                        ("width", j(json!(32))),
                        ("height", j(json!(64))),
                    ],
                )[0]
                .clone(),
            ),
            ("x", j(json!(0))),
            ("y", j(json!(0))),
            ("operation", j(json!("add"))),
        ],
    )[0]
    .clone();
    let other_half = call(&setup, "InvertMask", vec![("mask", half.clone())])[0].clone();
    let masked = |conditioning: &Value, mask: &Value| {
        call(
            &setup,
            "ConditioningSetMask",
            vec![
                ("conditioning", conditioning.clone()),
                ("mask", mask.clone()),
                ("strength", j(json!(1.0))),
                ("set_cond_area", j(json!("default"))),
            ],
        )[0]
        .clone()
    };
    let left = masked(&positive, &half);
    let with_default = call(
        &setup,
        "ConditioningSetDefaultCombine",
        vec![("cond", left.clone()), ("cond_DEFAULT", negative.clone())],
    )[0]
    .clone();
    let entries = &with_default.downcast::<Conditioning>().unwrap().0;
    assert_eq!(
        entries.iter().map(|entry| entry.default).collect::<Vec<_>>(),
        [false, true]
    );
    let complement = call(
        &setup,
        "ConditioningCombine",
        vec![
            ("conditioning_1", left),
            ("conditioning_2", masked(&negative, &other_half)),
        ],
    )[0]
    .clone();
    let model = &loaded[0];
    let got = advanced(&setup, model, &with_default, &negative, &latent, (0, 4), true, false);
    let want = advanced(&setup, model, &complement, &negative, &latent, (0, 4), true, false);
    let difference = max_difference(&samples(&got), &samples(&want));
    assert!(
        difference < 1e-5,
        "default entry differs from its complementary mask by {difference}"
    );
}

fn hidden(conditioning: &Value, entry: usize) -> Tensor {
    conditioning.downcast::<Conditioning>().unwrap().0[entry]
        .cross_attention
        .clone()
}

fn encode(setup: &Setup, clip: &Value) -> Value {
    call(
        setup,
        "CLIPTextEncode",
        vec![("text", j(json!("a fox"))), ("clip", clip.clone())],
    )[0]
    .clone()
}

/// SetClipHooks encodes with the LoRA on the text encoder at its CLIP strength (at strength 1
/// unscheduled; once per keyframe range scheduled, each entry limited to its range) and gives the
/// entries its hooks.
#[test]
fn clip_hooks_encode_as_the_lora_on_the_text_encoder() {
    let setup = setup();
    let loaded = call(
        &setup,
        "CheckpointLoaderSimple",
        vec![("ckpt_name", j(json!(TINY_SD1_CHECKPOINT)))],
    );
    let clip = &loaded[1];
    let hooks = call(
        &setup,
        "CreateHookLora",
        vec![
            ("lora_name", j(json!(TINY_SD1_LORA))),
            ("strength_model", j(json!(1.0))),
            ("strength_clip", j(json!(0.6))),
        ],
    )[0]
    .clone();
    let keyframed = {
        let first = call(
            &setup,
            "CreateHookKeyframe",
            vec![("strength_mult", j(json!(1.0))), ("start_percent", j(json!(0.0)))],
        );
        let second = call(
            &setup,
            "CreateHookKeyframe",
            vec![
                ("strength_mult", j(json!(0.5))),
                ("start_percent", j(json!(0.4))),
                ("prev_hook_kf", first[0].clone()),
            ],
        );
        call(
            &setup,
            "SetHookKeyframes",
            vec![("hooks", hooks.clone()), ("hook_kf", second[0].clone())],
        )[0]
        .clone()
    };
    let set_hooks = |scheduled: bool| {
        call(
            &setup,
            "SetClipHooks",
            vec![
                ("clip", clip.clone()),
                ("apply_to_conds", j(json!(true))),
                ("schedule_clip", j(json!(scheduled))),
                ("hooks", keyframed.clone()),
            ],
        )[0]
        .clone()
    };
    let lora_clip = |strength: f64| {
        call(
            &setup,
            "LoraLoader",
            vec![
                ("model", loaded[0].clone()),
                ("clip", clip.clone()),
                ("lora_name", j(json!(TINY_SD1_LORA))),
                ("strength_model", j(json!(0.0))),
                ("strength_clip", j(json!(strength))),
            ],
        )[1]
        .clone()
    };

    let unscheduled = encode(&setup, &set_hooks(false));
    let entries = &unscheduled.downcast::<Conditioning>().unwrap().0;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].clip_range, None);
    let attached = entries[0].hooks.as_ref().map(HookGroup::ids);
    assert_eq!(attached, Some(keyframed.downcast::<HookGroup>().unwrap().ids()));
    assert_eq!(
        flat(&hidden(&unscheduled, 0)),
        flat(&hidden(&encode(&setup, &lora_clip(0.6)), 0))
    );

    let scheduled = encode(&setup, &set_hooks(true));
    let entries = &scheduled.downcast::<Conditioning>().unwrap().0;
    let ranges: Vec<_> = entries.iter().map(|entry| entry.clip_range).collect();
    assert_eq!(ranges, [Some((0.0, 0.4)), Some((0.4, 1.0))]);
    assert_eq!(
        flat(&hidden(&scheduled, 0)),
        flat(&hidden(&encode(&setup, &lora_clip(0.6)), 0))
    );
    assert_eq!(
        flat(&hidden(&scheduled, 1)),
        flat(&hidden(&encode(&setup, &lora_clip(0.3)), 0))
    );
    assert_ne!(flat(&hidden(&scheduled, 1)), flat(&hidden(&encode(&setup, clip), 0)));
}

/// Timestep ranges and combining: the range node's three ranges, CombineHooks keeping each hook
/// once in order, and nothing out of nothing.
#[test]
fn ranges_and_combined_hooks() {
    let setup = setup();
    let ranges = call(
        &setup,
        "ConditioningTimestepsRange",
        vec![("start_percent", j(json!(0.2))), ("end_percent", j(json!(0.7)))],
    );
    let got: Vec<_> = ranges
        .iter()
        .map(|range| *range.downcast::<easel_nodes::hooks::TimestepsRange>().unwrap())
        .map(|range| (range.0, range.1))
        .collect();
    assert_eq!(got, [(0.2, 0.7), (0.0, 0.2), (0.7, 1.0)]);

    let lora = |strength: f64| {
        call(
            &setup,
            "CreateHookLoraModelOnly",
            vec![
                ("lora_name", j(json!(TINY_SD1_LORA))),
                ("strength_model", j(json!(strength))),
            ],
        )[0]
        .clone()
    };
    let (a, b) = (lora(0.5), lora(0.7));
    let ids = |value: &Value| value.downcast::<HookGroup>().unwrap().ids();
    let combined = call(
        &setup,
        "CombineHooks4",
        vec![("hooks_A", a.clone()), ("hooks_B", b.clone()), ("hooks_C", a.clone())],
    );
    assert_eq!(ids(&combined[0]), [ids(&a), ids(&b)].concat());
    let none = call(&setup, "CombineHooks2", vec![]);
    assert!(matches!(&none[0], Value::Json(Json::Null)));
    let unchanged = call(
        &setup,
        "CreateHookLora",
        vec![
            ("lora_name", j(json!(TINY_SD1_LORA))),
            ("strength_model", j(json!(0.0))),
            ("strength_clip", j(json!(0.0))),
            ("prev_hooks", a.clone()),
        ],
    );
    assert_eq!(ids(&unchanged[0]), ids(&a));

    let (_, positive, _, _) = sd1_inputs(&setup, 1);
    let timed = call(
        &setup,
        "ConditioningSetProperties",
        vec![
            ("cond_NEW", positive),
            ("strength", j(json!(1.0))),
            ("set_cond_area", j(json!("default"))),
            ("hooks", a.clone()),
            ("timesteps", ranges[0].clone()),
        ],
    );
    let entry = &timed[0].downcast::<Conditioning>().unwrap().0[0];
    assert_eq!(entry.timestep_range, Some((0.2, 0.7)));
    assert_eq!(entry.hooks.as_ref().map(HookGroup::ids), Some(ids(&a)));
}
