"""``fedmaml simulate``: a federated meta-learning simulation on Flower, no Flower knowledge needed.

Defaults: MAML on the sinusoid family, 100 training clients (tasks), 10 per round, 20 held-out
clients. Settings come from (in order) the defaults in pyproject.toml's run config, a TOML
``--config`` file, ``--set key=value`` pairs and the named flags.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, shipped as tomli (a Flower dependency)
    import tomli as tomllib

from fedmaml.errors import FedmamlError
from fedmaml.meta.algorithms import ALGORITHMS

FLAGS = {
    "rounds": "num-rounds",
    "clients": "num-train-clients",
    "heldout_clients": "num-heldout-clients",
    "algorithm": "algorithm",
    "task": "task",
    "data_path": "data-path",
    "inner_steps": "inner-steps",
    "inner_lr": "inner-lr",
    "meta_optimizer": "meta-optimizer",
    "meta_lr": "meta-lr",
    "seed": "seed",
    "device": "device",
    "resume": "resume",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated meta-learning simulation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file of run-config keys (as in pyproject)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key, e.g. --set inner-steps=5 (repeatable)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory")
    p.add_argument("--rounds", type=int, help="number of federated rounds")
    p.add_argument("--clients", type=int, help="number of training clients (tasks)")
    p.add_argument("--clients-per-round", type=int, help="training clients sampled per round")
    p.add_argument("--heldout-clients", type=int, help="clients never trained on (unseen users)")
    p.add_argument("--algorithm", choices=ALGORITHMS)
    p.add_argument("--task", choices=["sine", "omniglot", "femnist", "table"])
    p.add_argument("--data-path", help="data for omniglot / femnist / table tasks")
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--inner-lr", type=float, help="inner step size α")
    p.add_argument("--meta-optimizer", choices=["adam", "sgd"])
    p.add_argument("--meta-lr", type=float, help="outer step size β")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (clients and server)")
    p.add_argument("--resume", help="checkpoint.pt of an earlier run to continue from")
    p.add_argument(
        "--cpus-per-client", type=int, default=1, help="CPU cores per simulated client (default 1)"
    )
    p.add_argument(
        "--gpus-per-client",
        type=float,
        help="GPU share per simulated client (default 0.25 with a GPU, else 0)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the plots")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")
    p.set_defaults(func=run)


def parse_value(text: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, quoted or bare strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def collect_config(args: argparse.Namespace) -> dict[str, Any]:
    from fedmaml.federated.simulation import APP_DIR

    values: dict[str, Any] = {}
    pyproject = APP_DIR / "pyproject.toml"
    if pyproject.is_file():
        values.update(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    if args.config:
        if not args.config.is_file():
            raise FedmamlError(f"config file {args.config} does not exist")
        try:
            values.update(tomllib.loads(args.config.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise FedmamlError(f"config file {args.config} is not valid TOML: {exc}") from None
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedmamlError(f"--set {item!r} is not KEY=VALUE")
        values[key.strip()] = parse_value(value.strip())
    for attr, key in FLAGS.items():
        if getattr(args, attr) is not None:
            values[key] = getattr(args, attr)
    values["out-dir"] = str(args.out)
    if args.clients_per_round is not None:
        clients = int(values.get("num-train-clients", 100))
        if not 1 <= args.clients_per_round <= clients:
            raise FedmamlError(f"--clients-per-round must be in 1..{clients}")
        values["fraction-train"] = args.clients_per_round / clients
        values["min-train-nodes"] = min(
            int(values.get("min-train-nodes", 2)), args.clients_per_round
        )
    return values


def run(args: argparse.Namespace) -> int:
    from fedmaml.config import RunConfig

    cfg = RunConfig.from_mapping(collect_config(args))
    from fedmaml.commands.progress import RoundProgress
    from fedmaml.federated.simulation import SimulationOptions, simulate

    gpus = args.gpus_per_client
    if gpus is None:
        import torch

        gpus = 0.25 if torch.cuda.is_available() and cfg.device != "cpu" else 0.0
    progress = RoundProgress(Path(cfg.out_dir), cfg.num_rounds, quiet=args.quiet)
    progress.start(cfg)
    out_dir = simulate(
        cfg,
        SimulationOptions(client_cpus=args.cpus_per_client, client_gpus=gpus),
        on_poll=progress.poll,
    )
    progress.poll()
    progress.finish(out_dir, plot=not args.no_plot)
    return 0
