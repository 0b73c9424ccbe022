//! A plan: what happens to every source tensor. Pure data, built by [`crate::rules`],
//! consumed by the converter; it does no I/O.

use crate::dtype::DType;

/// One output tensor: where it comes from and how its axes move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    /// Index of the source tensor in the checkpoint's tensor list.
    pub source: usize,
    /// Source tensor name.
    pub source_name: String,
    /// Output tensor name.
    pub target: String,
    pub dtype: DType,
    pub source_shape: Vec<usize>,
    pub target_shape: Vec<usize>,
    /// Output axis `k` is source axis `perm[k]`.
    pub perm: Vec<usize>,
    /// The rule that produced this entry, for reports.
    pub rule: String,
}

impl PlanEntry {
    /// True when the op leaves the axes in place.
    pub fn is_identity(&self) -> bool {
        self.perm.iter().enumerate().all(|(i, &p)| i == p)
    }
}

/// A source tensor left out of the output, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub source: usize,
    pub name: String,
    pub reason: String,
}

/// The whole mapping of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Output tensors, in source order.
    pub entries: Vec<PlanEntry>,
    /// Tensors a rule dropped.
    pub dropped: Vec<Skipped>,
    /// Tensors no rule matched; they are not in the output.
    pub unmatched: Vec<Skipped>,
    /// Provenance: the preset and rule files this plan was built from.
    pub sources: Vec<String>,
}

impl Plan {
    /// Fails when some tensor matched no rule, naming the first; for callers that do
    /// not want tensors to vanish from the output silently.
    pub fn require_all_matched(&self) -> crate::error::Result<()> {
        match self.unmatched.first() {
            None => Ok(()),
            Some(first) => Err(crate::error::Error::Unmatched {
                count: self.unmatched.len(),
                first: first.name.clone(),
            }),
        }
    }

    /// The entry a source tensor became, if any.
    pub fn entry_for(&self, source_name: &str) -> Option<&PlanEntry> {
        self.entries.iter().find(|e| e.source_name == source_name)
    }
}
