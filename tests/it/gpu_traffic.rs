//! Device traffic of the GPU path, counted: converting Linear (out, in) and Conv
//! (O, I, kH, kW) weights of 16-256 MiB in f32 and bf16 uploads each source byte about
//! once and reads each output byte back about once (both ≤ 1.10× the output), and writes
//! exactly the CPU path's bytes.

#![cfg(feature = "gpu")]

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use relayout::backend::cpu::Cpu;
use relayout::backend::gpu::{Gpu, GpuOptions};
use relayout::writer::{HeaderEntry, SafetensorsWriter};
use relayout::{Backend, Checkpoint, Converter, DType, RuleSet, WriteOptions};

fn gpu() -> Option<Gpu> {
    gpu_or_skip(Gpu::new(&GpuOptions::new(None, true)))
}

/// A checkpoint of one tensor `name` of `shape`, filled with a pattern.
fn checkpoint(path: &Path, name: &str, dtype: DType, shape: &[usize]) {
    let entry = HeaderEntry::new(name.to_string(), dtype, shape.to_vec());
    let bytes = entry.bytes();
    let mut w = SafetensorsWriter::create(path, &[entry], &BTreeMap::new(), true).unwrap();
    let mut rng = Rng::new(bytes as u64);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(8 << 20);
        w.write(&rng.bytes(n)).unwrap();
        left -= n;
    }
    w.finish().unwrap();
}

fn convert(ckpt: &Checkpoint, backend: &dyn Backend, out: &Path) -> relayout::ConvertReport {
    let plan = RuleSet::preset("flax")
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap();
    let opts = WriteOptions {
        force: true,
        ..Default::default()
    };
    Converter::new(ckpt, &plan, backend)
        .write_safetensors(out, &opts, &mut |_| {})
        .unwrap()
}

#[test]
fn linear_and_conv_weights_cross_the_bus_about_once() {
    let Some(gpu) = gpu() else { return };
    let dir = scratch("gpu-traffic");
    let mib = 1usize << 20;
    let cases: Vec<(&str, DType, Vec<usize>)> = vec![
        // Linear (out, in) -> (in, out).
        ("fc.weight", DType::F32, vec![2048, 2048]),
        ("fc.weight", DType::BF16, vec![4096, 2048]),
        ("fc.weight", DType::F32, vec![4096, 4096]),
        ("fc.weight", DType::BF16, vec![16384, 8192]),
        ("fc.weight", DType::F32, vec![8192, 8192]),
        // Conv (O, I, kH, kW) -> (kH, kW, I, O), 3x3 and 1x1.
        ("conv.weight", DType::F32, vec![512, 1024, 3, 3]),
        ("conv.weight", DType::BF16, vec![1024, 1024, 3, 3]),
        ("conv.weight", DType::F32, vec![2048, 2048, 1, 1]),
        ("conv.weight", DType::BF16, vec![2048, 7280, 3, 3]),
    ];
    for (name, dtype, shape) in cases {
        let bytes: usize = shape.iter().product::<usize>() * dtype.size();
        assert!((16 * mib..=256 * mib).contains(&bytes), "{shape:?}");
        let src = dir.join("in.safetensors");
        checkpoint(&src, name, dtype, &shape);
        let ckpt = Checkpoint::open(&src).unwrap();
        let on_gpu = convert(&ckpt, &gpu, &dir.join("gpu.safetensors"));
        let on_cpu = convert(&ckpt, &Cpu::new(), &dir.join("cpu.safetensors"));
        let what = format!("{name} {dtype} {shape:?}");
        assert_eq!(on_cpu.device_upload_bytes(), 0);
        assert_eq!(on_gpu.bytes(), bytes as u64);
        let up = on_gpu.device_upload_bytes() as f64 / bytes as f64;
        let back = on_gpu.device_readback_bytes() as f64 / bytes as f64;
        eprintln!("{what}: upload {up:.3}x, readback {back:.3}x of the output");
        assert!(up <= 1.10, "{what}: uploaded {up:.2}x the output");
        assert!(back <= 1.10, "{what}: read back {back:.2}x the output");
        assert!(
            std::fs::read(dir.join("gpu.safetensors")).unwrap()
                == std::fs::read(dir.join("cpu.safetensors")).unwrap(),
            "{what}: GPU and CPU outputs differ"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convert_json_reports_the_run_and_its_device_traffic() {
    let dir = scratch("convert-json");
    let src = dir.join("in.safetensors");
    checkpoint(&src, "fc.weight", DType::F32, &[384, 256]);
    let mut devices = vec!["cpu"];
    if gpu().is_some() {
        devices.push("gpu");
    }
    for device in devices {
        let out = dir.join(format!("{device}.safetensors"));
        let run = relayout(&[
            "convert".as_ref(),
            src.as_os_str(),
            out.as_os_str(),
            "--preset".as_ref(),
            "flax".as_ref(),
            "--device".as_ref(),
            device.as_ref(),
            "--json".as_ref(),
        ]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&run.stdout).expect("one JSON object");
        let bytes = 384 * 256 * 4;
        assert_eq!(report["tensors"], 1);
        assert_eq!(report["bytes"], bytes);
        assert_eq!(report["dropped"], 0);
        assert_eq!(report["unmatched"], 0);
        assert_eq!(report["outputs"][0], out.display().to_string());
        assert!(report["seconds"].as_f64().unwrap() > 0.0);
        let backend = report["backend"].as_str().unwrap();
        assert!(backend.starts_with(device), "{backend}");
        let (up, back) = (
            &report["device_upload_bytes"],
            &report["device_readback_bytes"],
        );
        if device == "cpu" {
            assert_eq!((up, back), (&serde_json::json!(0), &serde_json::json!(0)));
        } else {
            assert_eq!(
                (up, back),
                (&serde_json::json!(bytes), &serde_json::json!(bytes))
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bytes of a device buffer, read back by the test.
fn read_buffer(
    device: &relayout::wgpu::Device,
    queue: &relayout::wgpu::Queue,
    buffer: &relayout::wgpu::Buffer,
) -> Vec<u8> {
    use relayout::wgpu;
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("test readback"),
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder =
        device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    queue.submit([encoder.finish()]);
    let (tx, rx) = std::sync::mpsc::channel();
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, move |r| tx.send(r).unwrap());
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    rx.recv().unwrap().unwrap();
    let bytes = staging.slice(..).get_mapped_range().unwrap().to_vec();
    staging.unmap();
    bytes
}

#[test]
fn for_each_on_device_hands_out_buffers_holding_the_cpu_bytes() {
    if gpu().is_none() {
        return;
    }
    let (device, queue) =
        relayout::backend::gpu::open_device(&GpuOptions::new(None, true)).unwrap();
    let cpu = Cpu::new();
    for (name, preset, dtype) in [
        ("small_cnn.pt", "flax", None),
        ("mixed.pt", "mlx", None),
        ("mixed.pt", "flax", Some(DType::BF16)),
        ("dtypes_views.pt", "flax", None),
        ("dtypes_views.pt", "nnx", Some(DType::F16)),
        (
            "frameworks/transformer_encoder.pt",
            "flax",
            Some(DType::BF16),
        ),
    ] {
        let ckpt = Checkpoint::open(fixture(name)).unwrap();
        let opts = relayout::PlanOptions {
            dtype,
            vars: [("heads".to_string(), "4".to_string())].into(),
            ..Default::default()
        };
        let plan = RuleSet::preset(preset)
            .unwrap()
            .plan_with(ckpt.tensors(), &opts)
            .unwrap();
        let mut want = Vec::new();
        Converter::new(&ckpt, &plan, &cpu)
            .for_each(|_, bytes| {
                want.push(bytes.to_vec());
                Ok(())
            })
            .unwrap();
        let mut seen = 0;
        Converter::new(&ckpt, &plan, &cpu)
            .for_each_on_device(&device, &queue, |entry, buffer| {
                let bytes = read_buffer(&device, &queue, &buffer);
                let w = &want[seen];
                assert_eq!(
                    buffer.size() as usize,
                    w.len().next_multiple_of(4).max(4),
                    "{name} {}",
                    entry.target()
                );
                assert!(
                    bytes[..w.len()] == w[..],
                    "{name} {preset} {dtype:?}: '{}' differs",
                    entry.target()
                );
                seen += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, plan.entries().len());
    }
}

/// A checkpoint of several tensors (name, dtype, shape), each filled with a pattern.
fn multi_checkpoint(path: &Path, tensors: &[(&str, DType, Vec<usize>)]) {
    let entries: Vec<HeaderEntry> = tensors
        .iter()
        .map(|(name, dtype, shape)| HeaderEntry::new(name.to_string(), *dtype, shape.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &entries, &BTreeMap::new(), true).unwrap();
    for (k, e) in entries.iter().enumerate() {
        w.write(&Rng::new(k as u64 + 1).bytes(e.bytes())).unwrap();
    }
    w.finish().unwrap();
}

/// The converter names each tensor's successor, and the GPU queues that upload behind
/// the current tensor's last pieces, then starts the successor's first pieces while the
/// current one's last come back: every transposed tensor after the first begins with its
/// source already on the device (the first too, when a copy precedes it), and each one
/// that follows another transposed tensor with its first pieces in flight. The bytes
/// equal the CPU's, written or filled into buffers, cast or not, with default pieces and
/// with 4 KiB pieces and windows (many pieces per band, some tensors streamed), and each
/// source still crosses once.
#[test]
fn each_tensor_starts_while_the_one_before_finishes_and_still_crosses_once() {
    let Some(gpu) = gpu() else { return };
    let Ok(tiny) = Gpu::new(&GpuOptions::new(None, true).with_max_chunk_bytes(4096)) else {
        return;
    };
    let dir = scratch("gpu-prefetch");
    let src = dir.join("in.safetensors");
    // Written in name order (one dtype): a.bias (a copy, on the host) first, then
    // a.weight, b.weight, c.bias, ...: five transposed tensors, three of them right
    // after another transposed one.
    let tensors = vec![
        ("a.bias", DType::F32, vec![1000]),
        ("a.weight", DType::F32, vec![1000, 770]),
        ("b.weight", DType::F32, vec![256, 1000]),
        ("c.bias", DType::F32, vec![64]),
        ("c.weight", DType::F32, vec![64, 256, 3, 3]),
        ("d.weight", DType::F32, vec![130, 64]),
        ("e.weight", DType::F32, vec![2048, 130]),
    ];
    let (transposed, after_transposed) = (5, 3);
    multi_checkpoint(&src, &tensors);
    let ckpt = Checkpoint::open(&src).unwrap();
    let source: u64 = tensors
        .iter()
        .map(|(_, d, s)| (s.iter().product::<usize>() * d.size()) as u64)
        .sum();
    for dtype in [None, Some(DType::BF16)] {
        let plan = RuleSet::preset("flax")
            .unwrap()
            .plan_with(
                ckpt.tensors(),
                &relayout::PlanOptions {
                    dtype,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(plan.entries()[0].source_name().ends_with("bias"));
        let opts = WriteOptions {
            force: true,
            ..Default::default()
        };
        Converter::new(&ckpt, &plan, &Cpu::new())
            .write_safetensors(&dir.join("cpu.safetensors"), &opts, &mut |_| {})
            .unwrap();
        let sizes: Vec<usize> = plan
            .entries()
            .iter()
            .map(|e| Converter::entry_bytes(e).unwrap())
            .collect();
        let mut want: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
        let mut views: Vec<&mut [u8]> = want.iter_mut().map(|v| &mut v[..]).collect();
        Converter::new(&ckpt, &plan, &Cpu::new())
            .fill(&mut views, &mut |_| {})
            .unwrap();
        for (device, exact) in [(&gpu, true), (&tiny, false)] {
            let what = format!("{dtype:?}, {} byte pieces", device.chunk_bytes());
            let (p0, c0) = (device.prefetched_tensors(), device.carried_tensors());
            let on_gpu = Converter::new(&ckpt, &plan, device)
                .write_safetensors(&dir.join("gpu.safetensors"), &opts, &mut |_| {})
                .unwrap();
            let (p1, c1) = (device.prefetched_tensors(), device.carried_tensors());
            assert!(
                std::fs::read(dir.join("gpu.safetensors")).unwrap()
                    == std::fs::read(dir.join("cpu.safetensors")).unwrap(),
                "{what}: GPU and CPU outputs differ"
            );
            assert!(on_gpu.device_upload_bytes() <= source, "{what}: {on_gpu:?}");
            // Filled into the caller's buffers, in plan order: the same bytes.
            let mut got: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xA5u8; n]).collect();
            let mut views: Vec<&mut [u8]> = got.iter_mut().map(|v| &mut v[..]).collect();
            Converter::new(&ckpt, &plan, device)
                .fill(&mut views, &mut |_| {})
                .unwrap();
            assert!(want == got, "{what}: filled buffers differ");
            let (p2, c2) = (device.prefetched_tensors(), device.carried_tensors());
            // Stopped right after each tensor, and within the first bands, then run whole
            // on the same device: the stopped run leaves no piece in flight (pieces it
            // started for a tensor it never reached are dropped inside its one call), and
            // the next run's bytes are right.
            let mut left_in_flight = 0;
            let stops = [(0, 1), (0, 3)].into_iter().chain((1..=7).map(|t| (t, 0)));
            // (4 KiB pieces make this slow on a software adapter; the default ones carry.)
            for stop in stops.filter(|_| exact) {
                let interrupt = relayout::Interrupt::new();
                let conv = Converter::new(&ckpt, &plan, device)
                    .with_band_bytes(65536)
                    .with_interrupt(interrupt.clone());
                let mut scratch: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
                let mut views: Vec<&mut [u8]> = scratch.iter_mut().map(|v| &mut v[..]).collect();
                let mut bands = 0;
                let _ = conv.fill(&mut views, &mut |p| {
                    bands += 1;
                    let at_tensor = stop.0 > 0 && p.tensors_done() == stop.0;
                    if at_tensor || (stop.0 == 0 && bands == stop.1) {
                        interrupt.raise(2);
                    }
                });
                left_in_flight += usize::from(device.has_carried_pieces());
                let mut got: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xA5u8; n]).collect();
                let mut views: Vec<&mut [u8]> = got.iter_mut().map(|v| &mut v[..]).collect();
                Converter::new(&ckpt, &plan, device)
                    .with_band_bytes(65536)
                    .fill(&mut views, &mut |_| {})
                    .unwrap();
                assert!(want == got, "{what}: a run after stop {stop:?} differs");
            }
            assert_eq!(
                left_in_flight, 0,
                "{what}: a stopped run left pieces in flight"
            );
            if exact {
                assert_eq!((p1 - p0, c1 - c0), (transposed, after_transposed), "{what}");
                assert_eq!((p2 - p1, c2 - c1), (transposed, after_transposed), "{what}");
            } else {
                // Tensors too wide for 4 KiB windows stream; the rest still overlap.
                assert!(c1 > c0 && c2 > c1, "{what}: nothing carried over");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
