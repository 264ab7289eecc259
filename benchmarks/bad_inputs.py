"""The adversarial pass over fedmaml's commands, as a table: every bad input tried, its exit code
and the one line it printed. Not a speed benchmark; each case runs the real ``fedmaml`` command
in a fresh process (none of these starts Flower: each is refused before).

    .venv/bin/python benchmarks/bad_inputs.py > bad_inputs.md

A case passes when the command exits 2 with exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

FEDMAML = str(Path(sys.executable).with_name("fedmaml"))


def files(root: Path) -> dict[str, Path]:
    """The bad (and good) files the cases point at."""
    from fedmaml.checkpoint import Checkpoint, save_checkpoint
    from fedmaml.meta import model_params
    from fedmaml.models import build_model

    made = {}
    made["latin1"] = root / "latin1.toml"
    made["latin1"].write_bytes("seed = 1 # caf\xe9\n".encode("latin-1"))
    made["badtoml"] = root / "bad.toml"
    made["badtoml"].write_text("num-rounds = = 3\n")
    made["afile"] = root / "a-file"
    made["afile"].write_text("x")
    made["random"] = root / "random.pt"
    made["random"].write_bytes(os.urandom(4096))
    mlp = build_model("mlp", in_features=3, out_features=2)
    made["other"] = save_checkpoint(
        root / "other.pt",
        Checkpoint(model_params(mlp), "mlp", {"in_features": 3, "out_features": 2}),
    )
    sine = model_params(build_model("sine_mlp"))
    made["sine"] = save_checkpoint(root / "sine.pt", Checkpoint(sine, "sine_mlp", {"hidden": 40}))
    payload = torch.load(made["sine"], weights_only=True)
    for name, change in {
        "nokeys": {"format": payload["format"], "version": payload["version"]},
        "hidden-5": {**payload, "model_kwargs": {"hidden": -5}},
        "hidden1e6": {**payload, "model_kwargs": {"hidden": 10**6}},
        "configlist": {**payload, "config": ["inner-lr", 1]},
        "modellist": {**payload, "model": ["sine_mlp"]},
    }.items():
        made[name] = root / f"{name}.pt"
        torch.save(change, made[name])
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(40, 3)), columns=["a", "b", "y"])
    made["good"] = root / "user.csv"
    table.to_csv(made["good"], index=False)
    made["nan"] = root / "nan.csv"
    table.assign(a=np.nan).to_csv(made["nan"], index=False)
    made["text"] = root / "text.csv"
    table.astype({"b": object}).assign(b="Patient 0 Smith").to_csv(made["text"], index=False)
    made["empty"] = root / "empty.csv"
    made["empty"].write_text("")
    made["header"] = root / "header.csv"
    made["header"].write_text("a,b,y\n")
    return made


def cases(f: dict[str, Path], root: Path) -> list[tuple[str, list[str]]]:
    sim = ["simulate", "--clients", "2", "--heldout-clients", "1", "--out", str(root / "run")]
    out: list[str] = []
    personalize = ["personalize", "--checkpoint", str(f["sine"]), "--label-column", "y"]
    table = ["--label-column", "y", "--insecure"]

    def client(superlink: str, data: Path, *extra: str) -> list[str]:
        return ["client", "--superlink", superlink, "--data", str(data), *extra]

    return [
        ("unknown algorithm", [*sim, "--set", "algorithm=foo"]),
        ("inner-lr 0", [*sim, "--set", "inner-lr=0"]),
        ("inner-lr NaN", [*sim, "--set", "inner-lr=nan"]),
        ("unknown key (typo)", [*sim, "--set", "inner-stpes=3"]),
        ("--set without =", [*sim, "--set", "inner-steps"]),
        ("--clients-per-round too many", [*sim, "--clients-per-round", "500"]),
        ("min-train-nodes > clients", [*sim, "--set", "min-train-nodes=5"]),
        ("task local in a simulation", [*sim, "--set", "task=local", "--set", "input-shape=3"]),
        ("seed beyond 64 bits", [*sim, "--set", "seed=99999999999999999999"]),
        ("max-update-norm negative", [*sim, "--set", "max-update-norm=-1"]),
        ("num-rounds 0", [*sim, "--set", "num-rounds=0"]),
        ("fraction-train 2", [*sim, "--set", "fraction-train=2"]),
        ("femnist without data-path", [*sim, "--set", "task=femnist"]),
        ("missing data path", [*sim, "--task", "table", "--data-path", str(root / "no.csv")]),
        ("missing Omniglot folder", [*sim, "--task", "omniglot", "--data-path", str(root / "o")]),
        ("missing --config file", [*sim, "--config", str(root / "missing.toml")]),
        ("--config not UTF-8", [*sim, "--config", str(f["latin1"])]),
        ("--config not TOML", [*sim, "--config", str(f["badtoml"])]),
        ("--out is a file", [*sim, "--out", str(f["afile"])]),
        ("--out under /proc", [*sim, "--out", "/proc/fedmaml-run"]),
        ("--device cuda without a GPU", [*sim, *out, "--device", "cuda"]),
        ("--device cuda:abc", [*sim, *out, "--device", "cuda:abc"]),
        ("--device tpu", [*sim, *out, "--device", "tpu"]),
        ("--gpus-per-client 1 without a GPU", [*sim, *out, "--gpus-per-client", "1"]),
        ("--resume a missing file", [*sim, *out, "--resume", str(root / "missing.pt")]),
        ("--resume random bytes", [*sim, *out, "--resume", str(f["random"])]),
        ("--resume another model", [*sim, *out, "--resume", str(f["other"])]),
        ("--resume a checkpoint without keys", [*sim, *out, "--resume", str(f["nokeys"])]),
        ("--resume hidden=-5", [*sim, *out, "--resume", str(f["hidden-5"])]),
        ("--resume hidden=10**6", [*sim, *out, "--resume", str(f["hidden1e6"])]),
        ("--resume config as a list", [*sim, *out, "--resume", str(f["configlist"])]),
        ("--resume model as a list", [*sim, *out, "--resume", str(f["modellist"])]),
        ("--compare unknown algorithm", [*sim, "--compare", "maml", "bogus"]),
        ("certs: bad host", ["certs", str(root / "certs"), "--host", "bad host!"]),
        ("certs: --nodes -1", ["certs", str(root / "certs2"), "--nodes", "-1"]),
        ("client: not an address", client("not an address", f["good"], *table, "--print-command")),
        ("client: nobody listening", client("127.0.0.1:1", f["good"], *table)),
        (
            "client: text in a feature cell",
            client("127.0.0.1:9092", f["text"], *table, "--feature-columns", "a,b"),
        ),
        ("client: missing data", client("127.0.0.1:9092", root / "none.csv", *table)),
        ("personalize: NaN in the data", [*personalize, "--data", str(f["nan"])]),
        ("personalize: empty file", [*personalize, "--data", str(f["empty"])]),
        ("personalize: header only", [*personalize, "--data", str(f["header"])]),
        (
            "personalize: a checkpoint without keys",
            ["personalize", "--checkpoint", str(f["nokeys"]), "--data", str(f["good"])],
        ),
        ("personalize: --steps -1", [*personalize, "--data", str(f["good"]), "--steps", "-1"]),
        ("report: a folder without a run", ["report", str(root)]),
        (
            "predict: a training checkpoint",
            ["predict", "--model", str(f["sine"]), "--data", str(f["good"]), "--out", "p.csv"],
        ),
    ]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fedmaml-bad-") as tmp:
        root = Path(tmp)
        made = files(root)
        rows, good = [], 0
        for name, argv in cases(made, root):
            result = subprocess.run(
                [FEDMAML, *argv], capture_output=True, text=True, timeout=120, cwd=root
            )
            lines = result.stderr.strip().splitlines()
            ok = result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
            good += ok
            message = (lines[-1] if lines else "(nothing)").replace(str(root), "…")
            rows.append(f"| {name} | {result.returncode} | {'yes' if ok else 'NO'} | {message} |")
    print(f"{good} of {len(rows)} bad inputs: exit 2 with one clear line\n")
    print("| input | exit | one line | message |")
    print("|---|---:|---|---|")
    print("\n".join(rows))
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
