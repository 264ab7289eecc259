"""``fedmaml certs DIR``: development certificates and SuperNode keys for a TLS deployment.

Writes into DIR (nothing is overwritten without ``--force``):

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (give ``ca.crt`` to every
  SuperNode with ``--root-certificates`` and to ``flwr`` as the connection's
  ``root-certificates``);
* ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by that CA, valid for
  the ``--host`` names and addresses (default 127.0.0.1 and localhost);
* ``node-<i>`` / ``node-<i>.pub``: ECDSA (NIST P-384) key pairs in OpenSSH format, one per
  SuperNode: register each ``.pub`` with ``flwr supernode register`` and give the private key to
  its SuperNode (``fedmaml client --auth-key``).

For development and testing only: a production federation uses certificates from its own CA
and keys generated on each device (``ssh-keygen -t ecdsa -b 384 -N "" -f node``).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmaml.errors import FedmamlError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class DevCerts:
    """Where :func:`make_dev_certs` wrote everything."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    def public_key(self, i: int) -> Path:
        return self.node_keys[i].with_name(self.node_keys[i].name + ".pub")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "certs",
        help="make development TLS certificates and SuperNode keys",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", type=Path, help="folder to write the files into")
    p.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default 3)")
    p.add_argument(
        "--host",
        dest="hosts",
        action="append",
        help="a name or IP address the SuperLink is reached at (repeatable; default "
        "127.0.0.1 and localhost)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    certs = make_dev_certs(
        args.directory,
        nodes=args.nodes,
        hosts=args.hosts or DEFAULT_HOSTS,
        days=args.days,
        force=args.force,
    )
    print(f"CA certificate      {certs.ca_cert}  (SuperNodes: --root-certificates)")
    print(f"SuperLink cert/key  {certs.server_cert}  {certs.server_key}")
    for i, key in enumerate(certs.node_keys):
        print(f"SuperNode key {i:<5} {key}  (register {certs.public_key(i)})")
    return 0


def make_dev_certs(
    directory: str | os.PathLike[str],
    *,
    nodes: int = 3,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = 365,
    force: bool = False,
) -> DevCerts:
    """A CA, a SuperLink certificate for ``hosts`` signed by it, and ``nodes`` SuperNode keys."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from fedmaml.atomic import atomic_write
    from fedmaml.federated.flower_cli import check_host

    if nodes < 0 or days < 1 or not hosts:
        raise FedmamlError("give --nodes >= 0, --days >= 1 and at least one --host")
    for host in hosts:
        check_host(host)
    out = Path(directory)
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"node-{i}{ext}" for i in range(nodes) for ext in ("", ".pub")]
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise FedmamlError(
            f"{out} already holds {', '.join(existing)}; choose another folder or pass --force "
            "to replace them"
        )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def certificate(subject, key, issuer, signer, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def pem_key(key: ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = certificate(name("fedmaml dev CA"), ca_key, name("fedmaml dev CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate(
        name("fedmaml SuperLink"), server_key, ca_cert.subject, ca_key, ca=False
    )
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key, serialization.PrivateFormat.PKCS8),
        "server.crt": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": pem_key(server_key, serialization.PrivateFormat.PKCS8),
    }
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        files[f"node-{i}"] = pem_key(key, serialization.PrivateFormat.OpenSSH)
        files[f"node-{i}.pub"] = (
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" fedmaml-node-{i}\n".encode()
        )
    for file, data in files.items():
        private = not file.endswith((".crt", ".pub"))
        atomic_write(out / file, lambda f, data=data: f.write(data), mode="wb", private=private)
    return DevCerts(
        out / "ca.crt",
        out / "ca.key",
        out / "server.crt",
        out / "server.key",
        tuple(out / f"node-{i}" for i in range(nodes)),
    )
