"""A throwaway PKI made with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1 and a client certificate, each valid for a day."""

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
LEAF_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
SERVER_EXTENSIONS = LEAF_EXTENSIONS + (
    "extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n"
)
CLIENT_EXTENSIONS = LEAF_EXTENSIONS + "extendedKeyUsage = clientAuth\n"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts the CA and shows the client certificate."""
        context = ssl.create_default_context(cafile=self.ca)
        context.load_cert_chain(self.client_cert, self.client_key)
        return context


def openssl(directory: Path, *args: str | Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=30,
    )


def issue(
    directory: Path, name: str, extensions: str, serial: int, ca: Path | None = None
) -> tuple[Path, Path]:
    """A key and a one-day certificate for ``name``, signed by ``ca`` or itself."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    openssl(
        directory,
        "req",
        "-new",
        *EC_KEY,
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={name}",
    )
    signer = (
        ["-signkey", key]
        if ca is None
        else ["-CA", ca, "-CAkey", ca.with_suffix(".key")]
    )
    openssl(
        directory,
        "x509",
        "-req",
        "-in",
        csr,
        *signer,
        "-set_serial",
        str(serial),
        "-days",
        "1",
        "-extfile",
        ext_file,
        "-out",
        cert,
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    ca, _ = issue(directory, "fanout-test-ca", CA_EXTENSIONS, 1)
    server_cert, server_key = issue(directory, "127.0.0.1", SERVER_EXTENSIONS, 2, ca)
    client_cert, client_key = issue(directory, "fanout", CLIENT_EXTENSIONS, 3, ca)
    return Pki(ca, server_cert, server_key, client_cert, client_key)
