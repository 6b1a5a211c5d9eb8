"""The small loop that device apps embed. Needs numpy + onnxruntime only (never torch or onnx).

    from trm_export.runtime import Solver
    solver = Solver("sudoku.bundle")                       # verifies the manifest checksums
    answer = solver.solve(puzzle_tokens)                   # [N, seq_len] or one puzzle
    answer.predictions, answer.steps_used
    solver.solve(puzzle_tokens, halting="stable:2")        # halt once the answer is unchanged for 2 steps
    stream = SolverStream("sudoku.bundle")                 # many threads' requests in one batch (a server)
    stream.submit(puzzle_tokens).result()
"""

from trm_export.runtime.solver import HaltingPolicy, Solver, SolveResult, parse_halting
from trm_export.runtime.stream import SolverStream

__all__ = ["HaltingPolicy", "SolveResult", "Solver", "SolverStream", "parse_halting"]
