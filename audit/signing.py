"""Ed25519 signing of the audit outputs as a DSSE envelope around an in-toto Statement v1.

Why this format: DSSE signs a pre-authentication encoding (PAE) of the payload type and the exact
payload bytes, so a verifier never has to re-serialise JSON (a classic source of signature bugs),
and in-toto Statements are what supply-chain tools already read. References: DSSE protocol
(github.com/secure-systems-lab/dsse, "protocol.md"), in-toto attestation Statement v1 and the
test-result predicate v0.1 (github.com/in-toto/attestation, spec/), see ../shared/REFERENCES.md.

- `keygen(out_dir)`: signing.key (PKCS8 PEM, 0600, created O_EXCL) and signing.pub (SPKI PEM).
- `sign(root, params)`: reports/audit.bundle.json and reports/signing.pub.
- `verify(bundle, pub, root)`: signature first, then every subject's sha256.

The private key is only ever read into memory and handed to `cryptography`; no message, bundle
or report includes it.
"""

from __future__ import annotations

import base64
import binascii
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from metarec.errors import MetarecError
from metarec.io import atomic_write_bytes, atomic_write_json, dumps_json, sha256_bytes, sha256_file

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://in-toto.io/attestation/test-result/v0.1"
KEY_ENV = "METAREC_AUDIT_SIGNING_KEY_FILE"
DEV_KEY_DIR = "keys"
DEV_KEY_NAME = "dev-signing.key"
BUNDLE_PATH = "reports/audit.bundle.json"
PUBLISHED_PUB_PATH = "reports/signing.pub"
REPORT_PATH = "reports/audit.html"
# Signed subjects. Required ones must exist (sign exits 2 naming the first missing one); the
# globbed model files are included when present (a run with only non-neural baselines has none).
# `verify` refuses a statement that omits any required subject: a signature over params.yaml alone
# must not pass for a signed audit. results/per_user.parquet is what a later audit compares with.
REQUIRED_SUBJECTS = (
    REPORT_PATH, "params.yaml", "dvc.lock", "results/metrics_long.parquet", "results/per_user.parquet",
    "metrics/summary.json", "metrics/fairness.json", "metrics/robustness.json",
    "metrics/reproducibility.json", "metrics/gate.json", "metrics/provenance.json",
)
SUBJECT_GLOBS = ("metrics/*.json", "models/**/*.safetensors", "models/**/config.json")


class SigningError(MetarecError):
    """Signing cannot proceed (missing key or input); the CLI exits 2."""


class KeyExistsError(SigningError):
    """keygen refuses to overwrite an existing key file."""


class VerifyInputError(MetarecError):
    """The bundle or key cannot be read at all (exit 2), as opposed to being invalid (exit 1)."""


class VerificationFailed(MetarecError):
    """The bundle is readable but its signature or a subject does not check out (exit 1)."""


@dataclass(frozen=True)
class Signer:
    """The key `sign` will use, resolved without signing anything (the report states it first)."""

    private_key: Ed25519PrivateKey
    keyid: str
    development_key: bool
    source: str  # where the key came from, for messages; never the key material itself

    @property
    def public_pem(self) -> bytes:
        return public_pem(self.private_key.public_key())


def make_public(path: str | os.PathLike) -> Path:
    """Give a published output the usual 0644-under-umask mode.

    metarec.io's atomic writes go through mkstemp, which creates files 0600; reports, bundles and
    public keys are meant to be read by reviewers and web servers, so they are widened here.
    Private keys never pass through this function.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return Path(path)


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: lengths are byte lengths in ASCII decimal."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """sha256 hex of the 32 raw public-key bytes: the same value `openssl pkey -pubin -outform DER | tail -c 32 | sha256sum` gives."""
    return sha256_bytes(raw_public_bytes(key))


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the first byte on, atomically, refusing to replace a file.

    The temporary file is opened with O_CREAT|O_EXCL and the final mode, so a private key is never
    readable by others even for an instant; os.link then publishes it whole and fails if `path`
    already exists (unlike rename, which would overwrite).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        try:
            os.fchmod(fd, mode)  # umask may have removed bits we want (never adds any)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyExistsError(f"{path} already exists; refusing to overwrite a key") from None
        except OSError:
            # Filesystems without hard links: fall back to an exclusive create of the final name.
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            try:
                os.fchmod(fd2, mode)
                os.write(fd2, data)
                os.fsync(fd2)
            finally:
                os.close(fd2)
    finally:
        if tmp.exists():
            tmp.unlink()


def keygen(out_dir: str | os.PathLike, key_name: str = "signing.key") -> tuple[Path, Path]:
    """Write a fresh Ed25519 pair; refuses (KeyExistsError) if either file already exists."""
    out = Path(out_dir)
    key_path = out / key_name
    pub_path = key_path.with_suffix(".pub")
    for p in (key_path, pub_path):
        if p.exists() or p.is_symlink():
            raise KeyExistsError(f"{p} already exists; refusing to overwrite a key (choose another --out)")
    private = Ed25519PrivateKey.generate()
    _write_exclusive(key_path, _private_pem(private), 0o600)
    _write_exclusive(pub_path, public_pem(private.public_key()), 0o644)
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read signing key {path} ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Deliberately no detail from the parser: it could echo key material.
        raise SigningError(f"signing key {path} is not an unencrypted PEM (PKCS8) private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read public key {path} ({exc.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise VerifyInputError(f"public key {path} is not a PEM SubjectPublicKeyInfo public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerifyInputError(f"public key {path} is not an Ed25519 key")
    return key


def resolve_signer(root: Path, params: dict[str, Any], *, create_dev_key: bool = True) -> Signer:
    """The key `sign` uses: $METAREC_AUDIT_SIGNING_KEY_FILE, else params signing.key_path, else a dev key.

    An explicitly set environment variable that points nowhere is an error (CI must not silently
    fall back to an unvetted key); a missing params path falls back to a local development key
    under keys/ (git-ignored), which bundle and report then label as such. With
    params `signing.require_key: true` the fallback is refused instead.
    """
    root = Path(root)
    env = os.environ.get(KEY_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise SigningError(f"{KEY_ENV} points to {path}, which does not exist")
        key = load_private_key(path)
        return Signer(key, key_id(key.public_key()), False, f"${KEY_ENV}")
    signing = params.get("signing") or {}
    configured = signing.get("key_path")
    if configured:
        path = Path(configured)
        path = path if path.is_absolute() else root / path
        if path.is_file():
            key = load_private_key(path)
            return Signer(key, key_id(key.public_key()), False, f"params signing.key_path ({configured})")
    if signing.get("require_key"):
        where = f"signing.key_path ({configured})" if configured else f"${KEY_ENV}"
        raise SigningError(f"no signing key found: set {KEY_ENV} or create {where} with metarec-audit keygen")
    dev_path = root / DEV_KEY_DIR / DEV_KEY_NAME
    if not dev_path.is_file():
        if not create_dev_key:
            raise SigningError(f"no signing key and no development key at {dev_path}")
        keygen(dev_path.parent, DEV_KEY_NAME)
    key = load_private_key(dev_path)
    return Signer(key, key_id(key.public_key()), True, f"development key {DEV_KEY_DIR}/{DEV_KEY_NAME}")


def subject_names(root: Path, *, require: bool = True) -> list[str]:
    """Relative POSIX paths of everything `sign` hashes, sorted; the report lists the same names.

    With require=True a missing required input raises SigningError naming it. The report calls this
    with require=False before it exists itself (and before DVC writes dvc.lock on a first run).
    """
    root = Path(root)
    names: set[str] = set()
    for rel in REQUIRED_SUBJECTS:
        if (root / rel).is_file():
            names.add(rel)
        elif require:
            raise SigningError(f"cannot sign: required input {rel} is missing")
        else:
            names.add(rel)
    for pattern in SUBJECT_GLOBS:
        for hit in glob.glob(pattern, root_dir=root, recursive=True):
            if (root / hit).is_file():
                names.add(PurePosixPath(Path(hit).as_posix()).as_posix())
    return sorted(names)


def _gate_summary(root: Path) -> tuple[str, list[str], list[str], list[dict[str, Any]]]:
    path = root / "metrics" / "gate.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        records = [r for r in doc["records"] if r.get("kind") == "gate"]
        passed = bool(doc["passed"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SigningError("cannot sign: metrics/gate.json is not a readable gate result") from None
    ok = [str(r["name"]) for r in records if r.get("passed")]
    bad = [str(r["name"]) for r in records if not r.get("passed")]
    gates = [{k: r.get(k) for k in ("name", "file", "where", "field", "op", "threshold")} for r in records]
    return ("PASSED" if passed and not bad else "FAILED"), ok, bad, gates


def build_statement(root: Path, signer: Signer, subjects: list[str]) -> dict[str, Any]:
    """The in-toto Statement v1 with a test-result predicate over the gates."""
    root = Path(root)
    result, passed, failed, gates = _gate_summary(root)
    environment: dict[str, Any] | None = None
    repro = root / "metrics" / "reproducibility.json"
    try:
        environment = json.loads(repro.read_text(encoding="utf-8")).get("environment")
    except (OSError, ValueError, AttributeError):
        environment = None
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": sha256_file(root / n)}} for n in subjects],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "result": result,
            # test-result v0.1: configuration is a list of resource descriptors.
            "configuration": [{"name": "params.yaml", "digest": {"sha256": sha256_file(root / "params.yaml")},
                               "annotations": {"gates": gates}}],
            "passedTests": passed,
            "warnedTests": [],
            "failedTests": failed,
            "environment": environment,
            "signer": {"keyid": signer.keyid, "development_key": signer.development_key},
        },
    }


def sign(root: str | os.PathLike, params: dict[str, Any]) -> tuple[Path, Signer]:
    """Hash the subjects, sign the Statement, write reports/audit.bundle.json and reports/signing.pub."""
    root = Path(root)
    subjects = subject_names(root, require=True)
    signer = resolve_signer(root, params)
    _check_report_states_signer(root, signer)
    payload = dumps_json(build_statement(root, signer, subjects)).encode("utf-8")
    sig = signer.private_key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode("ascii")}],
    }
    if signer.development_key:
        # Outside the signed payload too, so nobody has to decode it to see the warning.
        envelope["_comment"] = "signed by a local DEVELOPMENT key (keys/dev-signing.key), not a release key"
    bundle = make_public(atomic_write_json(root / BUNDLE_PATH, envelope))
    make_public(atomic_write_bytes(root / PUBLISHED_PUB_PATH, signer.public_pem))
    return bundle, signer


def _check_report_states_signer(root: Path, signer: Signer) -> None:
    """The report names the signer key before it is signed; refuse a bundle that would contradict it."""
    marker = 'name="metarec-signer-keyid" content="'
    try:
        text = (root / REPORT_PATH).read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise SigningError(f"cannot sign: required input {REPORT_PATH} is missing") from None
    start = text.find(marker)
    if start < 0:
        return  # a report from another tool; nothing stated, nothing to contradict
    stated = text[start + len(marker): start + len(marker) + 64]
    if stated != signer.keyid:
        raise SigningError(f"{REPORT_PATH} states signer key {stated[:16]}... but the signing key is "
                           f"{signer.keyid[:16]}... ({signer.source}); re-run `metarec-audit report` first")


@dataclass(frozen=True)
class Verified:
    keyid: str
    result: str
    subjects: int
    development_key: bool
    names: tuple[str, ...] = ()   # the subjects whose digests were checked


def _b64(value: Any, what: str) -> bytes:
    """Standard or URL-safe base64, padded or not: DSSE allows either alphabet."""
    if not isinstance(value, str):
        raise VerifyInputError(f"bundle {what} is not a base64 string")
    text = value.strip()
    if "-" in text or "_" in text:
        if "+" in text or "/" in text:
            raise VerifyInputError(f"bundle {what} is not valid base64 (mixes the standard and URL-safe alphabets)")
        text = text.replace("-", "+").replace("_", "/")
    if not text.endswith("="):
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise VerifyInputError(f"bundle {what} is not valid base64") from None


def _loads(data: bytes, what: str, error: type[MetarecError]) -> Any:
    """json.loads that turns malformed and absurdly nested input into one sentence."""
    try:
        return json.loads(data)
    except RecursionError:
        raise error(f"{what} is nested too deeply to be JSON an audit writes") from None
    except (ValueError, UnicodeDecodeError):
        raise error(f"{what} is not JSON") from None


def _safe_subject_path(root: Path, name: Any) -> Path:
    """The subject's file under root; refuses names and symbolic links that lead outside it."""
    if not isinstance(name, str) or not name:
        raise VerificationFailed("a subject has no name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise VerificationFailed(f"subject {name} points outside the project root")
    path = root.joinpath(*pure.parts)
    real_root = root.resolve()
    if path.exists() and not path.resolve().is_relative_to(real_root):
        raise VerificationFailed(f"subject {name} is a symbolic link to {path.resolve()}, outside the project root")
    return path


def verify(bundle_path: str | os.PathLike, pub_path: str | os.PathLike,
           root: str | os.PathLike | None = None) -> Verified:
    """Check signature, payload type, keyid, then re-hash each subject; raise at the first failure."""
    bundle_path = Path(bundle_path)
    root = Path(root) if root is not None else bundle_path.resolve().parent.parent
    try:
        raw = bundle_path.read_bytes()
    except OSError as exc:
        raise VerifyInputError(f"cannot read bundle {bundle_path} ({exc.strerror})") from None
    envelope = _loads(raw, f"bundle {bundle_path}", VerifyInputError)
    if not isinstance(envelope, dict) or not all(k in envelope for k in ("payload", "payloadType", "signatures")):
        raise VerifyInputError(f"bundle {bundle_path} is not a DSSE envelope (needs payload, payloadType, signatures)")
    payload = _b64(envelope["payload"], "payload")
    sigs = envelope["signatures"]
    if not isinstance(sigs, list) or not sigs or not all(isinstance(s, dict) for s in sigs):
        raise VerifyInputError(f"bundle {bundle_path} has no signatures list")
    public = load_public_key(Path(pub_path))
    kid = key_id(public)
    payload_type = envelope["payloadType"]
    if payload_type != PAYLOAD_TYPE:
        raise VerificationFailed(f"payloadType is {payload_type!r}, expected {PAYLOAD_TYPE!r}")
    message = pae(payload_type, payload)  # over the exact decoded bytes, never re-serialised
    # keyid is optional in DSSE: a signature without one is tried with the given key.
    matching = [s for s in sigs if s.get("keyid") in (kid, None, "")]
    for s in matching:
        try:
            public.verify(_b64(s.get("sig"), "signature"), message)
            break
        except InvalidSignature:
            continue
    else:
        others = sorted({str(s.get("keyid")) for s in sigs} - {kid})
        why = (f"; the bundle was signed by keyid {', '.join(o[:16] + '...' for o in others)}" if not matching and others
               else "")
        raise VerificationFailed(f"signature does not verify with key {pub_path} (keyid {kid[:16]}...){why}")
    statement = _loads(payload, "the signed payload", VerificationFailed)
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise VerificationFailed(f"the signed payload is not an in-toto Statement v1 ({STATEMENT_TYPE})")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise VerificationFailed("the signed statement lists no subjects")
    if not all(isinstance(subj, dict) for subj in subjects):
        raise VerificationFailed("a subject entry is not an object")
    paths = [_safe_subject_path(root, subj.get("name")) for subj in subjects]   # names first
    listed = {subj.get("name") for subj in subjects}
    absent = [rel for rel in REQUIRED_SUBJECTS if rel not in listed]
    if absent:
        raise VerificationFailed(f"the signed statement does not cover the audit's required subject {absent[0]} "
                                 f"(an audit bundle signs {', '.join(REQUIRED_SUBJECTS)})")
    for subj, path in zip(subjects, paths):
        name = subj.get("name")
        expected = (subj.get("digest") or {}).get("sha256")
        if not isinstance(expected, str):
            raise VerificationFailed(f"subject {name} has no sha256 digest")
        if not path.is_file():
            raise VerificationFailed(f"subject {name} missing (looked for {path})")
        found = sha256_file(path)
        if found != expected:
            raise VerificationFailed(f"subject {name}: sha256 mismatch (expected {expected}, found {found})")
    predicate = statement.get("predicate") or {}
    signer = predicate.get("signer") or {}
    return Verified(keyid=kid, result=str(predicate.get("result")), subjects=len(subjects),
                    development_key=bool(signer.get("development_key")),
                    names=tuple(str(subj.get("name")) for subj in subjects))


def signature_context(root: Path, params: dict[str, Any]) -> dict[str, Any]:
    """What the report's Signature section states, computed before signing (see audit.report)."""
    signer = resolve_signer(root, params, create_dev_key=True)
    fp = signer.keyid
    return {
        "keyid": fp,
        "fingerprint": ":".join(fp[i:i + 4] for i in range(0, 64, 4)),
        "development_key": signer.development_key,
        "key_source": signer.source,
        "public_key_pem": signer.public_pem.decode("ascii"),
        "subjects": subject_names(root, require=False),
        "bundle": BUNDLE_PATH,
        "public_key_path": PUBLISHED_PUB_PATH,
        "payload_type": PAYLOAD_TYPE,
    }
