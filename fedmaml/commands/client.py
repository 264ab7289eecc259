"""``fedmaml client``: serve fedmaml's ClientApp on this device's own data (a Flower SuperNode).

Checks the data file first (readable, the named columns, finite values), then runs
``flower-supernode`` in the foreground with the data's path and format in its node config, until
it stops or you press Ctrl-C. The federation's runs must use task = 'local' with the data's
input-shape and num-classes; each message is then answered with this device's data only.

Security: TLS is on by default (the SuperLink's certificate is checked against the system's
CAs, or the CA of --root-certificates); --auth-key authenticates this SuperNode with its
registered ECDSA key. --insecure (no TLS) is for local testing only.

Examples:
  fedmaml client --superlink 127.0.0.1:9092 --data data.csv --label-column y --insecure
  fedmaml client --superlink link.example.org:9092 --data images/ --role heldout \\
      --root-certificates ca.crt --auth-key node-0 --device cpu
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedmaml.errors import FedmamlError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "client",
        help="serve this device's data to a federation (a Flower SuperNode)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="SuperLink address")
    p.add_argument("--data", required=True, type=Path, help="this device's data: file or folder")
    p.add_argument(
        "--format",
        choices=["csv", "parquet", "npz", "leaf", "images"],
        help="data format (default: from the suffix; a folder is images)",
    )
    p.add_argument("--label-column", help="tables: the label column (default: the run's)")
    p.add_argument(
        "--feature-columns", help="tables: comma-separated feature columns (default: all numeric)"
    )
    p.add_argument("--user", help="LEAF JSON: this device's user, when the file holds several")
    p.add_argument(
        "--heldout-fraction",
        type=float,
        help="share of the examples kept for evaluation (default 0.2)",
    )
    p.add_argument(
        "--cache-dir",
        help="where decoded data is kept between messages (default "
        "$XDG_CACHE_HOME/fedmaml/local-data; '' for no cache)",
    )
    p.add_argument(
        "--role",
        choices=["train", "heldout"],
        default="train",
        help="train: takes part in training; heldout: only evaluated (an unseen user)",
    )
    p.add_argument(
        "--client-index",
        type=int,
        default=0,
        help="this device's number in the results tables and episode seeds (default 0)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N",
    )
    security = p.add_mutually_exclusive_group()
    security.add_argument("--insecure", action="store_true", help="no TLS: for local testing only")
    security.add_argument(
        "--root-certificates",
        type=Path,
        metavar="CA",
        help="CA certificate (PEM) that signed the SuperLink's certificate",
    )
    p.add_argument(
        "--auth-key",
        type=Path,
        metavar="KEY",
        help="this SuperNode's ECDSA private key (OpenSSH format), registered with "
        "flwr supernode register",
    )
    p.add_argument(
        "--port",
        type=int,
        help="local port of the SuperNode's own API and /health (default: a free one)",
    )
    p.add_argument(
        "--print-command",
        action="store_true",
        help="check the data, print the flower-supernode command and exit",
    )
    p.set_defaults(func=run)


def node_config(args: argparse.Namespace) -> dict[str, Any]:
    """The SuperNode's node config: who it is and where its data is."""
    values: dict[str, Any] = {
        "role": args.role,
        "client-index": args.client_index,
        "data-path": str(args.data.expanduser().resolve()),
        "device": args.device,
    }
    optional = {
        "data-format": args.format,
        "label-column": args.label_column,
        "feature-columns": args.feature_columns,
        "user": args.user,
        "heldout-fraction": args.heldout_fraction,
        "cache-dir": args.cache_dir,
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    return values


def check_data(args: argparse.Namespace) -> str:
    """Load the data as a run would (shapes and classes come later, from the run config);
    one line describing it."""
    import torch

    from fedmaml.config import column_names
    from fedmaml.device import resolve_device
    from fedmaml.tasks.local import load_local

    if args.client_index < 0:
        raise FedmamlError("--client-index must be >= 0")
    resolve_device(args.device)
    features = column_names(args.feature_columns or "")
    data = load_local(
        args.data,
        fmt=args.format,
        label_column=args.label_column or "label",
        feature_columns=features or None,
        user=args.user,
        heldout_fraction=0.2 if args.heldout_fraction is None else args.heldout_fraction,
    )
    labels = torch.cat([data.y, data.y_test]) if data.y_test is not None else data.y
    shape = ",".join(map(str, data.x.shape[1:]))
    if data.is_classification:
        kind = f"{len(labels.unique())} classes (labels {int(labels.min())}..{int(labels.max())})"
    else:
        kind = "regression targets"
    return f"{args.data}: {len(labels)} examples of shape {shape}, {kind}"


def run(args: argparse.Namespace) -> int:
    from fedmaml.federated.flower_cli import supernode_command
    from fedmaml.federated.processes import (
        flower_env,
        free_port,
        new_token,
        stop_marked,
        stop_on_signals,
        stop_tree,
    )

    print(check_data(args), flush=True)
    port = args.port or free_port()
    cmd = supernode_command(
        args.superlink,
        port=port,
        node_config=node_config(args),
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
    )
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    probe_superlink(args.superlink, insecure=args.insecure, ca=args.root_certificates)
    print(f"starting the SuperNode (local API and /health on 127.0.0.1:{port})", flush=True)
    token = new_token()
    with stop_on_signals():
        process = subprocess.Popen(cmd, env=flower_env(token=token))
        try:
            code = process.wait()
        finally:
            stop_tree(process)
            stop_marked(token)
    if code:
        print(f"fedmaml client: the SuperNode exited with code {code}", file=sys.stderr)
    return code


def probe_superlink(address: str, *, insecure: bool, ca: Path | None, timeout: float = 5.0) -> None:
    """Fail now, with the reason, where the SuperNode would retry silently forever: a SuperLink
    that cannot be reached, one that speaks TLS to an ``--insecure`` node, or one whose TLS
    certificate the node cannot verify."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        raise FedmamlError(
            f"cannot reach the SuperLink at {address} ({exc.strerror or exc}); check the "
            "address and that the SuperLink is running"
        ) from None
    with sock:
        if insecure:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=str(ca) if ca else None)
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(sock, server_hostname=host):
                tls = True
        except ssl.SSLCertVerificationError as exc:
            raise FedmamlError(
                f"the SuperLink at {address} speaks TLS but its certificate cannot be verified "
                f"({exc.verify_message}); give --root-certificates with the CA that signed it"
            ) from None
        except (ssl.SSLError, OSError):
            tls = False
    if insecure and tls:
        raise FedmamlError(
            f"the SuperLink at {address} speaks TLS; drop --insecure and give "
            "--root-certificates with the CA that signed its certificate"
        )
    if not insecure and not tls:
        raise FedmamlError(
            f"the SuperLink at {address} does not speak TLS (an insecure SuperLink, for local "
            "testing only); start it with its certificates, or pass --insecure"
        )
