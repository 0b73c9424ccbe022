//! Writes a synthetic checkpoint of about a given size with a realistic mix of tensors,
//! for benchmarks: a 32000×1024 embedding, then blocks of 1024×1024 attention
//! projections, 4096×1024 / 1024×4096 MLP weights, a (256,256,3,3) conv with its
//! BatchNorm (running stats, num_batches_tracked) and LayerNorms, until the size is
//! reached.
//!
//! cargo run --release --example make_checkpoint -- OUT.safetensors SIZE_MIB [f32|bf16]

use std::collections::BTreeMap;
use std::path::PathBuf;

use relayout::writer::{HeaderEntry, SafetensorsWriter};
use relayout::DType;

/// Bytes generated and written per call, so the generator's memory stays small.
const CHUNK: usize = 8 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: make_checkpoint OUT.safetensors SIZE_MIB [f32|bf16]";
    let out = PathBuf::from(args.next().ok_or(usage)?);
    let size_mib: u64 = args.next().ok_or(usage)?.parse()?;
    let dtype = match args.next().as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => return Err(format!("unknown dtype {other}; {usage}").into()),
    };
    let entries = layout(size_mib << 20, dtype);
    let total: usize = entries.iter().map(HeaderEntry::bytes).sum();
    let mut writer = SafetensorsWriter::create(&out, &entries, &BTreeMap::new(), true)?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; CHUNK];
    for e in &entries {
        let mut left = e.bytes();
        while left > 0 {
            let n = left.min(CHUNK);
            fill(&mut buf[..n], &mut state);
            writer.write(&buf[..n])?;
            left -= n;
        }
    }
    writer.finish()?;
    println!(
        "{}: {} tensors, {:.1} MiB of {dtype}",
        out.display(),
        entries.len(),
        total as f64 / (1u64 << 20) as f64
    );
    Ok(())
}

/// The tensor list: an embedding, then whole blocks while they fit in `target` bytes.
fn layout(target: u64, dtype: DType) -> Vec<HeaderEntry> {
    let t =
        |name: String, shape: &[usize], dtype: DType| HeaderEntry::new(name, dtype, shape.to_vec());
    let mut entries = vec![t("embed_tokens.weight".into(), &[32000, 1024], dtype)];
    let mut size: u64 = entries[0].bytes() as u64;
    for i in 0.. {
        let p = format!("layers.{i}");
        let mut block = Vec::new();
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            block.push(t(format!("{p}.attn.{proj}.weight"), &[1024, 1024], dtype));
            block.push(t(format!("{p}.attn.{proj}.bias"), &[1024], dtype));
        }
        block.push(t(format!("{p}.norm1.weight"), &[1024], dtype));
        block.push(t(format!("{p}.norm1.bias"), &[1024], dtype));
        block.push(t(format!("{p}.mlp.up.weight"), &[4096, 1024], dtype));
        block.push(t(format!("{p}.mlp.down.weight"), &[1024, 4096], dtype));
        block.push(t(format!("{p}.norm2.weight"), &[1024], dtype));
        block.push(t(format!("{p}.norm2.bias"), &[1024], dtype));
        block.push(t(format!("{p}.conv.weight"), &[256, 256, 3, 3], dtype));
        for stat in ["weight", "bias", "running_mean", "running_var"] {
            block.push(t(format!("{p}.bn.{stat}"), &[256], dtype));
        }
        block.push(t(format!("{p}.bn.num_batches_tracked"), &[], DType::I64));
        let bytes: u64 = block.iter().map(|e| e.bytes() as u64).sum();
        if size + bytes > target && i > 0 {
            break;
        }
        size += bytes;
        entries.extend(block);
    }
    entries
}

/// Deterministic pseudo-random bytes (xorshift64*): fast, and never all-zero pages that
/// a file system could store sparsely.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}
