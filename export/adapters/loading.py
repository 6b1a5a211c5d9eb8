"""A checkpoint from elsewhere, through its adapter, as the LoadedCheckpoint the exporter takes."""

from __future__ import annotations

from pathlib import Path

from trm_export.export.checkpoint import LoadedCheckpoint
from trm_export.runtime.manifest import sha256_file


def load_adapted(path: str | Path, arch: str, arch_config: str | Path) -> LoadedCheckpoint:
    """`path` (a saved state_dict) as the model `arch` describes with `arch_config`; every source recorded."""
    from trm_export.export.adapters import tiny_recursive_model as trm_adapter

    if arch != "tiny-recursive-model":
        raise ValueError(f"unknown architecture {arch!r}")
    path = Path(path)
    if not path.is_file():
        raise trm_adapter.AdapterError(f"{path}: no such file (give the file torch.save(trm.state_dict(), ...) "
                                       "wrote)")
    config = trm_adapter.TinyRecursiveConfig.read(arch_config)
    model = trm_adapter.load(path, config)
    sources = {name: f"--arch-config {arch_config}" for name in ("seq_len", "hidden_size", "halt_max_steps")}
    return LoadedCheckpoint(path=path, config=model.config, model=model, key_prefix="", sha256=sha256_file(path),
                            stored_dtypes={k: str(v.dtype).replace("torch.", "")
                                           for k, v in model.trm.state_dict().items()},
                            config_path=Path(arch_config), sources=sources)
