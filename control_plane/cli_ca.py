"""`meshctl token create|list|revoke` and `meshctl ca show|rotate|issue`: bootstrap tokens and
the mesh's roots (docs/identity.md "CA operations").

Registered into meshctl's parser by control_plane.cli.build_parser (add_commands). Failures of
a call become meshctl's usual messages and exit codes (through the Client); what these
commands refuse themselves is written as `error: ...` with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from mesh.v1 import ca_pb2, ca_pb2_grpc

from control_plane.ca.spiffe import IdentityError, check_service_name, spiffe_id
from control_plane.ca.state import write_private

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
ENV_TOKEN = "MESH_TOKEN"
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(s|m|h|d)")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Files `ca issue` writes (the names docs/identity.md's bootstrap example uses)
KEY_FILE, CERT_FILE, BUNDLE_FILE = "key.pem", "cert.pem", "bundle.pem"


class _Refused(Exception):
    """Something this module refuses itself: the message and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --- durations and times ----------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """'90m' -> 5400.0; units s, m, h, d."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f'expected a duration like "30m", "24h" or "30d", got '
                                         f"{text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_token_ttl(text: str) -> float:
    """A token TTL: a positive duration, or `never` (0 on the wire)."""
    if text.strip().lower() in ("never", "0"):
        return 0.0
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the TTL must be positive (or `never`)")
    return seconds


def human_duration(seconds: float) -> str:
    """24h, 90m, 45s, 1h30m: the shortest exact spelling."""
    s = round(seconds)
    if s % 3600 == 0 and s:
        return f"{s // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60}m" if s % 60 == 0 else f"{s}s"
    if s % 60 == 0 and s:
        return f"{s // 60}m"
    return f"{s}s"


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _seconds(msg: Message, field: str) -> float | None:
    if not msg.HasField(field):
        return None
    ts = getattr(msg, field)
    return float(ts.seconds) + ts.nanos / 1e9


# --- calling the control plane ------------------------------------------------------------------
def _call(client: Any, method: Callable[..., Any], request: Message) -> Any:
    """client.call, except that what only these APIs answer reads as the control plane said it
    (a token the CA does not know, a root the operator supplies)."""
    try:
        return method(request, timeout=client.timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = (error.details() if isinstance(error, grpc.Call) else "") or ""
        if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED):
            raise _Refused(details, EXIT_REJECTED) from None
        raise client.failure(error) from None


def _stubs(client: Any) -> tuple[Any, Any, Any]:
    channel = client.channel
    return (ca_pb2_grpc.TokenServiceStub(channel),  # type: ignore[no-untyped-call]
            ca_pb2_grpc.CaAdminServiceStub(channel),  # type: ignore[no-untyped-call]
            ca_pb2_grpc.CertificateServiceStub(channel))  # type: ignore[no-untyped-call]


def _cli() -> Any:
    """meshctl's formatting helpers (imported late: control_plane.cli imports this module)."""
    from control_plane import cli

    return cli


def _dump(value: Any, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2) + "\n"
    return yaml.safe_dump(value, sort_keys=False)


# --- tokens -------------------------------------------------------------------------------------
def token_dict(token: ca_pb2.Token, now: float) -> dict[str, Any]:
    cli = _cli()
    return {"id": token.id, "services": list(token.services),
            "status": token_status(token, now),
            "created": cli.iso(_seconds(token, "create_time")),
            "expires": cli.iso(_seconds(token, "expire_time")) or "never",
            "revoked": cli.iso(_seconds(token, "revoke_time")) or None,
            "description": token.description}


def token_status(token: ca_pb2.Token, now: float) -> str:
    if token.HasField("revoke_time"):
        return "revoked"
    expires = _seconds(token, "expire_time")
    if expires is not None and expires <= now:
        return "expired"
    return "active"


def tokens_table(tokens: Sequence[ca_pb2.Token], now: float) -> str:
    cli = _cli()
    rows = []
    for t in tokens:
        expires = _seconds(t, "expire_time")
        rows.append([t.id, ",".join(t.services), token_status(t, now),
                     cli.age(_seconds(t, "create_time"), now),
                     cli.iso(expires) if expires is not None else "never",
                     t.description or "-"])
    return str(cli.table(("ID", "SERVICES", "STATUS", "AGE", "EXPIRES", "DESCRIPTION"), rows))


def cmd_token_create(args: argparse.Namespace, client: Any, io: Any) -> int:
    tokens, _, _ = _stubs(client)
    request = ca_pb2.CreateTokenRequest(services=args.service, description=args.description)
    if args.ttl is not None:
        request.ttl.CopyFrom(_duration(args.ttl))
    response = _call(client, tokens.Create, request)
    if args.output in ("json", "yaml"):
        io.out.write(_dump({"token": response.secret, **token_dict(response.token, io.now())},
                           args.output))
        return EXIT_OK
    io.out.write(response.secret + "\n")
    expires = _seconds(response.token, "expire_time")
    until = f"expires {_cli().iso(expires)}" if expires is not None else "never expires"
    io.err.write(f"token {response.token.id} created for {', '.join(response.token.services)}; "
                 f"{until}.\nKeep it secret: it is shown only this once (the control plane "
                 "keeps only its hash).\n")
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace, client: Any, io: Any) -> int:
    tokens, _, _ = _stubs(client)
    found = list(_call(client, tokens.List, ca_pb2.ListTokensRequest()).tokens)
    now = io.now()
    if args.output in ("json", "yaml"):
        io.out.write(_dump([token_dict(t, now) for t in found], args.output))
    elif found:
        io.out.write(tokens_table(found, now))
    else:
        io.err.write("no tokens\n")
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace, client: Any, io: Any) -> int:
    tokens, _, _ = _stubs(client)
    response = _call(client, tokens.Revoke, ca_pb2.RevokeTokenRequest(id=args.id))
    io.out.write(f"token {response.token.id} revoked "
                 f"(at {_cli().iso(_seconds(response.token, 'revoke_time'))})\n")
    return EXIT_OK


# --- roots --------------------------------------------------------------------------------------
def ca_dict(status: ca_pb2.CaStatus) -> dict[str, Any]:
    cli = _cli()
    return {"trustDomain": status.trust_domain,
            "workloadTTL": human_duration(status.workload_ttl.ToNanoseconds() / 1e9),
            "source": status.source,
            "roots": [{"state": r.state, "subject": r.subject,
                       "fingerprintSHA256": r.fingerprint_sha256,
                       "notBefore": cli.iso(_seconds(r, "not_before")),
                       "notAfter": cli.iso(_seconds(r, "not_after")),
                       "signsFrom": cli.iso(_seconds(r, "sign_from")),
                       "retires": cli.iso(_seconds(r, "retire_time")) or None,
                       "certificate": r.certificate_pem}
                      for r in status.roots]}


def describe_ca(status: ca_pb2.CaStatus, now: float) -> str:
    cli = _cli()
    lines = [f"Trust domain:   {status.trust_domain}",
             f"Workload TTL:   {human_duration(status.workload_ttl.ToNanoseconds() / 1e9)}",
             f"Root source:    {status.source}"]
    rows = []
    for r in status.roots:
        sign_from = _seconds(r, "sign_from")
        retire = _seconds(r, "retire_time")
        rows.append([r.state, r.fingerprint_sha256[:16], r.subject,
                     cli.iso(_seconds(r, "not_after")),
                     cli.iso(sign_from) if r.state == "pending" and sign_from else "-",
                     cli.iso(retire) if retire is not None else "-"])
    out = "\n".join(lines) + "\n\n"
    out += str(cli.table(("STATE", "FINGERPRINT", "SUBJECT", "EXPIRES", "SIGNS FROM",
                          "RETIRES"), rows))
    return out


def cmd_ca_show(args: argparse.Namespace, client: Any, io: Any) -> int:
    _, admin, certs = _stubs(client)
    if args.output == "pem":
        bundle = _call(client, certs.TrustBundle, ca_pb2.TrustBundleRequest())
        io.out.write("".join(bundle.trust_bundle_pem))
        return EXIT_OK
    status = _call(client, admin.Show, ca_pb2.ShowCaRequest())
    if args.output in ("json", "yaml"):
        io.out.write(_dump(ca_dict(status), args.output))
    else:
        io.out.write(describe_ca(status, io.now()))
    return EXIT_OK


def cmd_ca_rotate(args: argparse.Namespace, client: Any, io: Any) -> int:
    _, admin, _ = _stubs(client)
    request = ca_pb2.RotateRootRequest()
    if args.activate_after:
        request.activate_after.CopyFrom(_duration(args.activate_after))
    status = _call(client, admin.Rotate, request)
    cli = _cli()
    newest = max(status.roots, key=lambda r: _seconds(r, "sign_from") or 0.0, default=None)
    if newest is not None:
        when = _seconds(newest, "sign_from")
        retiring = [r for r in status.roots if r.HasField("retire_time")]
        io.out.write(f"new root {newest.fingerprint_sha256[:16]} "
                     + ("signs workload certificates from now on"
                        if newest.state == "active" else f"signs from {cli.iso(when)}")
                     + "\n")
        for r in retiring:
            io.out.write(f"root {r.fingerprint_sha256[:16]} stays trusted until "
                         f"{cli.iso(_seconds(r, 'retire_time'))}\n")
    io.out.write("\n" + describe_ca(status, io.now()))
    return EXIT_OK


# --- a certificate for a proxyless client -------------------------------------------------------
def _read_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise _Refused(f"cannot read {args.token_file}: {getattr(e, 'strerror', e) or e}"
                           ) from None
    token = os.environ.get(ENV_TOKEN, "")
    if not token:
        raise _Refused(f"a bootstrap token is needed: --token-file FILE, or {ENV_TOKEN} "
                       "(create one with `meshctl token create --service NAME`)")
    return token.strip()


def _write_public(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def cmd_ca_issue(args: argparse.Namespace, client: Any, io: Any) -> int:
    """Make a key here, have the CA sign a CSR for SERVICE, write key, chain and bundle."""
    try:
        service = check_service_name(args.service)
    except IdentityError as e:
        raise _Refused(str(e)) from None
    token = _read_token(args)
    _, _, certs = _stubs(client)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Refused(f"cannot create {out}: {e.strerror or e}") from None
    domain = args.trust_domain or _call(client, certs.TrustBundle,
                                        ca_pb2.TrustBundleRequest()).trust_domain
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier(spiffe_id(domain, service))]), critical=False)
           .sign(key, hashes.SHA256()))
    request = ca_pb2.SignRequest(csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode())
    try:
        response = certs.Sign(request, timeout=client.timeout,
                              metadata=(("authorization", f"Bearer {token}"),))
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT):
            details = error.details() if isinstance(error, grpc.Call) else ""
            raise _Refused(f"the CA refused: {details}", EXIT_REJECTED) from None
        raise client.failure(error) from None
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    try:
        # the key first: a watcher that reads the new certificate then finds its key
        write_private(out / KEY_FILE, key_pem)
        _write_public(out / CERT_FILE, response.certificate_pem)
        _write_public(out / BUNDLE_FILE, "".join(response.trust_bundle_pem))
    except OSError as e:
        raise _Refused(f"cannot write to {out}: {e.strerror or e}") from None
    io.out.write(f"{response.spiffe_id} until {_cli().iso(_seconds(response, 'not_after'))}: "
                 f"{out / KEY_FILE}, {out / CERT_FILE}, {out / BUNDLE_FILE}\n")
    return EXIT_OK


# --- arguments ----------------------------------------------------------------------------------
def _guard(command: Callable[[argparse.Namespace, Any, Any], int]
           ) -> Callable[[argparse.Namespace, Any, Any], int]:
    def run(args: argparse.Namespace, client: Any, io: Any) -> int:
        try:
            return command(args, client, io)
        except _Refused as e:
            io.err.write(f"error: {e.message}\n")
            return e.code

    return run


def add_commands(sub: Any) -> None:
    """Add `token` and `ca` to meshctl's subcommands (`sub`: its add_subparsers() action)."""
    token = sub.add_parser("token", help="bootstrap tokens that let workloads get certificates")
    tsub = token.add_subparsers(dest="token_command", metavar="COMMAND",
                                parser_class=type(token))
    tsub.required = True
    p = tsub.add_parser("create", help="a new token (printed once) for one or more services")
    p.add_argument("--service", action="append", required=True, metavar="NAME",
                   help="a service name the token may claim; repeatable")
    p.add_argument("--ttl", type=parse_token_ttl, default=None, metavar="DURATION",
                   help="how long it can be used, e.g. 720h or 30d, or `never` (default 720h)")
    p.add_argument("--description", default="", help="a note shown by `token list`")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    p.set_defaults(run=_guard(cmd_token_create))
    p = tsub.add_parser("list", help="every token: id, services, status, expiry")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(run=_guard(cmd_token_list))
    p = tsub.add_parser("revoke", help="stop a token from getting certificates")
    p.add_argument("id", metavar="ID", help="the token id `token list` shows")
    p.set_defaults(run=_guard(cmd_token_revoke))

    ca = sub.add_parser("ca", help="the mesh's certificate authority: roots and rotation")
    csub = ca.add_subparsers(dest="ca_command", metavar="COMMAND", parser_class=type(ca))
    csub.required = True
    p = csub.add_parser("show", help="the roots, which one signs, the trust domain and TTL")
    p.add_argument("-o", "--output", choices=("text", "json", "yaml", "pem"), default="text",
                   help="pem: the trust bundle only")
    p.set_defaults(run=_guard(cmd_ca_show))
    p = csub.add_parser("rotate", help="add a new root; the old one stays trusted until the "
                                       "certificates it signed have expired")
    p.add_argument("--activate-after", type=parse_duration, default=0.0, metavar="DURATION",
                   help="trust the new root at once but sign with it only after this (e.g. "
                        "10m, time for every workload to get the new bundle)")
    p.set_defaults(run=_guard(cmd_ca_rotate))
    p = csub.add_parser("issue", help="get a certificate for SERVICE into a directory (for "
                                      "proxyless gRPC clients): key.pem, cert.pem, bundle.pem")
    p.add_argument("--service", required=True, metavar="NAME")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--token-file", metavar="FILE",
                   help=f"the bootstrap token (or set {ENV_TOKEN})")
    p.add_argument("--trust-domain", help="default: the control plane's")
    p.set_defaults(run=_guard(cmd_ca_issue))
