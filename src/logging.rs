//! Logging: `tracing` to standard error, as text (coloured on a terminal) or as one JSON object
//! per line (`[log] format = "json"`), for journald, Loki or Elasticsearch.
//!
//! The filter is `RUST_LOG` when set, else `[log] level`, else the command's default (`info`
//! for replicas and workers, `warn` for client commands so their output stays clean). Spans
//! carry the context of every line: `replica{node}` for everything a replica does,
//! `worker{worker}` and `attempt{task, attempt, fencing_token}` in a worker; JSON lines carry
//! them as `span` and `spans` fields.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Fails on a filter that does not parse, naming it.
pub fn init(config: &LogConfig, default_level: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(&v)
            .map_err(|e| anyhow::anyhow!("RUST_LOG = {v:?} is not a valid filter: {e}"))?,
        _ if !config.level.is_empty() => EnvFilter::try_new(&config.level).map_err(|e| {
            anyhow::anyhow!(
                "log.level = {:?} is not valid ({e}); use a level (error, warn, info, debug, \
                 trace) or directives such as \"fleet=debug,openraft=warn\"",
                config.level
            )
        })?,
        _ => EnvFilter::new(default_level),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
