//! The rule language: a TOML rule file, parsed, layered over the flax preset, planned
//! over the tensors of three fixed checkpoints (module structure; every dtype and
//! strided views; attention with module classes) and every planned tensor converted, so
//! a rule's perm, split, reshape and dtype reach the layout code.
#![no_main]

mod common;

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use relayout::fuzzing::Opened;
use relayout::{ModuleTypes, RuleSet};

const MIXED: &[u8] = include_bytes!("../../tests/fixtures/mixed.pt");
const DTYPES_VIEWS: &[u8] = include_bytes!("../../tests/fixtures/dtypes_views.pt");
const VIT_BLOCK: &[u8] = include_bytes!("../../tests/fixtures/frameworks/vit_block.pt");
const VIT_BLOCK_TYPES: &str = include_str!("../../tests/fixtures/frameworks/vit_block.types.json");

/// The checkpoints, each with its module classes if the fixture has them.
fn checkpoints() -> &'static [(Opened, Option<ModuleTypes>)] {
    static CKPTS: OnceLock<Vec<(Opened, Option<ModuleTypes>)>> = OnceLock::new();
    CKPTS.get_or_init(|| {
        let open = |bytes| relayout::fuzzing::checkpoint(bytes).expect("a fixture opens");
        let types = ModuleTypes::from_json(VIT_BLOCK_TYPES, Path::new("vit_block.types.json"))
            .expect("fixture module types parse");
        vec![
            (open(MIXED), None),
            (open(DTYPES_VIEWS), None),
            (open(VIT_BLOCK), Some(types)),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(user) = RuleSet::from_toml(text, "fuzz.toml") else {
        return;
    };
    // In front of a preset, as `--rules` puts a user's file: its rules are tried first
    // and the preset's shadowing analysis runs over both.
    let rules = common::flax().clone().layered(user);
    for (ckpt, types) in checkpoints() {
        let mut opts = common::plan_options();
        opts.module_types = types.clone();
        if let Ok(plan) = rules.plan_with(ckpt.tensors(), &opts) {
            common::convert_and_compare(ckpt, &plan);
        }
    }
});
