//! Metrics: what fleet measures, and where it is sent.
//!
//! Code records through the [`metrics`] facade with the names in [`names`] (every one is listed,
//! with its labels and meaning, in [`names::CATALOG`] and docs/metrics.md). [`install`] sets up
//! the process's recorder once, fanning out to:
//!
//! - **StatsD** (`[metrics] statsd = true`), through `metrics-exporter-statsd`. StatsD has no
//!   labels, so [`statsd::FlattenLabels`] appends label values to the name the way Airflow does
//!   (`fleet.tasks.<queue>.<state>`); `config/statsd-mapping.yml` turns them back into labels
//!   for Prometheus's `statsd_exporter`. Histograms are sent as timers, in milliseconds.
//! - **Prometheus** (`[metrics] prometheus = true`): the replica's HTTP endpoint serves
//!   `/metrics` from `metrics-exporter-prometheus`'s recorder, with the prefix and `_`
//!   (`fleet_tasks{queue="default",state="ready"}`), counters ending in `_total`, durations in
//!   seconds with histogram buckets.
//!
//! Both carry the same names, so one Grafana dashboard works with either path.
//!
//! Replicas record; the leader records the cluster-wide metrics (tasks, leases, workers), every
//! replica its own (Raft, fsync, snapshots) with a `node` label. Workers record nothing: the
//! leader sees everything they do.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::{FanoutBuilder, Layer, PrefixLayer};

use crate::config::MetricsConfig;

pub mod names;
pub mod sampler;
pub mod statsd;

/// Histogram buckets (seconds) for durations: 1 ms to about 1 hour.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static NODE: OnceLock<String> = OnceLock::new();

/// Installs the process's recorder (once; later calls are no-ops) and remembers `node` for the
/// per-replica metrics. Nothing is installed when both exporters are off.
pub fn install(config: &MetricsConfig, node: u64) -> anyhow::Result<()> {
    let _ = NODE.set(node.to_string());
    if PROMETHEUS.get().is_some() {
        return Ok(());
    }
    let mut fanout = FanoutBuilder::default();
    let mut any = false;
    let mut handle = None;
    if config.prometheus {
        let recorder = PrometheusBuilder::new()
            .with_recommended_naming(true)
            .set_buckets(DURATION_BUCKETS)
            .map_err(|e| anyhow::anyhow!("prometheus buckets: {e}"))?
            .build_recorder();
        handle = Some(recorder.handle());
        let prefix = format!("{}.", config.prefix);
        let prefixed = PrefixLayer::new(prefix.trim_end_matches('.')).layer(recorder);
        fanout = fanout.add_recorder(prefixed);
        any = true;
    }
    if config.statsd {
        let recorder = metrics_exporter_statsd::StatsdBuilder::from(
            config.statsd_host.clone(),
            config.statsd_port,
        )
        .histogram_is_timer()
        .build(Some(&config.prefix))
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot set up StatsD export to {}:{} (metrics.statsd_host, metrics.statsd_port): \
                 {e}",
                config.statsd_host,
                config.statsd_port
            )
        })?;
        fanout = fanout.add_recorder(statsd::FlattenLabels::new(recorder));
        any = true;
    }
    if PROMETHEUS.set(handle).is_err() {
        return Ok(());
    }
    if any {
        metrics::set_global_recorder(fanout.build())
            .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
        names::describe();
    }
    Ok(())
}

/// The Prometheus text exposition of every metric, when the Prometheus exporter is on.
pub fn render_prometheus() -> Option<String> {
    PROMETHEUS
        .get()
        .and_then(|h| h.as_ref())
        .map(|h| h.render())
}

/// Housekeeping of the Prometheus recorder (drains histogram samples); called by the sampler.
pub fn upkeep() {
    if let Some(Some(h)) = PROMETHEUS.get() {
        h.run_upkeep();
    }
}

/// This replica's node id as a label value ("0" before a replica started).
pub fn node() -> String {
    NODE.get().cloned().unwrap_or_else(|| "0".into())
}

/// Records a duration in seconds into a histogram.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Seconds between two millisecond timestamps (0 when `to` is earlier).
pub fn seconds_between_ms(from_ms: u64, to_ms: u64) -> f64 {
    to_ms.saturating_sub(from_ms) as f64 / 1000.0
}
