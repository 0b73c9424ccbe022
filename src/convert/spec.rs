//! What a conversion is asked to do, and the one-call [`convert`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::BackendOptions;
use crate::convert::{ConvertReport, Converter, Interrupt, Progress, WriteOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::reader::{Checkpoint, OpenOptions};
use crate::rules::{ModuleTypes, PlanOptions, RuleSet};
use crate::writer::shard::Worker;
use crate::writer::OutputKind;

/// Everything [`convert`] needs besides the two paths.
#[derive(Clone, Debug, Default)]
pub struct ConvertSpec {
    /// Built-in preset to start from (see [`RuleSet::preset_names`]).
    pub preset: Option<String>,
    /// User rule files, layered over the preset in order (later files win).
    pub rules: Vec<PathBuf>,
    /// Training checkpoints: the key holding the state dict.
    pub key: Option<String>,
    /// Which backend runs the layout ops.
    pub backend: BackendOptions,
    /// Replace an existing output.
    pub force: bool,
    /// Leave tensors that match no rule out of the output instead of failing.
    pub allow_unmatched: bool,
    /// Accept views that expand their storage beyond the size policy
    /// ([`crate::reader::MAX_EXPANSION`]); the output must still fit on the disk.
    pub allow_expand: bool,
    /// Rule variables (`--set NAME=VALUE`).
    pub vars: BTreeMap<String, String>,
    /// A `{module name: class name}` JSON file (`--module-types`).
    pub module_types: Option<PathBuf>,
    /// Output dtype of every floating tensor (`--dtype`).
    pub dtype: Option<DType>,
    /// An expectation file (`--expect`): the plan must produce exactly its tensor names,
    /// shapes and dtypes, checked before anything is written.
    pub expect: Option<PathBuf>,
    /// Most bytes of tensor data per shard (`--max-shard-size`); for folder outputs.
    pub max_shard_size: Option<u64>,
    /// Write only this worker's shards (`--shard i/N`).
    pub worker: Option<Worker>,
    /// Stops the conversion when raised.
    pub interrupt: Option<Interrupt>,
}

impl ConvertSpec {
    /// How the spec opens its input.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            key: self.key.clone(),
            allow_expand: self.allow_expand,
        }
    }

    /// Fails with [`Error::Verify`] when `plan` does not produce what the expectation
    /// file asks for; passes when there is none.
    pub fn check_expectation(&self, plan: &Plan) -> Result<()> {
        if let Some(path) = &self.expect {
            crate::verify::Expectation::from_file(path)?
                .check_plan(plan)
                .into_result()?;
        }
        Ok(())
    }

    /// The planning options the spec describes; reads the module-types file.
    pub fn plan_options(&self) -> Result<PlanOptions> {
        Ok(PlanOptions {
            vars: self.vars.clone(),
            module_types: self
                .module_types
                .as_deref()
                .map(ModuleTypes::from_file)
                .transpose()?,
            dtype: self.dtype,
        })
    }
}

/// Builds the rule set of a preset and/or rule files.
pub fn rule_set(preset: Option<&str>, rule_files: &[PathBuf]) -> Result<RuleSet> {
    let mut rules = match preset {
        Some(name) => Some(RuleSet::preset(name)?),
        None => None,
    };
    for file in rule_files {
        let over = RuleSet::from_file(file)?;
        rules = Some(match rules {
            Some(base) => base.layered(over),
            None => over,
        });
    }
    rules.ok_or_else(|| Error::Rules {
        origin: "(none)".to_string(),
        detail: "give a preset or at least one rule file".to_string(),
    })
}

/// Plans `ckpt`, failing when tensors match no rule unless `allow_unmatched`.
pub fn plan_checkpoint(
    ckpt: &Checkpoint,
    rules: &RuleSet,
    opts: &PlanOptions,
    allow_unmatched: bool,
) -> Result<Plan> {
    let plan = rules.plan_with(ckpt.tensors(), opts)?;
    if !allow_unmatched {
        plan.require_all_matched()?;
    }
    Ok(plan)
}

/// Opens `input`, plans it and writes the converted checkpoint to `output`.
///
/// ```
/// # fn main() -> relayout::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("relayout-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// # let out = dir.join("small_cnn.flax.safetensors");
/// use relayout::{convert, ConvertSpec, Device};
/// let spec = ConvertSpec {
///     preset: Some("flax".into()),
///     backend: relayout::BackendOptions { device: Device::Cpu, ..Default::default() },
///     force: true,
///     ..Default::default()
/// };
/// let report = convert("tests/fixtures/small_cnn.pt", &out, &spec, &mut |_| {})?;
/// assert!(report.tensors > 0);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(())
/// # }
/// ```
pub fn convert(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
    spec: &ConvertSpec,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertReport> {
    let input = input.as_ref();
    let rules = rule_set(spec.preset.as_deref(), &spec.rules)?;
    let ckpt = Checkpoint::open_with(input, &spec.open_options())?;
    let plan = plan_checkpoint(&ckpt, &rules, &spec.plan_options()?, spec.allow_unmatched)?;
    spec.check_expectation(&plan)?;
    let output = output.as_ref();
    let kind = OutputKind::for_path(output, spec.max_shard_size, spec.worker)?;
    let backend = crate::backend::select(&spec.backend)?;
    let opts = WriteOptions {
        force: spec.force,
        metadata: provenance(spec, &plan),
        interrupt: spec.interrupt.clone(),
    };
    Converter::new(&ckpt, &plan, backend.as_ref()).write(output, &kind, &opts, progress)
}

/// The `relayout` metadata entry recording what produced a file.
pub fn provenance(spec: &ConvertSpec, plan: &Plan) -> BTreeMap<String, String> {
    let value = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "preset": spec.preset,
        "rules": plan.sources,
        "set": spec.vars,
        "dtype": spec.dtype.map(|d| d.to_string()),
        "dropped": plan.dropped.len(),
        "unmatched": plan.unmatched.len(),
    });
    BTreeMap::from([("relayout".to_string(), value.to_string())])
}
