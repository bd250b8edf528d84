"""TLS identity of a party: where its material lives, the TLS 1.3 contexts, and the
certificate common names that bind a certificate to one role (see
:mod:`secure_inference.mpc.certs` for making them)."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProtocolError
from ..session import PARTY_NAMES

__all__ = ["TLSConfig", "party_common_name", "peer_role_from_cert", "check_own_certificate"]


def party_common_name(role: int) -> str:
    """The certificate common name that identifies party ``role``."""
    return f"secure-inference party {role} ({PARTY_NAMES[role]})"


def _tls_advice(cfg: "TLSConfig", name: str, folder: Path) -> str:
    """What to do about missing TLS files: only the CA certificate, only this party's, or all."""
    own = [p for p in (cfg.cert_file, cfg.key_file) if not p.exists()]
    if not own:
        return (f"copy the CA certificate ca.pem (public; from whoever runs the CA, or the "
                f"folder si-certificates init-ca wrote) into {folder}")
    if cfg.ca_file.exists() and cfg.cert_file.exists():
        return (f"{name}.key is this host's private key: it is created next to the request "
                f"by si-certificates request --role {name} and never leaves the host")
    return (f"on this host run si-certificates request --role {name} --host ADDRESS --out "
            f"{folder} and have the CA sign the request (or, all parties on one machine: "
            f"si-certificates local {folder}); see si-certificates --help")


@dataclass
class TLSConfig:
    """Where one party finds its TLS material (see :mod:`secure_inference.mpc.certs`)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_dir(cls, folder: str | Path, role: int) -> "TLSConfig":
        """``ca.pem``, ``<name>.pem`` and ``<name>.key`` from a folder made by make_certificates."""
        folder = Path(folder)
        name = PARTY_NAMES[role]
        cfg = cls(folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key")
        missing = [str(p) for p in (cfg.ca_file, cfg.cert_file, cfg.key_file) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"TLS files missing for party {role}: {missing}; "
                                    + _tls_advice(cfg, name, folder))
        return cfg

    def context(self, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that presents this party's certificate and requires the peer's."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not server_side:
            ctx.check_hostname = True
        return ctx


def peer_role_from_cert(sock: ssl.SSLSocket) -> int:
    """The role whose common name the peer's (verified) certificate carries."""
    cert = sock.getpeercert()
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    for role in PARTY_NAMES:
        if party_common_name(role) in names:
            return role
    raise ProtocolError(f"peer certificate names none of the three parties (subject {names})")



def check_own_certificate(me: int, tls: TLSConfig) -> None:
    """Refuse, before dialling, a certificate of this party that names another party (the
    peers would drop every connection this party makes, each with only a log line)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        cert = x509.load_pem_x509_certificate(Path(tls.cert_file).read_bytes())
    except (OSError, ValueError):
        return  # unreadable: loading the TLS context reports it
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if party_common_name(me) in names:
        return
    owner = [r for r in PARTY_NAMES if party_common_name(r) in names]
    whose = f"party {owner[0]} ({PARTY_NAMES[owner[0]]})" if owner else f"no party ({names})"
    raise ProtocolError(f"party {me}: this party's own certificate belongs to another party: "
                        f"{tls.cert_file} names {whose}, not party {me} "
                        f"({PARTY_NAMES[me]}); use {PARTY_NAMES[me]}.pem/.key from "
                        "make_certificates.py")
