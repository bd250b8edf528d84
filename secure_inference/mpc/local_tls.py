"""TLS material for the local process harness: a throw-away CA and party certificates made in
memory, and each party's files in anonymous memory (never on disk)."""
from __future__ import annotations

import os
import tempfile
from typing import Callable

from cryptography.hazmat.primitives import serialization

from .session import ROLES
from .transport.tls import TLSConfig

__all__ = ["memory_tls", "throwaway_certificates"]


def memory_tls(material: tuple[bytes, bytes, bytes]) -> tuple[TLSConfig, Callable[[], None]]:
    """TLS files for this process only: CA certificate, certificate and key in anonymous
    memory files (Linux memfd; gone when the process ends, even if it is killed). Elsewhere
    a 0700 temporary folder, deleted by the returned cleanup once the links are up."""
    names = ("ca.pem", "party.pem", "party.key")
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        for name, data in zip(names, material):
            fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
            os.write(fd, data)
            fds.append(fd)
        paths = [f"/proc/self/fd/{fd}" for fd in fds]

        def cleanup() -> None:
            for fd in fds:
                os.close(fd)
    else:  # pragma: no cover - non-Linux
        import shutil
        folder = tempfile.mkdtemp(prefix="si-party-tls-")
        paths = [os.path.join(folder, n) for n in names]
        for path, data in zip(paths, material):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        def cleanup() -> None:
            shutil.rmtree(folder, ignore_errors=True)
    from pathlib import Path
    return TLSConfig(Path(paths[0]), Path(paths[1]), Path(paths[2])), cleanup


def throwaway_certificates(host: str) -> dict[int, tuple[bytes, bytes, bytes]]:
    """A fresh CA and one certificate per party, in memory only: per role (CA certificate,
    certificate, key) as PEM bytes. The CA key is never written anywhere and is dropped here."""
    from .certs import create_ca, create_party_certificate
    ca_key, ca_cert = create_ca()
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    out = {}
    for r in ROLES:
        key, cert = create_party_certificate(ca_key, ca_cert, r, ["localhost", host])
        out[r] = (ca_pem, cert.public_bytes(serialization.Encoding.PEM),
                  key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return out
