"""Coordinator receipts: canonical bytes, Ed25519 verification, the journal's columns, the CLI.

Receipts here are signed by code written apart from the engine's (as the
deployed coordinator signs them: Ed25519 over canonical JSON without
``signature``, the signature as ``{"alg", "key_id", "sig"}`` in unpadded
URL-safe base64, ``zk_status``/``tee_status`` added after signing), so the
engine's canonical form is checked against an independent one.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from coordinators import aitbc_app
from coordinators.helpers import OPERATOR_KEY, make_coordinator
from coordinators.server import ServerThread
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.cli import main
from engine.coordinator import (
    Capabilities,
    Outbox,
    ReceiptCheck,
    ReceiptKeyError,
    ReceiptVerifier,
    canonical_receipt_bytes,
    load_public_key,
)
from engine.coordinator.receipts import DEFAULT_UNIT_PRICE, key_id, priced_terms

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v if x is not None]
    return v


def _sign(payload: dict[str, Any], seed: bytes = SEED) -> dict[str, Any]:
    """Sign as the deployed coordinator does; then add its post-signing fields."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    message = json.dumps(_drop_none(payload), sort_keys=True, separators=(",", ":"))
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return {**payload, "signature": {"alg": "Ed25519", "key_id": _b64(public),
                                     "sig": _b64(key.sign(message.encode("utf-8")))}}


def _public(seed: bytes = SEED) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _receipt(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": "1.0", "receipt_id": "r" * 32, "job_id": "job_1", "provider": "miner-a",
        "client": None, "status": "COMPLETED", "units": 2.5, "unit_type": "gpu_seconds",
        "unit_price": 0.02, "price": 0.05, "completed_at": 1_700_000_000,
        "started_at": 1_699_999_997,
        "metadata": {"job_payload": {"model": "gpt2", "prompt": "Grüße, 世界", "stop": None},
                     "job_constraints": {}, "result": {"output": {"text": "é"},
                                                       "ids": [1, None, 2]},
                     "metrics": {"units": 2.5, "duration_ms": 2500}},
    }
    base.update(over)
    return base


HEX_KEY = _public().hex()


# ------------------------------------------------------------------ canonical bytes

def test_canonical_bytes_drop_none_everywhere_sort_keys_and_escape_non_ascii() -> None:
    receipt = {"b": 1, "a": {"z": None, "y": [3, None, {"k": None, "j": 1.5}]}, "c": None,
               "t": "é", "signature": {"sig": "x"}, "zk_status": "verified",
               "tee_status": "not_required", "attestations": [{"sig": "y"}]}
    assert canonical_receipt_bytes(receipt) == b'{"a":{"y":[3,{"j":1.5}]},"b":1,"t":"\\u00e9"}'


def test_canonical_bytes_equal_what_the_coordinator_signed() -> None:
    signed = _sign(_receipt())
    expected = json.dumps(_drop_none(_receipt()), sort_keys=True, separators=(",", ":"))
    assert canonical_receipt_bytes(signed) == expected.encode()
    # and survive a trip through JSON (as the receipt arrives over HTTP and sits in the journal)
    assert canonical_receipt_bytes(json.loads(json.dumps(signed, ensure_ascii=False))) \
        == expected.encode()


# ------------------------------------------------------------------ verification

def test_a_valid_receipt_verifies() -> None:
    check = ReceiptVerifier(HEX_KEY).check(_sign(_receipt()))
    assert check == ReceiptCheck("verified") and check.verified
    assert check.to_dict() == {"status": "verified", "reason": None}


@pytest.mark.parametrize(("field", "value"), [("price", 0.06), ("units", 3.0),
                                               ("provider", "miner-b"), ("client", "c1")])
def test_a_tampered_receipt_is_invalid(field: str, value: Any) -> None:
    receipt = _sign(_receipt())
    receipt[field] = value
    check = ReceiptVerifier(HEX_KEY).check(receipt)
    assert check.status == "invalid" and not check.verified
    assert "does not match" in (check.reason or "")


def test_a_nested_change_is_invalid() -> None:
    receipt = _sign(_receipt())
    receipt["metadata"]["result"]["output"]["text"] = "e"
    assert ReceiptVerifier(HEX_KEY).check(receipt).status == "invalid"


def test_post_signing_fields_leave_it_verified() -> None:
    receipt = _sign(_receipt())
    receipt.update(zk_status="not_required", tee_status="verified", zk_proof={"p": 1},
                   tee_attestation_id="att-1", tee_quote="q", reinvest_status="staked",
                   attestations=[{"alg": "Ed25519", "key_id": "x", "sig": "y"}])
    assert ReceiptVerifier(HEX_KEY).check(receipt).status == "verified"


def test_a_receipt_verified_by_an_attestation_with_the_configured_key() -> None:
    payload = _receipt()
    receipt = _sign(payload, OTHER_SEED)  # "signature" by a key we were not given
    receipt["attestations"] = [_sign(payload, SEED)["signature"]]
    check = ReceiptVerifier(HEX_KEY).check(receipt)
    assert check.status == "verified" and "attestation" in (check.reason or "")


@pytest.mark.parametrize("receipt", [None, _receipt(signature=None), _receipt(), _receipt(
    signature={})])
def test_unsigned_receipts(receipt: dict[str, Any] | None) -> None:
    check = ReceiptVerifier(HEX_KEY).check(receipt)
    assert check.status == "unsigned" and check.reason


def test_a_receipt_signed_by_another_key_is_invalid_and_says_which() -> None:
    check = ReceiptVerifier(HEX_KEY).check(_sign(_receipt(), OTHER_SEED))
    assert check.status == "invalid"
    assert _b64(_public(OTHER_SEED)) in (check.reason or "")
    assert _b64(_public()) in (check.reason or "")


def test_without_a_key_a_signed_receipt_is_no_key() -> None:
    for verifier in (ReceiptVerifier(), ReceiptVerifier(None), ReceiptVerifier("  ")):
        check = verifier.check(_sign(_receipt()))
        assert check.status == "no_key" and "AITBC_COORDINATOR_KEY" in (check.reason or "")
        assert verifier.check(_receipt()).status == "unsigned"


@pytest.mark.parametrize("signature", [{"alg": "RSA", "sig": "abc"}, {"alg": "Ed25519"},
                                       {"alg": "Ed25519", "sig": "not*base64"},
                                       {"alg": "Ed25519", "sig": _b64(b"short")}])
def test_malformed_signatures_are_invalid(signature: dict[str, Any]) -> None:
    check = ReceiptVerifier(HEX_KEY).check(_receipt(signature=signature))
    assert check.status == "invalid" and check.reason


def test_a_receipt_that_is_not_an_object_is_invalid() -> None:
    assert ReceiptVerifier(HEX_KEY).check(["x"]).status == "invalid"  # type: ignore[arg-type]


# ------------------------------------------------------------------ key input

def _pem(seed: bytes = SEED) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("form", ["hex", "HEX", "0xhex", "b64", "b64url", "raw", "pem_text"])
def test_key_forms(form: str) -> None:
    raw = _public()
    value: Any = {"hex": raw.hex(), "HEX": raw.hex().upper(), "0xhex": "0x" + raw.hex(),
                  "b64": base64.b64encode(raw).decode(), "b64url": _b64(raw), "raw": raw,
                  "pem_text": _pem().decode()}[form]
    assert key_id(load_public_key(value)) == _b64(raw)


def test_key_from_files(tmp_path: Path) -> None:
    pem = tmp_path / "coordinator.pem"
    pem.write_bytes(_pem())
    text = tmp_path / "coordinator.key"
    text.write_text(HEX_KEY + "\n")
    der = tmp_path / "coordinator.der"
    der.write_bytes(Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    for path in (pem, str(pem), text, der):
        verifier = ReceiptVerifier(path)
        assert verifier.key_id == _b64(_public())
        assert verifier.check(_sign(_receipt())).verified


@pytest.mark.parametrize(("value", "words"), [
    ("abcd", "no file exists"), ("ab" * 31, "62 hex digits, not 64"),
    ("/nonexistent/coordinator.pem", "no file exists at /nonexistent/coordinator.pem"),
    (base64.b64encode(b"x" * 16).decode(), "expected a 32-byte Ed25519 public key"),
    ("", "empty"),
])
def test_bad_key_strings_say_what_is_expected(value: str, words: str) -> None:
    with pytest.raises(ReceiptKeyError) as info:
        load_public_key(value)
    assert words in info.value.message
    assert info.value.code == "invalid_coordinator_key" and info.value.field == "coordinator_key"


def test_bad_key_files(tmp_path: Path) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(Ed25519PrivateKey.from_private_bytes(SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(ReceiptKeyError, match="private key"):
        ReceiptVerifier(private)
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ReceiptKeyError, match="not an Ed25519 public key"):
        ReceiptVerifier(p256)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ReceiptKeyError, match="not a readable PEM public key"):
        ReceiptVerifier(junk)
    empty = tmp_path / "empty.key"
    empty.write_text("hello")
    with pytest.raises(ReceiptKeyError, match="holds no key in a known form"):
        ReceiptVerifier(empty)
    with pytest.raises(ReceiptKeyError, match="cannot read the coordinator key file"):
        ReceiptVerifier(tmp_path / "missing.pem")
    with pytest.raises(ReceiptKeyError, match="decodes to 16 bytes"):
        ReceiptVerifier(b"x" * 16)


# ------------------------------------------------------------------ pricing

def test_priced_terms() -> None:
    assert priced_terms(_receipt(price=0.07), {"units": 9}) == {
        "units": 2.5, "unit_type": "gpu_seconds", "unit_price": 0.02, "price": 0.07}
    assert priced_terms(None, {"units": 10, "unit_type": "cpu_seconds"}) == {
        "units": 10.0, "unit_type": "cpu_seconds", "unit_price": DEFAULT_UNIT_PRICE,
        "price": 0.2}
    assert priced_terms(None, {"units": 10, "unit_price": 0.5})["price"] == 5.0
    assert priced_terms(None, {"units": 10, "price": 1.25})["price"] == 1.25
    # the test coordinator's unsigned receipt: units and price, no unit price
    assert priced_terms({"units": 4.0, "price": 0.004}, None)["unit_price"] == 0.001
    assert priced_terms(None, {"units": 3}, priced=False) == {
        "units": 3.0, "unit_type": "gpu_seconds", "unit_price": None, "price": None}
    assert priced_terms(None, {"execution_time_seconds": 3}) == {
        "units": None, "unit_type": None, "unit_price": None, "price": None}


# ------------------------------------------------------------------ the journal

SCOPE = "aitbc|http://coordinator|miner-a"


def _journal_job(box: Outbox, job_id: str, *, model: str = "gpt2", units: float = 2.5,
                 kind: str = "result") -> None:
    box.accepted(SCOPE, job_id, {"type": "inference", "model": model, "prompt": "hi"})
    metrics = {"units": units, "unit_type": "cpu_seconds", "duration_ms": int(units * 1000)}
    body = ({"result": {"output": "x"}, "metrics": metrics} if kind == "result"
            else {"error_code": "boom", "error_message": "boom", "metrics": metrics})
    box.finished(SCOPE, job_id, kind, body, {"job_id": job_id, "model": model})  # type: ignore[arg-type]


def test_acknowledge_keeps_model_terms_day_and_verification(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3")
    verifier = ReceiptVerifier(HEX_KEY)
    good = _sign(_receipt(job_id="j1"))
    bad = {**_sign(_receipt(job_id="j2")), "price": 9.0}
    _journal_job(box, "j1")
    box.acknowledge(SCOPE, "j1", receipt=good, receipt_check=verifier.check(good))
    _journal_job(box, "j2")
    box.acknowledge(SCOPE, "j2", receipt=bad, receipt_check=verifier.check(bad))
    _journal_job(box, "j3", model="smollm2-135m", units=10)
    box.acknowledge(SCOPE, "j3", duplicate=True)  # the agent's call for a 409: no receipt
    _journal_job(box, "j4", kind="failure")
    box.acknowledge(SCOPE, "j4")
    rows = {r["job_id"]: r for r in box.acked(SCOPE)}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert rows["j1"]["verification"] == "verified" and rows["j1"]["verification_reason"] is None
    assert rows["j1"]["model"] == "gpt2" and rows["j1"]["day"] == today
    assert (rows["j1"]["units"], rows["j1"]["unit_type"], rows["j1"]["unit_price"],
            rows["j1"]["price"]) == (2.5, "gpu_seconds", 0.02, 0.05)  # the receipt's terms
    assert rows["j1"]["receipt"] == good and rows["j1"]["kind"] == "result"
    assert rows["j2"]["verification"] == "invalid" and rows["j2"]["price"] == 9.0
    assert rows["j3"]["verification"] is None and rows["j3"]["duplicate"] is True
    assert (rows["j3"]["model"], rows["j3"]["units"], rows["j3"]["unit_type"],
            rows["j3"]["price"]) == ("smollm2-135m", 10.0, "cpu_seconds", 0.2)
    assert rows["j4"]["kind"] == "failure" and rows["j4"]["price"] is None
    assert box.entries() == []
    box.close()


def test_model_from_a_service_request_payload_without_a_result(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3")
    box.accepted(SCOPE, "j1", {"service_type": "llm_inference",
                               "service_request": {"model": "smollm2-135m", "prompt": "x"}})
    box.acknowledge(SCOPE, "j1", receipt=None)
    assert box.acked()[0]["model"] == "smollm2-135m"
    box.close()


OLD_SCHEMA = """
CREATE TABLE entries (scope TEXT NOT NULL, job_id TEXT NOT NULL, state TEXT NOT NULL,
    payload TEXT, body TEXT, result TEXT, note TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL, finished_at REAL, updated_at REAL NOT NULL, PRIMARY KEY (scope, job_id));
CREATE TABLE acked (scope TEXT NOT NULL, job_id TEXT NOT NULL, kind TEXT NOT NULL,
    acked_at REAL NOT NULL, receipt TEXT, duplicate INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, job_id));
CREATE TABLE identity (key TEXT PRIMARY KEY, data TEXT NOT NULL);
"""


def test_an_old_journal_gains_the_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    old_receipt = {"job_id": "old1", "miner_id": "m", "units": 4.0, "unit_type": "cpu_seconds",
                   "price": 0.004, "duration_ms": 4000, "signature": None}
    at = 1_700_000_000.0  # 2023-11-14 UTC
    db.execute("INSERT INTO acked VALUES (?, ?, 'result', ?, ?, 0)",
               (SCOPE, "old1", at, json.dumps(old_receipt)))
    db.execute("INSERT INTO acked VALUES (?, ?, 'result', ?, NULL, 1)", (SCOPE, "old2", at))
    db.execute("INSERT INTO entries (scope, job_id, state, updated_at) VALUES (?, 'p1', "
               "'result', ?)", (SCOPE, at))
    db.execute("INSERT INTO identity VALUES ('doc|x', '{\"miner_id\": \"m\"}')")
    db.commit()
    db.close()
    os.chmod(path, 0o644)

    box = Outbox(path)
    columns = {r[1] for r in box._db.execute("PRAGMA table_info(acked)")}
    assert {"verification", "verification_reason", "model", "units", "unit_type",
            "unit_price", "price", "day"} <= columns
    rows = {r["job_id"]: r for r in box.acked()}
    assert rows["old1"]["receipt"] == old_receipt and rows["old1"]["day"] == "2023-11-14"
    assert (rows["old1"]["units"], rows["old1"]["unit_type"], rows["old1"]["unit_price"],
            rows["old1"]["price"]) == (4.0, "cpu_seconds", 0.001, 0.004)
    assert rows["old1"]["verification"] is None
    assert rows["old2"]["duplicate"] is True and rows["old2"]["price"] is None
    assert [e.job_id for e in box.pending(SCOPE)] == ["p1"]
    assert box.load_identity("doc|x") == {"miner_id": "m"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    _journal_job(box, "new1")
    box.acknowledge(SCOPE, "new1", receipt=_sign(_receipt()),
                    receipt_check=ReceiptCheck("verified"))
    box.close()
    again = Outbox(path)  # a second open finds nothing to migrate
    assert [r["job_id"] for r in again.acked()] == ["old1", "old2", "new1"]
    again.close()


# ------------------------------------------------------------------ the CLI

@pytest.fixture
def journal(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "outbox.sqlite3"
    box = Outbox(path)
    verifier = ReceiptVerifier(HEX_KEY)
    for job_id, model, receipt in (
            ("job-good", "gpt2", _sign(_receipt(job_id="job-good"))),
            ("job-bad", "gpt2", {**_sign(_receipt(job_id="job-bad")), "price": 1.0}),
            ("job-smol", "smollm2-135m", _receipt(job_id="job-smol", price=0.03)),
            ("job-nokey", "smollm2-135m", _sign(_receipt(job_id="job-nokey")))):
        _journal_job(box, job_id, model=model)
        check = ReceiptVerifier().check(receipt) if job_id == "job-nokey" \
            else verifier.check(receipt)
        box.acknowledge(SCOPE, job_id, receipt=receipt, receipt_check=check)
    box.close()
    return path


def test_receipts_json(journal: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITBC_COORDINATOR_KEY", raising=False)
    assert main(["receipts", "--outbox", str(journal), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    jobs = {j["job_id"]: j for j in report["jobs"]}
    assert report["journal"] == str(journal) and report["rechecked_with_key"] is None
    assert {k: v["verification"] for k, v in jobs.items()} == {
        "job-good": "verified", "job-bad": "invalid", "job-smol": "unsigned",
        "job-nokey": "no_key"}
    assert jobs["job-good"]["model"] == "gpt2" and jobs["job-good"]["price"] == 0.05
    assert jobs["job-good"]["units"] == 2.5 and jobs["job-good"]["unit_type"] == "gpu_seconds"
    assert jobs["job-good"]["unit_price"] == 0.02
    by_model = {g["model"]: g for g in report["totals"]["by_model"]}
    assert by_model["gpt2"]["jobs"] == 2 and by_model["gpt2"]["price"] == 1.05
    assert by_model["gpt2"]["verified_jobs"] == 1 and by_model["gpt2"]["verified_price"] == 0.05
    assert by_model["smollm2-135m"]["price"] == 0.08
    assert by_model["smollm2-135m"]["units"] == {"gpu_seconds": 5.0}
    (day,) = report["totals"]["by_day"]
    assert day["day"] == time.strftime("%Y-%m-%d", time.gmtime()) and day["jobs"] == 4
    assert report["totals"]["all"]["price"] == 1.13
    assert report["totals"]["all"]["verified_price"] == 0.05


def test_receipts_recheck_with_a_key(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receipts", "--state-dir", str(journal.parent), "--json",
                 "--coordinator-key", _b64(_public())]) == 0
    report = json.loads(capsys.readouterr().out)
    states = {j["job_id"]: j["verification"] for j in report["jobs"]}
    assert states["job-nokey"] == "verified" and states["job-bad"] == "invalid"
    assert report["rechecked_with_key"] == _b64(_public())
    assert main(["receipts", "--outbox", str(journal), "--json",
                 "--coordinator-key", _public(OTHER_SEED).hex()]) == 0
    states = {j["job_id"]: j["verification"] for j in json.loads(capsys.readouterr().out)["jobs"]}
    assert states["job-good"] == "invalid" and states["job-smol"] == "unsigned"
    # the journal itself is unchanged
    box = Outbox(journal)
    assert {r["job_id"]: r["verification"] for r in box.acked()}["job-nokey"] == "no_key"
    box.close()


def test_receipts_text(journal: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("AITBC_COORDINATOR_KEY", raising=False)
    assert main(["receipts", "--outbox", str(journal)]) == 0
    out = capsys.readouterr().out
    for text in ("job-good", "job-bad", "job-smol", "job-nokey", "verified", "INVALID",
                 "unsigned", "signed, no key", "totals per day (UTC)", "totals per model",
                 "smollm2-135m", "0.05", "gpu_seconds"):
        assert text in out, text
    assert "all: 4 job(s), price 1.13, of which verified: 1 job(s), price 0.05" in out
    assert "INVALID receipt for job-bad" in out


def test_receipts_without_a_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receipts", "--state-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no miner journal at" in err and "--state-dir" in err
    assert not (tmp_path / "none").exists()


def test_receipts_with_a_bad_key(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receipts", "--outbox", str(journal), "--coordinator-key", "nope"]) == 2
    assert "invalid_coordinator_key" in capsys.readouterr().err


def test_receipts_key_from_the_environment(journal: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITBC_COORDINATOR_KEY", HEX_KEY)
    assert main(["receipts", "--outbox", str(journal), "--json"]) == 0
    states = {j["job_id"]: j["verification"] for j in json.loads(capsys.readouterr().out)["jobs"]}
    assert states["job-nokey"] == "verified"


def test_an_empty_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Outbox(tmp_path / "outbox.sqlite3").close()
    assert main(["receipts", "--state-dir", str(tmp_path)]) == 0
    assert "no acknowledged jobs" in capsys.readouterr().out


# ------------------------------------------------------------------ end to end over HTTP

def test_signed_receipts_from_the_test_coordinator_verify(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db", signing_key=SEED.hex())
    st = app.state.coord
    box = Outbox(tmp_path / "state" / "outbox.sqlite3")
    verifier = ReceiptVerifier(HEX_KEY)
    caps = Capabilities(gpu_type="cpu", gpu_count=0, gpus=(), cuda_version=None,
                        models=("gpt2",), max_concurrent=1, price_per_hour=0.0)
    with ServerThread(app) as url:
        coordinator = make_coordinator("aitbc", url, box, api_key=OPERATOR_KEY,
                                       miner_id="miner-e2e")
        try:
            coordinator.register(caps)
            coordinator.heartbeat(0)
            job_id = st.add_job({"type": "inference", "model": "gpt2", "prompt": "Grüße",
                                 "stop": None}, constraints={"models": ["gpt2"]})
            assigned = coordinator.next_job()
            assert assigned is not None and assigned.job_id == job_id
            box.accepted(coordinator.scope(), job_id, assigned.payload)
            body = {"result": {"output": {"text": "日本 é"}, "ids": [1, None, 2],
                               "result_hash": "sha256:" + "0" * 64, "execution_time": 1.5},
                    "metrics": {"units": 1.5, "unit_type": "cpu_seconds", "duration_ms": 1500,
                                "execution_time_seconds": 1.5, "gpu_time_seconds": 0.0}}
            box.finished(coordinator.scope(), job_id, "result", body,
                         {"job_id": job_id, "model": "gpt2"})
            ack = coordinator.submit_result(job_id, body)
        finally:
            coordinator.close()
    receipt = ack.receipt
    assert receipt is not None and receipt["signature"]["alg"] == "Ed25519"
    assert receipt["zk_status"] == "not_required" and receipt["client"] is None
    check = verifier.check(receipt)
    assert check.status == "verified", check.reason
    assert ReceiptVerifier(_public(OTHER_SEED)).check(receipt).status == "invalid"
    assert verifier.check({**receipt, "units": 100.0}).status == "invalid"
    box.acknowledge(coordinator.scope(), job_id, receipt=receipt, receipt_check=check)
    (row,) = box.acked()
    assert row["verification"] == "verified" and row["model"] == "gpt2"
    assert (row["units"], row["unit_type"], row["unit_price"]) == (1.5, "cpu_seconds",
                                                                   aitbc_app.UNIT_PRICE)
    assert row["price"] == pytest.approx(1.5 * aitbc_app.UNIT_PRICE)
    assert verifier.check(row["receipt"]).verified  # the journal keeps the exact receipt
    box.close()
    assert main(["receipts", "--state-dir", str(tmp_path / "state"), "--json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)["jobs"]
    assert job["job_id"] == job_id and job["verification"] == "verified"


def test_the_test_coordinator_without_a_key_sends_no_signature(tmp_path: Path) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db")
    st = app.state.coord
    box = Outbox(tmp_path / "outbox.sqlite3")
    caps = Capabilities(gpu_type="cpu", gpu_count=0, gpus=(), cuda_version=None,
                        models=("gpt2",), max_concurrent=1, price_per_hour=0.0)
    with ServerThread(app) as url:
        coordinator = make_coordinator("aitbc", url, box)
        try:
            coordinator.register(caps)
            coordinator.heartbeat(0)
            job_id = st.add_job({"type": "inference", "model": "gpt2", "prompt": "x"})
            assert coordinator.next_job() is not None
            ack = coordinator.submit_result(job_id, {"result": {"output": "x"},
                                                     "metrics": {"units": 1.0}})
        finally:
            coordinator.close()
    box.close()
    assert ReceiptVerifier(HEX_KEY).check(ack.receipt).status == "unsigned"
