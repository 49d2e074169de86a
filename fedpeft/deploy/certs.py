"""Certificates and keys for a deployment: a private CA, the SuperLink's TLS certificate and one
SuperNode authentication key pair per device.

    DIR/ca.crt          CA certificate: every device and the coordinator trust it (public)
    DIR/ca.key          CA private key: keep it offline; only needed to issue more certificates
    DIR/server.crt      SuperLink TLS certificate, subject alternative names from ``--san``
    DIR/server.key      its private key (coordinator only)
    DIR/node-N.key      SuperNode N's authentication key (device N only), OpenSSH format
    DIR/node-N.pub      its public key (coordinator: registered with the SuperLink)

A device's key pair belongs on the device: ``make_device_key`` (``fedpeft keygen`` on the device)
writes ``device.key`` there and only ``device.pub`` travels to the coordinator, which registers it
(``fedpeft server --node-keys``). ``make_certs`` can still make ``node-N`` pairs as a convenience
for tests and single-owner setups, but then every device's private key was on the coordinator.

Keys are ECDSA P-384 (what Flower's SuperNode authentication expects, in OpenSSH format); private
keys are created 0600 with O_EXCL, so nothing is ever overwritten unless ``force`` is given.
127.0.0.1 and localhost are always in the certificate: the coordinator's own tools (``flwr``, the
fleet gateway) reach the SuperLink over loopback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_SANS = ("127.0.0.1", "localhost")
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
MAX_DAYS = 3650  # ten years for the server certificate; the CA lives CA_LIFETIMES times as long
CA_LIFETIMES = 5  # (50 years: far inside x509's year-9999 limit and Python's datetime range)


class CertsError(ValueError):
    """A user error: bad SAN, existing files without --force, unreadable key."""


@dataclass(frozen=True)
class CertPaths:
    """Where ``make_certs`` writes (or wrote) each file."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, index: int) -> Path:
        return self.root / f"node-{index}.key"

    def node_pub(self, index: int) -> Path:
        return self.root / f"node-{index}.pub"

    def node_pubs(self) -> list[Path]:
        """Every ``node-N.pub`` in the folder, in N order."""
        found = [p for p in self.root.glob("node-*.pub") if p.stem[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.stem[5:]))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def parse_sans(values: Iterable[str]) -> list[x509.GeneralName]:
    """IP addresses and DNS names for the certificate; loopback always included, no repeats."""
    names: list[x509.GeneralName] = []
    for raw in [*LOOPBACK_SANS, *values]:
        value = raw.strip()
        if not value:
            continue
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            if any(c in value for c in " /:@") or value.startswith(("-", ".")):
                raise CertsError(f"--san {raw!r} is neither an IP address nor a DNS name") \
                    from None
            entry = x509.DNSName(value.lower())
        if entry not in names:
            names.append(entry)
    return names


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpeft CA")).issuer_name(_name("fedpeft CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     sans: Sequence[x509.GeneralName],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    start, end = _validity(days)
    first = sans[0].value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedpeft SuperLink {first}")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_agreement=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def node_key_pair() -> tuple[bytes, bytes]:
    """(private, public) OpenSSH-encoded ECDSA P-384 pair for SuperNode authentication."""
    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, mode: int, force: bool = False) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions); refuse
    to replace an existing file unless ``force``."""
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have removed bits from a public file


def make_certs(root: Path, sans: Sequence[str], nodes: int = 2, *, days: int = 365,
               force: bool = False) -> CertPaths:
    """Write a CA, a SuperLink certificate and ``nodes`` key pairs into ``root``."""
    if nodes < 0:
        raise CertsError(f"--nodes {nodes}: expected 0 or more")
    if not 1 <= days <= MAX_DAYS:
        raise CertsError(f"--days {days}: expected 1 to {MAX_DAYS} (ten years); the CA is valid "
                         f"{CA_LIFETIMES} times as long")
    names = parse_sans(sans)
    paths = CertPaths(Path(root))
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    for i in range(1, nodes + 1):
        targets += [paths.node_key(i), paths.node_pub(i)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise CertsError(f"{', '.join(str(p) for p in existing)} already exist; use --force to "
                         "replace them (devices then need the new ca.crt and keys)")
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, stat.S_IRWXU)
    ca_key, ca_cert = make_ca(days * CA_LIFETIMES)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, names, days)
    write_file(paths.ca_key, _pem_key(ca_key), PRIVATE_MODE, force)
    write_file(paths.ca_cert, _pem_cert(ca_cert), PUBLIC_MODE, force)
    write_file(paths.server_key, _pem_key(server_key), PRIVATE_MODE, force)
    write_file(paths.server_cert, _pem_cert(server_cert), PUBLIC_MODE, force)
    for i in range(1, nodes + 1):
        private, public = node_key_pair()
        write_file(paths.node_key(i), private, PRIVATE_MODE, force)
        write_file(paths.node_pub(i), public, PUBLIC_MODE, force)
    return paths


def make_device_key(root: Path, name: str = "device", *, force: bool = False) -> tuple[Path, Path]:
    """On the device: a SuperNode key pair ``root/NAME.key`` (0600, never leaves the device) and
    ``root/NAME.pub`` (hand it to the coordinator); ``root`` is created 0700 when new."""
    if not name or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise CertsError(f"--name {name!r}: use letters, digits, '-', '_' and '.'")
    root = Path(root)
    key, pub = root / f"{name}.key", root / f"{name}.pub"
    existing = [p for p in (key, pub) if p.exists()]
    if existing and not force:
        raise CertsError(f"{', '.join(map(str, existing))} already exist; use --force to replace "
                         "them (the coordinator then needs the new .pub)")
    if not root.exists():
        root.mkdir(parents=True, mode=stat.S_IRWXU)
    private, public = node_key_pair()
    write_file(key, private, PRIVATE_MODE, force)
    write_file(pub, public, PUBLIC_MODE, force)
    return key, pub


def certificate_sans(path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as text (for messages)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def check_private_key_file(path: Path) -> None:
    """A readable OpenSSH EC private key that only its owner can read."""
    if not path.is_file():
        raise CertsError(f"{path} does not exist")
    if path.stat().st_mode & 0o077:
        raise CertsError(f"{path} is readable by other users (mode "
                         f"{stat.S_IMODE(path.stat().st_mode):o}); run: chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise CertsError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{path}: SuperNode authentication needs an ECDSA key "
                         "(make one with `fedpeft keygen`)")


def check_public_key_file(path: Path) -> None:
    """An OpenSSH EC public key (what ``flwr supernode register`` accepts)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertsError(f"{path} is not an OpenSSH public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertsError(f"{path}: SuperNode authentication needs an ECDSA key")
