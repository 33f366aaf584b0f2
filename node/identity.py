"""The node's Ed25519 identity: one key in ``<data>/identity.key`` (PKCS#8 PEM, mode 0600).

The same key is the libp2p host key (so the peer ID is stable across restarts) and signs catalog
entries, results and DHT records. A key file that others can read is refused, not silently fixed:
the key may already have leaked, and the owner should know.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.durable import write_atomically
from node.errors import IdentityError

KEY_FILE = "identity.key"


@dataclass(frozen=True, slots=True)
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte seed (what libp2p's Ed25519 key type is built from)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        path = data_dir / KEY_FILE
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_private_dir(data_dir)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            st = path.stat()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from e
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
                f"(others may have read it: check, then 'chmod 600 {path}')"
            )
        try:
            pem = path.read_bytes()
        except OSError as e:
            # e.g. a 0600 key owned by another user (made by an earlier `sudo vmlend`): say so,
            # rather than calling a perfectly good key "not a PEM private key".
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from e
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"key file {path} is not a PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} holds a {type(key).__name__}, not Ed25519")
        return cls(key)

    def save(self, path: Path) -> None:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Created 0600 under a fresh name (never a planted link) and synced with its directory:
        # never readable by others, and a power cut right after first start keeps the peer ID.
        write_atomically(path, pem, mode=0o600)


def check_private_dir(path: Path) -> None:
    """Refuse a data directory others may write to (they could replace the key or state files)
    or that is not a directory, with what to do about it."""
    try:
        st = path.lstat()
    except OSError as e:
        raise IdentityError(f"cannot use data directory {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise IdentityError(f"data directory {path} is not a directory (a link or a file)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise IdentityError(
            f"data directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may write "
            f"to it; make it private with 'chmod 700 {path}'"
        )


def verify(public_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``public_bytes``' Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_bytes).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
