//! Convert a checkpoint to a Flax-layout safetensors file through the library API.
//!
//! cargo run --release --example convert_file -- tests/fixtures/small_cnn.pt /tmp/small_cnn.flax.safetensors flax

use relayout::{convert, ConvertSpec, Device};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: convert_file INPUT OUTPUT [PRESET]".into());
    };
    let preset = args.next().unwrap_or_else(|| "flax".to_string());
    let spec = ConvertSpec::new()
        .preset(preset)
        .device(Device::Auto)
        .force(true);
    let report = convert(&input, &output, &spec, &mut |_progress| {})?;
    println!(
        "{} tensors, {} bytes in {:.3} s on {}",
        report.tensors(),
        report.bytes(),
        report.seconds(),
        report.backend()
    );
    Ok(())
}
