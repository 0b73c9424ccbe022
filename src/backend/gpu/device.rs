//! Getting a device: instance, adapter choice, device with the adapter's own limits.
//! Doing work on it lives in the parent module, so tests can hand in their own device.

use crate::error::{Error, Result};

/// Environment variable naming (a substring of) the adapter to use.
pub const ADAPTER_ENV: &str = "RELAYOUT_ADAPTER";

/// Backends tried first; GL only when none of these offers an acceptable adapter,
/// because a GL fallback is slow and hides a missing Vulkan driver.
const PRIMARY: wgpu::Backends = wgpu::Backends::VULKAN
    .union(wgpu::Backends::METAL)
    .union(wgpu::Backends::DX12);

/// How to pick a device.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name; overrides [`ADAPTER_ENV`] and the
    /// type preference. A named adapter is taken even when it is a software one.
    pub adapter: Option<String>,
    /// Accept a software adapter (lavapipe, llvmpipe, WARP) when no hardware one exists.
    pub allow_software: bool,
    /// Test hook: cut tensors into chunks of at most this many bytes.
    pub max_chunk_bytes: Option<usize>,
}

/// What an adapter offers, for `relayout devices` and error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    /// True for CPU (software) adapters.
    pub software: bool,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub min_storage_buffer_offset_alignment: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_workgroup_storage_size: u32,
}

impl AdapterReport {
    fn new(adapter: &wgpu::Adapter) -> AdapterReport {
        let info = adapter.get_info();
        let limits = adapter.limits();
        AdapterReport {
            name: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            software: info.device_type == wgpu::DeviceType::Cpu,
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            min_storage_buffer_offset_alignment: limits.min_storage_buffer_offset_alignment,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        }
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance(backends).enumerate_adapters(backends))
}

/// Every adapter of every backend (GL included), in enumeration order.
pub fn list_adapters() -> Vec<AdapterReport> {
    let mut all = adapters(PRIMARY);
    all.extend(adapters(wgpu::Backends::GL));
    all.iter().map(AdapterReport::new).collect()
}

/// Preference order: discrete > integrated > virtual > other > software.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The adapter the options ask for, among `candidates`.
fn pick(candidates: Vec<wgpu::Adapter>, opts: &GpuOptions) -> Option<wgpu::Adapter> {
    let wanted = opts
        .adapter
        .clone()
        .or_else(|| std::env::var(ADAPTER_ENV).ok())
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_lowercase());
    candidates
        .into_iter()
        .filter(|a| {
            let info = a.get_info();
            match &wanted {
                Some(w) => info.name.to_lowercase().contains(w.as_str()),
                None => opts.allow_software || info.device_type != wgpu::DeviceType::Cpu,
            }
        })
        .min_by_key(|a| rank(a.get_info().device_type))
}

fn unavailable(detail: String) -> Error {
    Error::DeviceUnavailable {
        device: "gpu".to_string(),
        detail,
    }
}

/// Chooses an adapter (primary backends first, GL as the last resort) and opens a device
/// with the adapter's own limits: how [`super::Gpu::new`] gets its device, and a way for
/// an engine to open one the same way for [`crate::Converter::for_each_on_device`].
pub fn open(opts: &GpuOptions) -> Result<(wgpu::Device, wgpu::Queue)> {
    let adapter = match pick(adapters(PRIMARY), opts) {
        Some(a) => a,
        None => pick(adapters(wgpu::Backends::GL), opts).ok_or_else(|| {
            let seen: Vec<String> = list_adapters()
                .into_iter()
                .map(|r| format!("{} ({}, {})", r.name, r.backend, r.device_type))
                .collect();
            let seen = if seen.is_empty() {
                "none found".to_string()
            } else {
                format!("found {}", seen.join(", "))
            };
            let why = match &opts.adapter {
                Some(name) => format!("no adapter named like '{name}'"),
                None if !opts.allow_software => {
                    "no hardware adapter (software adapters need to be allowed)".to_string()
                }
                None => "no adapter".to_string(),
            };
            unavailable(format!("{why}; {seen}"))
        })?,
    };
    let info = adapter.get_info();
    let desc = wgpu::DeviceDescriptor {
        label: Some("relayout"),
        required_features: wgpu::Features::empty(),
        // The WebGPU defaults cap bindings at 128 MiB; real drivers offer more.
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::default(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    pollster::block_on(adapter.request_device(&desc))
        .map_err(|e| unavailable(format!("{} ({:?}): {e}", info.name, info.backend)))
}
