"""keygen, sign and verify: the happy path, every tamper case, key handling and the openssl recipe."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from audit import signing
from audit.cli import main
from tests.fixtures_metrics import write_fixture_project


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def keypair(tmp_path: Path, capsys) -> tuple[Path, Path]:
    rc, _, err = _run(capsys, "keygen", "--out", str(tmp_path / "release-keys"))
    assert rc == 0, err
    return tmp_path / "release-keys" / "signing.key", tmp_path / "release-keys" / "signing.pub"


@pytest.fixture()
def signed(tmp_path: Path, keypair, capsys, monkeypatch) -> Path:
    """A project rendered and signed with a release key from $METAREC_AUDIT_SIGNING_KEY_FILE."""
    root = write_fixture_project(tmp_path / "proj")
    monkeypatch.setenv(signing.KEY_ENV, str(keypair[0]))
    assert _run(capsys, "--root", str(root), "report")[0] == 0
    rc, _, err = _run(capsys, "--root", str(root), "sign")
    assert rc == 0, err
    return root


def _verify(capsys, root: Path, pub: Path) -> tuple[int, str, str]:
    return _run(capsys, "verify", str(root / "reports" / "audit.bundle.json"), "--key", str(pub))


def _envelope(root: Path) -> dict:
    return json.loads((root / "reports" / "audit.bundle.json").read_text())


def _write_envelope(root: Path, env: dict) -> None:
    (root / "reports" / "audit.bundle.json").write_text(json.dumps(env))


def test_keygen_modes_and_refuses_existing(tmp_path: Path, keypair, capsys) -> None:
    key, pub = keypair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = key.read_bytes()
    rc, _, err = _run(capsys, "keygen", "--out", str(key.parent))
    assert rc == 2 and "already exists" in err and key.read_bytes() == before
    pub_only = tmp_path / "pub-only"
    pub_only.mkdir()
    (pub_only / "signing.pub").write_text("x")
    assert _run(capsys, "keygen", "--out", str(pub_only))[0] == 2
    assert not (pub_only / "signing.key").exists()
    assert not [p for p in key.parent.iterdir() if p.name.endswith(".tmp")]


def test_keygen_key_is_never_world_readable_even_with_open_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        key, pub = signing.keygen(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644


def test_happy_path_verifies(signed: Path, keypair, capsys) -> None:
    rc, out, err = _verify(capsys, signed, keypair[1])
    assert rc == 0, err
    assert "OK" in out and "DEVELOPMENT" not in out
    statement = json.loads(base64.b64decode(_envelope(signed)["payload"]))
    names = [s["name"] for s in statement["subject"]]
    for required in signing.REQUIRED_SUBJECTS:
        assert required in names
    assert "models/melu/seed0/weights.safetensors" in names and "models/melu/seed0/config.json" in names
    assert "models/melu/seed0/history.json" not in names
    assert statement["_type"] == signing.STATEMENT_TYPE
    assert statement["predicateType"] == signing.PREDICATE_TYPE
    pred = statement["predicate"]
    assert pred["result"] == "PASSED" and len(pred["passedTests"]) == 4 and pred["failedTests"] == []
    assert pred["signer"]["development_key"] is False
    assert pred["environment"]["torch"] == "2.13.0+cpu"
    assert pred["configuration"][0]["name"] == "params.yaml"
    assert len(pred["configuration"][0]["annotations"]["gates"]) == 4
    # the published public key is the signer's, and the default root is the bundle's parent's parent
    assert (signed / "reports" / "signing.pub").read_bytes() == keypair[1].read_bytes()
    assert _run(capsys, "verify", str(signed / "reports" / "audit.bundle.json"),
                "--key", str(signed / "reports" / "signing.pub"))[0] == 0


def test_failed_gates_give_failed_result(tmp_path: Path, capsys) -> None:
    root = write_fixture_project(tmp_path, gates_pass=False)
    assert _run(capsys, "--root", str(root), "report")[0] == 0
    assert _run(capsys, "--root", str(root), "sign")[0] == 0
    pred = json.loads(base64.b64decode(_envelope(root)["payload"]))["predicate"]
    assert pred["result"] == "FAILED" and pred["failedTests"] == ["gender_mae_gap_upper"]


def test_flipped_byte_in_report(signed: Path, keypair, capsys) -> None:
    path = signed / "reports" / "audit.html"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1
    assert "subject reports/audit.html: sha256 mismatch (expected" in err and "found" in err


def test_changed_metric_file(signed: Path, keypair, capsys) -> None:
    path = signed / "metrics" / "fairness.json"
    path.write_text(path.read_text().replace('"gap"', '"gap" ', 1))
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1 and "subject metrics/fairness.json: sha256 mismatch" in err


def test_missing_subject(signed: Path, keypair, capsys) -> None:
    (signed / "dvc.lock").unlink()
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1 and "subject dvc.lock missing" in err


def test_wrong_key(signed: Path, tmp_path: Path, capsys) -> None:
    _, other_pub = signing.keygen(tmp_path / "other")
    rc, _, err = _verify(capsys, signed, other_pub)
    assert rc == 1 and "signature does not verify with key" in err


def test_wrong_key_even_if_keyid_is_forged(signed: Path, tmp_path: Path, capsys) -> None:
    _, other_pub = signing.keygen(tmp_path / "other")
    env = _envelope(signed)
    env["signatures"][0]["keyid"] = signing.key_id(signing.load_public_key(other_pub))
    _write_envelope(signed, env)
    rc, _, err = _verify(capsys, signed, other_pub)
    assert rc == 1 and "signature does not verify with key" in err


def test_changed_payload_type(signed: Path, keypair, capsys) -> None:
    env = _envelope(signed)
    env["payloadType"] = "application/json"
    _write_envelope(signed, env)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1 and "payloadType" in err


def test_signature_copied_from_another_envelope(signed: Path, keypair, tmp_path: Path, capsys,
                                                monkeypatch) -> None:
    other = write_fixture_project(tmp_path / "other", gates_pass=False)
    assert _run(capsys, "--root", str(other), "report")[0] == 0
    assert _run(capsys, "--root", str(other), "sign")[0] == 0
    env = _envelope(signed)
    env["signatures"] = _envelope(other)["signatures"]  # same key, different payload
    _write_envelope(signed, env)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1 and "signature does not verify" in err


def test_payload_edited_but_signature_kept(signed: Path, keypair, capsys) -> None:
    env = _envelope(signed)
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["result"] = "PASSED"
    statement["predicate"]["failedTests"] = []
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    _write_envelope(signed, env)
    assert _verify(capsys, signed, keypair[1])[0] == 1


def test_subject_outside_root_is_rejected(tmp_path: Path, keypair) -> None:
    key = signing.load_private_key(keypair[0])
    (tmp_path / "secret.txt").write_text("x")
    statement = {"_type": signing.STATEMENT_TYPE, "predicateType": signing.PREDICATE_TYPE, "predicate": {},
                 "subject": [{"name": "../secret.txt", "digest": {"sha256": "0" * 64}}]}
    payload = json.dumps(statement).encode()
    env = {"payload": base64.b64encode(payload).decode(), "payloadType": signing.PAYLOAD_TYPE,
           "signatures": [{"keyid": signing.key_id(key.public_key()),
                           "sig": base64.b64encode(key.sign(signing.pae(signing.PAYLOAD_TYPE, payload))).decode()}]}
    bundle = tmp_path / "proj" / "reports" / "audit.bundle.json"
    bundle.parent.mkdir(parents=True)
    bundle.write_text(json.dumps(env))
    with pytest.raises(signing.VerificationFailed, match="outside the project root"):
        signing.verify(bundle, keypair[1])


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"payload": "@@", "payloadType": "x", "signatures": []}'])
def test_unreadable_bundle_exit_2(tmp_path: Path, keypair, capsys, content: bytes) -> None:
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(content)
    rc, _, err = _run(capsys, "verify", str(bundle), "--key", str(keypair[1]))
    assert rc == 2 and "Traceback" not in err


def test_unreadable_key_and_missing_bundle_exit_2(signed: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.pub").write_text("nope")
    assert _verify(capsys, signed, tmp_path / "bad.pub")[0] == 2
    rc, _, err = _run(capsys, "verify", str(tmp_path / "missing.json"), "--key", str(tmp_path / "bad.pub"))
    assert rc == 2 and "cannot read bundle" in err


@pytest.mark.parametrize("missing", ["dvc.lock", "params.yaml", "results/metrics_long.parquet",
                                     "metrics/gate.json", "reports/audit.html"])
def test_sign_with_missing_input_exit_2(tmp_path: Path, keypair, capsys, monkeypatch, missing: str) -> None:
    root = write_fixture_project(tmp_path)
    monkeypatch.setenv(signing.KEY_ENV, str(keypair[0]))
    assert _run(capsys, "--root", str(root), "report")[0] == 0
    (root / missing).unlink()
    rc, _, err = _run(capsys, "--root", str(root), "sign")
    assert rc == 2 and missing in err and "Traceback" not in err
    assert not (root / "reports" / "audit.bundle.json").exists()


def test_env_key_that_does_not_exist_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    root = write_fixture_project(tmp_path)
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "nope.key"))
    rc, _, err = _run(capsys, "--root", str(root), "report")  # the report must name the key too
    assert rc == 2 and signing.KEY_ENV in err
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "audit.html").write_text("<!DOCTYPE html><title>x</title>")
    rc, _, err = _run(capsys, "--root", str(root), "sign")
    assert rc == 2 and signing.KEY_ENV in err and "does not exist" in err


def test_development_key_is_created_marked_and_private(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    root = write_fixture_project(tmp_path)
    assert _run(capsys, "--root", str(root), "report")[0] == 0
    rc, _, err = _run(capsys, "--root", str(root), "sign")
    assert rc == 0 and "DEVELOPMENT" in err
    dev = root / "keys" / signing.DEV_KEY_NAME
    assert stat.S_IMODE(dev.stat().st_mode) == 0o600
    env = _envelope(root)
    assert "DEVELOPMENT" in env["_comment"]
    assert json.loads(base64.b64decode(env["payload"]))["predicate"]["signer"]["development_key"] is True
    assert "development key" in (root / "reports" / "audit.html").read_text()
    rc, out, _ = _run(capsys, "verify", str(root / "reports" / "audit.bundle.json"),
                      "--key", str(root / "reports" / "signing.pub"))
    assert rc == 0 and "DEVELOPMENT" in out


def test_require_key_refuses_development_fallback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    root = write_fixture_project(tmp_path)
    params = (root / "params.yaml").read_text().replace("key_path: keys/signing.key",
                                                          "key_path: keys/signing.key\n  require_key: true")
    (root / "params.yaml").write_text(params)
    rc, _, err = _run(capsys, "--root", str(root), "report")
    assert rc == 2 and "no signing key" in err
    assert not (root / "keys").exists()


def test_report_stating_another_key_is_refused(tmp_path: Path, keypair, capsys, monkeypatch) -> None:
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    root = write_fixture_project(tmp_path)
    assert _run(capsys, "--root", str(root), "report")[0] == 0  # states the dev key
    monkeypatch.setenv(signing.KEY_ENV, str(keypair[0]))
    rc, _, err = _run(capsys, "--root", str(root), "sign")
    assert rc == 2 and "re-run `metarec-audit report`" in err


def test_private_key_never_leaks(tmp_path: Path, keypair, capsys, monkeypatch) -> None:
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    captured = []
    root = write_fixture_project(tmp_path / "proj")
    for argv in (["report"], ["sign"], ["gate"], ["summary"]):
        main(["--root", str(root), *argv])
        captured.append(capsys.readouterr())
    monkeypatch.setenv(signing.KEY_ENV, str(keypair[0]))
    main(["--root", str(root), "report"])
    main(["--root", str(root), "sign"])
    main(["verify", str(root / "reports" / "audit.bundle.json"), "--key", str(keypair[1])])
    captured.append(capsys.readouterr())
    secrets = []
    for key_file in (keypair[0], root / "keys" / signing.DEV_KEY_NAME):
        pem = key_file.read_bytes()
        body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
        raw = signing.load_private_key(key_file).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        secrets += [body, raw.hex().encode(), base64.b64encode(raw)]
    key_files = {(root / "keys" / signing.DEV_KEY_NAME).resolve()}
    for path in root.rglob("*"):
        if path.is_file() and path.resolve() not in key_files:
            data = path.read_bytes()
            for s in secrets:
                assert s not in data, f"private key material in {path}"
    for c in captured:
        for s in secrets:
            assert s.decode() not in c.out and s.decode() not in c.err


def _recipe(use_jq: bool) -> str:
    if use_jq:
        extract = ("jq -r .payload reports/audit.bundle.json | base64 -d > payload.json\n"
                   "jq -r '.signatures[0].sig' reports/audit.bundle.json | base64 -d > sig.bin\n")
        listing = "jq -r '.subject[] | \"\\(.digest.sha256)  \\(.name)\"' payload.json | sha256sum -c -\n"
    else:
        extract = ("python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"payload\"])' "
                   "reports/audit.bundle.json | base64 -d > payload.json\n"
                   "python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[\"signatures\"][0][\"sig\"])' "
                   "reports/audit.bundle.json | base64 -d > sig.bin\n")
        listing = ("python3 -c 'import json; [print(s[\"digest\"][\"sha256\"] + \"  \" + s[\"name\"]) "
                   "for s in json.load(open(\"payload.json\"))[\"subject\"]]' | sha256sum -c -\n")
    return ("set -euo pipefail\n" + extract +
            "T=application/vnd.in-toto+json\n"
            "printf 'DSSEv1 %d %s %d ' \"${#T}\" \"$T\" \"$(wc -c < payload.json)\" > pae.bin\n"
            "cat payload.json >> pae.bin\n"
            "openssl pkeyutl -verify -pubin -inkey reports/signing.pub -rawin -in pae.bin -sigfile sig.bin\n"
            + listing)


@pytest.mark.parametrize("use_jq", [True, False])
def test_openssl_recipe_from_readme_works(signed: Path, use_jq: bool) -> None:
    needed = ["openssl", "base64", "sha256sum", "bash"] + (["jq"] if use_jq else ["python3"])
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    script = _recipe(use_jq)
    ok = subprocess.run(["bash", "-c", script], cwd=signed, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    assert ok.stdout.count(": OK") == len(json.loads((signed / "payload.json").read_text())["subject"])
    # and it catches tampering: the signature over a changed payload and a changed subject both fail
    (signed / "metrics" / "summary.json").write_text("{}")
    bad = subprocess.run(["bash", "-c", script], cwd=signed, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "metrics/summary.json: FAILED" in bad.stdout


def test_keyid_matches_openssl_fingerprint(keypair) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(keypair[1]), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    import hashlib

    assert hashlib.sha256(der[-32:]).hexdigest() == signing.key_id(signing.load_public_key(keypair[1]))


# --- verifier boundaries (found by trying to break them) -----------------------------------------


def _resign(root: Path, key_path: Path, statement: dict, *, urlsafe: bool = False, keyid: bool = True) -> None:
    """Sign `statement` with the key and write it as the project's bundle."""
    key = signing.load_private_key(key_path)
    payload = json.dumps(statement).encode()
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    sig = {"sig": enc(key.sign(signing.pae(signing.PAYLOAD_TYPE, payload))).decode()}
    if keyid:
        sig["keyid"] = signing.key_id(key.public_key())
    env = {"payload": enc(payload).decode().rstrip("=" if urlsafe else ""), "payloadType": signing.PAYLOAD_TYPE,
           "signatures": [sig]}
    _write_envelope(root, env)


def _statement(root: Path) -> dict:
    return json.loads(base64.b64decode(_envelope(root)["payload"]))


def test_subject_symlink_leaving_the_root_is_refused(signed: Path, keypair, tmp_path: Path, capsys) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    statement = _statement(signed)
    statement["subject"].append({"name": "metrics/extra.json", "digest": {"sha256": signing.sha256_file(outside)}})
    (signed / "metrics" / "extra.json").symlink_to(outside)
    _resign(signed, keypair[0], statement)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1
    assert f"subject metrics/extra.json is a symbolic link to {outside.resolve()}, outside the project root" in err


def test_symlink_inside_the_root_still_verifies(signed: Path, keypair, capsys) -> None:
    statement = _statement(signed)
    target = signed / "metrics" / "summary.json"
    (signed / "metrics" / "alias.json").symlink_to(target)
    statement["subject"].append({"name": "metrics/alias.json", "digest": {"sha256": signing.sha256_file(target)}})
    _resign(signed, keypair[0], statement)
    assert _verify(capsys, signed, keypair[1])[0] == 0


def test_statement_without_the_standard_subjects_is_refused(signed: Path, keypair, capsys) -> None:
    statement = _statement(signed)
    statement["subject"] = [s for s in statement["subject"] if s["name"] == "params.yaml"]
    _resign(signed, keypair[0], statement)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1
    assert "the signed statement does not cover the audit's required subject reports/audit.html" in err


def test_url_safe_unpadded_base64_verifies(signed: Path, keypair, capsys) -> None:
    _resign(signed, keypair[0], _statement(signed), urlsafe=True)
    env = _envelope(signed)
    assert not env["payload"].endswith("=")
    assert _verify(capsys, signed, keypair[1])[0] == 0


def test_mixed_base64_alphabets_are_refused(signed: Path, keypair, capsys) -> None:
    env = _envelope(signed)
    env["signatures"][0]["sig"] = "ab+c-d" + env["signatures"][0]["sig"][6:]
    _write_envelope(signed, env)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 2 and "bundle signature is not valid base64 (mixes the standard and URL-safe alphabets)" in err


def test_signature_without_keyid_is_tried_with_the_given_key(signed: Path, keypair, tmp_path: Path, capsys) -> None:
    _resign(signed, keypair[0], _statement(signed), keyid=False)
    assert _verify(capsys, signed, keypair[1])[0] == 0
    _run(capsys, "keygen", "--out", str(tmp_path / "other"))
    rc, _, err = _verify(capsys, signed, tmp_path / "other" / "signing.pub")
    assert rc == 1 and "signature does not verify with key" in err


def test_deeply_nested_bundle_is_an_input_error(tmp_path: Path, keypair, capsys) -> None:
    bundle = tmp_path / "deep.json"
    bundle.write_text("[" * 100_000 + "]" * 100_000)
    rc, _, err = _run(capsys, "verify", str(bundle), "--key", str(keypair[1]))
    assert rc == 2
    assert err.strip() == f"metarec-audit verify: bundle {bundle} is nested too deeply to be JSON an audit writes"


def test_deeply_nested_signed_payload_fails_verification(signed: Path, keypair, capsys) -> None:
    key = signing.load_private_key(keypair[0])
    payload = b"[" * 100_000 + b"]" * 100_000
    env = {"payload": base64.b64encode(payload).decode(), "payloadType": signing.PAYLOAD_TYPE,
           "signatures": [{"keyid": signing.key_id(key.public_key()),
                           "sig": base64.b64encode(key.sign(signing.pae(signing.PAYLOAD_TYPE, payload))).decode()}]}
    _write_envelope(signed, env)
    rc, _, err = _verify(capsys, signed, keypair[1])
    assert rc == 1 and "the signed payload is nested too deeply to be JSON an audit writes" in err
