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
    /// Test hook ([`GpuOptions::with_max_chunk_bytes`]): chunks of at most this many bytes.
    pub(crate) max_chunk_bytes: Option<usize>,
}

impl GpuOptions {
    /// The adapter whose name contains `adapter` (else the preferred one), a software
    /// adapter only when `allow_software`.
    pub fn new(adapter: Option<String>, allow_software: bool) -> GpuOptions {
        GpuOptions {
            adapter,
            allow_software,
            max_chunk_bytes: None,
        }
    }

    internal! {
        /// Test hook: cut tensors into chunks of at most `bytes` bytes, so small tests
        /// cross every chunk boundary.
        pub fn with_max_chunk_bytes(mut self, bytes: usize) -> GpuOptions {
            self.max_chunk_bytes = Some(bytes);
            self
        }
    }
}

/// What an adapter offers, for `relayout devices` and error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterReport {
    pub(crate) name: String,
    pub(crate) backend: String,
    pub(crate) device_type: String,
    pub(crate) driver: String,
    /// True for CPU (software) adapters.
    pub(crate) software: bool,
    pub(crate) max_buffer_size: u64,
    pub(crate) max_storage_buffer_binding_size: u64,
    pub(crate) min_storage_buffer_offset_alignment: u32,
    pub(crate) max_compute_workgroups_per_dimension: u32,
    pub(crate) max_compute_workgroup_storage_size: u32,
}

/// Read access; the fields are set by the crate, which keeps them consistent.
impl AdapterReport {
    /// Adapter name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Graphics API (Vulkan, Metal, DX12, GL).
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Discrete, integrated, virtual, CPU.
    pub fn device_type(&self) -> &str {
        &self.device_type
    }

    /// Driver name and version.
    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// True for CPU (software) adapters.
    pub fn software(&self) -> bool {
        self.software
    }

    /// Largest buffer.
    pub fn max_buffer_size(&self) -> u64 {
        self.max_buffer_size
    }

    /// Largest storage binding.
    pub fn max_storage_buffer_binding_size(&self) -> u64 {
        self.max_storage_buffer_binding_size
    }

    /// Storage binding offset alignment.
    pub fn min_storage_buffer_offset_alignment(&self) -> u32 {
        self.min_storage_buffer_offset_alignment
    }

    /// Most workgroups per dispatch dimension.
    pub fn max_compute_workgroups_per_dimension(&self) -> u32 {
        self.max_compute_workgroups_per_dimension
    }

    /// Workgroup memory in bytes.
    pub fn max_compute_workgroup_storage_size(&self) -> u32 {
        self.max_compute_workgroup_storage_size
    }
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
    // Metal and DX12 do not exist where the headless instance is built, so for the primary
    // backends it is the whole of what `Instance::new` would make.
    #[cfg(all(
        unix,
        not(any(target_vendor = "apple", target_os = "android", target_os = "netbsd")),
        not(relayout_portable)
    ))]
    if backends.contains(wgpu::Backends::VULKAN) && !backends.contains(wgpu::Backends::GL) {
        if let Some(vulkan) = headless::vulkan() {
            return vulkan;
        }
    }
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

#[cfg(all(
    unix,
    not(any(target_vendor = "apple", target_os = "android", target_os = "netbsd")),
    not(relayout_portable)
))]
mod headless {
    use wgpu::hal;

    /// Window-system surface extensions. relayout never presents, and with the Wayland or
    /// XCB one enabled Mesa's device-select layer (an implicit layer, loaded for every
    /// Vulkan application) connects to a display while enumerating devices, which prints
    /// "error: XDG_RUNTIME_DIR is invalid or not set in the environment." on a headless
    /// machine. The layer's own off switch, `NODEVICE_SELECT`, is no way out: setting it
    /// needs `setenv`, unsound once the host process (Python) runs other threads.
    const WSI_EXTENSIONS: [&std::ffi::CStr; 3] = [
        c"VK_KHR_wayland_surface",
        c"VK_KHR_xcb_surface",
        c"VK_KHR_xlib_surface",
    ];

    /// A Vulkan-only instance without [`WSI_EXTENSIONS`], made the way wgpu-core makes its
    /// own; `None` when there is no Vulkan loader or driver.
    pub(super) fn vulkan() -> Option<wgpu::Instance> {
        let desc = hal::InstanceDescriptor {
            name: "wgpu",
            flags: wgpu::InstanceFlags::default(),
            memory_budget_thresholds: wgpu::MemoryBudgetThresholds::default(),
            backend_options: wgpu::BackendOptions::default(),
            telemetry: None,
            display: None,
        };
        let drop_wsi: Box<hal::vulkan::CreateInstanceCallback> = Box::new(|args| {
            args.extensions.retain(|e| !WSI_EXTENSIONS.contains(e));
        });
        // SAFETY: `desc` is what wgpu-core passes to `Instance::init`. The callback removes
        // extensions, which its contract forbids because wgpu-hal may assume an available
        // extension is enabled; wgpu-hal 30 (pinned by Cargo.lock) consults these three only
        // through the instance's list of enabled extensions, before creating a surface from
        // a window handle, and relayout never creates a surface.
        let raw =
            unsafe { hal::vulkan::Instance::init_with_callback(&desc, Some(drop_wsi)) }.ok()?;
        // SAFETY: `raw` was just created and is moved into wgpu, which owns and destroys it.
        Some(unsafe { wgpu::Instance::from_hal::<hal::api::Vulkan>(raw) })
    }
}

/// Device nodes through which a hardware GPU driver reaches its GPU on Linux: DRM (Mesa's
/// drivers, Asahi, Broadcom, Intel, AMD), NVIDIA's, WSL's paravirtual GPU, Arm Mali's and
/// Qualcomm's and Vivante's proprietary drivers.
const GPU_NODES: [(&str, &str); 6] = [
    ("/dev/dri", ""),
    ("/dev", "nvidia"),
    ("/dev", "dxg"),
    ("/dev", "mali"),
    ("/dev", "kgsl"),
    ("/dev", "galcore"),
];

/// Environment variables that point the Vulkan loader at drivers of the user's choice.
const DRIVER_ENV: [&str; 3] = ["VK_DRIVER_FILES", "VK_ICD_FILENAMES", "VK_ADD_DRIVER_FILES"];

/// False when this machine cannot have a hardware Vulkan adapter: on Linux, no GPU device
/// node exists (see [`GPU_NODES`]) and the Vulkan loader is not pointed at drivers of the
/// user's choice. `--device auto` then takes the CPU without loading the Vulkan drivers at
/// all: enumerating them loads every installed one (lavapipe alone costs ~50 MiB of RSS
/// and a tenth of a second) only to find software adapters that `auto` never picks. True
/// wherever it cannot tell (other systems, any node or variable present).
fn may_have_hardware_adapter() -> bool {
    if !cfg!(target_os = "linux") || cfg!(relayout_portable) {
        return true;
    }
    if DRIVER_ENV.iter().any(|k| std::env::var_os(k).is_some()) {
        return true;
    }
    any_gpu_node(&GPU_NODES)
}

/// True when some folder of `nodes` holds an entry whose name starts with its prefix (an
/// unreadable folder that exists counts as holding one).
fn any_gpu_node(nodes: &[(&str, &str)]) -> bool {
    nodes
        .iter()
        .any(|(dir, prefix)| match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix)),
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        })
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

/// The adapter name (lowercase substring) the options or [`ADAPTER_ENV`] ask for.
fn wanted(opts: &GpuOptions) -> Option<String> {
    opts.adapter
        .clone()
        .or_else(|| std::env::var(ADAPTER_ENV).ok())
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_lowercase())
}

/// The adapter the options ask for, among `candidates`.
fn pick(
    candidates: Vec<wgpu::Adapter>,
    wanted: Option<&str>,
    opts: &GpuOptions,
) -> Option<wgpu::Adapter> {
    candidates
        .into_iter()
        .filter(|a| {
            let info = a.get_info();
            match wanted {
                Some(w) => info.name.to_lowercase().contains(w),
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
///
/// GL is tried only when the caller takes a fallback (software adapters allowed, or an
/// adapter named): `--device auto` asks for neither and takes the CPU before a GL adapter,
/// so it never loads the GL drivers.
///
/// A caller that takes only hardware adapters and names none (`--device auto`) gets
/// its answer without any driver loaded where no GPU device node exists (Linux).
pub fn open(opts: &GpuOptions) -> Result<(wgpu::Device, wgpu::Queue)> {
    let wanted = wanted(opts);
    if !opts.allow_software && wanted.is_none() && !may_have_hardware_adapter() {
        return Err(unavailable(
            "no hardware adapter: no GPU device node (/dev/dri, /dev/nvidia*, ...) exists"
                .to_string(),
        ));
    }
    let primary = adapters(PRIMARY);
    let mut seen: Vec<AdapterReport> = primary.iter().map(AdapterReport::new).collect();
    let mut chosen = pick(primary, wanted.as_deref(), opts);
    if chosen.is_none() && (opts.allow_software || wanted.is_some()) {
        let gl = adapters(wgpu::Backends::GL);
        seen.extend(gl.iter().map(AdapterReport::new));
        chosen = pick(gl, wanted.as_deref(), opts);
    }
    let adapter = chosen.ok_or_else(|| {
        let seen: Vec<String> = seen
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
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_node_is_found_by_folder_and_prefix() {
        let dir = std::env::temp_dir().join(format!("relayout-nodes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("dri")).unwrap();
        let root = dir.to_str().unwrap().to_string();
        let dri = dir.join("dri").to_str().unwrap().to_string();
        // An empty DRM folder and no NVIDIA node: no hardware GPU.
        assert!(!any_gpu_node(&[(&dri, ""), (&root, "nvidia")]));
        std::fs::write(dir.join("nvidia0"), b"").unwrap();
        assert!(any_gpu_node(&[(&dri, ""), (&root, "nvidia")]));
        assert!(!any_gpu_node(&[(&dri, ""), (&root, "mali")]));
        std::fs::write(dir.join("dri").join("renderD128"), b"").unwrap();
        assert!(any_gpu_node(&[(&dri, "")]));
        // A folder that does not exist holds nothing.
        let gone = dir.join("gone").to_str().unwrap().to_string();
        assert!(!any_gpu_node(&[(&gone, "")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
