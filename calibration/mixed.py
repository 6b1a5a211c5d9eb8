"""Mixed precision by end-of-loop sensitivity: keep in float the layers whose int8 error the loop amplifies.

A layer's quantization error is not judged after one pass but after the whole loop: each layer group
(`graph.quantizable_groups`: all unrolled calls of one weight) is quantized alone, everything else float, and
the bundle's loop runs `sensitivity_puzzles` puzzles for the full step count; the group's sensitivity is the
relative drift of the answer logits from FP32 after the last step (then z_H's drift, then the Q head's).
Then, from the fully quantized graph, the most sensitive groups go back to float one at a time until the
exact-accuracy drop on the selection puzzles is within `max_accuracy_drop` points (without labels: the share
of answers that changed, an upper bound of the drop).

Ranking costs one loop run per group on a few puzzles; it only runs when the fully quantized graph misses
the budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from trm_export.calibration.compare import CompareOptions, Fp32Run, VariantComparison, compare_graph
from trm_export.calibration.data import CalibrationError
from trm_export.calibration.graph import compact_graph, quantizable_groups
from trm_export.calibration.quantize import ActivationRanges, Int8Options, QuantizedGraph, quantize_int8


@dataclass(frozen=True)
class MixedOptions:
    max_accuracy_drop: float = 0.5  # percentage points of exact accuracy (the bar: 0.5)
    sensitivity_puzzles: int = 64
    max_float_layers: int | None = None  # None: as many as it takes


@dataclass(frozen=True)
class LayerSensitivity:
    """End-of-loop damage of quantizing one layer group alone."""

    label: str
    kind: str
    logits_rel_error: float  # the ranking key: drift of the answer after the last step
    final_rel_error: float  # z_H drift after the last step (zero for the heads, which do not feed z_H)
    max_abs_q_halt: float
    predictions_identical: float
    exact_accuracy: float | None


@dataclass
class MixedResult:
    graph: QuantizedGraph
    comparison: VariantComparison
    float_layers: tuple[str, ...]
    met: bool  # accuracy drop within max_accuracy_drop
    ranking: list[LayerSensitivity] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # [{float_layers, accuracy_drop_points}] per try

    def details(self, options: MixedOptions) -> dict:
        return {"float_layers": list(self.float_layers), "max_accuracy_drop_points": options.max_accuracy_drop,
                "accuracy_drop_points": self.comparison.accuracy_drop, "met": self.met,
                "criterion": "exact accuracy" if self.comparison.exact_accuracy is not None else
                "answers changed vs fp32 (no labels)",
                "selection_puzzles": self.comparison.puzzles, "selection_source": self.comparison.source,
                "sensitivity_puzzles": options.sensitivity_puzzles,
                "sensitivity": {s.label: {"logits_rel_error": s.logits_rel_error, "z_H_rel_error": s.final_rel_error,
                                          "max_abs_q_halt": s.max_abs_q_halt} for s in self.ranking},
                "history": self.history}


def rank_sensitivity(bundle: str | Path, prepared: onnx.ModelProto, ranges: ActivationRanges, reference: Fp32Run,
                     int8: Int8Options, compare: CompareOptions, work_dir: Path) -> list[LayerSensitivity]:
    """Every quantizable group, most damaging first: the drift of the last step's logits when quantized alone
    (it covers the LM head, which z_H drift cannot see), then z_H drift, then the Q head's error."""
    groups = [g for g in quantizable_groups(prepared) if int8.quantize_attention or g.kind == "weight"]
    forced = set(int8.keep_float)
    groups = [g for g in groups if g.label not in forced]
    result = []
    for group in groups:
        others = tuple(g.label for g in groups if g is not group) + tuple(int8.keep_float)
        graph = quantize_int8(prepared, ranges, dataclasses.replace(int8, keep_float=others))
        cmp = compare_graph(bundle, compact_graph(graph.model), reference, f"only {group.label}", compare, work_dir)
        result.append(LayerSensitivity(group.label, group.kind, cmp.logits_rel_error, cmp.final_rel_error,
                                       cmp.max_abs_q_halt, cmp.predictions_identical, cmp.exact_accuracy))
    return sorted(result, key=lambda s: (-s.logits_rel_error, -s.final_rel_error, -s.max_abs_q_halt))


def select_float_layers(bundle: str | Path, prepared: onnx.ModelProto, ranges: ActivationRanges, selection: Fp32Run,
                        sensitivity: Fp32Run, options: MixedOptions = MixedOptions(),
                        int8: Int8Options | None = None, compare: CompareOptions | None = None,
                        work_dir: Path | None = None, start: tuple[QuantizedGraph, VariantComparison] | None = None,
                        log: Callable[[str], None] | None = None) -> MixedResult:
    """Smallest set of most-sensitive layers in float that brings the accuracy drop within budget.

    `start`: the fully quantized graph and its comparison on `selection`, when the caller already has them.
    """
    say = log or (lambda message: None)
    int8 = int8 or Int8Options()
    compare = compare or CompareOptions()
    if work_dir is None:
        raise CalibrationError("select_float_layers needs a work_dir for candidate graphs")
    if start is None:
        graph = quantize_int8(prepared, ranges, int8)
        cmp = compare_graph(bundle, compact_graph(graph.model), selection, "int8-mixed", compare, work_dir)
    else:
        graph, cmp = start
    history = [{"float_layers": [], "accuracy_drop_points": cmp.accuracy_drop}]
    if cmp.accuracy_drop <= options.max_accuracy_drop:
        say(f"mixed precision: all layers int8 already within {options.max_accuracy_drop} points "
            f"(drop {cmp.accuracy_drop:.2f})")
        return MixedResult(graph, cmp, (), True, [], history)
    say(f"mixed precision: drop {cmp.accuracy_drop:.2f} points > {options.max_accuracy_drop}; ranking layers by "
        f"end-of-loop sensitivity on {sensitivity.puzzles.tokens.shape[0]} puzzles")
    ranking = rank_sensitivity(bundle, prepared, ranges, sensitivity, int8, compare, work_dir)
    float_layers: list[str] = []
    limit = len(ranking) if options.max_float_layers is None else min(options.max_float_layers, len(ranking))
    met = False
    for layer in ranking[:limit]:
        float_layers.append(layer.label)
        try:
            graph = quantize_int8(prepared, ranges, dataclasses.replace(
                int8, keep_float=tuple(int8.keep_float) + tuple(float_layers)))
        except CalibrationError:  # nothing left to quantize
            float_layers.pop()
            break
        cmp = compare_graph(bundle, compact_graph(graph.model), selection, "int8-mixed", compare, work_dir)
        history.append({"float_layers": list(float_layers), "accuracy_drop_points": cmp.accuracy_drop})
        say(f"  + {layer.label} in float: drop {cmp.accuracy_drop:.2f} points")
        if cmp.accuracy_drop <= options.max_accuracy_drop:
            met = True
            break
    return MixedResult(graph, cmp, tuple(float_layers), met, ranking, history)
