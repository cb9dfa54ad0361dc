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
use crate::rpc::{ReadMode, SubmitTask};
use crate::state::{RequestId, TaskId, TaskState};

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
    if let Some(n) = args.start_latency {
        return start_latency(config, &args, n).await;
    }
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

/// What `--start-latency` reports.
#[derive(Debug, Serialize)]
pub struct StartLatencyReport {
    pub tasks: usize,
    pub queue: String,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `fleet bench --start-latency N`: one persistent client, one task at a time on an idle
/// fleet; submit call -> the start time the task printed. Both clocks are this machine's (the
/// worker must run here).
async fn start_latency(config: &Config, args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    if n == 0 || n > 100_000 {
        bail!("--start-latency {n} is not valid: use 1 to 100000 tasks");
    }
    crate::state::validate_queue_name(&args.queue).map_err(|e| anyhow::anyhow!("--queue: {e}"))?;
    let command = if args.command.is_empty() {
        vec!["bash".into(), "-c".into(), "echo $EPOCHREALTIME".into()]
    } else {
        args.command.clone()
    };
    let mut client = connect(config, &args.client)?;
    let mut latencies: Vec<f64> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut new = crate::rpc::NewTask::command(command.clone());
        new.queue = Some(args.queue.clone());
        let task = SubmitTask {
            request_id: RequestId(rand::random()),
            task: new,
        };
        let submitted_at = unix_nanos();
        let r = client
            .call(|c, ctx| {
                let t = vec![task.clone()];
                async move { c.submit(ctx, t, 0).await }
            })
            .await?;
        let id = r
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("empty reply"))??
            .id;
        let started = wait_for_start_time(&mut client, id).await?;
        latencies.push((started - submitted_at as f64 / 1e9) * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((n as f64 * p).ceil() as usize).clamp(1, n) - 1];
    let report = StartLatencyReport {
        tasks: n,
        queue: args.queue.clone(),
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: latencies[n - 1],
    };
    if args.client.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{n} tasks on queue {}: submit -> task start p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            report.queue, report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms
        );
    }
    Ok(())
}

/// Waits (polling, 2 ms apart) until task `id` succeeded; the start time it printed.
async fn wait_for_start_time(
    client: &mut crate::client::Client,
    id: TaskId,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = client
            .call(|c, ctx| async move { c.get_task(ctx, id, ReadMode::Local, 0).await })
            .await?;
        if let Some(t) = reply.value {
            match t.state {
                TaskState::Succeeded => {
                    let out = t
                        .attempts
                        .last()
                        .map(|a| a.output_tail.clone())
                        .unwrap_or_default();
                    return out
                        .split_whitespace()
                        .next()
                        .and_then(|w| w.parse::<f64>().ok())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "task {id} printed {out:?}: expected its start time in seconds \
                                 since the epoch first (as bash's $EPOCHREALTIME)"
                            )
                        });
                }
                s if s.is_final() => bail!("task {id} ended {}", s.as_str()),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            bail!("task {id} did not finish within 30 s: is a worker serving its queue?");
        }
        // Polling pace of a benchmark, not synchronization.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
