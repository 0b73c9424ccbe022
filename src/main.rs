//! The `relayout` command: parse arguments, call the library, report, exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use relayout::{
    backend, plan_checkpoint, rule_set, Checkpoint, ConvertSpec, Converter, Device, OpenOptions,
    Plan, Progress, RuleSet, WriteOptions,
};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "relayout",
    version,
    about = "Convert PyTorch checkpoints into other frameworks' tensor layouts and names"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct RuleArgs {
    /// Built-in preset (see `relayout presets`)
    #[arg(long, short)]
    preset: Option<String>,
    /// Rule file (TOML) layered over the preset; repeatable, later files win
    #[arg(long = "rules", short = 'r')]
    rules: Vec<PathBuf>,
    /// Training checkpoints: the top-level key holding the state dict
    #[arg(long)]
    key: Option<String>,
    /// Leave tensors that match no rule out instead of failing
    #[arg(long)]
    allow_unmatched: bool,
    /// A rule variable, e.g. `--set heads=12` for attention; repeatable
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// JSON {module name: class name}, written by
    /// `json.dump({n: type(m).__name__ for n, m in model.named_modules()}, f)`
    #[arg(long, value_name = "FILE")]
    module_types: Option<PathBuf>,
    /// Convert every floating tensor to bf16, f16 or f32 (integer and bool tensors never change)
    #[arg(long, value_name = "bf16|f16|f32", value_parser = parse_dtype)]
    dtype: Option<relayout::DType>,
    /// Fail unless the output has exactly these tensor names, shapes and dtypes: a JSON
    /// {name: {"shape": [...], "dtype": ...}}, a .safetensors or a Flax .msgpack file
    #[arg(long, value_name = "FILE")]
    expect: Option<PathBuf>,
}

fn parse_dtype(s: &str) -> std::result::Result<relayout::DType, String> {
    relayout::PlanOptions::parse_dtype(s).map_err(|e| e.to_string())
}

impl RuleArgs {
    fn spec(&self) -> Result<ConvertSpec> {
        let mut opts = relayout::PlanOptions::default();
        for s in &self.set {
            opts.set(s)?;
        }
        Ok(ConvertSpec {
            preset: self.preset.clone(),
            rules: self.rules.clone(),
            key: self.key.clone(),
            allow_unmatched: self.allow_unmatched,
            vars: opts.vars,
            module_types: self.module_types.clone(),
            dtype: self.dtype,
            expect: self.expect.clone(),
            ..ConvertSpec::default()
        })
    }
}

#[derive(clap::Args)]
struct ConvertArgs {
    input: PathBuf,
    output: PathBuf,
    #[command(flatten)]
    rules: RuleArgs,
    /// auto (a hardware GPU if found, else CPU), cpu, gpu or reference
    #[arg(long, default_value = "auto")]
    device: Device,
    /// GPU adapter to use (a substring of its name)
    #[arg(long)]
    adapter: Option<String>,
    /// Replace an existing output file
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors of a checkpoint
    Inspect {
        path: PathBuf,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show what a conversion would do to every tensor
    Plan {
        path: PathBuf,
        #[command(flatten)]
        rules: RuleArgs,
        #[arg(long)]
        json: bool,
    },
    /// Convert a checkpoint into a safetensors file
    Convert(ConvertArgs),
    /// List the built-in presets, or print one
    Presets {
        #[arg(long)]
        show: Option<String>,
    },
    /// List the GPU adapters relayout can use, with their limits
    Devices,
    /// Check an existing output against what the target model expects
    Verify {
        /// The file to check (only its header is read)
        path: PathBuf,
        /// The expected tensor names, shapes and dtypes: a JSON
        /// {name: {"shape": [...], "dtype": ...}}, a .safetensors or a Flax .msgpack file
        #[arg(long, value_name = "FILE")]
        expect: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(relayout::Error::Verify { report, .. }) = e.downcast_ref() {
                eprint!("{report}");
            }
            eprintln!("relayout: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut out = String::new();
    let result = match cli.command {
        Command::Inspect { path, key, json } => inspect(&mut out, path, key, json),
        Command::Plan { path, rules, json } => plan(&mut out, path, rules, json),
        Command::Convert(args) => convert(&mut out, args),
        Command::Presets { show } => presets(&mut out, show),
        Command::Devices => devices(&mut out),
        Command::Verify { path, expect } => verify(&mut out, path, expect),
    };
    emit(&out)?;
    result
}

/// Writes the command's output; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn open(path: &PathBuf, key: Option<String>) -> Result<Checkpoint> {
    Ok(Checkpoint::open_with(path, &OpenOptions { key })?)
}

fn inspect(out: &mut String, path: PathBuf, key: Option<String>, as_json: bool) -> Result<()> {
    let ckpt = open(&path, key)?;
    let mut by_dtype: BTreeMap<String, u64> = BTreeMap::new();
    let mut rows = Vec::new();
    for t in ckpt.tensors() {
        let bytes = (t.shape.iter().product::<usize>() * t.dtype.size()) as u64;
        *by_dtype.entry(t.dtype.to_string()).or_default() += bytes;
        rows.push(json!({
            "name": t.name,
            "dtype": t.dtype.to_string(),
            "shape": t.shape,
            "bytes": bytes,
            "contiguous": ckpt.is_contiguous(t),
            "shares_storage": ckpt.shares_storage(t),
            "file": ckpt.file_of(t).display().to_string(),
        }));
    }
    let total: u64 = by_dtype.values().sum();
    if as_json {
        let doc = json!({
            "path": path.display().to_string(),
            "format": format!("{:?}", ckpt.format()),
            "tensors": rows.len(),
            "bytes": total,
            "bytes_by_dtype": by_dtype,
            "metadata": ckpt.metadata(),
            "entries": rows,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {:?}, {} tensors, {}",
        path.display(),
        ckpt.format(),
        rows.len(),
        human(total)
    )?;
    for (dtype, bytes) in &by_dtype {
        writeln!(out, "  {dtype:<8} {}", human(*bytes))?;
    }
    for t in ckpt.tensors() {
        let mut notes = Vec::new();
        if !ckpt.is_contiguous(t) {
            notes.push("view");
        }
        if ckpt.shares_storage(t) {
            notes.push("shared storage");
        }
        let bytes = (t.shape.iter().product::<usize>() * t.dtype.size()) as u64;
        writeln!(
            out,
            "{:<48} {:<8} {:<20} {:>10} {}",
            t.name,
            t.dtype.to_string(),
            format!("{:?}", t.shape),
            human(bytes),
            notes.join(", ")
        )?;
    }
    Ok(())
}

fn build_plan(path: &PathBuf, spec: &ConvertSpec) -> Result<(Checkpoint, Plan)> {
    let rules = rule_set(spec.preset.as_deref(), &spec.rules)?;
    let ckpt = open(path, spec.key.clone())?;
    let plan = plan_checkpoint(&ckpt, &rules, &spec.plan_options()?, spec.allow_unmatched)?;
    Ok((ckpt, plan))
}

fn plan(out: &mut String, path: PathBuf, args: RuleArgs, as_json: bool) -> Result<()> {
    // Show unmatched tensors rather than failing: this is where one finds them.
    let spec = ConvertSpec {
        allow_unmatched: true,
        ..args.spec()?
    };
    let (_ckpt, plan) = build_plan(&path, &spec)?;
    if as_json {
        let entries: Vec<_> = plan
            .entries
            .iter()
            .map(|e| {
                json!({
                    "source": e.source_name, "target": e.target, "dtype": e.dtype.to_string(),
                    "source_dtype": e.source_dtype.to_string(),
                    "source_shape": e.source_shape, "target_shape": e.target_shape,
                    "slice": e.slice.map(|s| json!({"axis": s.axis, "start": s.start, "len": s.len})),
                    "perm": e.perm, "op": e.describe_op(), "rule": e.rule, "warning": e.warning,
                })
            })
            .collect();
        let skipped = |list: &[relayout::plan::Skipped]| -> Vec<serde_json::Value> {
            list.iter()
                .map(|s| json!({"name": s.name, "reason": s.reason}))
                .collect()
        };
        let doc = json!({
            "sources": plan.sources,
            "entries": entries,
            "dropped": skipped(&plan.dropped),
            "unmatched": skipped(&plan.unmatched),
            "unreachable": plan.unreachable,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return spec.check_expectation(&plan).map_err(Into::into);
    }
    for e in &plan.entries {
        writeln!(
            out,
            "{:<40} -> {:<44} {:?} -> {:?} {} [{}]",
            e.source_name,
            e.target,
            e.source_shape,
            e.target_shape,
            e.describe_op(),
            e.rule
        )?;
    }
    for s in &plan.dropped {
        writeln!(out, "{:<40} dropped ({})", s.name, s.reason)?;
    }
    for s in &plan.unmatched {
        writeln!(out, "{:<40} UNMATCHED ({})", s.name, s.reason)?;
    }
    writeln!(
        out,
        "{} tensors mapped, {} dropped, {} unmatched",
        plan.entries.len(),
        plan.dropped.len(),
        plan.unmatched.len()
    )?;
    write_warnings(out, &plan)?;
    spec.check_expectation(&plan)?;
    Ok(())
}

/// Warnings grouped by message, with the first few tensors each; then unreachable rules.
fn write_warnings(out: &mut String, plan: &Plan) -> Result<()> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &plan.entries {
        if let Some(w) = &e.warning {
            groups.entry(w).or_default().push(&e.source_name);
        }
    }
    for (warning, names) in groups {
        let shown: Vec<&str> = names.iter().take(3).copied().collect();
        let more = names.len().saturating_sub(shown.len());
        writeln!(
            out,
            "warning: {warning}: {} tensor(s): {}{}",
            names.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )?;
    }
    for u in &plan.unreachable {
        writeln!(out, "warning: {u}")?;
    }
    Ok(())
}

fn convert(out: &mut String, args: ConvertArgs) -> Result<()> {
    let ConvertArgs {
        input,
        output,
        rules: args,
        device,
        adapter,
        force,
        quiet,
    } = args;
    let spec = args.spec()?;
    let (ckpt, plan) = build_plan(&input, &spec)?;
    spec.check_expectation(&plan)?;
    let backend_opts = backend::BackendOptions {
        device,
        adapter,
        // Asking for the GPU by name means any GPU, a software one included.
        allow_software_gpu: device == Device::Gpu,
    };
    let backend = backend::select(&backend_opts)?;
    let spec = ConvertSpec {
        backend: backend_opts,
        force,
        ..spec
    };
    let opts = WriteOptions {
        force,
        metadata: relayout::convert::provenance(&spec, &plan),
    };
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let mut on_progress = |p: Progress| {
        if let Some(bar) = &bar {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_done);
            bar.set_message(format!("{}/{} tensors", p.tensors_done, p.tensors_total));
        }
    };
    let report = Converter::new(&ckpt, &plan, backend.as_ref()).write_safetensors(
        &output,
        &opts,
        &mut on_progress,
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if !quiet {
        writeln!(
            out,
            "{} -> {}: {} tensors, {} in {:.2} s ({:.2} GB/s) on {}; {} dropped, {} unmatched",
            input.display(),
            output.display(),
            report.tensors,
            human(report.bytes),
            report.seconds,
            report.gb_per_s(),
            report.backend,
            report.dropped,
            report.unmatched
        )?;
    }
    Ok(())
}

fn verify(out: &mut String, path: PathBuf, expect: PathBuf) -> Result<()> {
    let n = relayout::verify_file(&path, &expect)?;
    writeln!(out, "ok: {n} tensors match {}", expect.display())?;
    Ok(())
}

fn presets(out: &mut String, show: Option<String>) -> Result<()> {
    match show {
        Some(name) => {
            RuleSet::preset(&name)?;
            write!(out, "{}", RuleSet::preset_source(&name).unwrap_or_default())?;
        }
        None => {
            for name in RuleSet::preset_names() {
                let set = RuleSet::preset(name)?;
                writeln!(out, "{name:<6} {}", set.description())?;
            }
        }
    }
    Ok(())
}

#[cfg(feature = "gpu")]
fn devices(out: &mut String) -> Result<()> {
    let adapters = relayout::backend::gpu::list_adapters();
    if adapters.is_empty() {
        writeln!(out, "no GPU adapter found (the cpu backend is used)")?;
    }
    for a in adapters {
        writeln!(
            out,
            "{} [{} {}{}] driver {}: max buffer {}, max storage binding {}, storage offset alignment {}, {} workgroups/dim, {} workgroup storage",
            a.name,
            a.backend,
            a.device_type,
            if a.software { ", software" } else { "" },
            a.driver,
            human(a.max_buffer_size),
            human(a.max_storage_buffer_binding_size),
            a.min_storage_buffer_offset_alignment,
            a.max_compute_workgroups_per_dimension,
            human(u64::from(a.max_compute_workgroup_storage_size)),
        )?;
    }
    Ok(())
}

#[cfg(not(feature = "gpu"))]
fn devices(out: &mut String) -> Result<()> {
    writeln!(out, "relayout was built without the 'gpu' feature")?;
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
