"""The host's identity on the network: its certificate, private key and pairing key.

They live in the host's state folder (``--state``; systemd's ``$STATE_DIRECTORY``,
else ``~/.local/state/rockchip-llm``), made at the first start with TCP: the
certificate is self-signed (EC P-256) by the ``openssl`` command, since Python's
``ssl`` module cannot make one; the pairing key is 160 random bits. Home Assistant
pins the certificate by the SHA-256 of its DER form (:attr:`HostIdentity.identity`)
and proves, with the pairing key, that it was paired (``pairing.py``).
"""

from dataclasses import dataclass, field
import hashlib
import logging
import os
from pathlib import Path
import secrets
import shutil
import ssl
import subprocess
import tempfile
from typing import Final

_LOGGER = logging.getLogger(__name__)

STATE_ENV: Final = "STATE_DIRECTORY"
"""Set by systemd for a service with StateDirectory= (its first folder is ours)."""
CERTIFICATE_FILE: Final = "certificate.pem"
PRIVATE_KEY_FILE: Final = "private-key.pem"
PAIRING_KEY_FILE: Final = "pairing-key"
CERTIFICATE_DAYS: Final = 36500
"""The certificate's validity: Home Assistant pins it, so it never needs renewing."""
OPENSSL_TIMEOUT: Final = 60.0
"""Seconds openssl may take to make the key pair (a slow SD card)."""

PAIRING_KEY_BYTES: Final = 20
"""160 random bits: 32 characters of Crockford's base32, 8 groups of 4."""
_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford's base32: no I, L, O or U, so nothing reads as another character."""
_READS_AS: Final = {"O": "0", "I": "1", "L": "1"}
_KEY_CHARACTERS: Final = PAIRING_KEY_BYTES * 8 // 5
_GROUP: Final = 4


class IdentityError(Exception):
    """The host cannot make or read its identity (the message says what to do)."""


def default_state_dir() -> Path:
    """Return systemd's state folder for the service, else the user's."""
    if folders := os.environ.get(STATE_ENV):
        return Path(folders.split(":")[0])
    return Path.home() / ".local" / "state" / "rockchip-llm"


def format_pairing_key(key: bytes) -> str:
    """Write a pairing key as people type it: XXXX-XXXX-… (32 characters)."""
    number = int.from_bytes(key, "big")
    digits = "".join(
        _ALPHABET[(number >> (5 * index)) & 31]
        for index in reversed(range(_KEY_CHARACTERS))
    )
    return "-".join(
        digits[start : start + _GROUP] for start in range(0, len(digits), _GROUP)
    )


def parse_pairing_key(text: str) -> bytes:
    """Read a typed pairing key: any case, spaces and dashes anywhere, O for 0, I/L for 1.

    Raise ValueError when it is not one.
    """
    digits = "".join(
        _READS_AS.get(char, char)
        for char in text.upper()
        if not char.isspace() and char != "-"
    )
    if len(digits) != _KEY_CHARACTERS:
        raise ValueError(
            f"a pairing key has {_KEY_CHARACTERS} letters and digits, "
            f"this has {len(digits)}"
        )
    number = 0
    for char in digits:
        if (value := _ALPHABET.find(char)) < 0:
            raise ValueError(f"{char!r} is not a character of a pairing key")
        number = number << 5 | value
    return number.to_bytes(PAIRING_KEY_BYTES, "big")


def identity_of(der: bytes) -> str:
    """Return the identity of a certificate: sha256:<hex> of its DER form."""
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


@dataclass(frozen=True, slots=True)
class HostIdentity:
    """The host's certificate and pairing key, as read from its state folder."""

    state_dir: Path
    certificate: Path
    private_key: Path
    pairing_key_file: Path
    identity: str
    """sha256:<64 lowercase hex> of the certificate's DER form."""
    pairing_key: bytes = field(repr=False)

    @property
    def pairing_key_text(self) -> str:
        """The pairing key as the user types it."""
        return format_pairing_key(self.pairing_key)

    def server_context(self) -> ssl.SSLContext:
        """Return the TLS context the host serves with (TLS 1.3 only)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_cert_chain(self.certificate, self.private_key)
        except (OSError, ssl.SSLError) as err:
            raise IdentityError(
                f"the host's certificate {self.certificate} or private key "
                f"{self.private_key} cannot be used ({err}); delete both to make a new "
                "identity at the next start, then pair Home Assistant again"
            ) from err
        return context


def _make_certificate(state_dir: Path) -> None:
    """Make a new key pair and self-signed certificate with openssl (blocking)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise IdentityError(
            "the runtime host makes its TLS certificate with the openssl command at "
            "its first start, and openssl is not installed: install it (Debian, "
            "Ubuntu, Armbian: sudo apt install openssl) and start the host again"
        )
    with tempfile.TemporaryDirectory(dir=state_dir, prefix=".new-identity-") as new:
        certificate = Path(new) / CERTIFICATE_FILE
        private_key = Path(new) / PRIVATE_KEY_FILE
        try:
            subprocess.run(
                [
                    openssl,
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    str(CERTIFICATE_DAYS),
                    "-subj",
                    "/CN=Rockchip LLM runtime host",
                    "-keyout",
                    str(private_key),
                    "-out",
                    str(certificate),
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=True,
                timeout=OPENSSL_TIMEOUT,
            )
        except subprocess.CalledProcessError as err:
            detail = err.stderr.decode(errors="replace").strip()[-500:]
            raise IdentityError(
                f"openssl could not make the host's certificate: {detail}"
            ) from err
        except (OSError, subprocess.TimeoutExpired) as err:
            raise IdentityError(
                f"openssl could not make the host's certificate: {err}"
            ) from err
        private_key.chmod(0o600)
        certificate.chmod(0o644)
        # The key first: a certificate is never there without its key.
        private_key.replace(state_dir / PRIVATE_KEY_FILE)
        certificate.replace(state_dir / CERTIFICATE_FILE)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read, replacing the old one at once."""
    staging = path.with_name(f".{path.name}.new")
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    staging.replace(path)


def _read_pairing_key(path: Path) -> bytes:
    try:
        return parse_pairing_key(path.read_text(encoding="ascii"))
    except (UnicodeDecodeError, ValueError) as err:
        raise IdentityError(
            f"the pairing key in {path} is damaged ({err}); delete the file to make "
            "a new key at the next start, then pair Home Assistant again"
        ) from err


def load_or_create(state_dir: Path) -> tuple[HostIdentity, list[str]]:
    """Read the host's identity from its state folder, making what is missing.

    Return it and what was made (for the log). Blocking: it may run openssl.
    """
    made: list[str] = []
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        certificate = state_dir / CERTIFICATE_FILE
        private_key = state_dir / PRIVATE_KEY_FILE
        if not (certificate.is_file() and private_key.is_file()):
            _make_certificate(state_dir)
            made.append("certificate")
        pairing_file = state_dir / PAIRING_KEY_FILE
        if not pairing_file.is_file():
            _write_private(
                pairing_file,
                format_pairing_key(secrets.token_bytes(PAIRING_KEY_BYTES)) + "\n",
            )
            made.append("pairing key")
        pairing_key = _read_pairing_key(pairing_file)
        pem = certificate.read_text(encoding="ascii")
    except OSError as err:
        raise IdentityError(
            f"the host's state folder {state_dir} cannot be used: "
            f"{err.strerror or err}; give a folder it may write to with --state"
        ) from err
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError as err:
        raise IdentityError(
            f"the host's certificate {certificate} is damaged ({err}); delete it "
            f"and {private_key} to make a new identity at the next start, then pair "
            "Home Assistant again"
        ) from err
    identity = HostIdentity(
        state_dir=state_dir,
        certificate=certificate,
        private_key=private_key,
        pairing_key_file=pairing_file,
        identity=identity_of(der),
        pairing_key=pairing_key,
    )
    return identity, made
