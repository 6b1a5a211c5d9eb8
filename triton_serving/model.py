"""trm-export's loop model for Triton's Python backend, written by `trm-export triton` (the logic is in
trm_export.triton.serving; this file is only the backend's entry points). See the repository's README.md."""

from __future__ import annotations

import os
import site
import sys


def _honour_pythonpath() -> None:
    """Triton's Python stub embeds an interpreter that ignores PYTHONPATH; put its entries (and their .pth files,
    which editable installs use) first on sys.path, so that the environment the README names is the one used."""
    for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
        before = list(sys.path)
        site.addsitedir(entry)
        sys.path[:] = [p for p in sys.path if p not in before] + before


_honour_pythonpath()

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend)

try:
    from trm_export.triton.serving import LoopModel  # noqa: E402
except ImportError as exc:
    raise ImportError(f"trm-export is not importable in Triton's Python stub ({exc}); install it (pip install "
                      "trm-export 'numpy<2') where the stub runs, or start tritonserver with PYTHONPATH set to "
                      "that environment's site-packages") from None


class TritonPythonModel:
    def initialize(self, args):
        self.model = LoopModel.from_triton(args, pb_utils)

    def execute(self, requests):
        for request in requests:  # answered later, each on its own, by the stream's loop thread
            self.model.accept(request)
        return None

    def finalize(self):
        self.model.close()
