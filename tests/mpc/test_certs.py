"""Certificates: the CSR flow (each host keeps its key, a CA operator signs), its refusals, the
one-machine mode's command line, and real mutual TLS handshakes with what both produce."""
import importlib.util
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from helpers.links import connect_three
from secure_inference.mpc import certs
from secure_inference.mpc.session import PARTY_NAMES
from secure_inference.mpc.transport.addresses import listen
from secure_inference.mpc.transport.tls import TLSConfig, party_common_name

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "research" / "secure_inference" / "make_certificates.py"
PYTHON = sys.executable
HOSTS = {0: ["localhost", "127.0.0.1"], 1: ["127.0.0.1", "server.example"], 2: ["127.0.0.1"]}


def _load_cli():
    spec = importlib.util.spec_from_file_location("make_certificates_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def _cli(*argv) -> int:
    return CLI.main([str(a) for a in argv])


def _cli_error(capsys, *argv) -> str:
    """Run the CLI expecting a user error: exit status 2, a message on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _cli(*argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "error:" in err and "Traceback" not in err
    return err


def _csr_flow(tmp_path: Path) -> dict[int, Path]:
    """Three hosts each make a key and request, a CA operator signs, the hosts install: the
    returned folders hold exactly ca.pem, ROLE.pem, ROLE.key (and ROLE.csr)."""
    ca_dir = tmp_path / "operator"
    assert _cli("init-ca", ca_dir) == 0
    folders = {}
    for role, name in PARTY_NAMES.items():
        host = tmp_path / f"{name}-host"
        args = ["request", "--role", name, "--out", host]
        for h in HOSTS[role]:
            args += ["--host", h]
        assert _cli(*args) == 0
        inbox = tmp_path / "operator-inbox"          # only the .csr travels to the operator
        inbox.mkdir(exist_ok=True)
        shutil.copy(host / f"{name}.csr", inbox / f"{name}.csr")
        assert _cli("sign", "--ca", ca_dir, "--role", name, inbox / f"{name}.csr") == 0
        shutil.copy(inbox / f"{name}.pem", host / f"{name}.pem")      # and back to the host
        shutil.copy(ca_dir / "ca.pem", host / "ca.pem")
        assert _cli("check", host, "--role", name) == 0
        folders[role] = host
    return folders


def _mutual_tls_three_parties(tls_for) -> tuple[dict, dict]:
    """connect_links for the three parties in threads over 127.0.0.1; returns (TLS version
    and peer certificate per (role, peer), errors)."""
    listeners = {r: listen("127.0.0.1", 0) for r in (1, 2)}
    addresses = {0: ("127.0.0.1", 0),
                 **{r: ("127.0.0.1", s.getsockname()[1]) for r, s in listeners.items()}}
    return connect_three(addresses, listeners, tls_for, lambda out: {
        (r, peer): (link._sock.version(), link._sock.getpeercert())
        for r, links in out.items() for peer, link in links.items()}, timeout=10.0)


def _peer_common_names(peercert: dict) -> list[str]:
    return [v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"]


def _handshake(server_cfg: TLSConfig, client_cfg: TLSConfig, hostname: str):
    """One TLS handshake over a socket pair; returns (server's view, client's view) of the peer
    certificate, or raises the ssl error of the side that failed."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result: dict = {}

    def serve():
        try:
            with server_cfg.context(True).wrap_socket(a, server_side=True) as s:
                result["server"] = s.getpeercert()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            result["server_error"] = exc
            a.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_cfg.context(False).wrap_socket(b, server_hostname=hostname) as c:
            result["client"] = c.getpeercert()
            assert c.recv(2) == b"ok"
    finally:
        t.join(15)
    if "server_error" in result:
        raise result["server_error"]
    return result["server"], result["client"]


def _csr(subject: list[x509.NameAttribute], sans: list[x509.GeneralName] | None,
         key=None) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def _cn(role: int) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, party_common_name(role))


# --- the CSR flow end to end ------------------------------------------------------------------

def test_csr_flow_gives_each_host_only_its_own_key_and_working_mutual_tls(tmp_path):
    folders = _csr_flow(tmp_path)
    for role, host in folders.items():
        name = PARTY_NAMES[role]
        assert sorted(p.name for p in host.iterdir()) == sorted(
            ["ca.pem", f"{name}.csr", f"{name}.key", f"{name}.pem"])
        assert (host / f"{name}.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "operator").iterdir()) == ["ca.key", "ca.pem"]
    assert not list((tmp_path / "operator-inbox").glob("*.key"))   # no key reached the operator

    info, errs = _mutual_tls_three_parties(lambda r: TLSConfig.from_dir(folders[r], r))
    assert not errs, errs
    assert sorted(info) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    for (me, peer), (version, peercert) in info.items():
        assert version == "TLSv1.3"
        assert _peer_common_names(peercert) == [party_common_name(peer)]


def test_csr_flow_certificate_passes_a_direct_handshake_and_hostname_check(tmp_path):
    folders = _csr_flow(tmp_path)
    server, client = TLSConfig.from_dir(folders[1], 1), TLSConfig.from_dir(folders[0], 0)
    seen_by_server, seen_by_client = _handshake(server, client, "server.example")
    assert _peer_common_names(seen_by_server) == [party_common_name(0)]
    assert _peer_common_names(seen_by_client) == [party_common_name(1)]
    with pytest.raises(ssl.SSLCertVerificationError):        # not in the server's SAN list
        _handshake(server, client, "other.example")


def test_signed_certificate_has_the_same_extensions_and_validity_as_one_machine_mode(tmp_path):
    certs.create_certificates(tmp_path / "local", HOSTS)
    folders = _csr_flow(tmp_path)
    for role, name in PARTY_NAMES.items():
        local = x509.load_pem_x509_certificate((tmp_path / "local" / f"{name}.pem").read_bytes())
        signed = x509.load_pem_x509_certificate((folders[role] / f"{name}.pem").read_bytes())
        assert signed.subject == local.subject
        assert {e.oid: (e.critical, e.value) for e in signed.extensions} == \
               {e.oid: (e.critical, e.value) for e in local.extensions}
        assert (signed.not_valid_after_utc - signed.not_valid_before_utc) == \
               (local.not_valid_after_utc - local.not_valid_before_utc)


def test_library_request_sign_and_check_without_the_cli(tmp_path):
    paths = certs.write_party_request(tmp_path / "h", 2, ["helper.internal", "10.0.0.3"])
    assert paths["key"].stat().st_mode & 0o777 == 0o600
    certs.init_ca(tmp_path / "ca")
    out, info = certs.sign_request_file(tmp_path / "ca", paths["csr"], expected_role=2, days=30)
    assert out == tmp_path / "h" / "helper.pem"
    assert info.role == 2 and info.hosts == ("helper.internal", "10.0.0.3")
    shutil.copy(tmp_path / "ca" / "ca.pem", tmp_path / "h" / "ca.pem")
    assert certs.check_party_folder(tmp_path / "h", 2).hosts == ("helper.internal", "10.0.0.3")
    cert = x509.load_pem_x509_certificate(out.read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30


# --- refusals ---------------------------------------------------------------------------------

def test_tampered_request_is_refused(tmp_path, capsys):
    certs.write_party_request(tmp_path, 1, ["server.example"])
    certs.init_ca(tmp_path / "ca")
    der = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert der.count(b"server.example") == 1
    bad = tmp_path / "tampered.csr"                  # the same structure, another hostname
    bad.write_bytes(der.replace(b"server.example", b"attack.example"))
    with pytest.raises(ValueError, match="invalid signature"):
        certs.check_request(certs.load_request(bad))
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", bad, "--out", tmp_path / "x.pem")
    assert str(bad) in err and "invalid signature" in err
    assert not (tmp_path / "x.pem").exists()
    certs.check_request(certs.load_request(tmp_path / "server.csr"))   # the original is fine


@pytest.mark.parametrize("subject, match", [
    ([_cn(0), _cn(1)], "exactly one party role"),                          # two roles
    ([x509.NameAttribute(NameOID.COMMON_NAME, "secure-inference party 3 (admin)")],
     "exactly one party role"),                                            # unknown role
    ([x509.NameAttribute(NameOID.COMMON_NAME, "server")], "exactly one party role"),
    ([_cn(1), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")], "only subject attribute"),
])
def test_request_must_name_exactly_one_known_role(tmp_path, capsys, subject, match):
    csr = _csr(subject, [x509.DNSName("server.example")])
    with pytest.raises(ValueError, match=match):
        certs.check_request(csr)
    path = tmp_path / "req.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    certs.init_ca(tmp_path / "ca")
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", path)
    assert "exactly one party role" in err and str(path) in err


def test_request_for_an_unexpected_role_is_refused_when_role_is_given(tmp_path, capsys):
    certs.write_party_request(tmp_path, 0, ["laptop.example"])
    certs.init_ca(tmp_path / "ca")
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", "--role", "server",
                     tmp_path / "client.csr")
    assert "asks for a client certificate" in err and "--role server" in err
    assert not (tmp_path / "client.pem").exists() and not (tmp_path / "server.pem").exists()
    assert _cli("sign", "--ca", tmp_path / "ca", "--role", "client", tmp_path / "client.csr") == 0
    # nor may a client certificate be written under the server's file name
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", tmp_path / "client.csr",
                     "--out", tmp_path / "server.pem")
    assert "write it to client.pem" in err


@pytest.mark.parametrize("host", ["bad_host", "-lead.example", "a..b", "*.example.org",
                                  "10.0.0.256", "x" * 64 + ".org", ""])
def test_invalid_hostnames_are_refused(host):
    with pytest.raises(ValueError, match="neither an IP address nor a valid DNS name"):
        certs.check_hostnames(["ok.example", host])
    with pytest.raises(ValueError, match="neither an IP address"):
        certs.check_request(_csr([_cn(1)], [x509.DNSName("ok.example"), x509.DNSName(host)]))


def test_valid_hostnames_are_accepted_and_normalised():
    assert certs.check_hostnames(["LocalHost", "10.0.0.5", "::1", "a-b.example.org",
                                  "localhost"]) == ["localhost", "10.0.0.5", "::1",
                                                    "a-b.example.org"]


def test_request_without_hostnames_or_with_other_names_or_weak_keys_is_refused():
    with pytest.raises(ValueError, match="no hostnames"):
        certs.check_request(_csr([_cn(2)], None))
    with pytest.raises(ValueError, match="other than DNS names"):
        certs.check_request(_csr([_cn(2)], [x509.RFC822Name("a@b.example")]))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="1024-bit RSA"):
        certs.check_request(_csr([_cn(2)], [x509.DNSName("h.example")], key=weak))


def test_nothing_is_overwritten_without_force(tmp_path, capsys):
    host, ca = tmp_path / "host", tmp_path / "ca"
    assert _cli("request", "--role", "helper", "--host", "10.0.0.3", "--out", host) == 0
    key_before = (host / "helper.key").read_bytes()
    err = _cli_error(capsys, "request", "--role", "helper", "--host", "10.0.0.3", "--out", host)
    assert str(host / "helper.key") in err and "--force" in err
    assert (host / "helper.key").read_bytes() == key_before

    assert _cli("init-ca", ca) == 0
    ca_before = (ca / "ca.key").read_bytes()
    err = _cli_error(capsys, "init-ca", ca)
    assert str(ca / "ca.key") in err and "--force" in err
    assert (ca / "ca.key").read_bytes() == ca_before

    out = tmp_path / "helper.pem"
    assert _cli("sign", "--ca", ca, host / "helper.csr", "--out", out) == 0
    cert_before = out.read_bytes()
    err = _cli_error(capsys, "sign", "--ca", ca, host / "helper.csr", "--out", out)
    assert str(out) in err and "--force" in err
    assert out.read_bytes() == cert_before
    assert _cli("sign", "--ca", ca, host / "helper.csr", "--out", out, "--force") == 0
    assert out.read_bytes() != cert_before

    (host / "helper.key").chmod(0o644)        # a replaced key is 0600 even if the old one wasn't
    assert _cli("request", "--role", "helper", "--host", "10.0.0.3", "--out", host,
                "--force") == 0
    assert (host / "helper.key").read_bytes() != key_before
    assert (host / "helper.key").stat().st_mode & 0o777 == 0o600


def test_private_keys_are_written_0600(tmp_path):
    assert _cli("init-ca", tmp_path / "ca") == 0
    assert _cli("request", "--role", "client", "--host", "127.0.0.1", "--out", tmp_path) == 0
    certs.create_certificates(tmp_path / "local", HOSTS)
    keys = [tmp_path / "ca" / "ca.key", tmp_path / "client.key",
            *sorted((tmp_path / "local").glob("*.key"))]
    assert len(keys) == 6
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, key
    for public in [tmp_path / "ca" / "ca.pem", tmp_path / "client.csr"]:
        assert public.stat().st_mode & 0o077 != 0, public   # public files stay readable


def test_check_names_the_file_and_fix_for_a_wrong_ca_or_a_replaced_key(tmp_path, capsys):
    folders = _csr_flow(tmp_path)
    server = folders[1]
    certs.init_ca(tmp_path / "other-ca")
    shutil.copy(tmp_path / "other-ca" / "ca.pem", server / "ca.pem")
    err = _cli_error(capsys, "check", server, "--role", "server")
    assert "was not signed by the CA" in err and str(server / "server.pem") in err
    shutil.copy(tmp_path / "operator" / "ca.pem", server / "ca.pem")
    assert _cli("check", server, "--role", "server") == 0
    certs.write_party_request(server, 1, ["127.0.0.1"], overwrite=True)   # new key, old cert
    err = _cli_error(capsys, "check", server, "--role", "server")
    assert "does not belong to" in err and "server.csr" in err
    err = _cli_error(capsys, "check", server, "--role", "client")
    assert str(server / "client.pem") in err


def test_sign_reports_missing_or_broken_inputs_by_file(tmp_path, capsys):
    certs.write_party_request(tmp_path, 1, ["10.0.0.5"])
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "no-ca", tmp_path / "server.csr")
    assert str(tmp_path / "no-ca" / "ca.key") in err and "init-ca" in err
    certs.init_ca(tmp_path / "ca")
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", tmp_path / "missing.csr")
    assert str(tmp_path / "missing.csr") in err and "request --role" in err
    (tmp_path / "junk.csr").write_text("not a request\n")
    err = _cli_error(capsys, "sign", "--ca", tmp_path / "ca", tmp_path / "junk.csr")
    assert str(tmp_path / "junk.csr") in err and "not a certificate signing request" in err
    err = _cli_error(capsys, "request", "--role", "admin", "--host", "h.example")
    assert "unknown party role 'admin'" in err


# --- help and the one-machine command line ----------------------------------------------------

@pytest.mark.parametrize("command, words", [
    ([], ["request", "init-ca", "sign", "check", "ca.key", "--server-host", "copy"]),
    (["local"], ["ca.key", "impersonate", "--server-host", "copy only"]),
    (["request"], ["Step 1", "ROLE.key", "never leaves", "ROLE.csr", "CA operator", "ca.pem"]),
    (["init-ca"], ["Step 2a", "ca.key", "Secret", "ca.pem", "all three hosts"]),
    (["sign"], ["Step 2b", "--role", "signature", "--force", "never DIR/ca.key", "ROLE.key"]),
    (["check"], ["Step 3", "ca.pem", "ROLE.pem", "ROLE.key"]),
])
def test_help_explains_each_step(capsys, command, words):
    with pytest.raises(SystemExit) as info:
        _cli(*command, "--help")
    assert info.value.code == 0
    text = capsys.readouterr().out
    missing = [w for w in words if w not in text]
    assert not missing, missing


@pytest.mark.processes
def test_one_machine_command_line_of_run_local_still_works(tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "ca.pem").write_text("stale")           # run_local.sh passes --force
    cmd = [PYTHON, str(SCRIPT), str(folder), "--force", "--client-host", "127.0.0.1",
           "--server-host", "127.0.0.2", "--helper-host", "127.0.0.3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for role in PARTY_NAMES:
        certs.check_party_folder(folder, role)
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    again = subprocess.run(cmd[:-6] + ["--server-host", "bad_host"], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "bad_host" in again.stderr
    assert "Traceback" not in again.stderr


def test_one_machine_folder_gives_working_mutual_tls(tmp_path):
    assert _cli(tmp_path, "--client-host", "127.0.0.1", "--server-host", "127.0.0.1",
                "--helper-host", "127.0.0.1") == 0
    info, errs = _mutual_tls_three_parties(lambda r: TLSConfig.from_dir(tmp_path, r))
    assert not errs, errs
    assert {v for v, _ in info.values()} == {"TLSv1.3"} and len(info) == 6
