"""A typed script using the package; `test_stubs_type_check` runs mypy --strict on it."""

from pathlib import Path
from typing import Dict, List

import numpy as np

import relayout


def report_progress(p: relayout.Progress) -> None:
    print(f"{p.bytes_done}/{p.bytes_total}")


def main() -> None:
    arrays: Dict[str, np.ndarray] = relayout.load(Path("model.pt"), "flax", dtype="bf16", progress=report_progress)
    variables = relayout.load_flax("model.pt", set={"heads": 8}, as_jax=False)
    weights = relayout.load_mlx("model.pt", rules=["extra.toml"], device="cpu")
    report: relayout.Report = relayout.convert("model.pt", "out/", "mlx", max_shard_size="2GB", force=True)
    plan: relayout.Plan = relayout.plan("model.pt", "nnx", allow_unmatched=True)
    first: relayout.PlanEntry = plan.entries[0]
    tensors: List[relayout.TensorInfo] = relayout.inspect("model.pt", key="model")
    gpus = [d.name for d in relayout.devices() if d.kind == "gpu"]
    shape: tuple[int, ...] = first.target_shape
    total: int = report.bytes + plan.nbytes + sum(t.nbytes for t in tensors)
    try:
        relayout.load("model.pt", "flax")
    except relayout.ForbiddenGlobalError as e:
        print(e.path, e.kind)
    except relayout.Error as e:
        print(e)
    print(len(arrays), len(variables), len(weights), gpus, shape, total, relayout.presets())


if __name__ == "__main__":
    main()
