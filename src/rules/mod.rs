//! (placeholder until the rules branch lands)
use std::path::Path;

use crate::error::{Error, Result};
use crate::plan::{Plan, PlanEntry};
use crate::reader::TensorInfo;

#[derive(Clone, Debug, Default)]
pub struct RuleSet;

impl RuleSet {
    pub fn preset(name: &str) -> Result<RuleSet> {
        match name {
            "flax" | "mlx" => Ok(RuleSet),
            _ => Err(Error::UnknownPreset {
                name: name.to_string(),
                available: "flax, mlx".into(),
            }),
        }
    }
    pub fn preset_names() -> &'static [&'static str] {
        &["flax", "mlx"]
    }
    pub fn preset_source(_name: &str) -> Option<&'static str> {
        None
    }
    pub fn from_toml(_text: &str, _origin: &str) -> Result<RuleSet> {
        Ok(RuleSet)
    }
    pub fn from_file(_path: &Path) -> Result<RuleSet> {
        Ok(RuleSet)
    }
    pub fn layered(self, _over: RuleSet) -> RuleSet {
        self
    }
    pub fn plan(&self, tensors: &[TensorInfo]) -> Result<Plan> {
        Ok(Plan {
            entries: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| PlanEntry {
                    source: i,
                    source_name: t.name.clone(),
                    target: t.name.clone(),
                    dtype: t.dtype,
                    source_shape: t.shape.clone(),
                    target_shape: t.shape.clone(),
                    perm: (0..t.shape.len()).collect(),
                    rule: "identity".into(),
                })
                .collect(),
            ..Plan::default()
        })
    }
}
