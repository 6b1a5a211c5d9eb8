"""The small loop that device apps embed. Needs numpy + onnxruntime only (never torch or onnx).

    from trm_export.runtime import Solver
    solver = Solver("sudoku.bundle")                       # verifies the manifest checksums
    answer = solver.solve(puzzle_tokens)                   # [N, seq_len] or one puzzle
    answer.predictions, answer.steps_used
"""

from trm_export.runtime.solver import Solver, SolveResult

__all__ = ["SolveResult", "Solver"]
