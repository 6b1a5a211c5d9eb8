"""Trained reference models shipped with the toolchain, in the official checkpoint format.

Each folder holds what the official trainer writes (`step_N`, `all_config.yaml`) plus the task's `dataset.json`;
`RESULTS.md` gives their measured accuracy. `scripts/train_reference.py` makes them.
"""

from __future__ import annotations

from pathlib import Path

from trm_export.errors import CheckpointError

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "sudoku_mlpt"
TASK_OF_MODEL = {"sudoku_mlpt": ("sudoku", {}), "maze_att": ("maze", {"size": 9})}


def reference_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder of a shipped reference model (the default: the Sudoku mlp_t model)."""
    if name not in TASK_OF_MODEL:
        raise CheckpointError(name, f"no such reference model; shipped: {sorted(TASK_OF_MODEL)}")
    folder = HERE / name
    if not any(folder.glob("step_*")):
        raise CheckpointError(folder, "reference model not found in this installation (no step_N file)")
    return folder
