"""``fedmaml simulate``: a federated meta-learning simulation on Flower, no Flower knowledge
needed."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, shipped as tomli (a Flower dependency)
    import tomli as tomllib

from fedmaml.config import CHOICES, RunConfig
from fedmaml.errors import FedmamlError

DESCRIPTION = """\
Run a federated meta-learning simulation on Flower's simulation engine (Ray): its own
SuperLink on free ports, one simulated SuperNode per client (or per users-per-node clients),
everything stopped when it ends (also on Ctrl-C, SIGTERM and SIGHUP); --ray-address runs the
clients on an existing Ray cluster. Prints a line per round, then a results table; writes the
run directory (checkpoint.pt, rounds.csv, clients.csv, summary.json, summary.md, plots,
flower.log).

Defaults: MAML on the sinusoid family, 100 training clients (tasks), 10 per round, 20 held-out
clients, 300 rounds. Settings come from (later wins) the run config's defaults, a TOML --config
file, --set KEY=VALUE pairs and the flags below: every run-config key is a flag of its own name
(--num-rounds, --inner-lr, ...).

examples:
  fedmaml simulate --rounds 100 --out runs/sine
  fedmaml simulate --compare maml fedavg --rounds 150 --out runs/compare
  fedmaml simulate --config simulations/femnist.toml --set data-path=femnist.tar.xz
  fedmaml simulate --out runs/sine --resume auto --num-rounds 500   # continue a run
"""

#: metavars where the key's last word would mislead
METAVARS = {
    "fraction_train": "SHARE",
    "resume": "CHECKPOINT",
    "eval_every": "ROUNDS",
    "users_per_node": "USERS",
}

#: short flags beside the run-config key names
ALIASES = {
    "num_rounds": ("--rounds",),
    "num_train_clients": ("--clients",),
    "num_heldout_clients": ("--heldout-clients",),
    "out_dir": ("--out",),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated meta-learning simulation",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file of run-config keys (as in pyproject)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one run-config key, e.g. --set inner-steps=5 (repeatable)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="ALGORITHM",
        choices=CHOICES["algorithm"],
        help="run the same simulation once per algorithm (into OUT/<algorithm>/), then compare "
        "them in one table and one plot (OUT/comparison.md, OUT/comparison.png)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        help="training clients sampled per round (sets fraction-train; default: "
        f"{RunConfig().clients_per_round})",
    )
    p.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="CPU cores per simulated node (it computes users-per-node clients; default 1)",
    )
    p.add_argument(
        "--gpus-per-client",
        type=float,
        help="GPU share per simulated node (default 0.25 with a GPU, else 0)",
    )
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="run the simulated clients on an existing Ray cluster (its head's address, e.g. "
        "10.0.0.5:6379; docs/scale.md) instead of a private Ray on this machine",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the plots")
    p.add_argument("--quiet", action="store_true", help="no per-round progress")
    keys = p.add_argument_group("run configuration (every key of the run config)")
    defaults = RunConfig()
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = type(default)
            kwargs["metavar"] = METAVARS.get(f.name, f.name.split("_")[-1].upper())
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
            kwargs.pop("metavar")
        shown = f"{default!r}" if isinstance(default, str) else str(default).lower()
        kwargs["help"] = f"{f.metadata['help']} (default: {shown})"
        keys.add_argument(flag, *ALIASES.get(f.name, ()), **kwargs)
    p.set_defaults(func=run)


def parse_value(text: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, quoted or bare strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_config_file(path: Path) -> dict[str, Any]:
    """The keys of a TOML run-config file, or one clear error."""
    if not path.is_file():
        raise FedmamlError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FedmamlError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise FedmamlError(f"config file {path} is not valid TOML: {exc}") from None


def collect_config(args: argparse.Namespace) -> RunConfig:
    """The run config from the defaults, ``--config``, ``--set`` and the flags (later wins)."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config_file(args.config))
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedmamlError(f"--set {item!r} is not KEY=VALUE")
        values[key.strip()] = parse_value(value.strip())
    for f in fields(RunConfig):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    cfg = RunConfig.from_mapping(values)
    if args.clients_per_round is not None:
        k = args.clients_per_round
        if not 1 <= k <= cfg.num_train_clients:
            raise FedmamlError(f"--clients-per-round must be in 1..{cfg.num_train_clients}")
        cfg = cfg.replace(
            fraction_train=k / cfg.num_train_clients, min_train_nodes=min(cfg.min_train_nodes, k)
        )
    return cfg


def run(args: argparse.Namespace) -> int:
    from fedmaml.commands.progress import RoundProgress
    from fedmaml.federated.simulation import SimulationOptions, simulate
    from fedmaml.preflight import preflight

    base = collect_config(args)
    gpus = args.gpus_per_client
    if gpus is None:
        import torch

        gpus = 0.25 if torch.cuda.is_available() and base.device != "cpu" else 0.0
    runs = (
        [base.replace(algorithm=a, out_dir=str(Path(base.out_dir) / a)) for a in args.compare]
        if args.compare
        else [base]
    )
    progress = RoundProgress(quiet=args.quiet)
    progress.say(f"checking the settings and the data ({base.task})")
    ready = [
        preflight(cfg, gpus_per_client=gpus, on_cluster=bool(args.ray_address)) for cfg in runs
    ]
    if args.ray_address:
        from fedmaml.federated.ray_cluster import check_address

        check_address(args.ray_address)
    options = SimulationOptions(
        client_cpus=args.cpus_per_client, client_gpus=gpus, ray_address=args.ray_address
    )
    done = []
    for cfg, start in zip(runs, ready, strict=True):
        if start.complete(cfg):
            progress.say(
                f"{start.resumed_from} is at round {start.round} of num-rounds {cfg.num_rounds}: "
                "the run is already complete; nothing to do (raise --num-rounds to continue)"
            )
            done.append(Path(cfg.out_dir))
            continue
        started = time.monotonic()
        progress.start(cfg, start)
        out_dir = simulate(cfg, options, on_poll=progress.poll, on_line=progress.line)
        progress.finish(out_dir, time.monotonic() - started, plot=not args.no_plot)
        done.append(out_dir)
    if args.compare:
        progress.compare(Path(base.out_dir), done, plot=not args.no_plot)
    return 0
