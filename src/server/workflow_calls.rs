//! The workflow and run calls: definitions resolved on the leader into replicated commands,
//! and reads of workflows and runs.

use tarpc::context::Context;

use super::Replica;
use crate::error::Error;
use crate::rpc::workflows::{self, WorkflowOp, WorkflowOutcome};
use crate::state::{Command, CommandOutput, State};

/// Most changes in one `workflow_ops` call.
pub const MAX_WORKFLOW_OPS: usize = 100;

impl Replica {
    pub(crate) async fn workflow_ops(
        &self,
        ctx: Context,
        ops: Vec<WorkflowOp>,
        hop: u8,
    ) -> Result<Vec<Result<WorkflowOutcome, Error>>, Error> {
        if ops.len() > MAX_WORKFLOW_OPS {
            return Err(Error::InvalidArgument(format!(
                "{} changes in one call; at most {MAX_WORKFLOW_OPS} are accepted",
                ops.len()
            )));
        }
        if !self.raft.is_leader() {
            return self
                .forward(ctx, hop, |c, ctx| async move {
                    c.workflow_ops(ctx, ops, hop + 1).await
                })
                .await;
        }
        let now = self.clock.wall_ms();
        let resolved: Vec<Result<Command, Error>> = self
            .sm
            .read(|s| {
                ops.iter()
                    .map(|op| self.workflow_command(s, op, now))
                    .collect()
            })
            .await;
        let proposed = self.propose_resolved(resolved, Command::clone).await?;
        Ok(proposed
            .into_iter()
            .map(|r| {
                let (_, out) = r?;
                Ok(match out {
                    CommandOutput::WorkflowSaved { name, change } => {
                        WorkflowOutcome::Saved { name, change }
                    }
                    CommandOutput::WorkflowDeleted { name } => WorkflowOutcome::Deleted { name },
                    CommandOutput::RunStarted { run, duplicate } => {
                        WorkflowOutcome::Started { run, duplicate }
                    }
                    CommandOutput::RunUpdated { run, status } => {
                        WorkflowOutcome::Updated { run, status }
                    }
                    CommandOutput::WorkflowRuns { created, existing } => {
                        WorkflowOutcome::Backfilled { created, existing }
                    }
                    other => {
                        return Err(Error::Internal(format!(
                            "unexpected output for a workflow change: {other:?}"
                        )))
                    }
                })
            })
            .collect())
    }

    /// The command for one change, decided against the current state at `now`.
    fn workflow_command(&self, s: &State, op: &WorkflowOp, now: u64) -> Result<Command, Error> {
        Ok(match op {
            WorkflowOp::Apply(def) => {
                let (spec, schedule) = workflows::resolve(def, &self.config, now)?;
                Command::PutWorkflow {
                    name: def.name.clone(),
                    spec,
                    schedule,
                }
            }
            WorkflowOp::Delete(name) => Command::DeleteWorkflow { name: name.clone() },
            WorkflowOp::Run {
                workflow,
                params,
                request_id,
            } => {
                if s.workflows().get(workflow).is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "no workflow named {workflow:?}: apply its file first (`fleet workflow \
                         apply FILE`)"
                    )));
                }
                Command::StartRun {
                    workflow: workflow.clone(),
                    request_id: *request_id,
                    params: params.clone(),
                }
            }
            WorkflowOp::Cancel(run) => Command::CancelRun { run: *run },
            WorkflowOp::Retry { run, failed_only } => Command::RetryRun {
                run: *run,
                failed_only: *failed_only,
            },
            WorkflowOp::Backfill {
                workflow,
                from_ms,
                to_ms,
            } => {
                let missing = || Error::InvalidArgument(format!("no workflow named {workflow:?}"));
                let w = s.workflows().get(workflow).ok_or_else(missing)?;
                let sch = w
                    .schedule
                    .and_then(|id| s.schedules().by_id(id))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "workflow {workflow:?} has no schedule: a backfill runs its \
                             schedule's past ticks (add a [schedule] table, or start runs with \
                             `fleet workflow run`)"
                        ))
                    })?;
                let fires =
                    super::schedule_calls::backfill_fires(&sch.spec, *from_ms, *to_ms, now)?;
                Command::BackfillWorkflow {
                    name: workflow.clone(),
                    fires,
                }
            }
        })
    }
}
