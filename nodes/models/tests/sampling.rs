//! The sampling core against values recorded from ComfyUI 0.3.64 on a CPU: initial noise bit for
//! bit (`fixtures/torch_randn.json`) and every scheduler's σ sequence (`fixtures/sigmas.json`).

use easel_models::sampling::brownian::{seed_sequence_state, BrownianNoise};
use easel_models::sampling::noise::{prepare_noise, CpuGenerator};
use easel_models::sampling::schedule::{flux_shift_for_size, ksampler_sigmas, Scheduler, SigmaSchedule};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("fixture JSON")
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| match v {
            Value::String(s) if s == "NaN" => f32::NAN,
            v => v.as_f64().expect("number") as f32,
        })
        .collect()
}

fn usizes(value: &Value) -> Vec<usize> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_u64().expect("integer") as usize)
        .collect()
}

#[test]
fn initial_noise_is_bit_exact_with_torch() {
    let data = fixture("torch_randn.json");
    for case in data["cases"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let shape = usizes(&case["shape"]);
        let expected = floats(&case["values"]);
        let actual = prepare_noise(seed, &shape, None);
        let expected_bits: Vec<u32> = expected.iter().map(|v| v.to_bits()).collect();
        let actual_bits: Vec<u32> = actual.iter().map(|v| v.to_bits()).collect();
        assert_eq!(actual_bits, expected_bits, "seed {seed} shape {shape:?}");
    }
    let large = &data["large"];
    let values = CpuGenerator::new(large["seed"].as_u64().unwrap()).randn(large["numel"].as_u64().unwrap() as usize);
    assert_eq!(values[..32], floats(&large["first_32"])[..]);
    assert_eq!(values[values.len() - 32..], floats(&large["last_32"])[..]);
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, large["sha256_of_float32_le_bytes"].as_str().unwrap());
}

#[test]
fn batch_index_noise_matches_prepare_noise() {
    let data = fixture("torch_randn.json");
    for case in data["noise_inds_cases"].as_array().unwrap() {
        let indices = usizes(&case["noise_inds"]);
        let shape = usizes(&case["latent_shape"]);
        let actual = prepare_noise(case["seed"].as_u64().unwrap(), &shape, Some(&indices));
        assert_eq!(actual, floats(&case["values"]), "indices {indices:?}");
    }
}

fn schedule_for(model: &str) -> SigmaSchedule {
    match model {
        "SD15" | "SDXL" => SigmaSchedule::sd_discrete(),
        "SD3" => SigmaSchedule::flow(3.0, 1000.0),
        "FLUX_SCHNELL" => SigmaSchedule::flow(1.0, 1.0),
        "FLUX_1024x1024" => SigmaSchedule::flux(flux_shift_for_size(1.15, 0.5, 1024.0, 1024.0)),
        "FLUX_512x512" => SigmaSchedule::flux(flux_shift_for_size(1.15, 0.5, 512.0, 512.0)),
        other => panic!("unknown model {other}"),
    }
}

/// Equal within 1e-6, relative above 1 (σ up to 14.6, where one float32 step is 9.5e-7).
fn assert_close(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: {actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        let same = (a.is_nan() && e.is_nan()) || (a - e).abs() <= 1e-6 * e.abs().max(1.0);
        assert!(same, "{what}: {actual:?} vs {expected:?}");
    }
}

#[test]
fn model_sampling_tables_match_comfyui() {
    let data = fixture("sigmas.json");
    for (name, model) in data["models"].as_object().unwrap() {
        let schedule = schedule_for(name);
        assert_eq!(
            schedule.sigma_min(),
            model["sigma_min"].as_f64().unwrap() as f32,
            "{name} sigma_min"
        );
        assert_eq!(
            schedule.sigma_max(),
            model["sigma_max"].as_f64().unwrap() as f32,
            "{name} sigma_max"
        );
        if let Some(table) = model.get("sigmas_table") {
            assert_close(schedule.table(), &floats(table), name);
        }
        if let Some(first) = model.get("sigmas_table_first_8") {
            assert_close(&schedule.table()[..8], &floats(first), name);
            let table = schedule.table();
            assert_close(&table[table.len() - 8..], &floats(&model["sigmas_table_last_8"]), name);
        }
    }
}

#[test]
fn every_scheduler_matches_comfyui() {
    let data = fixture("sigmas.json");
    for case in data["cases"].as_array().unwrap() {
        let model = case["model"].as_str().unwrap();
        let scheduler: Scheduler = case["scheduler"].as_str().unwrap().parse().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let denoise = case["denoise"].as_f64().unwrap();
        let sigmas = ksampler_sigmas(&schedule_for(model), scheduler, steps, denoise, false);
        assert_close(
            &sigmas,
            &floats(&case["sigmas"]),
            &format!("{model} {scheduler} {steps} {denoise}"),
        );
    }
}

#[test]
fn samplers_that_discard_the_penultimate_sigma() {
    let data = fixture("sigmas.json");
    for case in data["discard_penultimate"].as_array().unwrap() {
        let scheduler: Scheduler = case["scheduler"].as_str().unwrap().parse().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let denoise = case["denoise"].as_f64().unwrap();
        let sigmas = ksampler_sigmas(
            &schedule_for(case["model"].as_str().unwrap()),
            scheduler,
            steps,
            denoise,
            true,
        );
        assert_close(&sigmas, &floats(&case["sigmas"]), &format!("{case}"));
    }
}

#[test]
fn discrete_schedule_conversions() {
    let schedule = SigmaSchedule::sd_discrete();
    assert_eq!(schedule.timestep(1.0), 354.0);
    assert!((schedule.sigma(500.0) - 1.618_278_9).abs() < 1e-6);
    assert!((schedule.percent_to_sigma(0.5) - 1.61558).abs() < 1e-5);
    assert!((SigmaSchedule::flow(3.0, 1000.0).percent_to_sigma(0.5) - 0.75).abs() < 1e-12);
    assert!((SigmaSchedule::flux(1.15).percent_to_sigma(0.5) - 0.759511).abs() < 1e-6);
}

/// Zero terminal SNR keeps σ_min and ends at ᾱ = 4.8973451890853435e-08; the LCM-distilled
/// schedule keeps every 20th σ, ending with σ_max, and maps them to timesteps 19, 39, …, 999.
#[test]
fn zero_terminal_snr_and_distilled_schedules() {
    let plain = SigmaSchedule::sd_discrete();
    let zsnr = SigmaSchedule::discrete_linear(0.00085, 0.012, 1000, true);
    assert!((zsnr.sigma_min() - plain.sigma_min()).abs() < 1e-7);
    let terminal = ((1.0 - 4.8973451890853435e-08f64) / 4.8973451890853435e-08).sqrt() as f32;
    assert_eq!(zsnr.sigma_max(), terminal);
    // Halfway, √ᾱ is shifted down and stretched: recompute it from the plain table in f64.
    let root = |sigma: f64| (1.0 / (sigma * sigma + 1.0)).sqrt();
    let (first, last) = (root(f64::from(plain.table()[0])), root(f64::from(plain.table()[999])));
    let halfway = (root(f64::from(plain.table()[500])) - last) * first / (first - last);
    let expected = ((1.0 - halfway * halfway) / (halfway * halfway)).sqrt();
    assert!((f64::from(zsnr.table()[500]) / expected - 1.0).abs() < 1e-5);

    let distilled = plain.distilled();
    assert_eq!(distilled.table().len(), 50);
    assert_eq!(distilled.sigma_max(), plain.sigma_max());
    assert_eq!(distilled.table()[0], plain.table()[19]);
    assert_eq!(distilled.table()[1], plain.table()[39]);
    assert_eq!(distilled.timestep(plain.sigma_max()), 999.0);
    assert_eq!(distilled.timestep(plain.table()[19]), 19.0);
    assert!((distilled.sigma(999.0) - plain.sigma_max()).abs() < 1e-4);
    assert!((distilled.sigma(39.0) - plain.table()[39]).abs() < 1e-6);
}

#[test]
fn seed_sequence_matches_numpy() {
    assert_eq!(seed_sequence_state(0, &[], 24, 3), [4025752534, 2687548107, 2326983537]);
}

/// node-catalog §C.3: seed 0, a [1, 4, 8, 8] latent, the SD1.5 σ range, n(σ_max, 9.10293).
#[test]
fn brownian_tree_noise_matches_comfyui() {
    let schedule = SigmaSchedule::sd_discrete();
    let mut noise = BrownianNoise::new(schedule.sigma_min(), schedule.sigma_max(), 4 * 8 * 8, 0);
    let values = noise.sample(schedule.sigma_max(), 9.10293);
    let expected = [0.071_278_21_f32, -1.196_463_1, -0.105_975_37, 1.164_427_5];
    for (actual, expected) in values.iter().zip(expected) {
        assert!((actual - expected).abs() < 1e-6, "{:?} vs {expected:?}", &values[..4]);
    }
    let next = noise.sample(9.10293, 5.47839);
    let reversed = noise.sample(5.47839, 9.10293);
    assert_eq!(next.len(), 256);
    assert!(
        next.iter().zip(&reversed).all(|(a, b)| *a == -*b),
        "the sign follows the order of the σ"
    );
    let mut again = BrownianNoise::new(schedule.sigma_min(), schedule.sigma_max(), 4 * 8 * 8, 0);
    assert_eq!(
        again.sample(9.10293, 5.47839),
        next,
        "noise depends on the seed and times only"
    );
}
