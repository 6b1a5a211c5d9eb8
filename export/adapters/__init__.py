"""Adapters: looped models from elsewhere as StepModels (export/step_protocol.py).

`--arch NAME` picks one; each reads a state_dict (never a pickle) and the network's description, which a state_dict
does not carry, from `--arch-config FILE` (JSON).
"""

from __future__ import annotations

ARCHITECTURES = ("tiny-recursive-model",)
