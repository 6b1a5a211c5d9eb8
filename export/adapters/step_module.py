"""Your own looped model: `--step-module MODULE:FUNCTION` names Python code that makes a StepModel from MODEL.

    trm-export saved.pt --step-module looped_sudoku:make_step --target cpu -o looped.bundle

MODULE is imported (from the current folder first, then sys.path) and FUNCTION(Path(MODEL)) must return a
StepModel (export/step_protocol.py): a torch module with `config` (a StepModelConfig) and embed, initial_state,
step, exporting and embedding_arrays. That code runs because the user named it on the command line; MODEL itself
is only ever read by it (the example reads a state_dict with weights_only=True). Everything after the load
(parity against this very module, float64 included, calibration, targets, the report, the bundle format) is what
any model gets. examples/looped_model/ is a complete one.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from pathlib import Path

from trm_export.errors import TrmExportError
from trm_export.export.config import MAX_STEPS
from trm_export.export.step_protocol import PROTOCOL_METHODS, StepModelConfig, count_step_flops
from trm_export.runtime.manifest import HALTING_RULE

SPEC = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)")


class StepModuleError(TrmExportError):
    """The named code, or what it returned, does not make a StepModel."""


def import_step_function(spec: str):
    """FUNCTION of `MODULE:FUNCTION`, imported with the current folder first on sys.path."""
    match = SPEC.fullmatch(spec)
    if match is None:
        raise StepModuleError(f"--step-module {spec!r}: expected MODULE:FUNCTION, e.g. my_model:make_step")
    module_name, function_name = match.groups()
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StepModuleError(f"--step-module {spec}: cannot import {module_name} ({exc}); run from the folder "
                              "holding it, or put it on PYTHONPATH") from None
    except Exception as exc:  # the user's module failed while importing: say where, in one line
        raise StepModuleError(f"--step-module {spec}: importing {module_name} raised {type(exc).__name__}: {exc}"
                              ) from None
    finally:
        sys.path.remove(str(Path.cwd()))
    function = getattr(module, function_name, None)
    if not callable(function):
        raise StepModuleError(f"--step-module {spec}: {module_name} has no function {function_name}")
    return function


def check_config(config: object, spec: str) -> StepModelConfig:
    """The config a StepModel carries, checked field by field (what the exporter and the manifest rely on)."""
    if not isinstance(config, StepModelConfig):
        raise StepModuleError(f"--step-module {spec}: the model's `config` must be a "
                              f"trm_export.export.step_protocol.StepModelConfig, got {type(config).__name__}")
    for name in ("vocab_size", "seq_len", "hidden_size", "halt_max_steps", "num_puzzle_identifiers",
                 "net_calls_per_step"):
        value = getattr(config, name)
        if type(value) is not int or not 1 <= value <= (MAX_STEPS if name == "halt_max_steps" else 1 << 20):
            raise StepModuleError(f"--step-module {spec}: config.{name} must be a positive integer"
                                  f"{f' up to {MAX_STEPS}' if name == 'halt_max_steps' else ''}, got {value!r}")
    for name in ("prefix_len", "puzzle_emb_ndim", "step_flops"):
        value = getattr(config, name)
        if type(value) is not int or value < 0:
            raise StepModuleError(f"--step-module {spec}: config.{name} must be an integer >= 0, got {value!r}")
    if not isinstance(config.halting_rule, str) or not HALTING_RULE.fullmatch(config.halting_rule):
        raise StepModuleError(f"--step-module {spec}: config.halting_rule must be q_halt>0, q_halt>q_continue or "
                              f"q_halt>=T (T a decimal), got {config.halting_rule!r}")
    if not isinstance(config.family, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", config.family):
        raise StepModuleError(f"--step-module {spec}: config.family must be a short name (letters, digits, '._-'), "
                              f"got {config.family!r}")
    if config.family in ("trm", "hrm"):
        raise StepModuleError(f"--step-module {spec}: config.family {config.family!r} is the official models' name; "
                              "give your model its own")
    return config


def load_step_module(path: Path, spec: str):
    """MODEL through the user's FUNCTION, checked against the step protocol; step_flops counted when left 0."""
    import torch

    function = import_step_function(spec)
    try:
        model = function(path)
    except TrmExportError:
        raise
    except Exception as exc:  # the user's code: its failure is one line naming it
        raise StepModuleError(f"--step-module {spec}: {spec.split(':')[1]}({path}) raised "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise StepModuleError(f"--step-module {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(model, name, None))]
    if missing:
        raise StepModuleError(f"--step-module {spec}: the model lacks {', '.join(missing)} (the step protocol: "
                              "export/step_protocol.py)")
    config = check_config(getattr(model, "config", None), spec)
    model = model.float().eval()
    if config.step_flops == 0:
        model.config = dataclasses.replace(config, step_flops=count_step_flops(model))
    return model
