//! relayout's integration tests, one binary (ripgrep's layout): each file below is a
//! module, and `common` holds the helpers they share (fixtures, scratch folders, the
//! one GPU gate). One binary links wgpu once instead of once per test file.

mod backend_grid;
mod bench_cli;
mod casts;
mod common;
mod end_to_end;
mod gpu_backend;
mod gpu_traffic;
mod hardening;
mod library_api;
mod mlx_lm;
mod model_folder;
mod ops;
mod quantized;
mod reports;
mod sharded;
mod stacked;
mod verify;
