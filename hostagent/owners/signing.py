"""The account service's `Authorization: Signature <sig>.<recid>.<msg>` scheme (secp256k1).

Formation's form-state (`form-state/src/auth/ecdsa.rs`) takes the header apart, hashes the
message with SHA-256 and hands that digest to k256's `recover_from_msg`, which hashes it with
SHA-256 once more: so the client signs SHA-256(SHA-256(msg)) as a prehashed digest. The
caller's address is the last 20 bytes of Keccak-256 of the uncompressed public key without
its 0x04 prefix, as lowercase hex without `0x`. The recovery id is a DECIMAL 0..3.

The server does not look at the message; ours still carries method, path and wall time so a
captured header says what it was for and when. The private key never appears in a log line,
an error message or a repr.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass

from hostagent.errors import AuthError, ConfigError

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
# secp256k1 group order; a signature with s above n/2 is "high-S" and upstream's k256 refuses it.
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_MAX_KEY_FILE_BYTES = 4096


def digest_of(message: bytes) -> bytes:
    """SHA-256(SHA-256(message)): the 32-byte digest the server recovers the key from."""
    return hashlib.sha256(hashlib.sha256(message).digest()).digest()


def address_of(public_key: bytes) -> str:
    """Ethereum-style address (lowercase hex, no 0x) of an uncompressed or compressed pubkey."""
    import coincurve
    from Crypto.Hash import keccak

    point = coincurve.PublicKey(public_key).format(compressed=False)
    h = keccak.new(digest_bits=256)
    h.update(point[1:])
    return str(h.hexdigest()[-40:])


def request_message(method: str, path: str, wall_s: int) -> bytes:
    """The message we sign for one request: `<METHOD> <path> <unix seconds>`."""
    return f"{method.upper()} {path} {wall_s}".encode()


class Signer:
    """A node key that signs account-service requests; it never shows the key."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ValueError("a secp256k1 private key is 32 bytes")
        import coincurve  # imported when used (~5 MB of RSS): most hosts sign nothing

        try:
            self._key = coincurve.PrivateKey(private_key)
        except ValueError as err:  # zero or >= group order
            raise ValueError("not a valid secp256k1 private key") from err
        self.address: str = address_of(self._key.public_key.format(compressed=False))

    def __repr__(self) -> str:
        return f"Signer(address={self.address})"

    def sign(self, message: bytes) -> str:
        """The header value `Signature <hex r||s>.<recid>.<hex message>` for `message`."""
        raw = self._key.sign_recoverable(digest_of(message), hasher=None)
        # libsecp256k1 always emits low-S, so the recid needs no adjusting.
        return f"Signature {raw[:64].hex()}.{raw[64]}.{message.hex()}"

    def header_for(self, method: str, path: str, wall_s: int) -> dict[str, str]:
        """`{"Authorization": ...}` for one request at wall time `wall_s`."""
        return {"Authorization": self.sign(request_message(method, path, wall_s))}


@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid header proves: who signed, and what."""

    address: str
    message: bytes


def verify(header_value: str) -> Verified:
    """Recover the signer of an `Authorization` value, as form-state does; AuthError if invalid."""
    if not header_value.startswith("Signature "):
        raise AuthError("authorization is not of the form 'Signature <sig>.<recid>.<msg>'")
    parts = header_value[len("Signature "):].split(".")
    if len(parts) != 3:
        raise AuthError("signature header needs exactly three dot-separated parts")
    sig_hex, recid_text, msg_hex = parts
    if not (_HEX.fullmatch(sig_hex) and _HEX.fullmatch(msg_hex)) or len(sig_hex) != 128:
        raise AuthError("signature must be 64 bytes of hex and the message hex")
    if recid_text not in ("0", "1", "2", "3"):
        raise AuthError("recovery id must be a decimal 0..3")
    sig = bytes.fromhex(sig_hex)
    s = int.from_bytes(sig[32:], "big")
    if not 0 < s <= _N // 2:
        raise AuthError("signature is not low-S")
    message = bytes.fromhex(msg_hex)
    import coincurve

    try:
        pub = coincurve.PublicKey.from_signature_and_message(
            sig + bytes([int(recid_text)]), digest_of(message), hasher=None
        )
    except Exception as err:  # coincurve raises plain Exception on a failed recovery
        raise AuthError("could not recover a public key from the signature") from err
    return Verified(address=address_of(pub.format(compressed=False)), message=message)


def load_key_file(path: str, *, config_source: str = "<config>") -> Signer:
    """Read a hex private key from a file only its owner can read; ConfigError otherwise."""
    key = "owners.key_file"
    try:
        # O_NONBLOCK: opening a FIFO put at the path would otherwise wait for a writer
        # forever (start-up and check-config hung); the S_ISREG check below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        fix = ("point owners.key_file at the key file itself: a symbolic link is not followed"
               if err.errno == errno.ELOOP
               else "create it with a hex secp256k1 key and `chmod 600` it"
               if err.errno == errno.ENOENT
               else "make it readable by the daemon's user (its owner, mode 0600)")
        raise ConfigError(config_source, key, "a readable key file", f"{path}: {err.strerror}",
                          fix) from err
    try:
        st = os.fstat(fd)  # the file we opened, not whatever the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(config_source, key, "a regular file", path,
                              "point owners.key_file at the file holding the node's key as "
                              "64 hex digits, not a directory or special file")
        if st.st_mode & 0o077:
            raise ConfigError(
                config_source, key, "a key file readable by its owner only (mode 0600)",
                f"{path} with mode {stat.S_IMODE(st.st_mode):04o}", f"chmod 600 {path}",
            )
        raw = os.read(fd, _MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    # Error messages below describe the content's shape only, never the content.
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if text[:2] in ("0x", "0X"):
        text = text[2:]
    if len(raw) > _MAX_KEY_FILE_BYTES or not _HEX64.fullmatch(text):
        # The path goes in the fix, which is never cut short: a `found` value is (to 120
        # characters), and a long path lost its middle there.
        raise ConfigError(config_source, key, "64 hex digits (optionally 0x-prefixed)",
                          "content of another shape (not shown)",
                          f"write the node's 32-byte private key as hex into {path}")
    try:
        return Signer(bytes.fromhex(text))
    except ValueError as err:
        raise ConfigError(config_source, key, "a valid secp256k1 private key",
                          "an out-of-range key (not shown)",
                          f"write the node's own private key into {path}: 64 hex digits above "
                          "zero and below the secp256k1 group order") from err
