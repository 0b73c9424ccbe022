//! The `relayout` command: parse arguments, call the library, report, exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use relayout::shard::parse_size;
use relayout::{
    open_and_plan, BackendOptions, Checkpoint, ConvertSpec, Device, InspectReport, Interrupt,
    OpenOptions, Plan, PlanReport, Progress, RuleSet, Worker,
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
    /// Accept views that repeat their storage more than 16× (and past 1 GiB) through
    /// stride-0 axes; the output must still fit on the disk
    #[arg(long)]
    allow_expand: bool,
    /// A rule variable, e.g. `--set heads=12` for attention; repeatable
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// JSON {module name: class name}, written by
    /// `json.dump({n: type(m).__name__ for n, m in model.named_modules()}, f)`
    #[arg(long, value_name = "FILE")]
    module_types: Option<PathBuf>,
    /// Convert every floating tensor to bf16, f16 or f32 (or bfloat16, float16, float32;
    /// integer and bool tensors never change); `source` keeps every source dtype where the
    /// preset would take the config's (mlx-lm)
    #[arg(long, value_name = "bf16|f16|f32|source", value_parser = parse_dtype)]
    dtype: Option<String>,
    /// Fail unless the output has exactly these tensor names, shapes and dtypes: a JSON
    /// {name: {"shape": [...], "dtype": ...}}, a .safetensors or a Flax .msgpack file
    #[arg(long, value_name = "FILE")]
    expect: Option<PathBuf>,
    /// Do not copy the model folder's files (config.json, generation_config.json, the
    /// tokenizer, *.py, LICENSE*, README.md) into a folder output
    #[arg(long)]
    no_copy_files: bool,
    #[command(flatten)]
    quant: QuantArgs,
}

/// mlx-lm's quantization flags (`mlx_lm.convert -q` is `--quantize` here: `-q` is
/// `--quiet`).
#[derive(clap::Args)]
struct QuantArgs {
    /// Quantize as `mlx_lm.convert -q` does (the mlx-lm preset only)
    #[arg(long)]
    quantize: bool,
    /// Bits per weight (default per mode: affine 4, mxfp4 4, nvfp4 4, mxfp8 8)
    #[arg(long, value_name = "BITS")]
    q_bits: Option<u32>,
    /// Values per group (default per mode: affine 64, mxfp4 32, nvfp4 16, mxfp8 32)
    #[arg(long, value_name = "N")]
    q_group_size: Option<usize>,
    /// affine, mxfp4, mxfp8 or nvfp4 (default affine)
    #[arg(long, value_name = "MODE")]
    q_mode: Option<String>,
    /// mlx-lm's mixed-precision recipe: mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6
    #[arg(long, value_name = "RECIPE")]
    quant_predicate: Option<String>,
}

fn parse_dtype(s: &str) -> std::result::Result<String, String> {
    if s.eq_ignore_ascii_case("source") {
        return Ok(s.to_string());
    }
    relayout::PlanOptions::parse_dtype(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{e}, or source"))
}

impl RuleArgs {
    fn spec(&self) -> Result<ConvertSpec> {
        let mut opts = relayout::PlanOptions::default();
        for s in &self.set {
            opts.set(s)?;
        }
        let spec = ConvertSpec::new();
        let spec = match &self.dtype {
            Some(name) => spec.dtype_name(name)?,
            None => spec,
        };
        let q = &self.quant;
        let quantize = relayout::QuantizeOptions::from_flags(
            q.quantize,
            q.q_bits,
            q.q_group_size,
            q.q_mode.as_deref(),
            q.quant_predicate.as_deref(),
        )?;
        Ok(spec
            .quantize(quantize)
            .maybe(self.preset.as_deref(), ConvertSpec::preset)
            .rule_files(&self.rules)
            .maybe(self.key.as_deref(), ConvertSpec::key)
            .allow_unmatched(self.allow_unmatched)
            .allow_expand(self.allow_expand)
            .vars(opts.vars)
            .maybe(self.module_types.as_deref(), ConvertSpec::module_types)
            .copy_files(!self.no_copy_files)
            .maybe(self.expect.as_deref(), ConvertSpec::expect))
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
    /// Replace existing output files
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary
    #[arg(long, short)]
    quiet: bool,
    /// Print the report as one JSON object on stdout (tensors, bytes, seconds, backend,
    /// dropped, unmatched, outputs, device traffic), no progress bar
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    shards: ShardArgs,
    /// Convert only the shards of worker i of N (0 <= i < N); each worker writes its
    /// shards atomically, and the one that finds all present writes the index
    #[arg(long, value_name = "i/N", value_parser = parse_worker, conflicts_with = "shard_from_env")]
    shard: Option<Worker>,
    /// Like --shard, from a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)
    /// or a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with --shards N)
    #[arg(long)]
    shard_from_env: bool,
}

#[derive(clap::Args)]
struct ShardArgs {
    /// Write a folder of shards of at most this much tensor data each (e.g. 5GB, 500MB,
    /// 2GiB); folder outputs default to 5GB, a path ending in .safetensors is one file
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    max_shard_size: Option<u64>,
    /// Number of workers (for --shard-from-env; in `plan`, shows each shard's worker)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    shards: Option<u32>,
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s)
}

fn parse_worker(s: &str) -> std::result::Result<Worker, String> {
    Worker::parse(s)
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors of a checkpoint
    Inspect {
        path: PathBuf,
        #[arg(long)]
        key: Option<String>,
        /// Accept views that repeat their storage more than 16× (and past 1 GiB)
        #[arg(long)]
        allow_expand: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show what a conversion would do to every tensor
    Plan {
        path: PathBuf,
        #[command(flatten)]
        rules: RuleArgs,
        #[command(flatten)]
        shards: ShardArgs,
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
    /// Measure this machine: GPU upload/readback and kernels against the WGSL copy
    /// kernel, CPU kernels against memcpy, a whole conversion against a file copy
    Bench {
        /// gpu (any adapter, software included), cpu, or auto (a hardware GPU if found)
        #[arg(long, default_value = "auto")]
        device: Device,
        /// GPU adapter to use (a substring of its name)
        #[arg(long)]
        adapter: Option<String>,
        /// Bytes per kernel case and of the generated checkpoint (e.g. 64MiB, 1GiB)
        #[arg(long, default_value = "256MiB", value_parser = parse_size_arg)]
        size: u64,
        /// Folder for the generated checkpoint (default: the temporary folder)
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Check a folder of shards written by `convert --shard i/N` workers and write its
    /// model.safetensors.index.json (run once, after all workers)
    MergeIndex {
        /// The output folder the workers wrote to
        dir: PathBuf,
        /// The input the workers converted: its model folder's files (config.json, the
        /// tokenizer, …) are written with the index, as the workers' --preset and rules
        /// would write them
        #[arg(long, value_name = "INPUT")]
        from: Option<PathBuf>,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Check an existing output against what the target model expects
    Verify {
        /// The file to check (only its header is read)
        path: PathBuf,
        /// The expected tensor names, shapes and dtypes: a JSON
        /// {name: {"shape": [...], "dtype": ...}}, a .safetensors or a Flax .msgpack file
        #[arg(long, value_name = "FILE")]
        expect: PathBuf,
        /// Print the report as one JSON object on stdout (exit status 1 on a mismatch)
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(relayout::Error::Interrupted { code }) = e.downcast_ref() {
                eprintln!(
                    "relayout: interrupted by {}; nothing was left behind",
                    signal_name(*code)
                );
                return ExitCode::from(128u8.saturating_add(*code as u8));
            }
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
        Command::Inspect {
            path,
            key,
            allow_expand,
            json,
        } => inspect(&mut out, path, OpenOptions { key, allow_expand }, json),
        Command::Plan {
            path,
            rules,
            shards,
            json,
        } => plan(&mut out, path, rules, shards, json),
        Command::Convert(args) => convert(&mut out, args),
        Command::Presets { show } => presets(&mut out, show),
        Command::Devices => devices(&mut out),
        Command::Bench {
            device,
            adapter,
            size,
            dir,
            json,
        } => bench(&mut out, device, adapter, size, dir, json),
        Command::Verify { path, expect, json } => verify(&mut out, path, expect, json),
        Command::MergeIndex { dir, from, rules } => merge_index(&mut out, dir, from, rules),
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

fn inspect(out: &mut String, path: PathBuf, opts: OpenOptions, as_json: bool) -> Result<()> {
    let ckpt = Checkpoint::open_with(&path, &opts)?;
    let report = InspectReport::new(&ckpt);
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}: {:?}, {} tensors, {}",
        path.display(),
        report.format(),
        report.tensors(),
        human(report.bytes())
    )?;
    for (dtype, bytes) in report.bytes_by_dtype() {
        writeln!(out, "  {:<8} {}", dtype.to_string(), human(*bytes))?;
    }
    for t in report.entries() {
        let mut notes = Vec::new();
        if !t.contiguous() {
            notes.push("view");
        }
        if t.shares_storage() {
            notes.push("shared storage");
        }
        writeln!(
            out,
            "{:<48} {:<8} {:<20} {:>10} {}",
            t.name(),
            t.dtype().to_string(),
            format!("{:?}", t.shape()),
            human(t.bytes()),
            notes.join(", ")
        )?;
    }
    Ok(())
}

fn plan(
    out: &mut String,
    path: PathBuf,
    args: RuleArgs,
    shard_args: ShardArgs,
    as_json: bool,
) -> Result<()> {
    // Show unmatched tensors rather than failing: this is where one finds them.
    let spec = args.spec()?.allow_unmatched(true);
    let (ckpt, plan) = open_and_plan(&path, &spec)?;
    let workers = shard_args.shards.map(|n| n as usize);
    let report = PlanReport::new(&ckpt, &plan, shard_args.max_shard_size, workers)?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return spec.check_expectation(&plan).map_err(Into::into);
    }
    for e in report.entries() {
        writeln!(
            out,
            "{:<40} -> {:<44} {:?} -> {:?} {} [{}]{}{}",
            e.source(),
            e.target(),
            e.source_shape(),
            e.target_shape(),
            e.op(),
            e.rule(),
            e.shard().map(|n| format!(" in {n}")).unwrap_or_default(),
            e.kept_whole()
                .map(|w| format!(" (left whole: {w})"))
                .unwrap_or_default()
        )?;
    }
    for s in report.dropped() {
        writeln!(out, "{:<40} dropped ({})", s.name(), s.reason())?;
    }
    for s in report.unmatched() {
        writeln!(out, "{:<40} UNMATCHED ({})", s.name(), s.reason())?;
    }
    writeln!(
        out,
        "{} tensors mapped, {} dropped, {} unmatched",
        report.entries().len(),
        report.dropped().len(),
        report.unmatched().len()
    )?;
    if let (Some(shards), Some(total)) = (report.shards(), report.total_size()) {
        writeln!(
            out,
            "{} output shard(s), {} in all: up to {} worker(s) can convert it in parallel",
            shards.len(),
            human(total),
            shards.len()
        )?;
        for f in shards {
            writeln!(
                out,
                "  {} {:>10} {} tensors{}",
                f.name(),
                human(f.bytes()),
                f.tensors(),
                f.worker()
                    .map(|k| format!(", worker {k}"))
                    .unwrap_or_default()
            )?;
        }
    }
    if let Some(from) = report.dtype_from() {
        writeln!(
            out,
            "output dtype: {from} (--dtype source keeps the source's)"
        )?;
    }
    if let Some(q) = report.quantization() {
        let quantized = report
            .entries()
            .iter()
            .filter(|e| e.quantize().is_some())
            .count();
        let whole = report
            .entries()
            .iter()
            .filter(|e| e.kept_whole().is_some())
            .count();
        writeln!(
            out,
            "quantization: {quantized} weight(s) quantized, {whole} left whole; config.json gets {q}"
        )?;
    }
    if !report.copied().is_empty() {
        writeln!(
            out,
            "{} file(s) of the model folder go into a folder output beside the weights:",
            report.copied().len()
        )?;
        for f in report.copied() {
            writeln!(
                out,
                "  {:<32} {:>10}{}",
                f.name(),
                human(f.bytes()),
                if f.rewritten() { " (rewritten)" } else { "" }
            )?;
        }
    }
    write_warnings(out, &plan)?;
    spec.check_expectation(&plan)?;
    Ok(())
}

/// Warnings grouped by message, with the first few tensors each; then unreachable rules.
fn write_warnings(out: &mut String, plan: &Plan) -> Result<()> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in plan.entries() {
        if let Some(w) = e.warning() {
            groups.entry(w).or_default().push(e.source_name());
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
    for u in plan.unreachable() {
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
        json,
        shards,
        shard,
        shard_from_env,
    } = args;
    if shards.shards.is_some() && !shard_from_env {
        anyhow::bail!("--shards N goes with --shard-from-env (or give --shard i/N)");
    }
    let worker = if shard_from_env {
        let n = shards.shards.map(|n| n as usize);
        Some(Worker::from_env(n, |k| std::env::var(k).ok()).map_err(anyhow::Error::msg)?)
    } else {
        shard
    };
    let interrupt = Interrupt::new();
    on_signals(&interrupt)?;
    let spec = args
        .spec()?
        .backend(BackendOptions::new(device, adapter))
        .force(force)
        .max_shard_size(shards.max_shard_size)
        .worker(worker)
        .interrupt(interrupt);
    let bar = (!quiet && !json && std::io::stderr().is_terminal()).then(|| {
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
            bar.set_length(p.bytes_total());
            bar.set_position(p.bytes_done());
            bar.set_message(format!(
                "{}/{} tensors",
                p.tensors_done(),
                p.tensors_total()
            ));
        }
    };
    let report = relayout::convert(&input, &output, &spec, &mut on_progress);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    if quiet {
        return Ok(());
    }
    let what = if report.shards() == 0 {
        String::new()
    } else {
        format!(
            " ({} of {} shard(s){})",
            report.outputs().len(),
            report.shards(),
            if report.reused().is_empty() {
                String::new()
            } else {
                format!(", {} already complete", report.reused().len())
            }
        )
    };
    writeln!(
        out,
        "{} -> {}{what}: {} tensors, {} in {:.2} s ({:.2} GB/s) on {}; {} dropped, {} unmatched",
        input.display(),
        output.display(),
        report.tensors(),
        human(report.bytes()),
        report.seconds(),
        report.gb_per_s(),
        report.backend(),
        report.dropped(),
        report.unmatched()
    )?;
    if report.device_upload_bytes() + report.device_readback_bytes() > 0 {
        let ratio = |n: u64| n as f64 / report.bytes().max(1) as f64;
        writeln!(
            out,
            "device traffic: {} uploaded ({:.2}x the output), {} read back ({:.2}x)",
            human(report.device_upload_bytes()),
            ratio(report.device_upload_bytes()),
            human(report.device_readback_bytes()),
            ratio(report.device_readback_bytes())
        )?;
    }
    if !report.copied().is_empty() {
        let names: Vec<String> = report
            .copied()
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        writeln!(out, "copied from the model folder: {}", names.join(", "))?;
    }
    match (&report.index(), worker) {
        (Some(index), Some(w)) => writeln!(
            out,
            "worker {w}: all {} shards present, checked; wrote {}",
            report.shards(),
            index.display()
        )?,
        (None, Some(w)) => writeln!(
            out,
            "worker {w}: {} of {} shards present; once every worker is done, the last worker (or `relayout merge-index {} --from INPUT` with the same options) writes the index and the model folder's files",
            report.shards_present(),
            report.shards(),
            output.display()
        )?,
        _ => {}
    }
    Ok(())
}

/// Routes SIGINT and SIGTERM to `interrupt`: the conversion stops at its next band,
/// removes what it wrote, and the process exits 130 or 143. A second signal ends the
/// process at once.
#[cfg(all(unix, not(relayout_portable)))]
fn on_signals(interrupt: &Interrupt) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    for sig in [SIGINT, SIGTERM] {
        let seen = Arc::new(AtomicBool::new(false));
        // Registered first, so it runs before `seen` is set: only a second signal exits.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&seen))?;
        signal_hook::flag::register(sig, seen)?;
        signal_hook::flag::register_usize(sig, interrupt.flag(), sig as usize)?;
    }
    Ok(())
}

#[cfg(any(not(unix), relayout_portable))]
fn on_signals(_interrupt: &Interrupt) -> Result<()> {
    Ok(())
}

fn signal_name(code: usize) -> String {
    match code {
        2 => "SIGINT".to_string(),
        15 => "SIGTERM".to_string(),
        c => format!("signal {c}"),
    }
}

fn bench(
    out: &mut String,
    device: Device,
    adapter: Option<String>,
    size: u64,
    dir: Option<PathBuf>,
    as_json: bool,
) -> Result<()> {
    let opts = relayout::bench::BenchOptions {
        device,
        adapter,
        size: usize::try_from(size)?,
        dir,
        ..Default::default()
    };
    let quiet = as_json || !std::io::stderr().is_terminal();
    let report = relayout::bench::run(&opts, &mut |what| {
        if !quiet {
            eprint!("\r\x1b[2Kmeasuring {what}");
        }
    })?;
    if !quiet {
        eprint!("\r\x1b[2K");
    }
    if as_json {
        let rows: Vec<_> = report
            .rows
            .iter()
            .map(|r| {
                json!({
                    "group": r.group,
                    "name": r.name,
                    "gb_per_s": r.gb_per_s,
                    "ratio": r.ratio,
                    "baseline": r.baseline,
                })
            })
            .collect();
        let adapter = report.adapter.as_ref().map(|a| {
            json!({"name": a.name, "driver": a.driver, "backend": a.backend, "software": a.software})
        });
        let doc = json!({
            "relayout": env!("CARGO_PKG_VERSION"),
            "adapter": adapter,
            "cpu_threads": report.cpu_threads,
            "size_bytes": report.size,
            "results": rows,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "relayout {} bench, {} per case",
        env!("CARGO_PKG_VERSION"),
        human(report.size as u64)
    )?;
    match &report.adapter {
        Some(a) => writeln!(
            out,
            "adapter: {} | driver: {} | API: {}{}",
            a.name,
            a.driver,
            a.backend,
            if a.software {
                " | software rasteriser: GPU rows are ratios, not GPU speed"
            } else {
                ""
            }
        )?,
        None => writeln!(out, "adapter: none (CPU only)")?,
    }
    writeln!(out, "cpu: {} threads", report.cpu_threads)?;
    writeln!(out)?;
    writeln!(out, "| group | case | GB/s | ratio | against |")?;
    writeln!(out, "| --- | --- | ---: | ---: | --- |")?;
    for r in &report.rows {
        writeln!(
            out,
            "| {} | {} | {:.2} | {} | {} |",
            r.group,
            r.name,
            r.gb_per_s,
            r.ratio.map(|x| format!("{x:.2}")).unwrap_or_default(),
            r.baseline.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

fn merge_index(
    out: &mut String,
    dir: PathBuf,
    from: Option<PathBuf>,
    rules: RuleArgs,
) -> Result<()> {
    let r = match from {
        Some(input) => relayout::merge_index_from(&dir, &input, &rules.spec()?)?,
        None => relayout::merge_index(&dir)?,
    };
    writeln!(
        out,
        "{}: {} shards, {} tensors, {} checked",
        r.index().display(),
        r.shards(),
        r.tensors(),
        human(r.total_size())
    )?;
    for f in r.copied() {
        writeln!(out, "  wrote {}", f.display())?;
    }
    Ok(())
}

fn verify(out: &mut String, path: PathBuf, expect: PathBuf, as_json: bool) -> Result<()> {
    let report = relayout::verify_report(&path, &expect)?;
    if as_json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        // The report says what differs; the exit status says that something does.
        if !report.is_ok() {
            anyhow::bail!("{} does not match {}", path.display(), expect.display());
        }
        return Ok(());
    }
    let n = report.into_result()?;
    writeln!(out, "ok: {n} tensors match {}", expect.display())?;
    Ok(())
}

fn presets(out: &mut String, show: Option<String>) -> Result<()> {
    match show {
        Some(name) => match name.split_once('/') {
            Some((preset, family)) => match RuleSet::family_source(preset, family) {
                Some(text) => write!(out, "{text}")?,
                None => anyhow::bail!(
                    "no family '{family}' in preset '{preset}' (`relayout presets` lists them)"
                ),
            },
            None => {
                RuleSet::preset(&name)?;
                write!(out, "{}", RuleSet::preset_source(&name).unwrap_or_default())?;
            }
        },
        None => {
            for name in RuleSet::preset_names() {
                let set = RuleSet::preset(name)?;
                writeln!(out, "{name:<6} {}", set.description())?;
                for (family, fset) in RuleSet::families(name) {
                    writeln!(
                        out,
                        "  {name}/{family:<12} model_type {}: {}",
                        fset.model_types().join(", "),
                        fset.description()
                    )?;
                }
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
            a.name(),
            a.backend(),
            a.device_type(),
            if a.software() { ", software" } else { "" },
            a.driver(),
            human(a.max_buffer_size()),
            human(a.max_storage_buffer_binding_size()),
            a.min_storage_buffer_offset_alignment(),
            a.max_compute_workgroups_per_dimension(),
            human(u64::from(a.max_compute_workgroup_storage_size())),
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
    relayout::human_bytes(bytes)
}
