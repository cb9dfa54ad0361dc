//! `fleet-peers`: load generators for the systems fleet is compared with (benches/compare.sh).
//!
//! - `etcd-writes`: N clients, each with its own connection, each putting one key per call back
//!   to back (the same shape as `fleet bench`); every acknowledged put was committed on a
//!   quorum of fsynced logs. Reports writes/s and latency, and optionally a timeline of
//!   acknowledgements (`UNIX_NANOS LATENCY_MICROS`, the format of `fleet bench --timeline`).
//! - `pg-queue`: a PostgreSQL job queue of the kind people build instead of a scheduler: a
//!   `jobs` table, claims with `FOR UPDATE SKIP LOCKED` in batches, completions in batches,
//!   `synchronous_commit = on`. N jobs are inserted (in batches of 1,000) and W workers with S
//!   slots each claim, run and complete them; the job is either nothing (in-process) or
//!   spawning `true` (a process per job, as fleet runs one). Reports jobs/s end to end.
//! - `machine`: the limits every system here shares: fsyncs/s on a directory, the loopback
//!   round trip, process spawns/s.

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replicated writes to etcd.
    EtcdWrites {
        /// etcd client URLs, comma-separated.
        #[arg(long)]
        endpoints: String,
        /// Concurrency levels, comma-separated.
        #[arg(long, default_value = "1,64")]
        clients: String,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Append one line per acknowledged write: `UNIX_NANOS LATENCY_MICROS`.
        #[arg(long)]
        timeline: Option<std::path::PathBuf>,
    },
    /// A PostgreSQL SKIP LOCKED queue, end to end.
    PgQueue {
        /// A tokio-postgres connection string (`host=/tmp port=5432 user=postgres`).
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 32)]
        slots: usize,
        /// `inproc` (the job does nothing) or `spawn` (the job runs `true`).
        #[arg(long, default_value = "inproc")]
        job: String,
    },
    /// fsyncs/s in DIR, the loopback round trip, process spawns/s.
    Machine {
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::EtcdWrites {
            endpoints,
            clients,
            seconds,
            timeline,
        } => etcd_writes(&endpoints, &clients, seconds, timeline).await,
        Command::PgQueue {
            url,
            jobs,
            workers,
            slots,
            job,
        } => pg_queue(&url, jobs, workers, slots, &job).await,
        Command::Machine { dir } => machine(&dir).await,
    }
}

#[derive(Serialize)]
struct Level {
    clients: usize,
    seconds: f64,
    writes: usize,
    writes_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn etcd_writes(
    endpoints: &str,
    clients: &str,
    seconds: u64,
    timeline: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_string).collect();
    let levels: Vec<usize> = clients
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<_, _>>()
        .context("--clients: use numbers like 1,64")?;
    let value = vec![b'x'; 64];
    let mut out = Vec::new();
    for &n in &levels {
        let mut handles = Vec::new();
        for c in 0..n {
            let endpoints = endpoints.clone();
            let value = value.clone();
            handles.push(tokio::spawn(async move {
                // One endpoint at a time, clients spread over them (etcd forwards a follower's
                // proposals to the leader); on an error the next endpoint at once, as fleet's
                // client moves to the next replica.
                let mut at = c % endpoints.len();
                let mut client = etcd_connect(&endpoints[at]).await?;
                let mut latencies = Vec::new();
                let mut acked = Vec::new();
                let started = Instant::now();
                let mut i = 0u64;
                while started.elapsed() < Duration::from_secs(seconds) {
                    let t0 = Instant::now();
                    let mut failures = 0usize;
                    loop {
                        match client
                            .put(format!("bench/{c}/{i}"), value.clone(), None)
                            .await
                        {
                            Ok(_) => break,
                            Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                                failures += 1;
                                if failures % endpoints.len() == 0 {
                                    // Every endpoint failed in a row: an election is on.
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                at = (at + 1) % endpoints.len();
                                if let Ok(fresh) = etcd_connect(&endpoints[at]).await {
                                    client = fresh;
                                }
                            }
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                    latencies.push(t0.elapsed());
                    acked.push(unix_nanos());
                    i += 1;
                }
                anyhow::Ok((latencies, acked))
            }));
        }
        let started = Instant::now();
        let mut all = Vec::new();
        let mut lines = Vec::new();
        for h in handles {
            let (l, a) = h.await??;
            lines.extend(a.into_iter().zip(l.iter().copied()));
            all.extend(l);
        }
        let secs = started.elapsed().as_secs_f64();
        all.sort();
        if let Some(path) = &timeline {
            lines.sort();
            let mut f = std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            );
            for (at, l) in lines {
                writeln!(f, "{at} {}", l.as_micros())?;
            }
        }
        out.push(Level {
            clients: n,
            seconds: secs,
            writes: all.len(),
            writes_per_sec: all.len() as f64 / secs,
            p50_ms: percentile(&all, 0.5),
            p99_ms: percentile(&all, 0.99),
        });
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// A client of one etcd endpoint; a request that gets no answer within a second fails.
async fn etcd_connect(endpoint: &str) -> anyhow::Result<etcd_client::Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(1));
    Ok(etcd_client::Client::connect([endpoint], Some(options)).await?)
}

async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("postgres connection: {e}");
        }
    });
    client
        .batch_execute("SET synchronous_commit = on")
        .await?;
    Ok(client)
}

#[derive(Serialize)]
struct QueueReport {
    jobs: usize,
    workers: usize,
    slots: usize,
    job: String,
    seconds: f64,
    jobs_per_sec: f64,
}

async fn pg_queue(
    url: &str,
    jobs: usize,
    workers: usize,
    slots: usize,
    job: &str,
) -> anyhow::Result<()> {
    if job != "inproc" && job != "spawn" {
        bail!("--job {job:?} is not valid: use inproc or spawn");
    }
    let db = pg_connect(url).await?;
    db.batch_execute(
        "DROP TABLE IF EXISTS jobs;
         CREATE TABLE jobs (
             id bigserial PRIMARY KEY,
             queue text NOT NULL,
             payload jsonb NOT NULL,
             state smallint NOT NULL DEFAULT 0,
             attempts int NOT NULL DEFAULT 0,
             leased_until timestamptz,
             created_at timestamptz NOT NULL DEFAULT now()
         );
         CREATE INDEX jobs_ready ON jobs (queue, id) WHERE state = 0;",
    )
    .await?;
    let started = Instant::now();
    // Workers start first and poll, as a deployed queue's would.
    let mut handles = Vec::new();
    for _ in 0..workers {
        let url = url.to_string();
        let spawn = job == "spawn";
        handles.push(tokio::spawn(async move {
            pg_worker(&url, slots, spawn, jobs).await
        }));
    }
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        db.execute(
            "INSERT INTO jobs (queue, payload)
             SELECT 'bench', '{\"command\": [\"true\"]}'::jsonb FROM generate_series(1, $1)",
            &[&(chunk.len() as i32)],
        )
        .await?;
    }
    for h in handles {
        h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let done: i64 = db
        .query_one("SELECT count(*) FROM jobs WHERE state = 2", &[])
        .await?
        .get(0);
    if done as usize != jobs {
        bail!("{done} of {jobs} jobs completed");
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&QueueReport {
            jobs,
            workers,
            slots,
            job: job.to_string(),
            seconds: secs,
            jobs_per_sec: jobs as f64 / secs,
        })?
    );
    Ok(())
}

/// One worker: claims up to its free slots in one statement, runs the jobs concurrently,
/// completes every finished job in one statement per round. Stops when the table holds no
/// unfinished job.
async fn pg_worker(url: &str, slots: usize, spawn: bool, total: usize) -> anyhow::Result<()> {
    let db = pg_connect(url).await?;
    let claim = db
        .prepare(
            "UPDATE jobs SET state = 1, attempts = attempts + 1,
                 leased_until = now() + interval '30 seconds'
             WHERE id IN (SELECT id FROM jobs WHERE state = 0 AND queue = 'bench'
                          ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id",
        )
        .await?;
    let complete = db
        .prepare("UPDATE jobs SET state = 2, leased_until = NULL WHERE id = ANY($1)")
        .await?;
    let mut running = futures::stream::FuturesUnordered::new();
    let mut done: Vec<i64> = Vec::new();
    use futures::StreamExt as _;
    loop {
        let free = slots - running.len();
        if free > 0 {
            let rows = db.query(&claim, &[&(free as i64)]).await?;
            for r in rows {
                let id: i64 = r.get(0);
                running.push(async move {
                    if spawn {
                        let _ = tokio::process::Command::new("true").status().await;
                    }
                    id
                });
            }
        }
        if running.is_empty() {
            // Nothing claimed: finished when every job is done or running elsewhere.
            let left: i64 = db
                .query_one("SELECT count(*) FROM jobs WHERE state < 2", &[])
                .await?
                .get(0);
            let inserted: i64 = db.query_one("SELECT count(*) FROM jobs", &[]).await?.get(0);
            if left == 0 && inserted as usize >= total {
                return Ok(());
            }
            // A poll interval while the submitter inserts (workload pacing).
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        // At least one job ends; take every other one that has ended too.
        if let Some(id) = running.next().await {
            done.push(id);
        }
        while let Some(Some(id)) = futures::FutureExt::now_or_never(running.next()) {
            done.push(id);
        }
        db.execute(&complete, &[&done]).await?;
        done.clear();
    }
}

#[derive(Serialize)]
struct Machine {
    fsyncs_per_sec: f64,
    loopback_round_trip_us: f64,
    spawns_per_sec: f64,
}

async fn machine(dir: &std::path::Path) -> anyhow::Result<()> {
    // fsync: 4 KiB appended and fdatasync'd, for one second.
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0u8; 4096];
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(1) {
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let fsyncs = n as f64 / t0.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    // Loopback: 1-byte ping-pong over TCP with NODELAY, median of 5,000.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        use std::io::Read as _;
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut rtts = Vec::new();
    for _ in 0..5000 {
        use std::io::Read as _;
        let t = Instant::now();
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        rtts.push(t.elapsed());
    }
    drop(s);
    let _ = echo.join();
    rtts.sort();
    // Spawns: `true`, one after another, for one second.
    let t0 = Instant::now();
    let mut spawns = 0u64;
    while t0.elapsed() < Duration::from_secs(1) {
        std::process::Command::new("true").status()?;
        spawns += 1;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Machine {
            fsyncs_per_sec: fsyncs,
            loopback_round_trip_us: rtts[rtts.len() / 2].as_secs_f64() * 1e6,
            spawns_per_sec: spawns as f64 / t0.elapsed().as_secs_f64(),
        })?
    );
    Ok(())
}
