//! `relayout._native`: the Rust half of the Python package.
//!
//! The Python half (`relayout/__init__.py`) allocates the NumPy arrays and shapes the
//! results; this half opens, plans and converts through the `relayout` crate. Every
//! long call runs on a worker thread while the calling thread waits with the GIL
//! released, waking every few milliseconds to hand progress to Python and to check for
//! signals: Ctrl-C raises the conversion's [`Interrupt`], the worker stops at its next
//! band, and the call raises `KeyboardInterrupt`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use relayout::{
    Backend, BackendOptions, Checkpoint, ConvertSpec, Converter, Error, InspectReport, Interrupt,
    OpenOptions, Plan, PlanReport, Progress,
};

/// How often the waiting thread wakes to check for signals and report progress.
const POLL: Duration = Duration::from_millis(20);

/// The options every entry point shares, as `relayout/__init__.py` passes them: one
/// dict whose keys are the keywords of `relayout.load`, `convert` and `plan`.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct Options {
    preset: Option<String>,
    rules: Vec<PathBuf>,
    #[pyo3(item("set"))]
    vars: BTreeMap<String, String>,
    dtype: Option<String>,
    device: String,
    adapter: Option<String>,
    key: Option<String>,
    allow_unmatched: bool,
    allow_expand: bool,
    module_types: Option<PathBuf>,
    expect: Option<PathBuf>,
    copy_files: bool,
    quantize: bool,
    q_bits: Option<u32>,
    q_group_size: Option<usize>,
    q_mode: Option<String>,
    quant_predicate: Option<String>,
}

impl Options {
    /// The spec these options describe. Names (`device`, `dtype`) are parsed by the
    /// library, as the CLI's are, so both refuse the same values with the same words.
    fn spec(&self) -> PyResult<ConvertSpec> {
        let value_error = |e: Error| PyValueError::new_err(e.to_string());
        let backend =
            BackendOptions::parse(&self.device, self.adapter.clone()).map_err(value_error)?;
        let dtype = self
            .dtype
            .as_deref()
            .map(relayout::PlanOptions::parse_dtype)
            .transpose()
            .map_err(value_error)?;
        let quantize = relayout::QuantizeOptions::from_flags(
            self.quantize,
            self.q_bits,
            self.q_group_size,
            self.q_mode.as_deref(),
            self.quant_predicate.as_deref(),
        )
        .map_err(value_error)?;
        Ok(ConvertSpec::new()
            .quantize(quantize)
            .backend(backend)
            .maybe(self.preset.as_deref(), ConvertSpec::preset)
            .rule_files(&self.rules)
            .maybe(self.key.as_deref(), ConvertSpec::key)
            .allow_unmatched(self.allow_unmatched)
            .allow_expand(self.allow_expand)
            .vars(self.vars.clone())
            .maybe(self.module_types.as_deref(), ConvertSpec::module_types)
            .dtype(dtype)
            .copy_files(self.copy_files)
            .maybe(self.expect.as_deref(), ConvertSpec::expect))
    }
}

/// Opens and plans `src` the way `relayout convert` would, checking `expect`.
fn open_and_plan(src: &PathBuf, spec: &ConvertSpec) -> relayout::Result<(Checkpoint, Plan)> {
    let (ckpt, plan) = relayout::open_and_plan(src, spec)?;
    spec.check_expectation(&plan)?;
    Ok((ckpt, plan))
}

/// A report as the JSON text `--json` prints; `relayout/__init__.py` builds its
/// dataclasses from it, so the Python objects and the CLI have the same keys.
fn to_json(report: &impl serde::Serialize) -> PyResult<String> {
    serde_json::to_string(report).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Turns a library error into the matching `relayout.Error` subclass (defined in
/// `relayout/_errors.py`), carrying the message, the Rust variant name and the path.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    if let Error::Interrupted { .. } = e {
        return PyKeyboardInterrupt::new_err("relayout: interrupted; nothing was left behind");
    }
    let (class, kind, path, errno) = classify(&e);
    let message = e.to_string();
    let made = (|| -> PyResult<PyErr> {
        let module = py.import("relayout._errors")?;
        let cls = module.getattr(class)?;
        let value = cls.call1((message.clone(),))?;
        value.setattr("kind", kind)?;
        value.setattr("path", path.map(|p| p.to_string_lossy().into_owned()))?;
        if let Some(n) = errno {
            // OSError's own fields: `str(e)` reads "[Errno 2] <message>".
            value.setattr("errno", n)?;
            value.setattr("strerror", message.as_str())?;
        }
        Ok(PyErr::from_value(value))
    })();
    made.unwrap_or_else(|_| PyRuntimeError::new_err(message))
}

/// The Python class, variant name, file and OS error number of an error.
fn classify(
    e: &Error,
) -> (
    &'static str,
    &'static str,
    Option<&std::path::Path>,
    Option<i32>,
) {
    use Error as E;
    match e {
        E::Io { path, cause } => ("IOError", "Io", Some(path), cause.raw_os_error()),
        E::UnknownFormat { path, .. } => ("FormatError", "UnknownFormat", Some(path), None),
        E::LegacyTorchFormat { path, .. } => ("FormatError", "LegacyTorchFormat", Some(path), None),
        E::HeaderTooLarge { path, .. } => ("FormatError", "HeaderTooLarge", Some(path), None),
        E::Truncated { path, .. } => ("FormatError", "Truncated", Some(path), None),
        E::SafetensorsHeader { path, .. } => ("FormatError", "SafetensorsHeader", Some(path), None),
        E::BadTensor { path, .. } => ("FormatError", "BadTensor", Some(path), None),
        E::UnsupportedDType { path, .. } => ("FormatError", "UnsupportedDType", Some(path), None),
        E::Zip { path, .. } => ("FormatError", "Zip", Some(path), None),
        E::Pickle { path, .. } => ("FormatError", "Pickle", Some(path), None),
        E::ForbiddenGlobal { path, .. } => {
            ("ForbiddenGlobalError", "ForbiddenGlobal", Some(path), None)
        }
        E::UnsupportedTensor { path, .. } => ("FormatError", "UnsupportedTensor", Some(path), None),
        E::NoStateDict { path, .. } => ("FormatError", "NoStateDict", Some(path), None),
        E::Shard { path, .. } => ("FormatError", "Shard", Some(path), None),
        E::Rules { .. } => ("RulesError", "Rules", None, None),
        E::MissingVariable { .. } => ("RulesError", "MissingVariable", None, None),
        E::ModuleTypes { path, .. } => ("RulesError", "ModuleTypes", Some(path), None),
        E::UnknownPreset { .. } => ("RulesError", "UnknownPreset", None, None),
        E::TargetCollision { .. } => ("PlanError", "TargetCollision", None, None),
        E::Unmatched { .. } => ("UnmatchedError", "Unmatched", None, None),
        E::Layout { .. } => ("PlanError", "Layout", None, None),
        E::Quantization { .. } => ("PlanError", "Quantization", None, None),
        E::Expectation { path, .. } => ("VerifyError", "Expectation", Some(path), None),
        E::Verify { file, .. } => ("VerifyError", "Verify", Some(file), None),
        E::OutputExists { path } => ("OutputExistsError", "OutputExists", Some(path), None),
        E::OutputIsInput { path } => ("IOError", "OutputIsInput", Some(path), None),
        E::NoSpace { path, .. } => ("NoSpaceError", "NoSpace", Some(path), Some(28)),
        E::InputChanged { path, .. } => ("InputChangedError", "InputChanged", Some(path), None),
        E::DeviceUnavailable { .. } => ("GPUError", "DeviceUnavailable", None, None),
        E::Gpu { .. } => ("GPUError", "Gpu", None, None),
        _ => ("Error", "Other", None, None),
    }
}

/// What the worker thread shares with the waiting one: the latest progress, the result.
struct Shared<T> {
    state: Mutex<(Option<Progress>, Option<T>)>,
    wake: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<Progress>, Option<T>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `work` on a worker thread with the GIL released. The calling thread wakes every
/// [`POLL`] to pass the latest progress to `progress` (with the GIL) and to check for
/// signals; a pending signal (Ctrl-C) raises `interrupt`, waits for the worker to stop
/// and re-raises the signal's exception.
fn run_detached<T: Send>(
    py: Python<'_>,
    interrupt: &Interrupt,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&mut dyn FnMut(Progress)) -> relayout::Result<T> + Send,
) -> PyResult<T> {
    let shared: Shared<relayout::Result<T>> = Shared {
        state: Mutex::new((None, None)),
        wake: Condvar::new(),
    };
    std::thread::scope(|scope| {
        let shared = &shared;
        scope.spawn(move || {
            let mut report = |p: Progress| {
                shared.lock().0 = Some(p);
                shared.wake.notify_one();
            };
            let result = work(&mut report);
            shared.lock().1 = Some(result);
            shared.wake.notify_one();
        });
        let mut signal: Option<PyErr> = None;
        loop {
            let (seen, done) = py.detach(|| {
                let mut g = shared.lock();
                if g.0.is_none() && g.1.is_none() {
                    g = shared
                        .wake
                        .wait_timeout(g, POLL)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                let seen = g.0.take();
                (seen, g.1.take())
            });
            if let (Some(p), Some(cb), None) = (seen, progress, &signal) {
                if let Err(e) = cb.call1((
                    p.tensors_done(),
                    p.tensors_total(),
                    p.bytes_done(),
                    p.bytes_total(),
                )) {
                    // A failing callback stops the work like a signal does.
                    interrupt.raise(1);
                    signal = Some(e);
                }
            }
            if let Some(result) = done {
                return match (signal, result) {
                    (Some(e), _) => Err(e),
                    (None, r) => r.map_err(|e| to_py(py, e)),
                };
            }
            if signal.is_none() {
                if let Err(e) = py.check_signals() {
                    interrupt.raise(2);
                    signal = Some(e);
                }
            }
        }
    })
}

/// An opened and planned checkpoint with its backend: what `relayout.load` fills arrays
/// from.
#[pyclass(frozen, module = "relayout._native")]
struct Session {
    ckpt: Checkpoint,
    plan: Plan,
    backend: Box<dyn relayout::Backend>,
}

#[pymethods]
impl Session {
    #[new]
    fn new(py: Python<'_>, src: PathBuf, options: Options) -> PyResult<Session> {
        let spec = options.spec()?;
        let built = py.detach(|| -> relayout::Result<Session> {
            let (ckpt, plan) = open_and_plan(&src, &spec)?;
            let backend = relayout::backend::select(spec.backend_options())?;
            Ok(Session {
                ckpt,
                plan,
                backend,
            })
        });
        built.map_err(|e| to_py(py, e))
    }

    /// `(name, shape, dtype)` of every output tensor, in plan order: one per entry, or
    /// a quantized weight's packed words, scales and biases.
    fn targets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for t in self.plan.entries().iter().flat_map(|e| e.outputs()) {
            let shape = PyTuple::new(py, &t.shape)?;
            list.append((t.name, shape, t.dtype.safetensors_name()))?;
        }
        Ok(list)
    }

    /// The `quantization` object of a quantized conversion's config (JSON text), or
    /// `None`.
    fn quantization(&self) -> Option<String> {
        self.plan.quantization().map(|q| q.to_string())
    }

    /// The backend's name, e.g. `cpu (2 threads)` or `gpu (llvmpipe, Vulkan)`.
    #[getter]
    fn backend(&self) -> String {
        self.backend.name()
    }

    /// Converts every tensor into `arrays` (NumPy arrays the caller allocated, one per
    /// output tensor of `targets()` in order, C-contiguous, writable, of exactly the
    /// tensor's bytes).
    #[pyo3(signature = (arrays, progress=None))]
    fn fill(
        &self,
        py: Python<'_>,
        arrays: Vec<Bound<'_, PyAny>>,
        progress: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let outputs: Vec<relayout::OutputTensor> = self
            .plan
            .entries()
            .iter()
            .flat_map(|e| e.outputs())
            .collect();
        if arrays.len() != outputs.len() {
            return Err(PyValueError::new_err(format!(
                "{} arrays for {} tensors",
                arrays.len(),
                outputs.len()
            )));
        }
        let mut raw: Vec<(usize, usize)> = Vec::with_capacity(arrays.len());
        for (a, t) in arrays.iter().zip(&outputs) {
            raw.push(writable_buffer(a, &t.name)?);
        }
        // Two arrays sharing memory would be written twice over.
        let mut sorted: Vec<(usize, usize)> = raw.iter().copied().filter(|r| r.1 > 0).collect();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(PyValueError::new_err("arrays overlap in memory"));
        }
        let interrupt = Interrupt::new();
        let converter = Converter::new(&self.ckpt, &self.plan, self.backend.as_ref())
            .with_interrupt(interrupt.clone());
        run_detached(py, &interrupt, progress.as_ref(), move |report| {
            // SAFETY: each (address, length) is the data of a distinct, live, writable,
            // C-contiguous array: checked above, non-overlapping, and kept alive by
            // `arrays`, which this call holds until the worker has finished.
            let mut dsts: Vec<&mut [u8]> = raw
                .iter()
                .map(|&(ptr, len)| unsafe { slice_at(ptr, len) })
                .collect();
            converter.fill(&mut dsts, report)
        })?;
        drop(arrays);
        Ok(())
    }
}

/// `len` bytes at address `ptr` (dangling but valid when empty).
///
/// # Safety
/// `ptr..ptr + len` must be memory no one else reads or writes while the slice lives.
unsafe fn slice_at<'a>(ptr: usize, len: usize) -> &'a mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: upheld by the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
}

/// The data address and byte length of a NumPy array we may write, checked through its
/// `__array_interface__` (no NumPy C API, so one abi3 wheel serves every version).
fn writable_buffer(a: &Bound<'_, PyAny>, target: &str) -> PyResult<(usize, usize)> {
    let iface = a.getattr("__array_interface__").map_err(|_| {
        PyValueError::new_err(format!("the buffer for '{target}' is not a NumPy array"))
    })?;
    let (ptr, readonly): (usize, bool) = iface.get_item("data")?.extract()?;
    let flags = a.getattr("flags")?;
    let contiguous: bool = flags.getattr("c_contiguous")?.extract()?;
    let writeable: bool = flags.getattr("writeable")?.extract()?;
    if readonly || !writeable || !contiguous {
        return Err(PyValueError::new_err(format!(
            "the array for '{target}' must be C-contiguous and writable"
        )));
    }
    let len: usize = a.getattr("nbytes")?.extract()?;
    if ptr == 0 && len > 0 {
        return Err(PyValueError::new_err(format!(
            "the array for '{target}' has no data"
        )));
    }
    Ok((ptr, len))
}

/// Plans `src` without converting anything: the plan report as JSON text, with the
/// shard layout for `max_shard_size` (and `shards` workers) when given.
#[pyfunction]
#[pyo3(signature = (src, options, max_shard_size=None, shards=None))]
fn plan(
    py: Python<'_>,
    src: PathBuf,
    options: Options,
    max_shard_size: Option<u64>,
    shards: Option<usize>,
) -> PyResult<String> {
    let spec = options.spec()?;
    let report = py
        .detach(|| -> relayout::Result<PlanReport> {
            let (ckpt, plan) = open_and_plan(&src, &spec)?;
            PlanReport::new(&ckpt, &plan, max_shard_size, shards)
        })
        .map_err(|e| to_py(py, e))?;
    to_json(&report)
}

/// The tensors of a checkpoint as stored: the inspect report as JSON text.
#[pyfunction]
#[pyo3(signature = (src, key=None, allow_expand=false))]
fn inspect(
    py: Python<'_>,
    src: PathBuf,
    key: Option<String>,
    allow_expand: bool,
) -> PyResult<String> {
    let opts = OpenOptions { key, allow_expand };
    let report = py
        .detach(|| Checkpoint::open_with(&src, &opts).map(|c| InspectReport::new(&c)))
        .map_err(|e| to_py(py, e))?;
    to_json(&report)
}

/// Converts `src` into `dst` (one safetensors file, or a folder of shards), atomically;
/// the report as JSON text.
#[pyfunction]
#[pyo3(signature = (src, dst, options, force, max_shard_size, progress=None))]
fn convert<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    options: Options,
    force: bool,
    max_shard_size: Option<u64>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<String> {
    let interrupt = Interrupt::new();
    let spec = options
        .spec()?
        .force(force)
        .max_shard_size(max_shard_size)
        .interrupt(interrupt.clone());
    let report = run_detached(py, &interrupt, progress.as_ref(), |report| {
        relayout::convert(&src, &dst, &spec, report)
    })?;
    to_json(&report)
}

/// Compares the checkpoint at `path` with an expectation file: the verify report as
/// JSON text, whether it matches or not.
#[pyfunction]
fn verify(py: Python<'_>, path: PathBuf, expect: PathBuf) -> PyResult<String> {
    let report = py
        .detach(|| relayout::verify_report(&path, &expect))
        .map_err(|e| to_py(py, e))?;
    to_json(&report)
}

/// `{safetensors name: (NumPy name, whether it comes from ml_dtypes)}` for every dtype:
/// the library's one table.
#[pyfunction]
fn dtype_names() -> BTreeMap<&'static str, (&'static str, bool)> {
    relayout::DType::ALL
        .iter()
        .map(|d| (d.safetensors_name(), (d.numpy_name(), d.needs_ml_dtypes())))
        .collect()
}

/// The devices a conversion can run on: the CPU, then every GPU adapter wgpu finds.
#[pyfunction]
fn devices(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let list = PyList::empty(py);
    let cpu = PyDict::new(py);
    cpu.set_item("kind", "cpu")?;
    cpu.set_item("name", relayout::backend::cpu::Cpu::new().name())?;
    cpu.set_item("backend", "cpu")?;
    cpu.set_item("software", false)?;
    list.append(cpu)?;
    for a in py.detach(relayout::backend::gpu::list_adapters) {
        let d = PyDict::new(py);
        d.set_item("kind", "gpu")?;
        d.set_item("name", a.name())?;
        d.set_item("backend", a.backend())?;
        d.set_item("device_type", a.device_type())?;
        d.set_item("driver", a.driver())?;
        d.set_item("software", a.software())?;
        list.append(d)?;
    }
    Ok(list)
}

/// `"5GB"`, `"512MiB"` or `"1.5 GB"` in bytes (10^3 and 2^10 units).
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    relayout::shard::parse_size(text).map_err(PyValueError::new_err)
}

/// The built-in preset names.
#[pyfunction]
fn presets() -> Vec<String> {
    relayout::RuleSet::preset_names()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Session>()?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(devices, m)?)?;
    m.add_function(wrap_pyfunction!(presets, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_names, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
