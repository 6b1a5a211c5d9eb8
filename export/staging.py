"""Write a bundle so that it is either complete or absent.

Files go to a hidden sibling directory `.NAME.partial-PID`; only a finished, checksummed bundle is renamed to
NAME. An existing NAME is never touched without `force`; with it, the old bundle is moved aside first and
removed only after the new one is in place. A failed or interrupted export removes its partial directory
(SIGTERM included); one left by SIGKILL is removed by the next export to the same place.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime.manifest import MANIFEST_NAME, Manifest, sha256_file


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedBundle:
    """Context manager: stage files, then `commit(manifest)`; on any exception the staging is removed."""

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        if self.out.exists() and not force:
            raise BundleError(f"{self.out} already exists; pass --force to replace it")
        if self.out.exists() and not (self.out / MANIFEST_NAME).is_file():
            raise BundleError(f"{self.out} exists and is not a bundle; refusing to replace it even with --force")
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._old_sigterm = None

    def __enter__(self) -> StagedBundle:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f".{self.out.name}.partial-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if (pid.isdigit() and not _pid_alive(int(pid))) or stale == self.path:
                shutil.rmtree(stale, ignore_errors=True)
        self.path.mkdir()
        if hasattr(signal, "SIGTERM"):
            try:
                self._old_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
            except ValueError:  # not the main thread: leave signal handling alone
                self._old_sigterm = None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)

    def write_bytes(self, rel: str, data: bytes) -> str:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return rel

    def write_array(self, rel: str, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        return self.write_bytes(rel, buffer.getvalue())

    def checksums(self) -> dict[str, str]:
        """sha256 of every staged file except the manifest."""
        return {p.relative_to(self.path).as_posix(): sha256_file(p)
                for p in sorted(self.path.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}

    def write_manifest(self, manifest: Manifest) -> None:
        (self.path / MANIFEST_NAME).write_text(manifest.to_json())

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest and move the bundle into place."""
        self.write_manifest(manifest)
        for file in self.path.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if self.out.exists():
            if not self.force:
                raise BundleError(f"{self.out} appeared while exporting; pass --force to replace it")
            aside = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
            os.replace(self.out, aside)
            os.replace(self.path, self.out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        return self.out


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt("export interrupted (SIGTERM)")
