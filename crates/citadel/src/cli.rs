//! The `citadel` command line (§3).

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use citadel_client::Client;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::bench::{self, Target, Workload};
use crate::output::{print_list, print_map, print_rows, Format};

#[derive(Parser)]
#[command(name = "citadel", version, about = "Citadel: a highly available vault for privileged credentials")]
struct Cli {
    /// Output format for reads.
    #[arg(long, global = true, value_enum, default_value = "table")]
    format: Format,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster of real server processes (the main job).
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "./.citadel-dev")]
        dir: PathBuf,
        #[arg(long, default_value_t = 8200)]
        port: u16,
    },
    /// Run one node.
    Server {
        #[arg(long, env = "CITADEL_CONFIG")]
        config: PathBuf,
    },
    /// Initialize, unseal, seal, rotate, step down.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Log in and adopt a token (prints it).
    Login {
        #[arg(long, default_value = "userpass")]
        method: String,
        #[arg(long)]
        username: String,
        /// Read from CITADEL_PASSWORD or prompted on stdin when absent.
        #[arg(long, env = "CITADEL_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    #[command(subcommand)]
    Token(TokenCmd),
    #[command(subcommand)]
    Kv(KvCmd),
    #[command(subcommand)]
    Policy(PolicyCmd),
    #[command(subcommand)]
    User(UserCmd),
    #[command(subcommand)]
    Audit(AuditCmd),
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Measure throughput and latency: Citadel (a 3-node cluster it starts, or --addr) and,
    /// with --target etcd, a 3-member etcd cluster, side by side in one run.
    Bench {
        /// Workloads, comma-separated: write, read (linearizable), stale-read; or alone: failover, rolling-restart, alerts, flood, scale.
        #[arg(value_enum, value_delimiter = ',', required = true)]
        workloads: Vec<Workload>,
        /// Systems to measure, comma-separated; each level runs on each in turn.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "citadel")]
        target: Vec<Target>,
        /// Client counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        concurrency: Vec<usize>,
        /// Operations per (target, workload, concurrency).
        #[arg(long, default_value_t = 2000)]
        ops: usize,
        /// Measure this running Citadel node (token from CITADEL_TOKEN) instead of starting a cluster.
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value = "secret")]
        mount: String,
        /// Where started clusters keep their data, on the disk whose raw fsync is measured as the
        /// floor of a durable write.
        #[arg(long, default_value = ".citadel-bench")]
        dir: PathBuf,
        /// Results as JSON (and a PNG chart beside it, same name).
        #[arg(long, default_value = "target/bench/bench.json")]
        json: PathBuf,
        /// failover, alerts: how many times to kill the leader; rolling-restart: how many times to restart every node.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Base port of started clusters (uses BASE..BASE+21).
        #[arg(long, default_value_t = 23000)]
        port: u16,
        /// flood: requests with bogus tokens.
        #[arg(long, default_value_t = 50_000)]
        bogus_requests: usize,
        /// flood: failing logins, each under a distinct user name.
        #[arg(long, default_value_t = 5_000)]
        failing_logins: usize,
        /// flood: clients sending the flood at once.
        #[arg(long, default_value_t = 32)]
        flood_concurrency: usize,
        /// flood: instead, hold this many idle connections open to one node.
        #[arg(long)]
        idle_connections: Option<usize>,
        /// scale: secrets to load.
        #[arg(long, default_value_t = 100_000)]
        secrets: usize,
        /// scale: versions written of each secret.
        #[arg(long, default_value_t = 3)]
        versions: usize,
        /// scale: audit events to load in all (writes count; reads make up the rest).
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// flood --idle-connections: the local (loopback) address they come from.
        #[arg(long, default_value = "127.0.0.2")]
        idle_source: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
enum OperatorCmd {
    Init {
        #[arg(long, default_value_t = 5)]
        key_shares: usize,
        #[arg(long, default_value_t = 3)]
        key_threshold: usize,
    },
    /// Submit an unseal key share (argument, CITADEL_UNSEAL_KEY, or stdin).
    Unseal {
        key: Option<String>,
    },
    Seal,
    Rotate,
    StepDown,
    #[command(subcommand)]
    Raft(RaftCmd),
    /// A node's lifecycle (§10.1): deactivate, activate, resync, rename, remove.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Offline, on a stopped node: when a majority is lost for good, make this survivor a
    /// one-node cluster that keeps every entry of its log (§10.3). Other nodes then join it
    /// fresh. Run it on one survivor only: the one with the highest last_log_term, then
    /// last_log_index (sys/health).
    Recover {
        /// The stopped node's data directory.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Required: says you know the other members are gone for good.
        #[arg(long)]
        force_single_node: bool,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Stop the node serving clients and take its vote; it keeps replicating.
    Deactivate {
        node_id: u64,
        /// Even if the cluster would be left unable to lose another voter.
        #[arg(long)]
        force: bool,
    },
    /// Let a deactivated node serve again; it gets its vote back once caught up.
    Activate { node_id: u64 },
    /// Make the node discard its state and catch up from a snapshot (waits until it has).
    Resync {
        node_id: u64,
        #[arg(long)]
        force: bool,
    },
    /// Change the node's display name.
    Rename { node_id: u64, name: String },
    /// Remove the node from the cluster (as `operator raft remove-peer`).
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum RaftCmd {
    /// Members, their suffrage, and the leader.
    ListPeers,
    /// Ask a member (its cluster address, host:port) to add the node at CITADEL_ADDR.
    Join {
        leader_cluster_addr: String,
    },
    RemovePeer {
        node_id: u64,
    },
    TransferLeader {
        node_id: u64,
    },
    /// Issue a one-time join token: a new node presents it to receive its certificate.
    JoinToken {
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The only node id the token may certify (recommended: the new node's `node_id`).
        #[arg(long)]
        node_id: Option<u64>,
    },
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    Create {
        #[arg(long = "policy")]
        policies: Vec<String>,
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Look up a token (the current one when omitted).
    Lookup { token: Option<String> },
    /// Revoke a token (the current one when omitted) and its children.
    Revoke { token: Option<String> },
}

#[derive(Subcommand)]
enum KvCmd {
    /// Write `k=v` pairs to MOUNT/PATH (e.g. secret/db/prod).
    Put {
        path: String,
        pairs: Vec<String>,
        #[arg(long)]
        cas: Option<u64>,
    },
    Get {
        path: String,
        #[arg(long)]
        version: Option<u64>,
    },
    List {
        path: String,
    },
    /// Soft-delete the latest version, or --versions.
    Delete {
        path: String,
        #[arg(long, value_delimiter = ',')]
        versions: Vec<u64>,
    },
    Undelete {
        path: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    Destroy {
        path: String,
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<u64>,
    },
    #[command(subcommand)]
    Metadata(MetadataCmd),
}

#[derive(Subcommand)]
enum MetadataCmd {
    Get {
        path: String,
    },
    Put {
        path: String,
        #[arg(long)]
        max_versions: Option<u32>,
        #[arg(long)]
        cas_required: Option<bool>,
    },
    Delete {
        path: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Write a policy from FILE (`-` for stdin).
    Write {
        name: String,
        file: PathBuf,
    },
    Read {
        name: String,
    },
    List,
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Create {
        username: String,
        #[arg(long, env = "CITADEL_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        #[arg(long = "policy")]
        policies: Vec<String>,
    },
    Delete {
        username: String,
    },
    List,
    Passwd {
        username: String,
        #[arg(long, env = "CITADEL_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// The HA table: leader, voters, quorum, and every node's state and lag.
    Status,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Save a snapshot of everything committed to FILE (Vault's archive: a gzip'd tar).
    Save { file: PathBuf },
    /// Restore FILE, an archive or an older bare snapshot file (replaces the state; the audit
    /// log is kept).
    Restore {
        file: PathBuf,
        /// Accept a snapshot taken from another cluster.
        #[arg(long)]
        force: bool,
    },
    /// Show a snapshot file's header and verify its checksums (offline).
    Inspect { file: PathBuf },
}

#[derive(Subcommand)]
enum AuditCmd {
    List {
        #[arg(long)]
        node: Option<u64>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        path: Option<String>,
        /// Unix milliseconds, or a duration such as 15m meaning "that long ago".
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Verify the cluster's audit chains; with --archive, verify archive files (oldest first)
    /// and that they end where the cluster's retained chains begin.
    Verify {
        #[arg(long)]
        archive: Vec<PathBuf>,
    },
}

fn env_either(primary: &str, fallback: &str) -> Option<String> {
    std::env::var(primary).ok().or_else(|| std::env::var(fallback).ok()).filter(|v| !v.is_empty())
}

fn client() -> Result<Client> {
    client_at(&env_either("CITADEL_ADDR", "VAULT_ADDR").unwrap_or_else(|| "https://127.0.0.1:8200".into()))
}

fn client_at(addr: &str) -> Result<Client> {
    let ca = env_either("CITADEL_CACERT", "VAULT_CACERT").ok_or_else(|| {
        anyhow!("set CITADEL_CACERT (or VAULT_CACERT) to the cluster CA certificate; `source .citadel-dev/env` does")
    })?;
    let mut client = Client::from_ca_file(addr, std::path::Path::new(&ca))?;
    if let Some(token) = env_either("CITADEL_TOKEN", "VAULT_TOKEN") {
        client.set_token(token);
    }
    Ok(client)
}

fn read_secret(prompt: &str, given: Option<String>) -> Result<String> {
    if let Some(v) = given {
        return Ok(v);
    }
    eprint!("{prompt}: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        bail!("no {prompt} given");
    }
    Ok(line)
}

/// Splits `mount/path` as `vault kv` does: the first segment is the mount.
fn split_kv_path(path: &str) -> Result<(String, String)> {
    let path = path.trim_matches('/');
    match path.split_once('/') {
        Some((mount, rest)) if !rest.is_empty() => Ok((mount.to_string(), rest.to_string())),
        _ => bail!("expected MOUNT/PATH, e.g. secret/db/prod; got {path:?}"),
    }
}

fn parse_pairs(pairs: &[String]) -> Result<Value> {
    let mut data = serde_json::Map::new();
    for pair in pairs {
        let (k, v) = pair.split_once('=').ok_or_else(|| anyhow!("expected key=value, got {pair:?}"))?;
        if k.is_empty() {
            bail!("empty key in {pair:?}");
        }
        let value = if v == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        } else {
            v.to_string()
        };
        data.insert(k.to_string(), Value::String(value));
    }
    if data.is_empty() {
        bail!("nothing to write: give at least one key=value");
    }
    Ok(Value::Object(data))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("CITADEL_LOG").unwrap_or_else(|_| "info,openraft=warn,raft_log=warn".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    citadel_server::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    let format = cli.format;
    match cli.command {
        Cmd::Dev { nodes, dir, port } => crate::dev::run(nodes, &dir, port).await,
        Cmd::Server { config } => {
            let config = citadel_server::Config::load(&config)?;
            citadel_server::run(config).await
        }
        Cmd::Operator(op) => operator(op, format).await,
        Cmd::Login { method, username, password } => {
            if method != "userpass" {
                bail!("unsupported login method {method:?} (supported: userpass)");
            }
            let password = read_secret("password", password)?;
            let mut c = client()?;
            let token = c.login_userpass(&username, &password).await?;
            print_map(&json!({ "token": token, "username": username }), format);
            Ok(())
        }
        Cmd::Token(cmd) => token(cmd, format).await,
        Cmd::Kv(cmd) => kv(cmd, format).await,
        Cmd::Policy(cmd) => policy(cmd, format).await,
        Cmd::User(cmd) => user(cmd, format).await,
        Cmd::Audit(cmd) => audit(cmd, format).await,
        Cmd::Cluster(ClusterCmd::Status) => {
            let reply = client()?.get("sys/ha/status").await?;
            let data = &reply["data"];
            if format == Format::Json {
                print_map(data, format);
                return Ok(());
            }
            print_map(&data["cluster"], format);
            out!();
            let nodes = data["nodes"].as_array().cloned().unwrap_or_default();
            let columns = [
                "id",
                "name",
                "site",
                "api_addr",
                "role",
                "suffrage",
                "state",
                "last_contact_ms",
                "matched_index",
                "lag",
                "version",
                "uptime_ms",
                "active_sessions",
            ];
            print_rows(&nodes, &columns, format);
            Ok(())
        }
        Cmd::Bench {
            workloads,
            port,
            bogus_requests,
            failing_logins,
            flood_concurrency,
            idle_connections,
            idle_source,
            ..
        } if workloads.contains(&Workload::Flood) => {
            if workloads.len() > 1 {
                bail!("flood runs alone: `citadel bench flood`");
            }
            let settings = crate::flood::FloodSettings {
                bogus_token_requests: bogus_requests,
                failing_logins,
                concurrency: flood_concurrency,
                port,
            };
            let report = crate::flood::run(idle_connections.map(|n| (n, idle_source)), settings).await?;
            print_map(&report, format);
            for miss in crate::flood::missed_goals(&report) {
                out!("goal missed: {miss}");
            }
            Ok(())
        }
        Cmd::Bench { workloads, secrets, versions, events, concurrency, port, dir, json, .. }
            if workloads.contains(&Workload::Scale) =>
        {
            if workloads.len() > 1 {
                bail!("scale runs alone: `citadel bench scale`");
            }
            let settings = crate::scale::ScaleSettings {
                secrets,
                versions,
                events,
                concurrency: concurrency.iter().copied().max().unwrap_or(1).max(64),
                port,
                dir: dir.join("scale"),
                json: if json == std::path::Path::new("target/bench/bench.json") {
                    "target/bench/scale.json".into()
                } else {
                    json
                },
            };
            let report = crate::scale::run(&settings).await?;
            print_map(&serde_json::to_value(&report)?, format);
            Ok(())
        }
        Cmd::Bench { workloads, rounds, port, .. } if workloads.contains(&Workload::Alerts) => {
            let [Workload::Alerts] = workloads[..] else { bail!("alerts runs alone: `citadel bench alerts`") };
            let dir = std::env::temp_dir().join(format!("citadel-bench-alerts-{}", std::process::id()));
            let report = crate::alert_bench::run(&dir, rounds, port).await;
            let _ = std::fs::remove_dir_all(&dir);
            let report = report?;
            let ms = |d: std::time::Duration| format!("{:.0}", d.as_secs_f64() * 1e3);
            let stat = |pick: fn(&crate::alert_bench::AlertRound) -> std::time::Duration| {
                let mut all: Vec<_> = report.iter().map(pick).collect();
                all.sort();
                (ms(bench::median(&all)), ms(all.last().copied().unwrap_or_default()))
            };
            let (changed_median, changed_worst) = stat(|r| r.leader_changed);
            let (unreachable_median, unreachable_worst) = stat(|r| r.unreachable);
            let (resolved_median, resolved_worst) = stat(|r| r.resolved);
            let summary = json!({
                "rounds": report.len(),
                "kill_to_leader_changed_median_ms": changed_median,
                "kill_to_leader_changed_worst_ms": changed_worst,
                "kill_to_node_unreachable_median_ms": unreachable_median,
                "kill_to_node_unreachable_worst_ms": unreachable_worst,
                "restart_to_resolved_median_ms": resolved_median,
                "restart_to_resolved_worst_ms": resolved_worst,
            });
            print_map(&summary, format);
            Ok(())
        }
        Cmd::Bench { workloads, rounds, port, .. }
            if workloads.iter().any(|w| matches!(w, Workload::Failover | Workload::RollingRestart)) =>
        {
            let [workload] = workloads[..] else {
                bail!("failover and rolling-restart run alone: `citadel bench failover`");
            };
            let dir = std::env::temp_dir().join(format!("citadel-bench-{}-{}", workload.name(), std::process::id()));
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            let (rounds, extra) = if workload == Workload::Failover {
                let report = bench::failover(&dir, rounds, port).await;
                let _ = std::fs::remove_dir_all(&dir);
                let report = report?;
                let extra = json!({
                    "read_only_entry_ms": format!("{:.0}", ms(report.read_only_entry)),
                    "election_timeout_ms": report.election_timeout_ms,
                    "heartbeat_ms": report.heartbeat_ms,
                    "leader_wait_ms": report.leader_wait_ms,
                });
                (report.rounds, extra)
            } else {
                let report = bench::rolling_restart(&dir, rounds, port).await;
                let _ = std::fs::remove_dir_all(&dir);
                (report?, json!({}))
            };
            let mut first_writes: Vec<_> = rounds.iter().map(|r| r.stop_to_first_new_write).collect();
            first_writes.sort();
            let mut summary = json!({
                "rounds": rounds.len(),
                "requests_sent": rounds.iter().map(|r| r.sent).sum::<usize>(),
                "requests_failed": rounds.iter().map(|r| r.failed).sum::<usize>(),
                "worst_latency_ms": format!("{:.0}", ms(rounds.iter().map(|r| r.worst).max().unwrap_or_default())),
                "worst_added_latency_ms":
                    format!("{:.0}", ms(rounds.iter().map(|r| r.added_latency()).max().unwrap_or_default())),
                "stop_to_first_new_write_median_ms": format!("{:.0}", ms(bench::median(&first_writes))),
                "stop_to_first_new_write_worst_ms":
                    format!("{:.0}", ms(first_writes.last().copied().unwrap_or_default())),
            });
            if let (Some(summary), Some(extra)) = (summary.as_object_mut(), extra.as_object()) {
                summary.extend(extra.clone());
            }
            print_map(&summary, format);
            Ok(())
        }
        Cmd::Bench { workloads, target, concurrency, ops, addr, mount, dir, json, port, .. } => {
            let settings =
                bench::Settings { workloads, targets: target, concurrency, ops, addr, mount, dir, json, port };
            let report = bench::compare(settings, client_at).await?;
            let columns = [
                "target",
                "workload",
                "concurrency",
                "ops",
                "errors",
                "ops_per_sec",
                "p50_ms",
                "p99_ms",
                "max_ms",
                "cpu_us_per_op",
            ];
            out!();
            print_rows(&report.rows, &columns, format);
            out!();
            out!("raw fsync of this disk: p50 {:.3} ms, p99 {:.3} ms", report.fsync_p50_ms, report.fsync_p99_ms);
            for line in &report.ratios {
                out!("{line}");
            }
            out!("results: {}  chart: {}", report.json.display(), report.chart.display());
            Ok(())
        }
    }
}

async fn operator(cmd: OperatorCmd, format: Format) -> Result<()> {
    if let OperatorCmd::Raft(RaftCmd::Snapshot(SnapshotCmd::Inspect { .. })) = &cmd {
        // Offline: no server needed.
        return operator_offline(cmd, format);
    }
    if let OperatorCmd::Recover { data_dir, force_single_node } = cmd {
        return recover(&data_dir, force_single_node, format).await;
    }
    let c = client()?;
    match cmd {
        OperatorCmd::Init { key_shares, key_threshold } => {
            let (keys, root) = c.init(key_shares, key_threshold).await?;
            if format == Format::Json {
                print_map(&json!({ "unseal_keys_hex": keys, "root_token": root }), format);
            } else {
                for (i, k) in keys.iter().enumerate() {
                    out!("Unseal Key {}: {k}", i + 1);
                }
                out!("\nInitial Root Token: {root}\n");
                out!("Store the keys apart: {key_threshold} of {key_shares} are needed to unseal a node.");
            }
            Ok(())
        }
        OperatorCmd::Unseal { key } => {
            let key = match key.or_else(|| std::env::var("CITADEL_UNSEAL_KEY").ok()) {
                Some(k) => k,
                None => read_secret("unseal key share", None)?,
            };
            let status = c.unseal(&key).await?;
            print_map(&status, format);
            Ok(())
        }
        OperatorCmd::Seal => {
            c.request("PUT", "sys/seal", None).await?;
            out!("Success! Node sealed.");
            Ok(())
        }
        OperatorCmd::Rotate => {
            c.request("PUT", "sys/rotate", None).await?;
            let status = c.get("sys/key-status").await?;
            print_map(&status["data"], format);
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::ListPeers) => {
            let reply = c.get("sys/storage/raft/configuration").await?;
            let servers = reply["data"]["config"]["servers"].as_array().cloned().unwrap_or_default();
            print_rows(&servers, &["node_id", "address", "leader", "voter", "protocol_version"], format);
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::Join { leader_cluster_addr }) => {
            let reply = c.post("sys/storage/raft/join", &json!({ "leader_cluster_addr": leader_cluster_addr })).await?;
            print_map(&reply, format);
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::RemovePeer { node_id }) => {
            c.post("sys/storage/raft/remove-peer", &json!({ "server_id": node_id })).await?;
            out!("Success! Removed node {node_id}.");
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::Snapshot(SnapshotCmd::Save { file })) => {
            let bytes = c.bytes("GET", "sys/storage/raft/snapshot", None).await?;
            citadel_server::tls::write_private(&file, &bytes)?;
            out!("Success! Saved a snapshot ({} bytes) to {}", bytes.len(), file.display());
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::Snapshot(SnapshotCmd::Restore { file, force })) => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let path = if force { "sys/storage/raft/snapshot-force" } else { "sys/storage/raft/snapshot" };
            c.bytes("POST", path, Some(bytes)).await?;
            out!("Success! Restored the snapshot {}", file.display());
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::Snapshot(SnapshotCmd::Inspect { .. })) | OperatorCmd::Recover { .. } => {
            unreachable!("handled offline")
        }
        OperatorCmd::Raft(RaftCmd::JoinToken { ttl, node_id }) => {
            let reply = c.post("sys/storage/raft/join-token", &json!({ "ttl": ttl, "node_id": node_id })).await?;
            print_map(&reply["data"], format);
            Ok(())
        }
        OperatorCmd::Raft(RaftCmd::TransferLeader { node_id }) => {
            c.post("sys/ha/transfer-leader", &json!({ "node_id": node_id })).await?;
            out!("Success! Node {node_id} leads.");
            Ok(())
        }
        OperatorCmd::StepDown => {
            c.request("PUT", "sys/step-down", None).await?;
            out!("Success! Stepped down.");
            Ok(())
        }
        OperatorCmd::Node(cmd) => {
            let (node_id, action, body, done) = match cmd {
                NodeCmd::Deactivate { node_id, force } => (
                    node_id,
                    "deactivate",
                    json!({ "force": force }),
                    "is inactive: it serves no client and has no vote",
                ),
                NodeCmd::Activate { node_id } => {
                    (node_id, "activate", json!({}), "is active: it serves, and votes again once caught up")
                }
                NodeCmd::Resync { node_id, force } => {
                    out!("Resyncing node {node_id}: it discards its state and catches up from a snapshot...");
                    (node_id, "resync", json!({ "force": force }), "has resynced and caught up")
                }
                NodeCmd::Rename { node_id, name } => (node_id, "rename", json!({ "name": name }), "is renamed"),
                NodeCmd::Remove { node_id } => (node_id, "remove", json!({}), "is removed from the cluster"),
            };
            // A resync waits for the node to catch up, which the server bounds at 150 s.
            let c = c.with_timeout(std::time::Duration::from_secs(180));
            c.post(&format!("sys/ha/nodes/{node_id}/{action}"), &body).await?;
            out!("Success! Node {node_id} {done}.");
            Ok(())
        }
    }
}

fn operator_offline(cmd: OperatorCmd, format: Format) -> Result<()> {
    match cmd {
        OperatorCmd::Raft(RaftCmd::Snapshot(SnapshotCmd::Inspect { file })) => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let (header, stored) = citadel_server::api::snapshot_file(&bytes).map_err(anyhow::Error::msg)?;
            let state = &stored.into_whole_state()?;
            let summary = json!({
                "cluster_id": header.cluster_id,
                "last_index": header.last_index,
                "last_term": header.last_term,
                "size_bytes": header.size,
                "sha256": header.sha256,
                "format_version": header.version,
                "hmac_key_term": header.key_term,
                "authenticity": if header.version >= 2 {
                    "checksums verified (an archive's SHA256SUMS and the file's own); the HMAC and \
                     SHA256SUMS.sealed are verified by a restore, with the cluster's keyring"
                } else {
                    "checksums verified; version 1 file: no HMAC (only snapshot-force restores it)"
                },
                "mounts": state.mounts.len(),
                "secrets": state.mounts.values().map(|m| m.kv.entries.len()).sum::<usize>(),
                "policies": state.policies.len(),
                "users": state.users.len(),
                "tokens": state.tokens.len(),
                // Files saved before format 5 hold the events; later ones hold each chain's end.
                "audit_events": state.audit.tips().map(|(_, seq)| seq).sum::<u64>(),
            });
            print_map(&summary, format);
            Ok(())
        }
        _ => unreachable!("only inspect runs offline"),
    }
}

/// `citadel operator recover`: offline, on the stopped survivor's data directory.
async fn recover(data_dir: &std::path::Path, force_single_node: bool, format: Format) -> Result<()> {
    if !force_single_node {
        bail!(
            "recover rewrites this node's membership to itself alone: the other members must be gone for good. \
             Pass --force-single-node to confirm"
        );
    }
    let marker = data_dir.join(citadel_server::resync::MARKER);
    if marker.exists() {
        bail!(
            "{} exists: this node was being resynced and discards its replicated state at its next start. \
             If its data is the survivor's you want to keep, delete that file first, then run recover again",
            marker.display()
        );
    }
    let node_id = citadel_storage::recover::node_id_of(data_dir).map_err(anyhow::Error::msg)?;
    let recovery = citadel_storage::recover::force_single_node(data_dir, node_id).await.map_err(anyhow::Error::msg)?;
    print_map(
        &json!({
            "node_id": node_id,
            "kept_log_through": recovery.last_index,
            "known_committed": recovery.committed,
            "new_term": recovery.term,
            "previous_voters": recovery.previous_voters,
            "previous_non_voters": recovery.previous_learners,
        }),
        format,
    );
    out!(
        "Success! Node {node_id} is now a one-node cluster holding its whole log. Start it, check it serves, \
         then join new nodes with empty data directories (never restart the old members on their old data)."
    );
    Ok(())
}

async fn token(cmd: TokenCmd, format: Format) -> Result<()> {
    let c = client()?;
    match cmd {
        TokenCmd::Create { policies, ttl } => {
            let mut body = json!({});
            if !policies.is_empty() {
                body["policies"] = json!(policies);
            }
            if let Some(ttl) = ttl {
                body["ttl"] = json!(ttl);
            }
            let reply = c.post("auth/token/create", &body).await?;
            print_map(&reply["auth"], format);
        }
        TokenCmd::Lookup { token } => {
            let reply = match token {
                Some(t) => c.post("auth/token/lookup", &json!({ "token": t })).await?,
                None => c.get("auth/token/lookup-self").await?,
            };
            print_map(&reply["data"], format);
        }
        TokenCmd::Revoke { token } => {
            match token {
                Some(t) => c.post("auth/token/revoke", &json!({ "token": t })).await?,
                None => c.post("auth/token/revoke-self", &json!({})).await?,
            };
            out!("Success! Revoked token (if it existed).");
        }
    }
    Ok(())
}

async fn kv(cmd: KvCmd, format: Format) -> Result<()> {
    let c = client()?;
    match cmd {
        KvCmd::Put { path, pairs, cas } => {
            let (mount, path) = split_kv_path(&path)?;
            let data = parse_pairs(&pairs)?;
            let mut body = json!({ "data": data });
            if let Some(cas) = cas {
                body["options"] = json!({ "cas": cas });
            }
            let reply = c.post(&format!("{mount}/data/{path}"), &body).await?;
            print_map(&reply["data"], format);
        }
        KvCmd::Get { path, version } => {
            let (mount, path) = split_kv_path(&path)?;
            let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let reply = c.get(&format!("{mount}/data/{path}{query}")).await.map_err(|e| match e.status() {
                Some(s) if s.as_u16() == 404 => anyhow!("no value found at {mount}/{path}"),
                _ => e.into(),
            })?;
            if format == Format::Json {
                print_map(&reply["data"], format);
            } else {
                out!("== Metadata ==");
                print_map(&reply["data"]["metadata"], format);
                out!("\n== Data ==");
                print_map(&reply["data"]["data"], format);
            }
        }
        KvCmd::List { path } => {
            let path = path.trim_matches('/');
            let (mount, rest) = path.split_once('/').unwrap_or((path, ""));
            let keys = c.list(&format!("{mount}/metadata/{rest}")).await?;
            print_list(&keys, format);
        }
        KvCmd::Delete { path, versions } => {
            let (mount, path) = split_kv_path(&path)?;
            if versions.is_empty() {
                c.delete(&format!("{mount}/data/{path}")).await?;
            } else {
                c.post(&format!("{mount}/delete/{path}"), &json!({ "versions": versions })).await?;
            }
            out!("Success! Data deleted (if it existed) at: {mount}/data/{path}");
        }
        KvCmd::Undelete { path, versions } => {
            let (mount, path) = split_kv_path(&path)?;
            c.post(&format!("{mount}/undelete/{path}"), &json!({ "versions": versions })).await?;
            out!("Success! Data written to: {mount}/undelete/{path}");
        }
        KvCmd::Destroy { path, versions } => {
            let (mount, path) = split_kv_path(&path)?;
            c.post(&format!("{mount}/destroy/{path}"), &json!({ "versions": versions })).await?;
            out!("Success! Data written to: {mount}/destroy/{path}");
        }
        KvCmd::Metadata(MetadataCmd::Get { path }) => {
            let (mount, path) = split_kv_path(&path)?;
            let reply = c.get(&format!("{mount}/metadata/{path}")).await?;
            print_map(&reply["data"], format);
        }
        KvCmd::Metadata(MetadataCmd::Put { path, max_versions, cas_required }) => {
            let (mount, path) = split_kv_path(&path)?;
            let mut body = json!({});
            if let Some(m) = max_versions {
                body["max_versions"] = json!(m);
            }
            if let Some(c) = cas_required {
                body["cas_required"] = json!(c);
            }
            c.post(&format!("{mount}/metadata/{path}"), &body).await?;
            out!("Success! Data written to: {mount}/metadata/{path}");
        }
        KvCmd::Metadata(MetadataCmd::Delete { path }) => {
            let (mount, path) = split_kv_path(&path)?;
            c.delete(&format!("{mount}/metadata/{path}")).await?;
            out!("Success! Data deleted (if it existed) at: {mount}/metadata/{path}");
        }
    }
    Ok(())
}

async fn policy(cmd: PolicyCmd, format: Format) -> Result<()> {
    let c = client()?;
    match cmd {
        PolicyCmd::Write { name, file } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            c.post(&format!("sys/policies/acl/{name}"), &json!({ "policy": text })).await?;
            out!("Success! Uploaded policy: {name}");
        }
        PolicyCmd::Read { name } => {
            let reply = c.get(&format!("sys/policies/acl/{name}")).await?;
            if format == Format::Json {
                print_map(&reply["data"], format);
            } else {
                out!("{}", reply["data"]["policy"].as_str().unwrap_or_default());
            }
        }
        PolicyCmd::List => print_list(&c.list("sys/policies/acl").await?, format),
        PolicyCmd::Delete { name } => {
            c.delete(&format!("sys/policies/acl/{name}")).await?;
            out!("Success! Deleted policy: {name}");
        }
    }
    Ok(())
}

async fn user(cmd: UserCmd, format: Format) -> Result<()> {
    let c = client()?;
    match cmd {
        UserCmd::Create { username, password, policies } => {
            let password = read_secret("password", password)?;
            c.post(
                &format!("auth/userpass/users/{username}"),
                &json!({ "password": password, "token_policies": policies }),
            )
            .await?;
            out!("Success! Created user: {username}");
        }
        UserCmd::Delete { username } => {
            c.delete(&format!("auth/userpass/users/{username}")).await?;
            out!("Success! Deleted user: {username}");
        }
        UserCmd::List => {
            let keys = match c.list("auth/userpass/users").await {
                Err(e) if e.status().map(|s| s.as_u16()) == Some(404) => vec![],
                other => other?,
            };
            print_list(&keys, format);
        }
        UserCmd::Passwd { username, password } => {
            let password = read_secret("new password", password)?;
            c.post(&format!("auth/userpass/users/{username}/password"), &json!({ "password": password })).await?;
            out!("Success! Changed the password of: {username}");
        }
    }
    Ok(())
}

async fn audit(cmd: AuditCmd, format: Format) -> Result<()> {
    let c = client()?;
    match cmd {
        AuditCmd::List { node, user, path, since, limit } => {
            let mut query = vec![format!("limit={limit}")];
            if let Some(n) = node {
                query.push(format!("node={n}"));
            }
            for (k, v) in [("user", user), ("path", path), ("since", since)] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode_query(&v)));
                }
            }
            let reply = c.get(&format!("sys/audit/events?{}", query.join("&"))).await?;
            let mut rows: Vec<Value> = reply["data"]["events"].as_array().cloned().unwrap_or_default();
            for row in &mut rows {
                let time = row["time"].as_u64().unwrap_or(0);
                row["when"] = json!(citadel_core::time::rfc3339(time));
            }
            print_rows(
                &rows,
                &["when", "node", "chain", "seq", "kind", "operation", "path", "user", "status", "error"],
                format,
            );
        }
        AuditCmd::Verify { archive } if !archive.is_empty() => {
            let check = check_archives(&archive)?;
            let reply = c.get("sys/audit/verify").await?;
            let rows = archive_against_cluster(&check, &reply["data"])?;
            print_rows(&rows, &["chain", "first_seq", "last_seq", "last_hash", "cluster"], format);
        }
        AuditCmd::Verify { .. } => {
            let reply = c.get("sys/audit/verify").await?;
            let data = &reply["data"];
            print_map(data, format);
            if data["ok"] != json!(true) {
                bail!("audit verification failed: {}", data["error"].as_str().unwrap_or("unknown"));
            }
        }
    }
    Ok(())
}

/// Reads archive files (JSON lines of stored events) oldest first, checking every link.
fn check_archives(files: &[PathBuf]) -> Result<citadel_core::audit::ArchiveCheck> {
    use std::io::BufRead;
    let mut check = citadel_core::audit::ArchiveCheck::default();
    for path in files {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", path.display()))?;
            let event: citadel_core::audit::AuditEvent = serde_json::from_str(&line)
                .with_context(|| format!("{} line {}: not an audit event", path.display(), n + 1))?;
            check.add(&event).map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), n + 1))?;
        }
    }
    Ok(check)
}

/// Each archived chain beside the cluster's: its last archived event must be where retention
/// cut the cluster's chain (or before it, if a later archive continues it).
fn archive_against_cluster(check: &citadel_core::audit::ArchiveCheck, cluster: &Value) -> Result<Vec<Value>> {
    use citadel_core::audit::Chain;
    let mut rows = Vec::new();
    for (chain, first, last) in check.chains() {
        let view = match chain {
            Chain::Log => &cluster["log"],
            Chain::Node(node) => &cluster["nodes"][node.to_string()],
        };
        let cut = view["pruned_through"].as_u64().unwrap_or(0);
        let verdict = if last.seq > cut {
            bail!("{chain}: the archive ends at sequence {}, but the cluster pruned only through {cut}", last.seq);
        } else if last.seq == cut && view["pruned_hash"].as_str() != Some(last.hash.as_str()) {
            bail!(
                "{chain}: the archive's event {} is not the one the cluster pruned through (hashes differ)",
                last.seq
            );
        } else if last.seq == cut {
            "links to the retained chain".to_string()
        } else {
            format!("continued by a later archive (the cluster pruned through {cut})")
        };
        rows.push(json!({
            "chain": chain.to_string(),
            "first_seq": first,
            "last_seq": last.seq,
            "last_hash": last.hash,
            "cluster": verdict,
        }));
    }
    Ok(rows)
}

fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
