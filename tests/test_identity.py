"""node.identity: the key file is made 0600, kept, and refused when others could read it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from node.errors import IdentityError
from node.identity import KEY_FILE, Identity, verify


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_the_key_0600_in_a_new_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "a" / "data"
    identity = Identity.load_or_create(data)
    key = data / KEY_FILE
    assert mode(key) == 0o600
    assert len(identity.public_bytes) == 32
    assert len(identity.private_bytes) == 32
    assert not (data / (KEY_FILE + ".tmp")).exists()


def test_key_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.load_or_create(tmp_path)
    finally:
        os.umask(old)
    assert mode(tmp_path / KEY_FILE) == 0o600


def test_reload_gives_the_same_key(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    again = Identity.load_or_create(tmp_path)
    assert again.public_bytes == first.public_bytes
    assert again.private_bytes == first.private_bytes
    assert Identity.load(tmp_path / KEY_FILE).public_bytes == first.public_bytes


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o620, 0o660, 0o700 | 0o007])
def test_a_key_others_can_reach_is_refused_with_a_clear_error(tmp_path: Path, loose: int) -> None:
    Identity.load_or_create(tmp_path)
    key = tmp_path / KEY_FILE
    key.chmod(loose)
    with pytest.raises(IdentityError) as info:
        Identity.load_or_create(tmp_path)
    message = str(info.value)
    assert str(key) in message
    assert f"{loose:04o}" in message
    assert "chmod 600" in message
    # Refused, not "fixed": the owner must find out the key may have leaked.
    assert mode(key) == loose


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o400)
    assert Identity.load_or_create(tmp_path).public_bytes == first.public_bytes


def _write_key_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not a key at all\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        os.urandom(64),
    ],
)
def test_a_garbage_key_file_is_refused(tmp_path: Path, garbage: bytes) -> None:
    _write_key_file(tmp_path / KEY_FILE, garbage)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        Identity.load_or_create(tmp_path)
    # The bad file is left alone for its owner to look at, never overwritten with a new key.
    assert (tmp_path / KEY_FILE).read_bytes() == garbage


NON_ED25519_KEYS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ed448": ed448.Ed448PrivateKey.generate,  # the near miss: also EdDSA, also "Ed..."
}


@pytest.mark.parametrize("kind", sorted(NON_ED25519_KEYS))
def test_a_non_ed25519_pem_is_refused(tmp_path: Path, kind: str) -> None:
    key = NON_ED25519_KEYS[kind]()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_key_file(tmp_path / KEY_FILE, pem)
    with pytest.raises(IdentityError, match="not Ed25519"):
        Identity.load_or_create(tmp_path)


def test_an_encrypted_pem_is_refused(tmp_path: Path) -> None:
    identity = Identity.generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    _write_key_file(tmp_path / KEY_FILE, pem)
    with pytest.raises(IdentityError, match="not a PEM private key"):
        Identity.load_or_create(tmp_path)


def test_a_missing_or_unreadable_path_is_an_identity_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot read key file"):
        Identity.load(tmp_path / "nope.key")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError, match=r"cannot read key file .*dir\.key"):
        Identity.load(tmp_path / "dir.key")


def test_verify_true_for_a_good_signature_false_otherwise() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    signature = alice.sign(b"result: exit 0")
    assert verify(alice.public_bytes, b"result: exit 0", signature)
    assert not verify(alice.public_bytes, b"result: exit 1", signature)
    assert not verify(bob.public_bytes, b"result: exit 0", signature)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify(alice.public_bytes, b"result: exit 0", tampered)
    assert not verify(alice.public_bytes, b"result: exit 0", signature[:-1])
    assert not verify(b"\x00" * 31, b"result: exit 0", signature)  # not a public key at all


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_data_dir_others_may_write_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    with pytest.raises(IdentityError, match=f"chmod 700 {data}"):
        Identity.load_or_create(data)
    assert not (data / "identity.key").exists()


def test_a_data_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "data").symlink_to(real)
    with pytest.raises(IdentityError, match="not a directory"):
        Identity.load_or_create(tmp_path / "data")
