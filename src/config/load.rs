//! Where a [`Config`] comes from, in order of precedence (later wins):
//!
//! 1. the TOML file (`--config FILE`, else `/etc/fleet/fleet.toml` when it exists);
//! 2. environment variables `FLEET__SECTION__KEY` (`FLEET__RAFT__TIMING_MULTIPLIER=2`,
//!    `FLEET__QUEUES__REPORTS__MAX_ATTEMPTS=5`);
//! 3. command-line flags (applied by the command, after this module).
//!
//! A secret key ([`SECRET_KEYS`]) may instead be given as `KEY_file` (the file's contents, one
//! trailing newline removed) or `KEY_cmd` (the standard output of `sh -c CMD`, trailing
//! newlines removed), in the file or in the environment (`FLEET__NODE__AUTH_TOKEN_FILE`).
//!
//! Every layer is merged into one TOML table, which is then deserialized once: an unknown key, a
//! wrong type or a bad duration is an error that names the key, the layer it came from, the value
//! and what is accepted.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use toml::{Table, Value};

use super::Config;

/// Keys whose values are secrets: masked by `fleet config show`, and the only keys that may be
/// given as `KEY_file` or `KEY_cmd`.
pub const SECRET_KEYS: &[&str] = &["node.auth_token"];

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "FLEET__";

/// What `fleet config show` prints for a secret that is set.
pub const MASK: &str = "********";

/// The configuration from `file` (if any) and the `FLEET__*` variables among `env`, with
/// secrets resolved. Not yet validated (flags come next): call [`Config::validate`].
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Config> {
    let mut table = Table::new();
    // Where each key's value came from, for error messages.
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read config file {}: {e}", path.display()))?;
        table = text
            .parse::<Table>()
            .map_err(|e| anyhow!("config file {} is not valid TOML: {e}", path.display()))?;
        for key in leaf_keys(&table) {
            origin.insert(key, format!("config file {}", path.display()));
        }
    }
    let defaults = Value::try_from(Config::default()).expect("defaults serialize");
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.len() < 2 || path.iter().any(String::is_empty) {
            bail!(
                "environment variable {name}: expected FLEET__SECTION__KEY (e.g. \
                 FLEET__RAFT__TIMING_MULTIPLIER=2 for [raft] timing_multiplier)"
            );
        }
        let value = env_value(&defaults, &path, &raw);
        insert(&mut table, &path, value)
            .map_err(|e| anyhow!("environment variable {name}: {e}"))?;
        origin.insert(path.join("."), format!("environment variable {name}"));
    }
    resolve_secrets(&mut table, &mut origin)?;
    deserialize(table, &origin)
}

/// Deserializes the merged table; errors name the key and where it was set.
fn deserialize(table: Table, origin: &BTreeMap<String, String>) -> anyhow::Result<Config> {
    serde_path_to_error::deserialize::<_, Config>(Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.message().trim().to_string();
        // For an unknown key the path names its section; the message names the key.
        let from = origin
            .get(&key)
            .or_else(|| {
                origin
                    .iter()
                    .find(|(k, _)| k.starts_with(&format!("{key}.")))
                    .map(|(_, v)| v)
            })
            .map(|o| format!(" (set in {o})"))
            .unwrap_or_default();
        if key == "." || key.is_empty() {
            anyhow!("configuration: {msg}{from}")
        } else {
            anyhow!("configuration key {key}{from}: {msg}")
        }
    })
}

/// Every dotted leaf key of a table (`raft.heartbeat_interval_ms`).
fn leaf_keys(t: &Table) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in t {
        match v {
            Value::Table(inner) => {
                out.extend(leaf_keys(inner).into_iter().map(|x| format!("{k}.{x}")))
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

/// Types an environment value by the default at the same key: a string stays a string, a list
/// is comma-separated (or a TOML array), anything else is read as a TOML value (numbers,
/// booleans) and falls back to a string (durations such as `5s`).
fn env_value(defaults: &Value, path: &[String], raw: &str) -> Value {
    let default = path
        .iter()
        .try_fold(defaults, |v, k| v.as_table().and_then(|t| t.get(k)));
    match default {
        Some(Value::String(_)) => Value::String(raw.to_string()),
        Some(Value::Array(_)) if !raw.trim_start().starts_with('[') => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.to_string())),
    }
}

fn insert(table: &mut Table, path: &[String], value: Value) -> anyhow::Result<()> {
    let (last, sections) = path.split_last().expect("path has two or more parts");
    let mut t = table;
    for (i, s) in sections.iter().enumerate() {
        let entry = t
            .entry(s.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        t = match entry {
            Value::Table(inner) => inner,
            _ => bail!("{} is a value, not a section", sections[..=i].join(".")),
        };
    }
    t.insert(last.clone(), value);
    Ok(())
}

/// Replaces `KEY_file` and `KEY_cmd` by `KEY`, for secret keys only.
fn resolve_secrets(table: &mut Table, origin: &mut BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut found: Vec<(String, String, &'static str)> = Vec::new();
    for key in leaf_keys(table) {
        for suffix in ["_file", "_cmd"] {
            if let Some(base) = key.strip_suffix(suffix) {
                if SECRET_KEYS.contains(&base) {
                    found.push((key.clone(), base.to_string(), suffix));
                } else if leaf_exists(&Value::try_from(Config::default())?, base)
                    || leaf_exists(&Value::Table(table.clone()), base)
                {
                    let from = origin.get(&key).cloned().unwrap_or_default();
                    bail!(
                        "configuration key {key} ({from}): only secret keys can be read from a \
                         file or a command ({}); set {base} directly",
                        SECRET_KEYS
                            .iter()
                            .map(|k| format!("{k}_file, {k}_cmd"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
    }
    for (key, base, suffix) in found {
        let from = origin.get(&key).cloned().unwrap_or_default();
        let path: Vec<String> = key.split('.').map(String::from).collect();
        let base_path: Vec<String> = base.split('.').map(String::from).collect();
        let raw = remove(table, &path).expect("key was listed");
        if get(table, &base_path).is_some() {
            bail!(
                "configuration key {base} is given twice: directly ({}) and as {key} ({from}); \
                 keep one",
                origin.get(&base).cloned().unwrap_or_default()
            );
        }
        let Value::String(arg) = raw else {
            bail!("configuration key {key} ({from}): expected a string, got {raw}");
        };
        let secret = if suffix == "_file" {
            let text = std::fs::read_to_string(&arg).with_context(|| {
                format!("configuration key {key} ({from}): cannot read {arg:?}")
            })?;
            text.strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string()
        } else {
            run_secret_command(&key, &from, &arg)?
        };
        insert(table, &base_path, Value::String(secret))?;
        origin.insert(base.clone(), format!("{key} ({from})"));
    }
    Ok(())
}

/// Runs `sh -c cmd` for a secret. Its output is never echoed in an error.
fn run_secret_command(key: &str, from: &str, cmd: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("configuration key {key} ({from}): cannot run sh -c {cmd:?}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "configuration key {key} ({from}): the command {cmd:?} failed ({}){}",
            out.status,
            stderr
                .lines()
                .last()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        );
    }
    let text = String::from_utf8(out.stdout).map_err(|_| {
        anyhow!("configuration key {key} ({from}): the command {cmd:?} printed non-UTF-8 output")
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

fn get<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (last, sections) = path.split_last()?;
    let mut t = table;
    for s in sections {
        t = t.get(s)?.as_table()?;
    }
    t.get(last)
}

fn remove(table: &mut Table, path: &[String]) -> Option<Value> {
    let (last, sections) = path.split_last()?;
    let mut t = table;
    for s in sections {
        t = t.get_mut(s)?.as_table_mut()?;
    }
    t.remove(last)
}

fn leaf_exists(v: &Value, dotted: &str) -> bool {
    dotted
        .split('.')
        .try_fold(v, |v, k| v.as_table().and_then(|t| t.get(k)))
        .is_some()
}

/// The configuration as TOML, with every set secret replaced by [`MASK`].
pub fn masked(config: &Config) -> anyhow::Result<Table> {
    let Value::Table(mut t) = Value::try_from(config)? else {
        bail!("the configuration did not serialize to a table");
    };
    for key in SECRET_KEYS {
        let path: Vec<String> = key.split('.').map(String::from).collect();
        if let Some(Value::String(s)) = remove(&mut t, &path) {
            let shown = if s.is_empty() {
                String::new()
            } else {
                MASK.into()
            };
            insert(&mut t, &path, Value::String(shown))?;
        }
    }
    Ok(t)
}

/// A duration in milliseconds: an integer (milliseconds) or a string such as `"500ms"`, `"5s"`,
/// `"2m"`, `"1h 30m"`. For `#[serde(deserialize_with = "...")]` on every `*_ms` key.
pub fn duration_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ms::deserialize(d).map(|m| m.0)
}

/// [`duration_ms`] for optional keys.
pub fn opt_duration_ms<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<Ms>::deserialize(d).map(|m| m.map(|m| m.0))
}

struct Ms(u64);

impl<'de> Deserialize<'de> for Ms {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const EXPECTED: &str =
            "milliseconds as an integer (5000) or a duration string (\"500ms\", \"5s\", \"2m\", \"1h\")";
        impl serde::de::Visitor<'_> for V {
            type Value = Ms;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Ms, E> {
                Ok(Ms(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Ms, E> {
                u64::try_from(v).map(Ms).map_err(|_| {
                    E::custom(format!(
                        "invalid duration {v}: expected {EXPECTED}, not negative"
                    ))
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Ms, E> {
                let d = humantime::parse_duration(v.trim()).map_err(|e| {
                    E::custom(format!("invalid duration {v:?} ({e}); expected {EXPECTED}"))
                })?;
                u64::try_from(d.as_millis())
                    .map(Ms)
                    .map_err(|_| E::custom(format!("duration {v:?} is too long")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn environment_overrides_the_file_and_is_typed_by_the_key() {
        let f = file("[node]\ncluster_name = \"from-file\"\n[raft]\ntiming_multiplier = 3.0\n");
        let c = load(
            Some(f.path()),
            env(&[
                ("FLEET__NODE__CLUSTER_NAME", "123"),
                ("FLEET__NODE__PEERS", "10.0.0.1:7101, 10.0.0.2:7101"),
                ("FLEET__SCHEDULER__TICK_MS", "250ms"),
                ("FLEET__WORKER__CONCURRENCY", "16"),
                ("FLEET__QUEUES__REPORTS__MAX_ATTEMPTS", "7"),
                ("FLEET_PEERS", "ignored: one underscore"),
            ]),
        )
        .unwrap();
        assert_eq!(c.node.cluster_name, "123");
        assert_eq!(c.node.peers, vec!["10.0.0.1:7101", "10.0.0.2:7101"]);
        assert_eq!(c.raft.timing_multiplier, 3.0);
        assert_eq!(c.scheduler.tick_ms, 250);
        assert_eq!(c.worker.concurrency, 16);
        assert_eq!(c.queues["reports"].max_attempts, Some(7));
    }

    #[test]
    fn errors_name_the_key_the_layer_and_what_is_accepted() {
        let f = file("[raft]\nheartbeat_interval = 5\n");
        let e = load(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("raft") && e.contains("heartbeat_interval") && e.contains("config file"),
            "{e}"
        );
        assert!(
            e.contains("heartbeat_interval_ms"),
            "lists accepted keys: {e}"
        );
        let e = load(None, env(&[("FLEET__WORKER__CONCURRENCY", "four")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("worker.concurrency")
                && e.contains("FLEET__WORKER__CONCURRENCY")
                && e.contains("four"),
            "{e}"
        );
        let e = load(None, env(&[("FLEET__SCHEDULER__TICK_MS", "5 parsecs")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("scheduler.tick_ms") && e.contains("5 parsecs") && e.contains("\"5s\""),
            "{e}"
        );
        let e = load(None, env(&[("FLEET__RAFT", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLEET__SECTION__KEY"), "{e}");
        let e = load(None, env(&[("FLEET__NODE__LISTEN_FILE", "/etc/passwd")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only secret keys"), "{e}");
    }

    #[test]
    fn secrets_come_from_files_and_commands_and_are_masked() {
        let secret = file("s3cret\n");
        let c = load(
            None,
            env(&[(
                "FLEET__NODE__AUTH_TOKEN_FILE",
                secret.path().to_str().unwrap(),
            )]),
        )
        .unwrap();
        assert_eq!(c.node.auth_token, "s3cret");
        let f = file("[node]\nauth_token_cmd = \"printf 'from-cmd\\n'\"\n");
        let c = load(Some(f.path()), env(&[])).unwrap();
        assert_eq!(c.node.auth_token, "from-cmd");
        let shown = masked(&c).unwrap().to_string();
        assert!(
            !shown.contains("from-cmd") && shown.contains(MASK),
            "{shown}"
        );
        let f = file("[node]\nauth_token_cmd = \"echo nope >&2; exit 3\"\n");
        let e = load(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("node.auth_token_cmd") && e.contains("nope"),
            "{e}"
        );
        let f = file("[node]\nauth_token = \"a\"\nauth_token_file = \"/x\"\n");
        let e = load(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
