//! `fleet bench`: write throughput and latency against a running cluster.
//!
//! For each concurrency level, that many clients (each with its own connection) submit one task
//! per call, back to back, for the given time. Every counted write was acknowledged, so it was
//! committed on a quorum of fsynced logs. The report gives writes per second, latency
//! percentiles, and each level's throughput relative to the first level measured in the same
//! run (so the ratio, not the absolute number, is what carries across machines).

use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::cli::{connect, BenchArgs, Output};
use crate::config::Config;
use crate::rpc::SubmitTask;
use crate::state::RequestId;

#[derive(Debug, Serialize)]
pub struct LevelReport {
    pub clients: usize,
    pub seconds: f64,
    pub writes: u64,
    pub writes_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Throughput relative to the first level of this run.
    pub ratio_to_first: f64,
}

pub async fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let levels: Vec<usize> = args
        .clients
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            anyhow::anyhow!(
                "--clients {:?} is not valid: use numbers like 1,64",
                args.clients
            )
        })?;
    if levels.is_empty() || levels.iter().any(|&c| c == 0 || c > 1024) {
        bail!(
            "--clients {:?} is not valid: each level must be 1 to 1024",
            args.clients
        );
    }
    if args.seconds == 0 || args.seconds > 3600 {
        bail!("--seconds {} is not valid: use 1 to 3600", args.seconds);
    }
    let mut reports: Vec<LevelReport> = Vec::new();
    for &clients in &levels {
        let duration = Duration::from_secs(args.seconds);
        let mut handles = Vec::new();
        let timeline = args.timeline.is_some();
        for _ in 0..clients {
            let mut client = connect(config, &args.client)?;
            handles.push(tokio::spawn(async move {
                let mut latencies: Vec<Duration> = Vec::new();
                let mut acked_at: Vec<u128> = Vec::new();
                let started = Instant::now();
                while started.elapsed() < duration {
                    let task = SubmitTask {
                        request_id: RequestId(rand::random()),
                        task: crate::rpc::NewTask::command(vec!["true".into()]),
                    };
                    let t0 = Instant::now();
                    let r = client
                        .call(|c, ctx| {
                            let t = vec![task.clone()];
                            async move { c.submit(ctx, t, 0).await }
                        })
                        .await?;
                    r.into_iter()
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("empty reply"))??;
                    latencies.push(t0.elapsed());
                    if timeline {
                        acked_at.push(unix_nanos());
                    }
                }
                anyhow::Ok((latencies, acked_at))
            }));
        }
        let started = Instant::now();
        let mut all: Vec<Duration> = Vec::new();
        let mut lines: Vec<(u128, Duration)> = Vec::new();
        for h in handles {
            let (latencies, acked_at) = h.await??;
            lines.extend(acked_at.into_iter().zip(latencies.iter().copied()));
            all.extend(latencies);
        }
        if let Some(path) = &args.timeline {
            write_timeline(path, lines)?;
        }
        let secs = started.elapsed().as_secs_f64();
        all.sort();
        let pct = |p: f64| -> f64 {
            if all.is_empty() {
                return 0.0;
            }
            let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
            all[i].as_secs_f64() * 1000.0
        };
        let wps = all.len() as f64 / secs;
        let first = reports.first().map(|r| r.writes_per_sec).unwrap_or(wps);
        let report = LevelReport {
            clients,
            seconds: secs,
            writes: all.len() as u64,
            writes_per_sec: wps,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: all.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
            ratio_to_first: if first > 0.0 { wps / first } else { 0.0 },
        };
        if args.client.output == Output::Text {
            println!(
                "{:>5} clients: {:>9.0} writes/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  ({:.1}x the first level)",
                report.clients, report.writes_per_sec, report.p50_ms, report.p99_ms, report.max_ms, report.ratio_to_first
            );
        }
        reports.push(report);
    }
    if args.client.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(())
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Appends `UNIX_NANOS LATENCY_MICROS` lines, in acknowledgement order (one file for all levels).
fn write_timeline(path: &std::path::Path, mut lines: Vec<(u128, Duration)>) -> anyhow::Result<()> {
    use std::io::Write;
    lines.sort();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("--timeline {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (at, latency) in lines {
        writeln!(out, "{at} {}", latency.as_micros())?;
    }
    out.flush()?;
    Ok(())
}
