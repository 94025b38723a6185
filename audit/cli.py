"""`metarec-audit`: the command line of CONTRACTS.md.

Commands and exit codes (0 success; 1 a check failed; 2 input missing or invalid):
  data      the prepare stage's checks without writing: params schema, data, data against params
            (audit.config.check_command); 0 valid, 2 invalid
  gate      evaluate params.yaml gates against metrics/*.json; table + reports/gate.junit.xml +
            reports/gate.md; 0 all pass, 1 a gate fails (or is inconclusive with
            on_inconclusive: fail), 2 input missing/invalid.
            `--record-only` is the DVC stage's form: writes metrics/gate.json and exits 0 whatever
            the verdict (CI fails on the plain command's exit code, the pipeline never does).
  keygen    --out DIR: Ed25519 pair signing.key (0600) + signing.pub; 2 if either exists
  sign      reports/audit.bundle.json (+ reports/signing.pub); 2 on missing key or inputs
  verify    BUNDLE --key PUB [--root DIR]: 0 valid, 1 invalid or tampered, 2 unreadable input
  report    render reports/audit.html (the DVC report stage)
  repro     `dvc repro` with the stale cells of the models x seeds matrix run concurrently on the
            compute engine (metarec.matrix); exit status DVC's or the first failed cell's
  summary   print the report path, the verdict, each gate (outcome, interval compared) and the report's
            key findings in under 40 lines; always 0

Global options (before or after the command): --root DIR (project root, default "."),
--params FILE (default params.yaml, relative to --root unless absolute).

Errors are one sentence on stderr, never a traceback (set METAREC_AUDIT_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

EXIT_OK, EXIT_FAIL, EXIT_INPUT = 0, 1, 2


class InputError(Exception):
    """An input problem detected in the CLI layer itself (exit 2)."""


def _load_params(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    path = Path(args.params)
    if not path.is_absolute():
        path = Path(args.root) / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read params file {path} ({exc.strerror or exc})") from None
    try:
        params = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"params file {path} is not valid YAML{where}") from None
    if not isinstance(params, dict):
        raise InputError(f"params file {path} must hold a mapping of settings")
    return params


def cmd_data(args: argparse.Namespace) -> int:
    # Imported here so that `gate`, `verify` etc. never pay for (or break on) the data stack.
    from audit.config import check_command

    return int(check_command(args.params if Path(args.params).is_absolute() else str(Path(args.root) / args.params)))


def cmd_gate(args: argparse.Namespace) -> int:
    from audit import gate

    params = _load_params(args)
    root = Path(args.root)
    if args.record_only:
        doc = gate.record_gates(root, params)
        print(f"wrote {root / 'metrics' / 'gate.json'}: {'PASSED' if doc['passed'] else 'FAILED'} ({doc['verdict']})")
        return EXIT_OK
    results = gate.evaluate_gates(root, params)
    junit, md = gate.write_gate_reports(root, results)
    print(gate.format_table(results))
    print(f"wrote {junit} and {md}")
    failed = [r for r in results if not r.passed]
    for r in failed:
        what = "failed" if r.outcome == "fail" else "is inconclusive (on_inconclusive: fail)"
        print(f"gate {r.name} {what}: {r.message}", file=sys.stderr)
    return EXIT_FAIL if failed else EXIT_OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from audit import signing

    key, pub = signing.keygen(args.out)
    print(f"wrote {key} (private, mode 0600; keep it secret) and {pub} (public)")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    from audit import signing

    params = _load_params(args)
    bundle, signer = signing.sign(Path(args.root), params)
    print(f"wrote {bundle} signed by keyid {signer.keyid} ({signer.source})")
    if signer.development_key:
        print("warning: signed with a local DEVELOPMENT key; set METAREC_AUDIT_SIGNING_KEY_FILE for a release",
              file=sys.stderr)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from audit import signing

    # Subjects are re-hashed under --root when given, else under the bundle's parent's parent.
    root = args.verify_root if args.verify_root is not None else args.root
    res = signing.verify(args.bundle, args.key, root)
    note = " (signed by a DEVELOPMENT key)" if res.development_key else ""
    print(f"OK: signature by keyid {res.keyid} verifies and all {res.subjects} subjects match; "
          f"gate result {res.result}{note}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from audit import report

    params = _load_params(args)
    path = report.write_report(Path(args.root), params)
    print(f"wrote {path}")
    return EXIT_OK


def cmd_repro(args: argparse.Namespace) -> int:
    """`dvc repro` with the stale cells of the models x seeds matrix run concurrently (metarec.matrix)."""
    from metarec.compute import ComputeConfig, Stopped, executor, stop_on_signals
    from metarec.matrix import reproduce

    config = ComputeConfig.from_params(_load_params(args))
    cpus = args.cell_cpus or config.cell_cpus
    try:
        with stop_on_signals():
            return reproduce(Path(args.root), lambda: executor(config), cpus=cpus).returncode
    except Stopped as stop:
        print(f"metarec-audit repro: {stop}; every cell was stopped", file=sys.stderr)
        return 128 + stop.signum


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one trained model of this project over the metarec-audit/1 protocol (reference server)."""
    from metarec.errors import MetarecError
    from metarec.models import registry
    from metarec.prepared import load_prepared, load_split
    from metarec.serving import make_server

    root = Path(args.root)
    directory = root / "models" / args.model / f"seed{args.seed}"
    if not directory.is_dir():
        raise InputError(f"no trained model at {directory}; run `dvc repro train@{args.model}-{args.seed}` first")
    try:
        data = load_prepared(root / "data" / "prepared")
        train = load_split("train", data, root / "data" / "tasks")
    except OSError as exc:
        raise InputError(f"cannot read the prepared data and task split under {root} ({exc})") from None
    model = registry.load(args.model, directory, train=train)
    ids = {key: data.id_map(key) for key in ("user_id", "item_id")}
    try:
        server = make_server(model, args.host, args.port, ids)
    except OSError as exc:
        raise MetarecError(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}, not loopback; the reference server has no authentication",
              file=sys.stderr)
    print(f"serving {args.model} (seed {args.seed}) at http://{host}:{port}/ (protocol metarec-audit/1); "
          f"Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


SUMMARY_MAX_GATES = 10      # beyond this, passing gates are counted, not listed: the summary stays under 40 lines
SUMMARY_MAX_FINDINGS = 10


def cmd_summary(args: argparse.Namespace) -> int:
    """The verdict, each gate with its outcome and the interval it compared, and the report's key
    findings, in under 40 lines: what a reviewer reads in a terminal before opening the report."""
    root = Path(args.root)
    html = root / "reports" / "audit.html"
    print(f"report: {html.resolve() if html.exists() else str(html) + ' (not written yet)'}")
    try:
        doc = json.loads((root / "metrics" / "gate.json").read_text(encoding="utf-8"))
        records = [r for r in doc.get("records", []) if r.get("kind") == "gate"]
    except (OSError, ValueError, AttributeError):
        print("gates: unknown (metrics/gate.json missing or unreadable; run `dvc repro`)")
        records, doc = [], None
    if doc is not None:
        from audit.gate import format_value

        outcomes = [r.get("outcome") or ("pass" if r.get("passed") else "fail") for r in records]
        n_inc = outcomes.count("inconclusive")
        print(f"gates: {'PASSED' if doc.get('passed') else 'FAILED'} ({outcomes.count('pass')} of {len(records)} "
              f"pass" + (f", {n_inc} inconclusive" if n_inc else "") + ")")
        shown = [(r, o) for r, o in zip(records, outcomes) if len(records) <= SUMMARY_MAX_GATES or o != "pass"]
        for r, outcome in shown[:SUMMARY_MAX_GATES]:
            counted = f" (counts as {'pass' if r.get('passed') else 'fail'})" if outcome == "inconclusive" else ""
            compared = (f"interval {format_value(r.get('interval_low'))} to {format_value(r.get('interval_high'))}"
                        if r.get("interval") else f"observed {format_value(r.get('observed'))}")
            print(f"  {outcome.upper()}{counted} {r.get('name')}: {compared}, rule {r.get('field')} {r.get('op')} "
                  f"{format_value(r.get('threshold'))}")
            if outcome != "pass" and r.get("message"):
                print(f"      {r.get('message')}")
        if len(shown) < len(records):
            print(f"  ... and {len(records) - len(shown[:SUMMARY_MAX_GATES])} more (see reports/gate.md)")
    try:
        from audit import report

        findings = report.key_findings(root, _load_params(args))
    except Exception as exc:  # noqa: BLE001 - the summary never fails; it says what it could not read
        findings = None
        print(f"key findings: unavailable ({exc})")
    if findings is not None:
        print("key findings:")
        for line in findings[:SUMMARY_MAX_FINDINGS]:
            print(f"  - {line}")
        if len(findings) > SUMMARY_MAX_FINDINGS:
            print(f"  ... and {len(findings) - SUMMARY_MAX_FINDINGS} more in the report")
    bundle = root / "reports" / "audit.bundle.json"
    if bundle.exists():
        print(f"signed bundle: {bundle.resolve()}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a value given after the command overrides the top-level one only when present.
    common.add_argument("--root", default=argparse.SUPPRESS, help="project root (default: .)")
    common.add_argument("--params", default=argparse.SUPPRESS,
                        help="params file, relative to --root unless absolute (default: params.yaml)")
    parser = argparse.ArgumentParser(
        prog="metarec-audit",
        description="Audit meta-learned cold-start recommenders: gates, signing, verification and the HTML report.",
        epilog="Exit codes: 0 success, 1 a check failed (gate or verification), 2 input missing or invalid.")
    parser.add_argument("--root", default=None, help="project root (default: .)")
    parser.add_argument("--params", default="params.yaml",
                        help="params file, relative to --root unless absolute (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", parents=[common], help="check the configured data source",
                       description="Load and check the data source configured in params.yaml.")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("gate", parents=[common], help="check the release gates (exit 0 pass, 1 fail, 2 input error)",
                       description="Evaluate the gates in params.yaml against metrics/*.json, print a table and write "
                                   "reports/gate.junit.xml and reports/gate.md. A gate with an interval passes, fails or is "
                                   "inconclusive (the interval straddles the threshold). Exit 0 when all pass, 1 when a "
                                   "gate fails or is inconclusive with on_inconclusive: fail, 2 when an input is missing "
                                   "or invalid.")
    p.add_argument("--record-only", action="store_true",
                   help="write metrics/gate.json and exit 0 whatever the verdict (for the DVC gate stage)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("keygen", parents=[common], help="write an Ed25519 key pair",
                       description="Write signing.key (PKCS8 PEM, mode 0600) and signing.pub (PEM) into DIR. "
                                   "Exit 2 if either file exists.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for signing.key and signing.pub")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", parents=[common], help="sign the audit outputs into reports/audit.bundle.json",
                       description="Hash the report, metrics, params.yaml, dvc.lock and model files into an in-toto "
                                   "Statement and sign it as a DSSE envelope (reports/audit.bundle.json). The key comes "
                                   "from $METAREC_AUDIT_SIGNING_KEY_FILE, else params signing.key_path, else a local "
                                   "development key under keys/. Exit 2 on a missing key or input.")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="verify a bundle's signature and every subject's hash",
                       description="Verify the DSSE signature with PUB, then re-hash every subject. Exit 0 valid, "
                                   "1 invalid or tampered (naming the first failure), 2 unreadable input.")
    p.add_argument("bundle", metavar="BUNDLE", help="reports/audit.bundle.json")
    p.add_argument("--key", required=True, metavar="PUB", help="the signer's public key (PEM)")
    p.add_argument("--root", dest="verify_root", default=None, metavar="DIR",
                   help="where subjects are re-hashed (default: the directory containing reports/, "
                        "i.e. the bundle's parent's parent)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", parents=[common], help="render reports/audit.html",
                       description="Render the self-contained audit report reports/audit.html from the metrics files.")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("repro", parents=[common], help="dvc repro, with the matrix's stale cells run concurrently",
                       description="Run the pipeline as `dvc repro` does, except that the stale cells of each matrix "
                                   "stage (train@<model>-<seed>) run at the same time on the compute engine (this "
                                   "machine's cores, or the Ray cluster at compute.address / $RAY_ADDRESS). DVC still "
                                   "decides what is stale and records every cell in dvc.lock. Exit status: DVC's, or "
                                   "that of the first cell that failed (2 for invalid input).")
    p.add_argument("--cell-cpus", type=int, default=None, metavar="N",
                   help="CPUs (threads) per cell (default: compute.cell_cpus in params.yaml, else 1)")
    p.set_defaults(func=cmd_repro)

    p = sub.add_parser("serve", parents=[common], help="serve a trained model over HTTP (metarec-audit/1)",
                       description="Serve models/MODEL/seedSEED of this project as a scoring service that speaks "
                                   "the metarec-audit/1 JSON protocol (the reference for auditing a model behind an "
                                   "endpoint). Listens on loopback by default; Ctrl-C stops it. Exit 2 when the "
                                   "model or data is missing.")
    p.add_argument("--model", required=True, help="a model name of this project's params.yaml")
    p.add_argument("--seed", type=int, default=0, help="its training seed (default 0)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("summary", parents=[common], help="print the verdict, the gates and the key findings",
                       description="Print the report path, the verdict recorded in metrics/gate.json, each gate with "
                                   "its outcome and the interval it compared, and the report's key findings, in under "
                                   "40 lines. Exit 0.")
    p.set_defaults(func=cmd_summary)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from metarec.errors import MetarecError

    return (MetarecError, InputError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "verify" and args.root is None:
        args.root = "."
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _known_errors() as exc:
        from audit.signing import VerificationFailed

        print(f"metarec-audit {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAIL if isinstance(exc, VerificationFailed) else EXIT_INPUT
    except KeyboardInterrupt:
        print(f"metarec-audit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the contract is one sentence, not a traceback
        if os.environ.get("METAREC_AUDIT_DEBUG"):
            traceback.print_exc()
        print(f"metarec-audit {args.command}: unexpected {type(exc).__name__}: {exc} "
              f"(set METAREC_AUDIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
