"""Bundle signatures: tell a bundle from its author from one a stranger edited and resealed.

The manifest's digest detects edits, not a forger: anyone who knows the format can edit a bundle and reseal it.
A signature can only be made with the author's private key. `trm-export sign BUNDLE --key KEY` signs the
manifest's digest, which covers every file's sha256, with Ed25519 and writes `signature.json` beside the manifest;
`trm-export verify BUNDLE --trust KEY.pub` refuses the bundle unless that signature verifies against the trusted
public key. A resealed bundle has another digest, so its old signature no longer verifies; signing it anew needs
the private key.

Keys are PEM files as `openssl genpkey -algorithm ed25519` writes them (PKCS#8 private, SubjectPublicKeyInfo
public), or made by `trm-export keygen`. The cryptography package does the Ed25519 arithmetic (optional extra
`trm-export[sign]`); nothing here runs without it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from trm_export.errors import BundleError, InputError
from trm_export.runtime.manifest import read_manifest

SIGNATURE_NAME = "signature.json"
ALGORITHM = "ed25519"
_CONTEXT = b"trm-export bundle manifest digest v1\n"  # what is signed: this, then the digest's hex
_MAX_BYTES = 64 << 10
HOW_TO_INSTALL = "pip install 'trm-export[sign]' (the cryptography package)"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise InputError(f"bundle signatures need the cryptography package: {HOW_TO_INSTALL}") from None
    return ed25519, serialization, InvalidSignature


def _read_key(path: Path, private: bool):
    ed25519, serialization, _ = _crypto()
    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()[:_MAX_BYTES + 1]
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} key ({exc.strerror or exc})") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: not an unencrypted PEM {what} key ({str(exc).splitlines()[0][:120]})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise InputError(f"{path}: a {type(key).__name__}; bundles are signed with Ed25519 keys "
                         "(trm-export keygen, or openssl genpkey -algorithm ed25519)")
    return key


def _raw_public(key) -> str:
    _, serialization, _ = _crypto()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def make_keys(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: PRIVATE (mode 600, refused if it exists) and PRIVATE.pub."""
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InputError(f"{path} already exists; a key is never overwritten (choose another name)")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def sign_bundle(bundle: str | Path, private_key: str | Path) -> Path:
    """Check the bundle (digest and every file), then write its signature.json; returns its path."""
    bundle = Path(bundle)
    key = _read_key(Path(private_key), private=True)
    manifest = read_manifest(bundle)  # signs only what verifies: digest and every listed file's sha256
    signature = key.sign(_CONTEXT + manifest.digest.encode())
    record = {"algorithm": ALGORITHM, "public_key": _raw_public(key.public_key()), "digest": manifest.digest,
              "signature": base64.b64encode(signature).decode()}
    path = bundle / SIGNATURE_NAME
    if path.is_symlink():
        raise BundleError(f"{path}: a symbolic link; refusing to write through it")
    tmp = bundle / f".{SIGNATURE_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def check_signature(bundle: str | Path, trusted_public_key: str | Path) -> str:
    """Refuse (BundleError) unless BUNDLE's signature.json verifies against the trusted public key and signs the
    manifest as it is now (digest and files checked too). Returns a one-line account of what was checked."""
    bundle = Path(bundle)
    _, _, invalid = _crypto()
    trusted = _read_key(Path(trusted_public_key), private=False)
    manifest = read_manifest(bundle)
    path = bundle / SIGNATURE_NAME
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{bundle}: not signed (no {SIGNATURE_NAME}); ask its author for a signed bundle, or "
                          "verify without --trust")
    try:
        record = json.loads(path.read_bytes()[:_MAX_BYTES + 1])
        signature = base64.b64decode(record["signature"], validate=True)
        claimed = str(record.get("public_key", ""))
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BundleError(f"{path}: not a signature record (JSON with a base64 'signature'); re-sign the "
                          "bundle") from None
    if claimed != _raw_public(trusted):
        raise BundleError(f"{path}: signed with another key than {trusted_public_key}; this bundle is not from "
                          "the author you trust")
    try:
        trusted.verify(signature, _CONTEXT + manifest.digest.encode())
    except invalid:
        raise BundleError(f"{path}: the signature does not match the manifest: the bundle was changed and "
                          "resealed after it was signed; do not use it") from None
    return f"signed by the trusted key {trusted_public_key}: signature matches the manifest digest " \
           f"{manifest.digest[:16]}... and every file's sha256"
