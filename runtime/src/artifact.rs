//! Compiled artifacts on disk: a directory with `plan.json` and the kernel library.

use std::path::{Path, PathBuf};

use crate::plan::{PLAN_FORMAT, Plan, Step};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{0} is not a compiled artifact: it has no plan.json")]
    Missing(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} has plan format {found}, this runtime reads format {expected}; recompile the model"
    )]
    Format {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
}

/// A loaded plan and where its files are.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub dir: PathBuf,
    pub plan: Plan,
}

impl Artifact {
    /// Reads and checks an artifact directory.
    pub fn load(dir: &Path) -> Result<Artifact, ArtifactError> {
        let plan_path = dir.join("plan.json");
        if !plan_path.exists() {
            return Err(ArtifactError::Missing(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&plan_path).map_err(|e| ArtifactError::Read {
            path: plan_path.clone(),
            message: e.to_string(),
        })?;
        let corrupt = |message: String| ArtifactError::Corrupt {
            path: plan_path.clone(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let format = value
            .get("format")
            .and_then(|f| f.as_u64())
            .ok_or_else(|| corrupt("no plan format".into()))?;
        if format != u64::from(PLAN_FORMAT) {
            return Err(ArtifactError::Format {
                path: plan_path,
                found: format as u32,
                expected: PLAN_FORMAT,
            });
        }
        let plan: Plan = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        check(&plan).map_err(corrupt)?;
        let library = dir.join(&plan.library);
        if !library.exists() {
            return Err(ArtifactError::Corrupt {
                path: library,
                message: "the kernel library is missing".into(),
            });
        }
        Ok(Artifact {
            dir: dir.to_path_buf(),
            plan,
        })
    }
}

/// Checks that every index in the plan points at something.
fn check(plan: &Plan) -> Result<(), String> {
    use crate::plan::Operand::*;
    for (i, step) in plan.steps.iter().enumerate() {
        let ok = match step {
            Step::Kernel {
                kernel,
                operands,
                schedule,
                ..
            } => {
                *kernel < plan.kernels.len()
                    && schedule.is_none_or(|s| s < plan.schedules.len())
                    && operands.iter().all(|o| match *o {
                        Input(x) => x < plan.inputs.len(),
                        Weight(x) => x < plan.weights.len(),
                        Packed(x) => x < plan.packed.len(),
                        Value(x) => x < plan.values.len(),
                        Constant(x) => x < plan.constants.len(),
                        Positions => true,
                        Workspace(x) => x < plan.workspaces.len(),
                        ScheduleRows(x)
                        | ScheduleTiles(x)
                        | ScheduleColumns(x)
                        | ScheduleColumnTiles(x) => x < plan.schedules.len(),
                        RopeCos(x) | RopeSin(x) => x < plan.rope_tables.len(),
                        CacheKeys(x) | CacheValues(x) | CachePositions(x) => x < plan.caches.len(),
                    })
            }
            Step::Schedule { id } => *id < plan.schedules.len(),
        };
        if !ok {
            return Err(format!(
                "step {i} refers to something the plan does not have"
            ));
        }
    }
    if plan
        .caches
        .iter()
        .any(|c| c.block == 0 || c.kv_heads == 0 || c.ring == Some(0) && c.sinks == 0)
    {
        return Err("a KV cache of the plan has no room".into());
    }
    for p in &plan.packed {
        if p.weight >= plan.weights.len()
            || p.norm.is_some_and(|n| n >= plan.weights.len())
            || p.group == 0
            || p.nr == 0
        {
            return Err("a packed weight refers to something the plan does not have".into());
        }
    }
    if plan.values.iter().any(|v| v.slot >= plan.slots)
        || plan.outputs.iter().any(|(_, v)| *v >= plan.values.len())
    {
        return Err("a value refers to a memory slot the plan does not have".into());
    }
    Ok(())
}
