"""A checkpoint from elsewhere, through its adapter or the user's own step module, as the LoadedCheckpoint the
exporter takes."""

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
    return _loaded(path, model, f"--arch-config {arch_config}", Path(arch_config))


def load_step_model(path: str | Path, spec: str) -> LoadedCheckpoint:
    """`path` through the user's `--step-module MODULE:FUNCTION` (export/adapters/step_module.py)."""
    from trm_export.export.adapters.step_module import StepModuleError, load_step_module

    path = Path(path)
    if not path.is_file():
        raise StepModuleError(f"{path}: no such file (MODEL is the one file your FUNCTION reads; its sha256 goes "
                              "into the bundle's provenance)")
    return _loaded(path, load_step_module(path, spec), f"--step-module {spec}", None)


def _loaded(path: Path, model, source: str, config_path: Path | None) -> LoadedCheckpoint:
    sources = {name: source for name in ("seq_len", "hidden_size", "halt_max_steps")}
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in model.state_dict().items()}
    return LoadedCheckpoint(path=path, config=model.config, model=model, key_prefix="", sha256=sha256_file(path),
                            stored_dtypes=dtypes, config_path=config_path, sources=sources)
