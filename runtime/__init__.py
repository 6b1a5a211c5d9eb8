"""The small loop that device apps embed. Needs numpy + onnxruntime only (never torch or onnx).

    from trm_export.runtime import Solver
    solver = Solver("sudoku.bundle")                       # verifies the manifest checksums
    answer = solver.solve(puzzle_tokens)                   # [N, seq_len] or one puzzle
    answer.predictions, answer.steps_used
    solver.solve(puzzle_tokens, halting="stable:2")        # halt once the answer is unchanged for 2 steps
"""

from trm_export.runtime.solver import HaltingPolicy, Solver, SolveResult, parse_halting

__all__ = ["HaltingPolicy", "SolveResult", "Solver", "parse_halting"]
