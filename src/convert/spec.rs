//! What a conversion is asked to do, and the one-call [`convert`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::{BackendOptions, Device};
use crate::convert::{ConvertReport, Converter, Interrupt, Progress, WriteOptions};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::plan::Plan;
use crate::reader::{Checkpoint, OpenOptions};
use crate::rules::{ModuleTypes, PlanOptions, RuleSet};
use crate::writer::shard::Worker;
use crate::writer::OutputKind;

/// Everything [`convert`] needs besides the two paths, built step by step:
///
/// ```
/// use relayout::{ConvertSpec, Device};
/// let spec = ConvertSpec::new()
///     .preset("flax")
///     .device(Device::Cpu)
///     .dtype_name("bf16")?
///     .var("heads", "12")
///     .force(true);
/// assert_eq!(spec.preset_name(), Some("flax"));
/// # Ok::<(), relayout::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ConvertSpec {
    pub(crate) preset: Option<String>,
    pub(crate) rules: Vec<PathBuf>,
    pub(crate) key: Option<String>,
    pub(crate) backend: BackendOptions,
    pub(crate) force: bool,
    pub(crate) allow_unmatched: bool,
    pub(crate) allow_expand: bool,
    pub(crate) vars: BTreeMap<String, String>,
    pub(crate) module_types: Option<PathBuf>,
    pub(crate) dtype: Option<DType>,
    pub(crate) expect: Option<PathBuf>,
    pub(crate) max_shard_size: Option<u64>,
    pub(crate) worker: Option<Worker>,
    pub(crate) interrupt: Option<Interrupt>,
    /// Leave the model folder's files (config, tokenizer, …) out of a folder output.
    pub(crate) no_copy_files: bool,
    /// `--dtype source`: keep every source dtype, even where the preset would take the
    /// config's.
    pub(crate) keep_source_dtype: bool,
    /// Quantize as mlx-lm's `convert -q` does (the `mlx-lm` preset only).
    pub(crate) quantize: Option<crate::model::quantize::QuantizeOptions>,
}

impl ConvertSpec {
    /// A spec with nothing set: no preset or rules yet (one of them is needed), the
    /// `auto` device, one output file.
    pub fn new() -> ConvertSpec {
        ConvertSpec::default()
    }

    /// The built-in preset to start from (see [`RuleSet::preset_names`]).
    pub fn preset(mut self, name: impl Into<String>) -> ConvertSpec {
        self.preset = Some(name.into());
        self
    }

    /// A user rule file, layered over the preset and the files before it (later wins).
    pub fn rule_file(mut self, path: impl Into<PathBuf>) -> ConvertSpec {
        self.rules.push(path.into());
        self
    }

    /// User rule files, in order, after those given before.
    pub fn rule_files<P: Into<PathBuf>>(
        mut self,
        paths: impl IntoIterator<Item = P>,
    ) -> ConvertSpec {
        self.rules.extend(paths.into_iter().map(Into::into));
        self
    }

    /// `set(self, value)` when there is a value, else the spec as it is: for front ends
    /// whose options are optional, `spec.maybe(args.key, ConvertSpec::key)`.
    pub fn maybe<T>(
        self,
        value: Option<T>,
        set: impl FnOnce(ConvertSpec, T) -> ConvertSpec,
    ) -> ConvertSpec {
        match value {
            Some(v) => set(self, v),
            None => self,
        }
    }

    /// Training checkpoints: the key holding the state dict.
    pub fn key(mut self, key: impl Into<String>) -> ConvertSpec {
        self.key = Some(key.into());
        self
    }

    /// Which backend runs the layout ops.
    pub fn backend(mut self, backend: BackendOptions) -> ConvertSpec {
        self.backend = backend;
        self
    }

    /// The backend by device, on the preferred adapter.
    pub fn device(mut self, device: Device) -> ConvertSpec {
        self.backend.device = device;
        self
    }

    /// Replace an existing output.
    pub fn force(mut self, force: bool) -> ConvertSpec {
        self.force = force;
        self
    }

    /// Leave tensors that match no rule out of the output instead of failing.
    pub fn allow_unmatched(mut self, allow: bool) -> ConvertSpec {
        self.allow_unmatched = allow;
        self
    }

    /// Accept views that expand their storage beyond the size policy
    /// ([`crate::reader::MAX_EXPANSION`]); the output must still fit on the disk.
    pub fn allow_expand(mut self, allow: bool) -> ConvertSpec {
        self.allow_expand = allow;
        self
    }

    /// A rule variable (`--set NAME=VALUE`).
    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> ConvertSpec {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// Rule variables, added to those set before.
    pub fn vars(mut self, vars: impl IntoIterator<Item = (String, String)>) -> ConvertSpec {
        self.vars.extend(vars);
        self
    }

    /// A `{module name: class name}` JSON file (`--module-types`).
    pub fn module_types(mut self, path: impl Into<PathBuf>) -> ConvertSpec {
        self.module_types = Some(path.into());
        self
    }

    /// Output dtype of every floating tensor (`--dtype`); `None` keeps each source's
    /// (or, with the `mlx-lm` preset, takes the config's declared dtype).
    pub fn dtype(mut self, dtype: Option<DType>) -> ConvertSpec {
        self.dtype = dtype;
        self.keep_source_dtype = false;
        self
    }

    /// [`ConvertSpec::dtype`] by name, as `--dtype` and Python's `dtype=` take it:
    /// `bf16`, `f16`, `f32` (or `bfloat16`, `float16`, `float32`), or `source`, which
    /// keeps every source dtype even where the preset would take the config's.
    pub fn dtype_name(self, name: &str) -> Result<ConvertSpec> {
        if name.eq_ignore_ascii_case("source") {
            let mut spec = self.dtype(None);
            spec.keep_source_dtype = true;
            return Ok(spec);
        }
        Ok(self.dtype(Some(PlanOptions::parse_dtype(name)?)))
    }

    /// An expectation file (`--expect`): the plan must produce exactly its tensor
    /// names, shapes and dtypes, checked before anything is written.
    pub fn expect(mut self, path: impl Into<PathBuf>) -> ConvertSpec {
        self.expect = Some(path.into());
        self
    }

    /// Most bytes of tensor data per shard (`--max-shard-size`); for folder outputs.
    /// Zero is refused when the output is opened.
    pub fn max_shard_size(mut self, bytes: Option<u64>) -> ConvertSpec {
        self.max_shard_size = bytes;
        self
    }

    /// Write only this worker's shards (`--shard i/N`).
    pub fn worker(mut self, worker: Option<Worker>) -> ConvertSpec {
        self.worker = worker;
        self
    }

    /// Stops the conversion when raised.
    pub fn interrupt(mut self, interrupt: Interrupt) -> ConvertSpec {
        self.interrupt = Some(interrupt);
        self
    }

    /// Whether a folder output receives the model folder's files (`config.json`, the
    /// tokenizer, …) when the input is a model folder; on unless turned off
    /// (`--no-copy-files`).
    pub fn copy_files(mut self, copy: bool) -> ConvertSpec {
        self.no_copy_files = !copy;
        self
    }

    /// Quantize the output as `mlx_lm.convert -q` does, with these parameters (`None`:
    /// no quantization). Only the `mlx-lm` preset takes it; the parameters are checked
    /// when the conversion is planned, before any work.
    pub fn quantize(
        mut self,
        opts: Option<crate::model::quantize::QuantizeOptions>,
    ) -> ConvertSpec {
        self.quantize = opts;
        self
    }

    /// The quantization asked for, if any.
    pub fn quantize_options(&self) -> Option<&crate::model::quantize::QuantizeOptions> {
        self.quantize.as_ref()
    }

    /// The preset, if one was given.
    pub fn preset_name(&self) -> Option<&str> {
        self.preset.as_deref()
    }

    /// The backend options.
    pub fn backend_options(&self) -> &BackendOptions {
        &self.backend
    }

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

    /// The planning options the spec describes; reads the module-types file. The model
    /// config is `None` here; [`open_and_plan`] reads it when the rules need it.
    pub fn plan_options(&self) -> Result<PlanOptions> {
        Ok(PlanOptions {
            vars: self.vars.clone(),
            module_types: self
                .module_types
                .as_deref()
                .map(ModuleTypes::from_file)
                .transpose()?,
            config: None,
            dtype: self.dtype,
        })
    }
}

/// Opens `input` and plans it by `spec`'s preset, rules and options: what `convert`,
/// `plan` and the Python package all start with. Tensors that match no rule fail it
/// unless the spec allows them. The expectation is not checked here (see
/// [`ConvertSpec::check_expectation`]), so a caller can show the plan that failed it.
pub fn open_and_plan(input: impl AsRef<Path>, spec: &ConvertSpec) -> Result<(Checkpoint, Plan)> {
    let input = input.as_ref();
    if let Some(q) = &spec.quantize {
        if spec.preset.as_deref() != Some(crate::rules::MLX_LM_PRESET) {
            return Err(Error::Quantization {
                detail: format!(
                    "quantized output is mlx-lm's format: it takes --preset {}, not {}",
                    crate::rules::MLX_LM_PRESET,
                    spec.preset
                        .as_deref()
                        .map_or("no preset".to_string(), |p| format!("'{p}'"))
                ),
            });
        }
        q.quant()?;
    }
    let dir = crate::model::model_dir(input);
    let config_path = dir.as_ref().map(|d| d.join(crate::model::CONFIG_NAME));
    let is_family_preset = spec.preset.as_deref() == Some(crate::rules::MLX_LM_PRESET);
    let config = match &config_path {
        Some(path) if is_family_preset => Some(ModelConfig::from_file(path)?),
        _ => None,
    };
    let rules =
        crate::rules::rule_set_for(spec.preset.as_deref(), &spec.rules, config.as_ref(), input)?;
    // Other presets and rule files read the config only when a rule needs it.
    let config = match (config, &config_path) {
        (None, Some(path)) if rules.needs_config() => Some(ModelConfig::from_file(path)?),
        (c, _) => c,
    };
    let ckpt = Checkpoint::open_with(input, &spec.open_options())?;
    let mut opts = spec.plan_options()?;
    let mut dtype_from = None;
    if rules.output().dtype_from_config() && opts.dtype.is_none() && !spec.keep_source_dtype {
        if let Some((d, key)) = config.as_ref().and_then(ModelConfig::declared_dtype) {
            opts.dtype = Some(d);
            dtype_from = Some(format!(
                "{} from {} '{key}'",
                d.numpy_name(),
                crate::model::CONFIG_NAME
            ));
        }
    }
    opts.config = config;
    let mut plan = plan_checkpoint(&ckpt, &rules, &opts, spec.allow_unmatched)?;
    plan.dtype_from = dtype_from;
    if let Some(q) = &spec.quantize {
        crate::model::quantize::apply(&mut plan, q)?;
    }
    if !spec.no_copy_files {
        if let Some(dir) = &dir {
            plan.files = crate::model::model_files(dir)?;
            if rules.output().mlx_lm_config() {
                rewrite_config(&mut plan, opts.config.as_ref())?;
            }
        }
    }
    Ok((ckpt, plan))
}

/// The model folder's `config.json` in `plan.files` replaced by mlx-lm's form of it.
fn rewrite_config(plan: &mut Plan, config: Option<&ModelConfig>) -> Result<()> {
    let Some(config) = config else {
        return Ok(());
    };
    let generation = plan
        .files
        .iter()
        .find(|f| f.name() == "generation_config.json")
        .map(|f| f.source().to_path_buf());
    let mut extra = BTreeMap::new();
    if let Some(q) = &plan.quantization {
        extra.insert("quantization".to_string(), q.clone());
        extra.insert("quantization_config".to_string(), q.clone());
    }
    let text = config.mlx_lm_text(generation.as_deref(), &extra)?;
    for f in &mut plan.files {
        if f.name() == crate::model::CONFIG_NAME {
            *f = f.clone().rewritten(text);
            break;
        }
    }
    Ok(())
}

/// Builds the rule set of a preset and/or rule files. The `mlx-lm` preset needs the
/// model's config to pick its family: use [`open_and_plan`] for it.
pub fn rule_set(preset: Option<&str>, rule_files: &[PathBuf]) -> Result<RuleSet> {
    crate::rules::rule_set_for(preset, rule_files, None, Path::new("."))
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
/// let spec = ConvertSpec::new().preset("flax").device(Device::Cpu).force(true);
/// let report = convert("tests/fixtures/small_cnn.pt", &out, &spec, &mut |_| {})?;
/// assert!(report.tensors() > 0);
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
    let (ckpt, plan) = open_and_plan(input, spec)?;
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
    let mut metadata = plan.metadata.clone();
    metadata.insert("relayout".to_string(), value.to_string());
    metadata
}

/// [`crate::merge_index`] for the workers of a conversion of a model folder: checks the
/// shard set in `dir` and writes its index together with the model folder's files of
/// `input` (config.json, the tokenizer, …) as a conversion by `spec` writes them, in one
/// commit. Refused, with nothing written, when a file is there already with other bytes
/// and `spec` does not force.
pub fn merge_index_from(
    dir: &Path,
    input: &Path,
    spec: &ConvertSpec,
) -> Result<crate::writer::shard::MergeReport> {
    let spec = spec.clone().allow_unmatched(true);
    let (ckpt, plan) = open_and_plan(input, &spec)?;
    let mut staged = Vec::with_capacity(plan.files.len());
    for f in &plan.files {
        let path = dir.join(f.name());
        crate::writer::output::check_not_input(&ckpt, &path)?;
        if !spec.force
            && std::fs::symlink_metadata(&path).is_ok()
            && !crate::writer::output::same_bytes(&path, f)?
        {
            return Err(Error::OutputExists { path });
        }
        staged.push(crate::writer::output::stage_copy(&path, f)?);
    }
    crate::writer::shard::merge_index_with(dir, staged)
}
