"""A private CA and one certificate per party for mutually authenticated TLS 1.3 links.

:func:`create_certificates` writes into one folder:

* ``ca.pem`` (the CA certificate: copy to all three hosts) and ``ca.key`` (the CA's private
  key: keep it off the party hosts, or delete it once the certificates exist);
* ``client.pem``/``client.key``, ``server.pem``/``server.key``, ``helper.pem``/``helper.key``:
  each party's certificate and private key (copy only that party's pair to its host).

Each party certificate carries the party's common name (:func:`transport.party_common_name`,
checked against the role a peer claims), its hostnames/IP addresses as subjectAltNames (checked
by the dialling side), and both TLS client and server usages, since a party dials some peers
and accepts others. Keys are ECDSA P-256; private keys are written with mode 0600.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Iterable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .transport import PARTY_NAMES, party_common_name


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    if not names:
        raise ValueError("each party certificate needs at least one hostname or IP address")
    return x509.SubjectAlternativeName(names)


def create_ca(common_name: str = "secure-inference session CA", days: int = 365):
    """A fresh self-signed CA: returns (private key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
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


def create_party_certificate(ca_key, ca_cert, role: int, hosts: Iterable[str], days: int = 365):
    """A certificate for party ``role`` signed by the CA: returns (private key, certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        party_common_name(role))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def create_certificates(folder: str | os.PathLike, hosts: Mapping[int, Iterable[str]],
                        days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write a new CA and the three party certificates into ``folder``; returns the file paths.

    ``hosts[role]`` lists the hostnames/IP addresses peers use to reach that party.
    Refuses to overwrite existing files unless ``overwrite``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["ca"] + [PARTY_NAMES[r] for r in sorted(PARTY_NAMES)]
    paths = {f"{n}.{ext}": folder / f"{n}.{'pem' if ext == 'pem' else 'key'}"
             for n in names for ext in ("pem", "key")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"certificate files already exist: {existing}; pass overwrite=True "
                              "(--force) to replace them")
    missing = [r for r in PARTY_NAMES if r not in hosts]
    if missing:
        raise ValueError(f"no hostnames given for parties {missing}")
    ca_key, ca_cert = create_ca(days=days)
    _write_key(folder / "ca.key", ca_key)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role, name in PARTY_NAMES.items():
        key, cert = create_party_certificate(ca_key, ca_cert, role, hosts[role], days)
        _write_key(folder / f"{name}.key", key)
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths
