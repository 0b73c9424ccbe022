//! The library surface loaders use: `Converter::fill` into caller buffers (what the
//! Python package runs), its checks and interrupt, and the checked `Gather::new`.

use std::collections::BTreeMap;

use crate::common::*;
use relayout::{
    Checkpoint, Converter, Error, Gather, Interrupt, LayoutOp, Plan, Progress, RuleSet,
    WriteOptions,
};

fn plan_of(ckpt: &Checkpoint, preset: &str) -> Plan {
    RuleSet::preset(preset)
        .unwrap()
        .plan(ckpt.tensors())
        .unwrap()
}

fn buffers(plan: &Plan, fill: u8) -> Vec<Vec<u8>> {
    plan.entries()
        .iter()
        .map(|e| vec![fill; Converter::entry_bytes(e).unwrap()])
        .collect()
}

#[test]
fn fill_equals_the_written_file_on_every_backend_and_band_size() {
    let dir = scratch("fill-equals-file");
    for name in ["small_cnn.pt", "mixed.pt", "dtypes_views.pt", "sharded"] {
        let ckpt = Checkpoint::open(fixture(name)).unwrap();
        for preset in ["flax", "mlx", "nnx"] {
            let plan = plan_of(&ckpt, preset);
            let out = dir.join(format!("{preset}.safetensors"));
            let cpu = relayout::backend::cpu::Cpu::new();
            Converter::new(&ckpt, &plan, &cpu)
                .write_safetensors(
                    &out,
                    &WriteOptions {
                        force: true,
                        ..Default::default()
                    },
                    &mut |_| {},
                )
                .unwrap();
            let want = load_safetensors(&out);
            for backend in all_backends() {
                // Bands of 1 element, 40 bytes and the default cut every tensor
                // differently.
                for band in [1, 40, relayout::DEFAULT_BAND_BYTES] {
                    let mut bufs = buffers(&plan, 0xA5);
                    let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                    let mut last = Progress::default();
                    Converter::new(&ckpt, &plan, backend.as_ref())
                        .with_band_bytes(band)
                        .fill(&mut dsts, &mut |p| {
                            assert!(p.bytes_done() >= last.bytes_done());
                            last = p;
                        })
                        .unwrap();
                    assert_eq!(last.tensors_done(), plan.entries().len());
                    assert_eq!(last.bytes_done(), last.bytes_total());
                    let got: BTreeMap<&str, &Vec<u8>> = plan
                        .entries()
                        .iter()
                        .map(|e| e.target())
                        .zip(&bufs)
                        .collect();
                    assert_eq!(got.len(), want.len(), "{name} {preset}");
                    for (k, t) in &want {
                        assert!(
                            got[k.as_str()] == &t.bytes,
                            "{name} {preset} {} band {band}: '{k}' differs",
                            backend.name()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fill_checks_every_buffer_before_writing_any() {
    let ckpt = Checkpoint::open(fixture("mixed.pt")).unwrap();
    let plan = plan_of(&ckpt, "flax");
    let cpu = relayout::backend::cpu::Cpu::new();
    let conv = Converter::new(&ckpt, &plan, &cpu);
    // One buffer too few.
    let mut bufs = buffers(&plan, 0xA5);
    let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().skip(1).map(|b| &mut b[..]).collect();
    let e = conv.fill(&mut dsts, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("buffers for a plan of"), "{e}");
    // The last buffer one byte short: nothing is written, not even the first tensor.
    for (shrink, grow) in [(1, 0), (0, 1)] {
        let mut bufs = buffers(&plan, 0xA5);
        let last = bufs.last_mut().unwrap();
        last.truncate(last.len() - shrink);
        last.extend(std::iter::repeat_n(0xA5, grow));
        let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let e = conv.fill(&mut dsts, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Layout { .. }), "{e}");
        assert!(bufs.iter().flatten().all(|&b| b == 0xA5));
    }
}

#[test]
fn an_interrupt_stops_fill_within_one_band() {
    // Every backend: the GPU streams a tensor's bands without draining between them,
    // and must still stop at the band the interrupt follows.
    for backend in all_backends() {
        interrupt_stops_fill_within_one_band(backend.as_ref());
    }
}

fn interrupt_stops_fill_within_one_band(cpu: &dyn relayout::Backend) {
    let ckpt = Checkpoint::open(fixture("mixed.pt")).unwrap();
    let plan = plan_of(&ckpt, "flax");
    let band = 64;
    let total: u64 = plan
        .entries()
        .iter()
        .map(|e| Converter::entry_bytes(e).unwrap() as u64)
        .sum();
    let mut want = buffers(&plan, 0);
    let mut dsts: Vec<&mut [u8]> = want.iter_mut().map(|b| &mut b[..]).collect();
    Converter::new(&ckpt, &plan, &relayout::backend::reference::Reference)
        .fill(&mut dsts, &mut |_| {})
        .unwrap();
    // Raised before: nothing written. Raised at each progress event: stops at the next
    // band, so nothing beyond that event's bytes plus one band is done.
    let mut events = 0;
    let mut raise_at = 0;
    loop {
        let interrupt = Interrupt::new();
        if raise_at == 0 {
            interrupt.raise(7);
        }
        let conv = Converter::new(&ckpt, &plan, cpu)
            .with_band_bytes(band)
            .with_interrupt(interrupt.clone());
        let mut bufs = buffers(&plan, 0xA5);
        let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let mut seen = 0;
        let mut raised_after = None;
        let mut done_after_raise = 0;
        let result = conv.fill(&mut dsts, &mut |p| {
            seen += 1;
            if let Some(at) = raised_after {
                done_after_raise = p.bytes_done() - at;
            }
            if seen == raise_at {
                interrupt.raise(7);
                raised_after = Some(p.bytes_done());
            }
        });
        events = events.max(seen);
        drop(dsts);
        match result {
            Err(Error::Interrupted { code: 7 }) => {
                assert!(
                    done_after_raise <= band as u64,
                    "ran {done_after_raise} bytes on"
                );
                if raise_at == 0 {
                    assert!(bufs.iter().flatten().all(|&b| b == 0xA5));
                }
                // Nothing the stopped run left in flight (a device backend starts the
                // next tensor's pieces early) reaches the next run on the same backend.
                let conv = Converter::new(&ckpt, &plan, cpu).with_band_bytes(band);
                let mut bufs = buffers(&plan, 0x5A);
                let mut dsts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
                conv.fill(&mut dsts, &mut |_| {}).unwrap();
                assert!(bufs == want, "a run after stop {raise_at} differs");
            }
            Ok(()) => {
                // Raised once the last band was done: nothing was left to stop.
                assert_eq!(raised_after, Some(total));
                assert_eq!(done_after_raise, 0);
                break;
            }
            Err(e) => panic!("{e}"),
        }
        raise_at += 1;
    }
    assert!(events > 10, "only {events} progress events");
}

#[test]
fn gather_new_checks_what_it_is_given_and_normalises() {
    assert!(Gather::new(3, vec![2], vec![1], 0).is_err());
    assert!(Gather::new(4, vec![2, 2], vec![1], 0).is_err());
    assert!(Gather::new(4, vec![usize::MAX / 2, 3], vec![1, 1], 0).is_err());
    assert!(Gather::new(8, vec![2], vec![usize::MAX / 4], 0).is_err());
    // A (2, 1, 3) contiguous walk is one axis of 6; a transpose stays two axes.
    let g = Gather::new(4, vec![2, 1, 3], vec![3, 9, 1], 5).unwrap();
    assert_eq!(
        (g.shape(), g.strides(), g.offset()),
        (&[6][..], &[1][..], 5)
    );
    let op = LayoutOp::contiguous(2, vec![3, 4], vec![1, 0]).unwrap();
    let g = Gather::new(2, vec![4, 3], vec![1, 4], 0).unwrap();
    assert_eq!(g, op.simplify());
    assert_eq!(
        (op.elem_size(), op.perm(), op.strides()),
        (2, &[1, 0][..], &[4, 1][..])
    );
}
