//! Workflow definition files (TOML), read by the CLI before anything reaches the cluster.
//!
//! ```toml
//! name = "etl"
//! max_active_runs = 1
//! [defaults]            # task options every task starts from
//! queue = "default"
//! [tasks.extract]
//! command = ["sh", "-c", "extract.sh"]
//! [tasks.transform]
//! command = ["sh", "-c", "transform.sh"]
//! after = ["extract"]
//! [tasks.load]
//! command = ["sh", "-c", "load.sh"]
//! after = ["transform"]
//! trigger = "all_success"
//! ```
//!
//! Every key is checked (an unknown one is refused with its name), durations are written as
//! for `fleet submit` (`30s`, `1h`), and the graph is checked as the state machine will check
//! it again ([`crate::state::workflows::Graph`]): an unknown upstream, a cycle (with its
//! path), more than the stated limits. A task name defined twice is refused by the TOML
//! parser itself (a duplicate table).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::submit::{merge, parse_duration_ms, parse_env};
use crate::rpc::NewTask;
use crate::state::runs::MAX_ACTIVE_RUNS;
use crate::state::workflows::{Graph, TriggerRule};

/// A checked workflow definition, as the CLI sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowDef {
    pub name: String,
    pub max_active_runs: Option<u32>,
    pub tasks: BTreeMap<String, WorkflowTaskDef>,
}

/// One task of a [`WorkflowDef`]: its options (the file's `[defaults]` filled in), upstream
/// tasks and trigger rule.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowTaskDef {
    pub task: NewTask,
    pub after: Vec<String>,
    pub trigger: TriggerRule,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    max_active_runs: Option<u32>,
    #[serde(default)]
    defaults: Options,
    /// Each task's table: `command`, `after` and `trigger`, then the keys of [`Options`].
    #[serde(default)]
    tasks: BTreeMap<String, toml::Table>,
}

/// The task options of a file, for `[defaults]` and each task.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    queue: Option<String>,
    priority: Option<i32>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    max_attempts: Option<u32>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    backoff_multiplier: Option<f64>,
    timeout: Option<String>,
    visibility_timeout: Option<String>,
    pool: Option<String>,
    pool_slots: Option<u32>,
}

impl Options {
    /// The options as a task without a command; errors name the key.
    fn new_task(&self) -> Result<NewTask, String> {
        let dur = |key: &str, v: &Option<String>| -> Result<Option<u64>, String> {
            v.as_deref()
                .map(parse_duration_ms)
                .transpose()
                .map_err(|e| format!("{key}: {e}"))
        };
        for k in self.env.keys() {
            parse_env(&format!("{k}=x")).map_err(|e| format!("env: {e}"))?;
        }
        Ok(NewTask {
            queue: self.queue.clone(),
            priority: self.priority,
            env: self.env.clone(),
            max_attempts: self.max_attempts,
            backoff_initial_ms: dur("backoff_initial", &self.backoff_initial)?,
            backoff_max_ms: dur("backoff_max", &self.backoff_max)?,
            backoff_multiplier: self.backoff_multiplier,
            timeout_ms: dur("timeout", &self.timeout)?,
            visibility_timeout_ms: dur("visibility_timeout", &self.visibility_timeout)?,
            pool: self.pool.clone(),
            pool_slots: self.pool_slots,
            ..NewTask::default()
        })
    }
}

/// A task's table, split.
struct TaskTable {
    command: Vec<String>,
    after: Vec<String>,
    trigger: Option<String>,
    options: Options,
}

/// Splits a task's table into its command, upstream tasks, trigger and options (whose
/// unknown keys are refused by name, as everywhere in the file).
fn split_task(mut t: toml::Table) -> Result<TaskTable, String> {
    fn take<T: serde::de::DeserializeOwned>(
        t: &mut toml::Table,
        key: &str,
    ) -> Result<Option<T>, String> {
        t.remove(key)
            .map(|v| v.try_into().map_err(|e| format!("{key}: {e}")))
            .transpose()
    }
    let command: Vec<String> = take(&mut t, "command")?.ok_or("command is missing")?;
    let after: Vec<String> = take(&mut t, "after")?.unwrap_or_default();
    let trigger: Option<String> = take(&mut t, "trigger")?;
    let options: Options = toml::Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    Ok(TaskTable {
        command,
        after,
        trigger,
        options,
    })
}

/// Parses and checks a workflow file's text; errors say which task and key are wrong.
pub fn parse_workflow(text: &str) -> Result<WorkflowDef, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    crate::state::workflows::check_workflow_name(&file.name).map_err(|e| e.to_string())?;
    if file.tasks.is_empty() {
        return Err("the workflow has no task: add at least one [tasks.NAME] table".into());
    }
    if let Some(n) = file.max_active_runs {
        if !(1..=MAX_ACTIVE_RUNS).contains(&n) {
            return Err(format!(
                "max_active_runs = {n} is not valid: use 1 to {MAX_ACTIVE_RUNS}"
            ));
        }
    }
    let defaults = file
        .defaults
        .new_task()
        .map_err(|e| format!("[defaults] {e}"))?;
    let mut tasks = BTreeMap::new();
    for (name, t) in file.tasks {
        let at = |e: String| format!("task {name:?}: {e}");
        let TaskTable {
            command,
            after,
            trigger,
            options,
        } = split_task(t).map_err(at)?;
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(at(
                "command is empty: give a program and its arguments".into()
            ));
        }
        let trigger = trigger
            .as_deref()
            .map(TriggerRule::parse)
            .transpose()
            .map_err(at)?
            .unwrap_or_default();
        let own = options.new_task().map_err(at)?;
        let task = merge(NewTask { command, ..own }, &defaults);
        if let Some(q) = &task.queue {
            crate::state::validate_queue_name(q).map_err(|e| at(format!("queue: {e}")))?;
        }
        tasks.insert(
            name,
            WorkflowTaskDef {
                task,
                after,
                trigger,
            },
        );
    }
    let edges: BTreeMap<String, Vec<String>> = tasks
        .iter()
        .map(|(n, t)| (n.clone(), t.after.clone()))
        .collect();
    Graph::new(&edges).map_err(|e| e.to_string())?;
    Ok(WorkflowDef {
        name: file.name,
        max_active_runs: file.max_active_runs,
        tasks,
    })
}

/// `fleet workflow ...`.
#[derive(clap::Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Check a workflow file and print its graph in topological layers. Reads the file only:
    /// nothing is sent to the cluster (storing and running workflows is not built yet).
    Validate {
        /// The workflow file (TOML).
        file: std::path::PathBuf,
    },
}

pub fn workflow(cmd: WorkflowCommand) -> anyhow::Result<()> {
    match cmd {
        WorkflowCommand::Validate { file } => {
            let def = read_workflow_file(&file)?;
            print!("{}", render_graph(&def));
            Ok(())
        }
    }
}

/// The graph as text: a summary line, then each layer's tasks with their upstream tasks and
/// any trigger rule other than the default.
pub fn render_graph(def: &WorkflowDef) -> String {
    let edges: BTreeMap<String, Vec<String>> = def
        .tasks
        .iter()
        .map(|(n, t)| (n.clone(), t.after.clone()))
        .collect();
    let graph = match Graph::new(&edges) {
        Ok(g) => g,
        Err(e) => return format!("{e}\n"),
    };
    let layers = graph.layers();
    let edge_count: usize = graph.upstream.iter().map(Vec::len).sum();
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let mut out = format!(
        "workflow {}: {}, {}, {}\n",
        def.name,
        count(def.tasks.len(), "task"),
        count(edge_count, "edge"),
        count(layers.len(), "layer")
    );
    for (i, layer) in layers.iter().enumerate() {
        out.push_str(&format!("layer {}:\n", i + 1));
        for &node in layer {
            let name = &graph.names[node];
            let t = &def.tasks[name];
            out.push_str(&format!("  {name}"));
            if !t.after.is_empty() {
                out.push_str(&format!("  after {}", t.after.join(", ")));
            }
            if t.trigger != TriggerRule::default() {
                out.push_str(&format!("  (trigger {})", t.trigger.as_str()));
            }
            out.push('\n');
        }
    }
    out
}

/// Reads and checks a workflow file; errors name the file.
pub fn read_workflow_file(path: &Path) -> anyhow::Result<WorkflowDef> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read workflow file {}: {e}", path.display()))?;
    parse_workflow(&text).map_err(|e| anyhow::anyhow!("workflow file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETL: &str = r#"
name = "etl"
[defaults]
queue = "default"
[tasks.extract]
command = ["sh", "-c", "extract.sh"]
[tasks.transform]
command = ["sh", "-c", "transform.sh"]
after = ["extract"]
[tasks.load]
command = ["sh", "-c", "load.sh"]
after = ["transform"]
trigger = "all_success"
"#;

    fn refused(text: &str) -> String {
        parse_workflow(text).expect_err("refused")
    }

    #[test]
    fn the_issue_s_example_parses_with_defaults_filled_in() {
        let w = parse_workflow(ETL).expect("valid");
        assert_eq!(w.name, "etl");
        assert_eq!(w.tasks.len(), 3);
        let load = &w.tasks["load"];
        assert_eq!(load.after, vec!["transform"]);
        assert_eq!(load.trigger, TriggerRule::AllSuccess);
        assert_eq!(load.task.queue.as_deref(), Some("default"));
        assert_eq!(load.task.command, vec!["sh", "-c", "load.sh"]);
    }

    #[test]
    fn the_graph_is_printed_in_layers() {
        let w = parse_workflow(&ETL.replace("trigger = \"all_success\"", "trigger = \"all_done\""))
            .expect("valid");
        assert_eq!(
            render_graph(&w),
            "workflow etl: 3 tasks, 2 edges, 3 layers\n\
             layer 1:\n  extract\n\
             layer 2:\n  transform  after extract\n\
             layer 3:\n  load  after transform  (trigger all_done)\n"
        );
    }

    #[test]
    fn a_task_s_own_options_win_over_the_defaults() {
        let w = parse_workflow(
            r#"
name = "w"
max_active_runs = 2
[defaults]
queue = "q1"
timeout = "10m"
env = { A = "1", B = "1" }
[tasks.a]
command = ["true"]
queue = "q2"
env = { B = "2" }
"#,
        )
        .expect("valid");
        let a = &w.tasks["a"].task;
        assert_eq!(a.queue.as_deref(), Some("q2"));
        assert_eq!(a.timeout_ms, Some(600_000));
        assert_eq!(a.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(a.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(w.max_active_runs, Some(2));
    }

    #[test]
    fn bad_files_are_refused_with_what_is_wrong() {
        let cycle = format!("{ETL}\n[tasks.again]\ncommand = [\"true\"]\nafter = [\"load\"]\n")
            .replace(
                "[tasks.extract]\ncommand = [\"sh\", \"-c\", \"extract.sh\"]",
                "[tasks.extract]\ncommand = [\"sh\", \"-c\", \"extract.sh\"]\nafter = [\"again\"]",
            );
        let e = refused(&cycle);
        assert!(
            e.contains("cycle: again -> extract -> transform -> load -> again"),
            "{e}"
        );
        let e = refused(&ETL.replace("after = [\"extract\"]", "after = [\"extrakt\"]"));
        assert!(e.contains("\"transform\" runs after \"extrakt\""), "{e}");
        let e = refused(&format!("{ETL}\n[tasks.load]\ncommand = [\"true\"]\n"));
        assert!(e.contains("duplicate") && e.contains("load"), "{e}");
        let e = refused(&ETL.replace("trigger = \"all_success\"", "triger = \"all_success\""));
        assert!(e.contains("task \"load\"") && e.contains("triger"), "{e}");
        let e = refused(&format!("{ETL}\n[tasks.nothing]\nafter = [\"load\"]\n"));
        assert!(e.contains("task \"nothing\": command is missing"), "{e}");
        let e = refused(&ETL.replace("name = \"etl\"", "name = \"etl\"\nretries = 3"));
        assert!(e.contains("retries"), "{e}");
        let e = refused(&ETL.replace("all_success", "none_failed"));
        assert!(
            e.contains("task \"load\"") && e.contains("none_failed"),
            "{e}"
        );
        let e = refused(&ETL.replace(
            "[defaults]\nqueue = \"default\"",
            "[defaults]\ntimeout = \"soon\"",
        ));
        assert!(
            e.contains("[defaults] timeout") && e.contains("\"soon\""),
            "{e}"
        );
        let e = refused("name = \"empty\"\n");
        assert!(e.contains("no task"), "{e}");
        let e = refused(&ETL.replace("command = [\"sh\", \"-c\", \"load.sh\"]", "command = []"));
        assert!(e.contains("task \"load\": command is empty"), "{e}");
        let e = refused(&format!("max_active_runs = 0\n{ETL}"));
        assert!(e.contains("max_active_runs = 0"), "{e}");
    }

    #[test]
    fn a_ten_thousand_task_file_is_accepted_and_one_more_is_refused_with_the_limit() {
        let mut text = String::from("name = \"big\"\n");
        for i in 0..crate::state::workflows::MAX_WORKFLOW_TASKS {
            text.push_str(&format!("[tasks.t{i}]\ncommand = [\"true\"]\n"));
            if i > 0 {
                text.push_str(&format!("after = [\"t{}\"]\n", i - 1));
            }
        }
        assert_eq!(parse_workflow(&text).expect("accepted").tasks.len(), 10_000);
        text.push_str("[tasks.extra]\ncommand = [\"true\"]\n");
        assert!(refused(&text).contains("at most 10000 tasks"));
    }
}
