//! `scripts/chaos`: runs real Citadel clusters under faults and checks what clients saw
//! (docs/TESTING.md).

mod cluster;
mod history;
mod nemesis;
mod proxy;
mod run;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use nemesis::Fault;
use run::RunConfig;

#[derive(Parser)]
#[command(about = "Fault-injection runs against real citadel nodes, with linearizability, lost-write and audit checks")]
struct Args {
    /// Every fault kind once, a few seconds each (what CI runs).
    #[arg(long)]
    short: bool,
    /// Number of runs; they cycle through the fault kinds.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Seconds of load and faults per run.
    #[arg(long, default_value_t = 10)]
    time: u64,
    /// Seed of the first run (run i uses seed + i); random when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Only this fault kind.
    #[arg(long, value_enum)]
    fault: Option<Fault>,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Keys the clients share; fewer keys mean more contention and longer histories to check.
    #[arg(long, default_value_t = 6)]
    keys: usize,
    /// First port; node i uses port + 10i (API) and port + 10i + 1 (cluster, proxied).
    #[arg(long, default_value_t = 23000)]
    port: u16,
    /// Print what the nemesis did in every run, passing ones included.
    #[arg(long)]
    show_nemesis: bool,
    /// Where failing runs leave their evidence.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// The citadel binary (default: next to this one).
    #[arg(long)]
    citadel: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let failed = runtime.block_on(run_all(args))?;
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

async fn run_all(args: Args) -> Result<usize> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3: faults need a majority to survive");
    }
    let exe = match args.citadel {
        Some(exe) => exe,
        None => std::env::current_exe()?.with_file_name("citadel"),
    };
    if !exe.exists() {
        bail!("no citadel binary at {}; build it or pass --citadel", exe.display());
    }
    let (runs, time) = if args.short {
        (Fault::ALL.len(), Duration::from_secs(6))
    } else {
        (args.runs, Duration::from_secs(args.time))
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    });
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let out = args.out.canonicalize()?;
    println!(
        "chaos: {runs} runs of {}s, {} nodes, {} clients, {} keys, first seed {seed}",
        time.as_secs(),
        args.nodes,
        args.clients,
        args.keys
    );
    let mut failed = 0;
    for i in 0..runs {
        let fault = args.fault.unwrap_or(Fault::ALL[i % Fault::ALL.len()]);
        let run_seed = seed.wrapping_add(i as u64);
        let dir = out.join(format!("run-{run_seed}-{}", fault.name()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let config = RunConfig {
            seed: run_seed,
            fault,
            time,
            nodes: args.nodes,
            clients: args.clients,
            keys: args.keys,
            base_port: args.port,
            exe: exe.clone(),
            dir: dir.clone(),
        };
        let started = std::time::Instant::now();
        let verdict = run::run(&config).await;
        let took = started.elapsed().as_secs_f64();
        let faults = verdict.nemesis_log.len();
        if verdict.problems.is_empty() {
            println!(
                "run {}/{runs} seed {run_seed} {}: ok in {took:.0}s ({}; {faults} nemesis events)",
                i + 1,
                fault.name(),
                verdict.summary
            );
            if args.show_nemesis {
                for line in &verdict.nemesis_log {
                    println!("    {line}");
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            failed += 1;
            keep_evidence(&dir, &verdict)?;
            println!(
                "run {}/{runs} seed {run_seed} {}: FAILED in {took:.0}s ({})",
                i + 1,
                fault.name(),
                verdict.summary
            );
            for problem in verdict.problems.iter().take(10) {
                println!("    {problem}");
            }
            println!("    history, verdict and node logs: {}", dir.display());
        }
    }
    println!("chaos: {runs} runs, {} passed, {failed} failed", runs - failed);
    Ok(failed)
}

fn keep_evidence(dir: &std::path::Path, verdict: &run::Verdict) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = String::from("problems:\n");
    for p in &verdict.problems {
        text.push_str(&format!("  {p}\n"));
    }
    text.push_str(&format!("\n{}\n\nnemesis:\n", verdict.summary));
    for line in &verdict.nemesis_log {
        text.push_str(&format!("  {line}\n"));
    }
    std::fs::write(dir.join("verdict.txt"), text)?;
    if let Some(recorded) = &verdict.recorded {
        std::fs::write(dir.join("history.json"), serde_json::to_vec_pretty(recorded)?)?;
    }
    Ok(())
}
