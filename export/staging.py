"""Write a bundle so that it is either complete or absent.

Files go to a hidden sibling directory `.NAME.partial-PID`; only a finished, checksummed bundle is renamed to
NAME. An existing NAME is never touched without `force`; with it, the new bundle and the old one trade places in
one atomic step (Linux renameat2 RENAME_EXCHANGE), so whatever instant a kill lands, NAME holds the old bundle or
the new one; the old one, left at the staging name, is removed afterwards. Where the exchange is not available
the old bundle is renamed aside to `.NAME.replaced-PID` first; a kill between the two renames leaves NAME absent
for an instant, and the next run to the same place puts the old bundle back. A failed or interrupted export
removes its partial directory (SIGTERM included); one left by SIGKILL is removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime.manifest import MANIFEST_NAME, Manifest, sha256_file

README_NAME = "README.md"


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
        check_writable(self.out)
        recover(self.out)
        if self.out.exists() and not force:
            raise BundleError(f"{self.out} already exists; pass --force to replace it")
        if self.out.exists() and not (self.out / MANIFEST_NAME).is_file():
            raise BundleError(f"{self.out} exists and is not a bundle; refusing to replace it even with --force")
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._old_sigterm = None

    def __enter__(self) -> StagedBundle:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
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

    @contextlib.contextmanager
    def work_dir(self) -> Iterator[Path]:
        """A scratch folder beside the output, `.NAME.work-PID`, for the temporary files of this run (quantize's
        graphs and calibration data). Within it, `tempfile` puts every temporary file there too, so that a run
        killed with SIGKILL leaves nothing in TMPDIR: the next run to the same output removes what it left.
        (`tempfile.tempdir` is process-wide: not for runs in parallel threads of one process.)"""
        path = self.out.parent / f".{self.out.name}.work-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        before = tempfile.tempdir
        tempfile.tempdir = str(path)
        try:
            yield path
        finally:
            tempfile.tempdir = before
            shutil.rmtree(path, ignore_errors=True)

    def write_bytes(self, rel: str, data: bytes) -> str:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return rel

    def write_array(self, rel: str, array: np.ndarray) -> str:
        """np.save straight to the staged file: no in-memory .npy (a BytesIO and its bytes were two more copies of
        an ARC puzzle table)."""
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        return rel

    def checksums(self) -> dict[str, str]:
        """sha256 of every staged file except the manifest."""
        return {p.relative_to(self.path).as_posix(): sha256_file(p)
                for p in sorted(self.path.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}

    def write_manifest(self, manifest: Manifest) -> None:
        (self.path / MANIFEST_NAME).write_text(manifest.to_json())

    def commit(self, manifest: Manifest) -> Path:
        """Write README.md (the device owner's page, from the final manifest) and the manifest, which lists the
        README's checksum, then move the bundle into place."""
        from trm_export.targets.device_readme import render_bundle_readme

        self.write_bytes(README_NAME, render_bundle_readme(manifest, self.out.name).encode())
        manifest = dataclasses.replace(manifest, files={**manifest.files,
                                                        README_NAME: sha256_file(self.path / README_NAME)})
        self.write_manifest(manifest)
        for file in self.path.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if self.out.exists():
            if not self.force:
                raise BundleError(f"{self.out} appeared while exporting; pass --force to replace it")
            if _exchange(self.path, self.out):
                shutil.rmtree(self.path, ignore_errors=True)  # now the old bundle; a kill here: removed next run
            else:
                aside = self.out.parent / f".{self.out.name}.replaced-{os.getpid()}"
                os.replace(self.out, aside)
                os.replace(self.path, self.out)
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.path, self.out)
        _fsync_dir(self.out.parent)
        return self.out


def check_writable(out: Path) -> None:
    """Refuse an output path that cannot be written, before any work starts."""
    if out.is_symlink():
        raise BundleError(f"{out} is a symbolic link; give the bundle folder's real path")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BundleError(f"{out}: cannot create it, {ancestor} is a file, not a folder; choose another --output")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BundleError(f"{out}: cannot create it, {ancestor} is not writable; choose another --output")


def _leftovers(out: Path, kind: str, include_own: bool = True) -> list[Path]:
    """`.NAME.<kind>-PID` siblings of `out` whose process is gone (or is this one, with `include_own`)."""
    found = []
    for p in out.parent.glob(f".{out.name}.{kind}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and ((include_own and int(pid) == os.getpid()) or not _pid_alive(int(pid))):
            found.append(p)
    return found


def recover(out: str | Path) -> None:
    """Undo what a killed run left next to `out`: an old bundle moved aside goes back where `out` is missing (the
    kill fell between the two renames), otherwise it is removed; partial stagings are removed."""
    out = Path(out)
    for aside in sorted(_leftovers(out, "replaced")):
        if not out.exists() and (aside / MANIFEST_NAME).is_file():
            os.replace(aside, out)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for stale in _leftovers(out, "partial") + _leftovers(out, "work") + _leftovers(out, "source", include_own=False):
        shutil.rmtree(stale, ignore_errors=True)  # "source": the fp32 bundle of a killed one-command export


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt("export interrupted (SIGTERM)")
