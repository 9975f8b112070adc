//! `easel bench TARGET`: measurements printed as tables — the HTTP API under load (`server`)
//! and Stable Diffusion 1.x compute (`sd15`).

mod cpu_peak;
mod sd15;
mod server;

use crate::cli::{BenchArgs, BenchTarget};

pub fn bench(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.target {
        BenchTarget::Server => server::bench(&args),
        BenchTarget::Sd15 => sd15::bench(&args),
    }
}
