"""Coordinator receipts: the bytes the coordinator signs, and checking its Ed25519 signature.

The deployed ``aitbc`` coordinator answers an accepted result with a receipt
(``{"status": "ok", "receipt": {...}}``). When its operator configures a
signing key, the receipt carries ``signature``: an object
``{"alg": "Ed25519", "key_id": ..., "sig": ...}`` where ``sig`` is the 64-byte
Ed25519 signature and ``key_id`` the 32-byte public key, both URL-safe base64
without padding. The signed bytes are the receipt without ``signature`` and
without the fields the coordinator adds after signing (:data:`UNSIGNED_FIELDS`:
``attestations``, ``zk_status``, ``zk_proof``, ``tee_*``, ``reinvest_*``), as
canonical JSON: ``None`` removed at every depth (from objects and from lists),
keys sorted at every depth, separators ``,`` and ``:``, non-ASCII characters
escaped as ``\\uXXXX``, UTF-8.

A receipt is priced by the coordinator as ``units`` × ``unit_price`` (0.02
unless the result's metrics carry ``unit_price`` or ``price``);
:func:`priced_terms` reads those terms from a receipt and the metrics sent.

    verifier = ReceiptVerifier(settings().coordinator_key)   # hex, base64 or a PEM file
    check = verifier.check(ack.receipt)                      # ReceiptCheck(status, reason)
    outbox.acknowledge(scope, job_id, receipt=ack.receipt, receipt_check=check)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.errors import EngineError

__all__ = [
    "DEFAULT_UNIT_PRICE", "UNSIGNED_FIELDS", "ReceiptCheck", "ReceiptKeyError", "ReceiptStatus",
    "ReceiptVerifier", "canonical_receipt_bytes", "key_id", "load_public_key", "priced_terms",
    "signed_payload", "strip_none",
]

#: The field that holds the coordinator's signature.
SIGNATURE_FIELD = "signature"

#: Fields that are not in the signed bytes: the signature itself, and what the deployed
#: coordinator adds to a receipt after signing it (attestations by a second key, the ZK
#: proof and its status, the TEE attestation and its status, reinvestment details).
UNSIGNED_FIELDS: frozenset[str] = frozenset({
    SIGNATURE_FIELD, "attestations", "zk_status", "zk_proof", "tee_status",
    "tee_attestation_id", "tee_quote", "reinvest_status", "reinvest_stake_id",
    "reinvest_amount",
})

#: What the deployed coordinator charges per unit when the metrics name no price.
DEFAULT_UNIT_PRICE = 0.02

ReceiptStatus = Literal["verified", "invalid", "unsigned", "no_key"]

_HEX_KEY = re.compile(r"^(?:0x)?[0-9a-fA-F]{64}$")
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")


class ReceiptKeyError(EngineError):
    """The coordinator's public key given to check receipts cannot be read or is not Ed25519."""

    code = "invalid_coordinator_key"


@dataclass(frozen=True)
class ReceiptCheck:
    """The outcome of checking one receipt's signature.

    ``verified``: signed by the configured coordinator key over exactly these
    fields. ``invalid``: signed, but not by that key or not over these fields (or
    the signature is malformed). ``unsigned``: no receipt, or no signature in it.
    ``no_key``: signed, but no coordinator key is configured to check it with.
    ``reason`` says why, in words (None when verified by the receipt's signature).
    """

    status: ReceiptStatus
    reason: str | None = None

    @property
    def verified(self) -> bool:
        """True when the signature checked out against the configured key."""
        return self.status == "verified"

    def to_dict(self) -> dict[str, Any]:
        """``{"status", "reason"}``."""
        return {"status": self.status, "reason": self.reason}


# ------------------------------------------------------------------ canonical bytes

def strip_none(value: Any) -> Any:
    """``value`` with every ``None`` removed, at every depth: from objects and from lists."""
    if isinstance(value, Mapping):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [strip_none(v) for v in value if v is not None]
    return value


def signed_payload(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The receipt's fields that the coordinator signed (all but :data:`UNSIGNED_FIELDS`)."""
    return {k: v for k, v in receipt.items() if k not in UNSIGNED_FIELDS}


def canonical_receipt_bytes(receipt: Mapping[str, Any]) -> bytes:
    """The exact bytes the coordinator signs for ``receipt`` (a received or unsigned one)."""
    text = json.dumps(strip_none(signed_payload(receipt)), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return text.encode("utf-8")


# ------------------------------------------------------------------ keys

def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional (as the coordinator writes it, unpadded)."""
    text = text.strip()
    if not _B64_CHARS.match(text):
        raise ValueError("not base64")
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def key_id(key: Ed25519PublicKey) -> str:
    """The key's id as the coordinator writes it in ``signature.key_id`` (URL-safe base64)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


_KEY_FORMS = ("a 32-byte Ed25519 public key as 64 hex digits or as base64 (43 or 44 "
              "characters, the form of a receipt's signature.key_id), or the path of a PEM "
              "public key file ('-----BEGIN PUBLIC KEY-----')")


def _from_pem(data: bytes, where: str) -> Ed25519PublicKey:
    if b"PRIVATE KEY" in data:
        raise ReceiptKeyError(
            f"{where} holds a private key; give the coordinator's public key instead "
            "(e.g. `openssl pkey -in KEY.pem -pubout`). A miner never needs the "
            "coordinator's private key.", field="coordinator_key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ReceiptKeyError(f"{where} is not a readable PEM public key ({exc}); expected "
                              f"{_KEY_FORMS}", field="coordinator_key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptKeyError(f"{where} is a {type(key).__name__.lstrip('_')}, not an Ed25519 "
                              "public key; the coordinator signs receipts with Ed25519",
                              field="coordinator_key")
    return key


def _from_raw(raw: bytes, what: str) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise ReceiptKeyError(f"{what} decodes to {len(raw)} bytes; an Ed25519 public key is "
                              f"32 bytes. Expected {_KEY_FORMS}", field="coordinator_key")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(value: str | bytes | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """The coordinator's Ed25519 public key from what a person configured.

    Accepted: an :class:`Ed25519PublicKey`; 32 raw bytes; 64 hex digits; base64
    (standard or URL-safe, padding optional) of 32 bytes; PEM text; the path of a
    PEM file (or of a file holding the hex or base64 form). Raises
    :class:`ReceiptKeyError` with what was wrong and what is expected.
    """
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, bytes):
        if value.lstrip().startswith(b"-----BEGIN"):
            return _from_pem(value, "the key given")
        return _from_raw(value, "the key given")
    if isinstance(value, Path):
        return _from_file(value)
    text = value.strip()
    if not text:
        raise ReceiptKeyError(f"the coordinator key is empty; expected {_KEY_FORMS}",
                              field="coordinator_key")
    if text.startswith("-----BEGIN"):
        return _from_pem(text.encode("utf-8"), "the key given")
    parsed = _from_text(text)
    if parsed is not None:
        return parsed
    path = Path(text).expanduser()
    if path.exists():
        return _from_file(path)
    shown = text if len(text) <= 80 else text[:77] + "..."
    hint = ""
    if _HEX_KEY.match(text) is None and re.fullmatch(r"(?:0x)?[0-9a-fA-F]+", text):
        hint = f" ({len(text.removeprefix('0x'))} hex digits, not 64)"
    raise ReceiptKeyError(f"cannot read the coordinator key {shown!r}{hint}: expected "
                          f"{_KEY_FORMS}, and no file exists at {path}",
                          field="coordinator_key")


def _from_text(text: str) -> Ed25519PublicKey | None:
    """A key written as hex or base64 (raw 32 bytes, or DER), or None when ``text`` is neither."""
    if _HEX_KEY.match(text):
        return _from_raw(bytes.fromhex(text[2:] if text[:2].lower() == "0x" else text),
                         "the hex key")
    try:
        raw = _b64decode(text)
    except (ValueError, binascii.Error):
        return None
    if len(raw) == 32:
        return Ed25519PublicKey.from_public_bytes(raw)
    if raw[:1] == b"\x30":  # DER SubjectPublicKeyInfo, as `openssl pkey -pubout -outform DER`
        try:
            key = serialization.load_der_public_key(raw)
        except (ValueError, UnsupportedAlgorithm):
            return None
        if isinstance(key, Ed25519PublicKey):
            return key
    return None


def _from_file(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReceiptKeyError(f"cannot read the coordinator key file {path}: "
                              f"{exc.strerror or exc}", field="coordinator_key") from exc
    if b"-----BEGIN" in data:
        return _from_pem(data, f"the file {path}")
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    parsed = _from_text(text) if text else None
    if parsed is None and data[:1] == b"\x30":  # a DER public key file
        try:
            der = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            der = None
        parsed = der if isinstance(der, Ed25519PublicKey) else None
    if parsed is None:
        raise ReceiptKeyError(f"the file {path} holds no key in a known form; expected "
                              f"{_KEY_FORMS}", field="coordinator_key")
    return parsed


# ------------------------------------------------------------------ verification

def _signature_bytes(sig: Any) -> bytes | None:
    """The 64 signature bytes of a ``sig`` value (URL-safe base64, or hex), or None."""
    if not isinstance(sig, str):
        return None
    text = sig.strip()
    try:
        raw = bytes.fromhex(text) if len(text) == 128 and all(
            c in "0123456789abcdefABCDEF" for c in text) else _b64decode(text)
    except (ValueError, binascii.Error):
        return None
    return raw if len(raw) == 64 else None


class ReceiptVerifier:
    """Checks receipts against the coordinator's public key (or reports ``no_key`` without one).

    ``key``: anything :func:`load_public_key` reads; None or ``""`` means no key
    is configured (signed receipts are then ``no_key``, never ``verified``).
    Raises :class:`ReceiptKeyError` for a key it cannot read.
    """

    def __init__(self, key: str | bytes | Path | Ed25519PublicKey | None = None) -> None:
        if isinstance(key, str) and not key.strip():
            key = None
        self.key: Ed25519PublicKey | None = None if key is None else load_public_key(key)
        self.key_id: str | None = None if self.key is None else key_id(self.key)

    def _verifies(self, signature: bytes, message: bytes) -> bool:
        assert self.key is not None
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def check(self, receipt: Mapping[str, Any] | None) -> ReceiptCheck:
        """Whether ``receipt`` carries a valid signature by the configured key."""
        if receipt is None:
            return ReceiptCheck("unsigned", "the coordinator sent no receipt")
        if not isinstance(receipt, Mapping):
            return ReceiptCheck("invalid", f"the receipt is a {type(receipt).__name__}, "
                                           "not a JSON object")
        signature = receipt.get(SIGNATURE_FIELD)
        if signature is None or signature == {} or signature == "":
            return ReceiptCheck("unsigned", "the receipt carries no signature (the "
                                            "coordinator signs only when its operator "
                                            "configures a signing key)")
        claimed = signature.get("key_id") if isinstance(signature, Mapping) else None
        if self.key is None:
            return ReceiptCheck("no_key", "signed" + (f" by key {claimed}" if claimed else "")
                                + ", but no coordinator key is configured to check it "
                                  "(set AITBC_COORDINATOR_KEY or --coordinator-key)")
        if isinstance(signature, Mapping):
            alg = signature.get("alg", signature.get("algorithm"))
            if alg is not None and str(alg).lower() != "ed25519":
                return ReceiptCheck("invalid", f"signature algorithm {alg!r} is not Ed25519")
            raw = _signature_bytes(signature.get("sig"))
        else:
            raw = _signature_bytes(signature)
        if raw is None:
            return ReceiptCheck("invalid", "the signature is malformed (expected 64 bytes of "
                                           "URL-safe base64 in signature.sig)")
        message = canonical_receipt_bytes(receipt)
        if self._verifies(raw, message):
            return ReceiptCheck("verified")
        for att in receipt.get("attestations") or []:
            if isinstance(att, Mapping) and str(att.get("alg", "Ed25519")).lower() == "ed25519":
                att_raw = _signature_bytes(att.get("sig"))
                if att_raw is not None and self._verifies(att_raw, message):
                    return ReceiptCheck("verified", "verified by a coordinator attestation")
        if claimed and claimed != self.key_id:
            return ReceiptCheck("invalid", f"signed by key {claimed}, not by the configured "
                                           f"coordinator key {self.key_id}")
        return ReceiptCheck("invalid", "the signature does not match the receipt's contents "
                                       "(altered after signing, or not signed by the "
                                       "configured coordinator key)")


# ------------------------------------------------------------------ pricing

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def priced_terms(receipt: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None, *,
                 priced: bool = True) -> dict[str, Any]:
    """``{"units", "unit_type", "unit_price", "price"}`` of a job, as the coordinator prices it.

    The receipt's own values win (they are what the coordinator charged); what it
    lacks comes from the metrics sent with the result, priced as the deployed
    coordinator does: ``unit_price`` from the metrics, else 0.02; ``price`` from the
    metrics, else ``round(units × unit_price, 6)``. Without ``units`` anywhere
    (the ``doc`` dialect prices by the hour), or with ``priced=False`` (a failure),
    the unit price and price stay None unless the receipt states them.
    """
    r: Mapping[str, Any] = receipt if isinstance(receipt, Mapping) else {}
    m: Mapping[str, Any] = metrics if isinstance(metrics, Mapping) else {}
    units = _number(r.get("units"))
    if units is None:
        units = _number(m.get("units"))
    unit_type = r.get("unit_type") or m.get("unit_type")
    if units is not None and not unit_type:
        unit_type = "gpu_seconds"
    unit_price = _number(r.get("unit_price"))
    price = _number(r.get("price"))
    if priced and units is not None:
        if unit_price is None:
            unit_price = _number(m.get("unit_price"))
        if unit_price is None and price is not None and units > 0:
            unit_price = round(price / units, 9)
        if unit_price is None:
            unit_price = DEFAULT_UNIT_PRICE
        if price is None:
            price = _number(m.get("price"))
        if price is None:
            price = round(max(0.0, units) * max(0.0, unit_price), 6)
    return {"units": units, "unit_type": str(unit_type) if unit_type else None,
            "unit_price": unit_price, "price": price}
