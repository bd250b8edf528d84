"""A private CA and one certificate per party for mutually authenticated TLS 1.3 links.

Two ways to get the files that :meth:`transport.tls.TLSConfig.from_dir` loads (``ca.pem``,
``<role>.pem`` and ``<role>.key`` in each party's folder):

**Certificate requests (multi-host; recommended).** No private key ever leaves the machine it
was made on:

1. each party host runs :func:`write_party_request`: its private key ``<role>.key`` (mode 0600,
   stays there) and a certificate signing request ``<role>.csr`` naming its role and hostnames;
2. the CA operator runs :func:`init_ca` once (``ca.key``, mode 0600, stays with the operator;
   ``ca.pem``, public) and :func:`sign_request_file` for each ``.csr`` it receives; the signer
   checks the request's signature, that it names exactly one party role, that its hostnames are
   valid DNS names or IP addresses, and builds the certificate itself;
3. each host puts the returned ``<role>.pem`` and ``ca.pem`` next to its ``<role>.key``;
   :func:`check_party_folder` confirms that the three fit together.

**One machine (tests, ``run_local.sh``).** :func:`create_certificates` writes a CA and all three
parties' keys and certificates into one folder. Whoever runs it holds every key and can
impersonate any party, so use it only where one person runs all three parties anyway.

Each party certificate carries the party's common name (:func:`transport.tls.party_common_name`,
checked against the role a peer claims), its hostnames/IP addresses as subjectAltNames (checked
by the dialling side), and both TLS client and server usages, since a party dials some peers
and accepts others. Both modes issue certificates with the same function, so the two are
identical in validity, key usage and extensions. Keys are ECDSA P-256.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .session import PARTY_NAMES
from .transport.tls import party_common_name

ROLE_BY_NAME: dict[str, int] = {name: role for role, name in PARTY_NAMES.items()}
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)


# --- small helpers ---------------------------------------------------------------------------

def parse_role(value: str | int) -> int:
    """A party role from ``client``/``server``/``helper`` or ``0``/``1``/``2``."""
    text = str(value).strip().lower()
    if text in ROLE_BY_NAME:
        return ROLE_BY_NAME[text]
    if text.isdigit() and int(text) in PARTY_NAMES:
        return int(text)
    raise ValueError(f"unknown party role {value!r}: use one of "
                     f"{', '.join(PARTY_NAMES.values())} (or 0, 1, 2)")


def check_hostnames(hosts: Iterable[str]) -> list[str]:
    """Validated, de-duplicated hostnames: each an IP address or a valid DNS name.

    DNS names are letters, digits and hyphens in dot-separated labels of 1-63 characters (no
    leading/trailing hyphen, at most 253 characters, no wildcards) whose last label is not all
    digits, so a mistyped IP address such as ``10.0.0.256`` is refused rather than taken as a name.
    """
    out: list[str] = []
    for raw in hosts:
        h = str(raw).strip()
        try:
            h = str(ipaddress.ip_address(h))
        except ValueError:
            labels = h.split(".")
            if (not h or len(h) > 253 or not all(_LABEL.match(lab) for lab in labels)
                    or labels[-1].isdigit()):
                raise ValueError(f"{raw!r} is neither an IP address nor a valid DNS name (letters, "
                                 "digits, hyphens and dots, e.g. server.example.org or 10.0.0.5)"
                                 ) from None
            h = h.lower()
        if h not in out:
            out.append(h)
    if not out:
        raise ValueError("each party certificate needs at least one hostname or IP address "
                         "(the name the other parties use to reach it)")
    return out


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in check_hostnames(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _pem(obj: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _check_free(paths: Iterable[Path], overwrite: bool, what: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        one = len(existing) == 1
        raise FileExistsError(f"{', '.join(existing)} already exist{'s' if one else ''} ({what}); "
                              f"replace {'it' if one else 'them'} with --force (from Python: "
                              f"overwrite=True) "
                              f"or choose another path")


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file created with ``mode`` (an existing file is replaced, so a
    replaced key never keeps the old file's looser permissions)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write_file(path, data, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- issuing (shared by both modes) ----------------------------------------------------------

def create_ca(common_name: str = "secure-inference session CA", days: int = 365
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh self-signed CA: returns (private key, certificate)."""
    if days < 1:
        raise ValueError(f"validity must be at least one day, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _issue(ca_key: PrivateKeyTypes, ca_cert: x509.Certificate, role: int, public_key,
           hosts: Iterable[str], days: int) -> x509.Certificate:
    """The party certificate both modes issue: subject, SANs, validity and usages set here only."""
    if days < 1:
        raise ValueError(f"validity must be at least one day, got {days}")
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        party_common_name(role))]))
            .issuer_name(ca_cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))


def create_party_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                             role: int, hosts: Iterable[str], days: int = 365
                             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and a certificate for party ``role`` signed by the CA: (private key, cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _issue(ca_key, ca_cert, role, key.public_key(), hosts, days)


# --- one machine: every key in one folder ----------------------------------------------------

def create_certificates(folder: str | os.PathLike, hosts: Mapping[int, Iterable[str]],
                        days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write a new CA and the three party certificates into ``folder``; returns the file paths.

    For tests and one-machine runs only: the caller ends up with every private key.
    ``hosts[role]`` lists the hostnames/IP addresses peers use to reach that party.
    Refuses to overwrite existing files unless ``overwrite``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["ca"] + [PARTY_NAMES[r] for r in sorted(PARTY_NAMES)]
    paths = {f"{n}.{ext}": folder / f"{n}.{'pem' if ext == 'pem' else 'key'}"
             for n in names for ext in ("pem", "key")}
    _check_free(paths.values(), overwrite, "certificate files")
    missing = [r for r in PARTY_NAMES if r not in hosts]
    if missing:
        raise ValueError(f"no hostnames given for parties {missing}")
    checked = {r: check_hostnames(hosts[r]) for r in PARTY_NAMES}
    ca_key, ca_cert = create_ca(days=days)
    _write_key(folder / "ca.key", ca_key)
    _write_file(folder / "ca.pem", _pem(ca_cert), 0o644)
    for role, name in PARTY_NAMES.items():
        key, cert = create_party_certificate(ca_key, ca_cert, role, checked[role], days)
        _write_key(folder / f"{name}.key", key)
        _write_file(folder / f"{name}.pem", _pem(cert), 0o644)
    return paths


# --- certificate requests: each host keeps its key ------------------------------------------

def create_party_request(role: int, hosts: Iterable[str]
                         ) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    """A fresh key and a signed CSR for party ``role`` and its hostnames: (private key, CSR)."""
    if role not in PARTY_NAMES:
        raise ValueError(f"unknown party role {role!r}: use 0 (client), 1 (server) or 2 (helper)")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                       party_common_name(role))]))
           .add_extension(_san(hosts), critical=False)
           .sign(key, hashes.SHA256()))
    return key, csr


def write_party_request(folder: str | os.PathLike, role: int, hosts: Iterable[str],
                        overwrite: bool = False) -> dict[str, Path]:
    """On a party's host: write ``<role>.key`` (mode 0600, never copy it) and ``<role>.csr``.

    Returns ``{"key": path, "csr": path}``. Refuses to replace an existing key or request unless
    ``overwrite`` (a replaced key invalidates any certificate already issued for the old one).
    """
    folder = Path(folder)
    name = PARTY_NAMES.get(role)
    if name is None:
        raise ValueError(f"unknown party role {role!r}: use 0 (client), 1 (server) or 2 (helper)")
    paths = {"key": folder / f"{name}.key", "csr": folder / f"{name}.csr"}
    _check_free(paths.values(), overwrite, f"the {name}'s key and request")
    key, csr = create_party_request(role, hosts)
    folder.mkdir(parents=True, exist_ok=True)
    _write_key(paths["key"], key)
    _write_file(paths["csr"], _pem(csr), 0o644)
    return paths


def init_ca(folder: str | os.PathLike, days: int = 3650, overwrite: bool = False,
            common_name: str = "secure-inference CA") -> dict[str, Path]:
    """For the CA operator: write ``ca.key`` (mode 0600, keep it secret) and ``ca.pem`` (public).

    Returns ``{"key": path, "cert": path}``; refuses to replace an existing CA unless
    ``overwrite`` (a new CA invalidates every certificate the old one signed).
    """
    folder = Path(folder)
    paths = {"key": folder / "ca.key", "cert": folder / "ca.pem"}
    _check_free(paths.values(), overwrite, "CA files")
    key, cert = create_ca(common_name=common_name, days=days)
    folder.mkdir(parents=True, exist_ok=True)
    _write_key(paths["key"], key)
    _write_file(paths["cert"], _pem(cert), 0o644)
    return paths


def _read(path: Path, what: str, fix: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found; {fix}")
    return path.read_bytes()


def load_ca(folder: str | os.PathLike) -> tuple[PrivateKeyTypes, x509.Certificate]:
    """The CA's (private key, certificate) from ``folder`` (``ca.key``, ``ca.pem``), checked:
    the key belongs to the certificate, which is a CA certificate and has not expired."""
    folder = Path(folder)
    fix = "make a CA with `make_certificates.py init-ca DIR` and pass --ca DIR"
    key_path, cert_path = folder / "ca.key", folder / "ca.pem"
    key_bytes = _read(key_path, "CA private key", fix)
    cert_bytes = _read(cert_path, "CA certificate", fix)
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_bytes)
    except ValueError as exc:
        raise ValueError(f"{cert_path} is not a PEM certificate ({exc})") from None
    if key.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo) != \
            cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{key_path} does not belong to {cert_path}; use the pair that "
                         "`make_certificates.py init-ca` wrote together")
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise ValueError(f"{cert_path} is not a CA certificate; make one with "
                         "`make_certificates.py init-ca DIR`")
    if cert.not_valid_after_utc <= _now():
        raise ValueError(f"the CA certificate {cert_path} expired on "
                         f"{cert.not_valid_after_utc:%Y-%m-%d}; "
                         "make a new CA (init-ca) and sign every party's request again")
    return key, cert


def load_request(path: str | os.PathLike) -> x509.CertificateSigningRequest:
    """A PEM (or DER) certificate signing request from ``path``."""
    path = Path(path)
    data = _read(path, "certificate request", "create it on the party's host with "
                 "`make_certificates.py request --role ROLE --host HOST --out DIR`")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a certificate signing request ({exc}); pass the .csr "
                         "file written by `make_certificates.py request`") from None


@dataclass(frozen=True)
class RequestInfo:
    """What a checked certificate request asks for."""

    role: int
    hosts: tuple[str, ...]

    @property
    def name(self) -> str:
        """The role's name (client/server/helper)."""
        return PARTY_NAMES[self.role]


def check_request(csr: x509.CertificateSigningRequest, expected_role: int | None = None,
                  source: str = "the request") -> RequestInfo:
    """Check a CSR before signing it and return the role and hostnames it asks for.

    Refused (``ValueError``): a signature that does not verify (the request was altered or not
    made with the key it carries), a subject other than exactly one party common name
    (:func:`transport.tls.party_common_name`, the name the runtime checks), a role other than
    ``expected_role`` when given, a missing subjectAltName or one with entries other than valid
    DNS names and IP addresses, and keys other than EC P-256/P-384 or RSA of 2048+ bits.
    Other requested extensions are ignored: the signer sets its own.
    """
    if not csr.is_signature_valid:
        raise ValueError(f"{source} has an invalid signature: it was altered after it was made or "
                         "was not made with the key it carries; ask the party to run "
                         "`make_certificates.py request` again and send the new .csr")
    attrs = list(csr.subject)
    cns = [a.value for a in attrs if a.oid == NameOID.COMMON_NAME]
    roles = [r for r in PARTY_NAMES for cn in cns if cn == party_common_name(r)]
    if len(attrs) != 1 or len(cns) != 1 or len(roles) != 1:
        expected = "; ".join(f"'{party_common_name(r)}'" for r in PARTY_NAMES)
        raise ValueError(f"{source} must name exactly one party role as its only subject "
                         f"attribute (common name one of {expected}); it has subject "
                         f"{csr.subject.rfc4514_string()!r}. Make requests with "
                         "`make_certificates.py request --role ROLE`")
    role = roles[0]
    if expected_role is not None and role != expected_role:
        raise ValueError(f"{source} asks for a {PARTY_NAMES[role]} certificate, but --role "
                         f"{PARTY_NAMES[expected_role]} was expected; check which host sent it")
    pub = csr.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if not isinstance(pub.curve, _ACCEPTED_CURVES):
            raise ValueError(f"{source} has an EC key on {pub.curve.name}; use P-256 or P-384")
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise ValueError(f"{source} has a {pub.key_size}-bit RSA key; use 2048 bits or more")
    else:
        raise ValueError(f"{source} has a {type(pub).__name__}; use an EC P-256 key "
                         "(`make_certificates.py request` makes one)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"{source} names no hostnames (no subjectAltName); make it with "
                         "`make_certificates.py request --host HOST`") from None
    allowed = [n for n in san if isinstance(n, (x509.DNSName, x509.IPAddress))]
    if len(allowed) != len(list(san)):
        others = [str(n) for n in san if not isinstance(n, (x509.DNSName, x509.IPAddress))]
        raise ValueError(f"{source} asks for subjectAltNames other than DNS names and IP "
                         f"addresses: {others}")
    try:
        hosts = check_hostnames(str(n.value) for n in allowed)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return RequestInfo(role, tuple(hosts))


def sign_request(ca_key: PrivateKeyTypes, ca_cert: x509.Certificate,
                 csr: x509.CertificateSigningRequest, expected_role: int | None = None,
                 days: int = 365, source: str = "the request"
                 ) -> tuple[x509.Certificate, RequestInfo]:
    """Check ``csr`` (:func:`check_request`) and issue its certificate exactly as the
    one-machine mode does; returns (certificate, what was asked for)."""
    info = check_request(csr, expected_role, source)
    return _issue(ca_key, ca_cert, info.role, csr.public_key(), info.hosts, days), info


def sign_request_file(ca_folder: str | os.PathLike, csr_path: str | os.PathLike,
                      out: str | os.PathLike | None = None, expected_role: int | None = None,
                      days: int = 365, overwrite: bool = False) -> tuple[Path, RequestInfo]:
    """For the CA operator: sign the request in ``csr_path`` with the CA in ``ca_folder``.

    ``out`` is the certificate file (default: ``<role>.pem`` next to the request; an existing
    folder means ``<folder>/<role>.pem``). Refuses to replace an existing file unless
    ``overwrite``, and to write one role's certificate under another role's file name.
    Returns (certificate path, what was signed).
    """
    ca_key, ca_cert = load_ca(ca_folder)
    csr_path = Path(csr_path)
    csr = load_request(csr_path)
    info = check_request(csr, expected_role, source=str(csr_path))
    if out is None:
        out_path = csr_path.parent / f"{info.name}.pem"
    else:
        out_path = Path(out)
        if out_path.is_dir():
            out_path = out_path / f"{info.name}.pem"
    if out_path.stem in ROLE_BY_NAME and out_path.stem != info.name:
        raise ValueError(f"{csr_path} is the {info.name}'s request, but the output {out_path} "
                         f"is named for the {out_path.stem}; write it to {info.name}.pem")
    if out_path.resolve() == (Path(ca_folder) / "ca.pem").resolve():
        raise ValueError("refusing to write a party certificate over the CA certificate "
                         f"{out_path}")
    _check_free([out_path], overwrite, "the certificate")
    cert, _ = sign_request(ca_key, ca_cert, csr, expected_role, days, source=str(csr_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(out_path, _pem(cert), 0o644)
    return out_path, info


# --- checking a party's folder ---------------------------------------------------------------

def check_party_folder(folder: str | os.PathLike, role: int) -> RequestInfo:
    """Check that ``folder`` holds what :meth:`TLSConfig.from_dir` needs for ``role`` and that
    it fits together: ``<role>.pem`` is signed by ``ca.pem``, names this role, is valid now and
    belongs to ``<role>.key``, which only its owner can read. Returns the role and hostnames."""
    folder = Path(folder)
    name = PARTY_NAMES.get(role)
    if name is None:
        raise ValueError(f"unknown party role {role!r}: use 0 (client), 1 (server) or 2 (helper)")
    ca_path, cert_path, key_path = folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key"
    ca_bytes = _read(ca_path, "CA certificate", "copy ca.pem from the CA operator into this folder")
    cert_bytes = _read(cert_path, f"{name} certificate",
                       f"have the CA operator sign {name}.csr and copy the result here")
    key_bytes = _read(key_path, f"{name} private key",
                      f"run `make_certificates.py request --role {name}` in this folder on this "
                      "host (the key is made here and never copied)")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_bytes)
        cert = x509.load_pem_x509_certificate(cert_bytes)
    except ValueError as exc:
        raise ValueError(f"{ca_path} or {cert_path} is not a PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_path} is not an unencrypted PEM private key ({exc})") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ValueError(f"{cert_path} was not signed by the CA in {ca_path}; get both from the "
                         "same CA operator (ca.pem of the CA that signed your request)") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise ValueError(f"{cert_path} does not belong to {key_path} (it was issued for another "
                         "key, perhaps for a request made before the key was replaced); send the "
                         f"current {name}.csr to the CA operator again")
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [party_common_name(role)]:
        raise ValueError(f"{cert_path} is not a {name} certificate (common name {cns})")
    now = _now()
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ValueError(f"{cert_path} is not valid now (valid "
                         f"{cert.not_valid_before_utc:%Y-%m-%d} "
                         f"to {cert.not_valid_after_utc:%Y-%m-%d}); request a new certificate")
    if os.name == "posix" and key_path.stat().st_mode & 0o077:
        raise PermissionError(f"{key_path} can be read by other users; run `chmod 600 {key_path}`")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return RequestInfo(role, tuple(str(n.value) for n in san))
