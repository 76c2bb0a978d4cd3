"""Signing secrets at rest: sealed under RELAY_SECRET_KEY, opened only in memory.

A sealed secret is `v1:` + base64url(nonce ‖ AES-256-GCM ciphertext and tag), the key derived
from RELAY_SECRET_KEY with HKDF-SHA256, and the API key's id bound in as associated data, so
a sealed value copied onto another key's row does not open. `cryptography` does the
cryptography; nothing here invents any.

This module also owns the SQLite key file (`<db>.secret`, mode 0600) that stands in for
RELAY_SECRET_KEY where none is set. It reads no environment and never logs: its inputs are
secrets. Errors: `SecretKeyError` (a wrong, short or missing key; a value that does not open).
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEALED_PREFIX = "v1:"
SECRET_KEY_MIN_CHARS = 32
_NONCE_BYTES = 12
_OPENED_MAX = 4096  # opened secrets kept in memory: signing must not decrypt every time


class SecretKeyError(Exception):
    """RELAY_SECRET_KEY is missing, too short, or not the key the secrets were sealed under."""


def check_secret_key(secret_key: str) -> str:
    """`secret_key` if it is long enough to be a key, else SecretKeyError."""
    if len(secret_key) < SECRET_KEY_MIN_CHARS:
        raise SecretKeyError(
            f"must be at least {SECRET_KEY_MIN_CHARS} characters, e.g. the output of "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret_key


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


class SecretBox:
    """Seals and opens signing secrets under one RELAY_SECRET_KEY."""

    def __init__(self, secret_key: str) -> None:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"relay signing secrets v1"
        ).derive(check_secret_key(secret_key).encode())
        self._aead = AESGCM(derived)
        self._opened: OrderedDict[tuple[str, str], str] = OrderedDict()

    def __repr__(self) -> str:
        return "SecretBox(<key not shown>)"

    def seal(self, secret: str, key_id: str) -> str:
        """`secret` sealed for the API key `key_id`."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), key_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, sealed: str, key_id: str) -> str:
        """The secret `seal` sealed for `key_id`; SecretKeyError if it does not open."""
        cached = self._opened.get((sealed, key_id))
        if cached is not None:
            return cached
        if not is_sealed(sealed):
            raise SecretKeyError("a stored signing secret is not sealed (run relay migrate)")
        try:
            raw = base64.urlsafe_b64decode(sealed.removeprefix(SEALED_PREFIX))
            secret = self._aead.decrypt(
                raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], key_id.encode()
            ).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretKeyError(
                "RELAY_SECRET_KEY does not open the stored signing secrets"
            ) from None
        self._opened[(sealed, key_id)] = secret
        if len(self._opened) > _OPENED_MAX:
            self._opened.popitem(last=False)
        return secret


def key_file_path(sqlite_file: str) -> Path:
    """Where the key file of a SQLite database lives: beside it, `<db>.secret`."""
    return Path(sqlite_file + ".secret")


def read_or_create_key_file(path: Path) -> str:
    """The key in `path`, made (random, mode 0600) if the file does not exist yet."""
    if not path.exists():
        # Written whole under another name, then linked into place: a process starting at
        # the same time finds either no file or the whole key, and one key wins.
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise SecretKeyError(f"cannot create the key file {path}: {exc.strerror}") from None
        finally:
            temporary.unlink(missing_ok=True)
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise SecretKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        return check_secret_key(key)
    except SecretKeyError as exc:
        raise SecretKeyError(f"the key file {path} holds no usable key: it {exc}") from None
