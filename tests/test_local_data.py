"""One device's own data (task local): the four formats, the errors a device owner sees, the
node config that names the data, the run config that fixes the model, and the deployment
helpers that need no running process (certificates, node config text, fedmaml client)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args
from PIL import Image

from fedmaml.cli import main as cli_main
from fedmaml.commands.certs import make_dev_certs
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.flower_cli import node_config_text, supernode_command
from fedmaml.federated.node import load_client, node_run_config
from fedmaml.problem import Problem
from fedmaml.tasks.episodes import EpisodeSpec
from fedmaml.tasks.local import infer_format, load_local

LOCAL = {"task": "local", "input-shape": "6", "num-classes": 3, "label-column": "y"}


def _frame(n: int = 45, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"f{i}" for i in range(6)])
    df["note"] = "text"
    df["y"] = np.arange(n) % 3
    return df


def test_csv_and_parquet_give_the_same_seeded_stratified_split(tmp_path):
    df = _frame()
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    a = load_local(tmp_path / "d.csv", label_column="y", num_classes=3, seed=4)
    b = load_local(tmp_path / "d.parquet", label_column="y", num_classes=3, seed=4)
    assert a.x.shape == (36, 6) and a.x_test.shape == (9, 6)
    assert torch.equal(a.x, b.x) and torch.equal(a.y_test, b.y_test)
    assert a.y.dtype == torch.long and sorted(a.y_test.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    c = load_local(tmp_path / "d.csv", label_column="y", num_classes=3, seed=5)
    assert not torch.equal(a.y_test, c.y_test) or not torch.equal(a.x_test, c.x_test)
    named = load_local(
        tmp_path / "d.csv", label_column="y", feature_columns=["f4", "f1"], heldout_fraction=0
    )
    assert torch.equal(named.x, torch.tensor(df[["f4", "f1"]].to_numpy().copy()).float())


def test_npz_is_reshaped_to_the_input_shape_and_float_labels_are_regression(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(30, 1, 2, 3)), y=rng.normal(size=30))
    data = load_local(tmp_path / "d.npz", input_shape=(6,), heldout_fraction=0.0)
    assert data.x.shape == (30, 6) and data.y.shape == (30, 1) and data.y.dtype == torch.float32
    assert infer_format(tmp_path / "d.npz") == "npz"


def test_one_users_leaf_json_becomes_ink_images(tmp_path):
    x = np.random.default_rng(0).uniform(size=(12, 784)).round(3)
    leaf = {
        "users": ["w1"],
        "num_samples": [12],
        "user_data": {"w1": {"x": x.tolist(), "y": [3] * 12}},
    }
    (tmp_path / "u.json").write_text(json.dumps(leaf))
    data = load_local(tmp_path / "u.json", input_shape=(1, 28, 28), num_classes=62)
    whole = torch.cat([data.x, data.x_test])
    assert whole.shape == (12, 1, 28, 28)
    assert torch.allclose(
        whole.sum(), torch.tensor(12 * 784 - x.sum(), dtype=torch.float32), rtol=1e-4
    )
    leaf["users"].append("w2")
    leaf["user_data"]["w2"] = {"x": x[:4].tolist(), "y": [1] * 4}
    (tmp_path / "two.json").write_text(json.dumps(leaf))
    with pytest.raises(FedmamlError, match=r"holds 2 users, .*user=ID"):
        load_local(tmp_path / "two.json")
    assert len(load_local(tmp_path / "two.json", user="w2", heldout_fraction=0.0)) == 4


def test_image_folders_by_class_are_resized_to_the_input_shape(tmp_path):
    for label, colour in ((0, (255, 0, 0)), (7, (0, 0, 255))):
        (tmp_path / "img" / str(label)).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (20 + k, 16), colour).save(tmp_path / "img" / str(label) / f"{k}.png")
    (tmp_path / "img" / "0" / "notes.txt").write_text("not an image")
    data = load_local(tmp_path / "img", input_shape=(3, 8, 8), num_classes=10, heldout_fraction=0)
    assert data.x.shape == (6, 3, 8, 8) and data.y.tolist() == [0, 0, 0, 7, 7, 7]
    assert torch.allclose(data.x[0, 0], torch.ones(8, 8)) and data.x[0, 2].abs().max() == 0
    grey = load_local(tmp_path / "img", input_shape=(1, 4, 4), heldout_fraction=0)
    assert grey.x.shape == (6, 1, 4, 4)
    (tmp_path / "img" / "7").rename(tmp_path / "img" / "cat")
    named = load_local(tmp_path / "img", input_shape=(1, 4, 4), heldout_fraction=0)
    assert named.y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("write", "kwargs", "message"),
    [
        (lambda p: None, {}, "no such file"),
        (lambda p: p.with_suffix(".xyz").write_text("1"), {}, "cannot tell the data format"),
        (lambda p: _frame().to_csv(p, index=False), {"label_column": "label"}, r"missing column"),
        (
            lambda p: _frame().assign(f2=np.nan).to_csv(p, index=False),
            {"label_column": "y"},
            "NaN",
        ),
        (
            lambda p: _frame().to_csv(p, index=False),
            {"label_column": "y", "num_classes": 2},
            r"label is not a class id \(first at row \d+\).*0\.\.1",
        ),
        (
            lambda p: _frame(8).to_csv(p, index=False),
            {"label_column": "y", "spec": EpisodeSpec(5, 5)},
            "episode needs 10",
        ),
        (
            lambda p: _frame().to_csv(p, index=False),
            {"label_column": "y", "input_shape": (4,)},
            r"shape \(6,\) .*input-shape is 4",
        ),
    ],
)
def test_bad_tables_name_the_problem(tmp_path, write, kwargs, message):
    path = tmp_path / "d.csv"
    write(path)
    if not path.exists() and (tmp_path / "d.xyz").exists():
        path = tmp_path / "d.xyz"
    with pytest.raises(FedmamlError, match=message):
        load_local(path, **kwargs)


def test_bad_npz_files_name_the_problem(tmp_path):
    np.savez(tmp_path / "keys.npz", features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(FedmamlError, match=r"not \['x'\].*np\.savez"):
        load_local(tmp_path / "keys.npz")
    np.savez(tmp_path / "nan.npz", x=np.zeros((4, 2)), y=np.array([0, 1, np.nan, 1]))
    with pytest.raises(FedmamlError, match="1 labels are NaN"):
        load_local(tmp_path / "nan.npz")
    np.savez(tmp_path / "inf.npz", x=np.array([[0, 1], [np.inf, 0]]), y=np.array([0, 1]))
    with pytest.raises(FedmamlError, match="example 1"):
        load_local(tmp_path / "inf.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FedmamlError, match="cannot read it as npz"):
        load_local(tmp_path / "junk.npz")


def test_run_config_of_task_local_fixes_the_model_without_data():
    cfg = RunConfig.from_mapping(LOCAL)
    assert cfg.model_name == "mlp" and cfg.input_dims == (6,) and cfg.data_path == ""
    params = Problem.from_config(cfg).initial_params()
    assert params["0.weight"].shape == (64, 6) and params["4.weight"].shape == (3, 64)
    images = RunConfig.from_mapping({**LOCAL, "input-shape": "1,28,28", "ways": 2})
    assert images.model_name == "conv4"
    assert Problem.from_config(images).model_kwargs == {
        "ways": 2,
        "in_channels": 1,
        "image_size": 28,
    }
    assert RunConfig().task == "sine" and RunConfig().model_name == "sine_mlp"
    for bad, match in (
        ({"task": "local"}, "input-shape"),
        ({**LOCAL, "input-shape": "2,3"}, "C,H,W"),
        ({**LOCAL, "input-shape": "a"}, "input-shape"),
        ({**LOCAL, "num-classes": 1}, "num-classes"),
        ({**LOCAL, "ways": 5}, "at most num-classes"),
    ):
        with pytest.raises(FedmamlError, match=match):
            RunConfig.from_mapping(bad)
    with pytest.raises(FedmamlError, match="does not take input-shape"):
        Problem.from_config(RunConfig.from_mapping({**LOCAL, "input-shape": "3,8,6"}))


def test_a_deployed_node_loads_its_own_file_from_its_node_config(tmp_path):
    _frame().to_csv(tmp_path / "d.csv", index=False)
    cfg = RunConfig.from_mapping({**LOCAL, "support-size": 4, "query-size": 4})
    node = {"role": "heldout", "client-index": 2, "data-path": str(tmp_path / "d.csv")}
    identity, data = load_client(node, cfg)
    assert (identity.role, identity.index, data.client_id) == ("heldout", 2, "heldout-2")
    assert len(data) + len(data.x_test) == 45
    _, narrow = load_client({**node, "feature-columns": "f0,f1"}, cfg.replace(input_shape="2"))
    assert narrow.x.shape[1] == 2
    with pytest.raises(FedmamlError, match="client-index='2'"):
        load_client({**node, "client-index": "2"}, cfg)
    with pytest.raises(FedmamlError, match="names none"):
        load_client({"role": "train"}, cfg)
    with pytest.raises(FedmamlError, match="task is 'sine'"):
        load_client(node, RunConfig())
    with pytest.raises(FedmamlError, match=r"missing column"):
        load_client({**node, "label-column": "nope"}, cfg)
    assert node_run_config({"device": "cpu"}, RunConfig(device="cuda")).device == "cpu"
    assert node_run_config({}, cfg) is cfg
    with pytest.raises(FedmamlError, match="device"):
        node_run_config({"device": "tpu"}, cfg)


def test_node_config_text_is_what_flower_parses():
    values = {"data-path": "/data/my file.csv", "client-index": 3, "heldout-fraction": 0.25}
    text = node_config_text(values)
    assert parse_config_args([text]) == values
    with pytest.raises(FedmamlError, match="double quotes"):
        node_config_text({"data-path": 'a"b'})


def test_dev_certificates_and_node_keys_are_what_tls_and_flower_accept(tmp_path):
    certs = make_dev_certs(tmp_path, nodes=2)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = load_ssh_private_key(certs.node_keys[1].read_bytes(), None)
    public = load_ssh_public_key(certs.public_key(1).read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key().public_numbers() == public.public_numbers()
    assert certs.node_keys[0].stat().st_mode & 0o077 == 0
    with pytest.raises(FedmamlError, match=r"already holds .*--force"):
        make_dev_certs(tmp_path, nodes=1)


def test_fedmaml_client_checks_the_data_and_wraps_flower_supernode(tmp_path, capsys):
    _frame().to_csv(tmp_path / "d.csv", index=False)
    args = ["client", "--superlink", "10.0.0.5:9092", "--data", str(tmp_path / "d.csv")]
    assert cli_main([*args, "--label-column", "y", "--insecure", "--print-command"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "45 examples of shape 6, 3 classes (labels 0..2)" in out[0]
    cmd = shlex.split(out[-1])
    assert cmd[0].endswith("flower-supernode") and "--insecure" in cmd
    assert cmd[cmd.index("--superlink") + 1] == "10.0.0.5:9092"
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert node["data-path"] == str(tmp_path / "d.csv") and node["label-column"] == "y"
    assert (node["role"], node["client-index"], node["device"]) == ("train", 0, "auto")
    assert cli_main([*args, "--print-command"]) == 2
    assert "missing column" in capsys.readouterr().err
    certs = make_dev_certs(tmp_path / "certs", nodes=1)
    cmd = supernode_command(
        "h:1", port=5, node_config={}, root_certificates=certs.ca_cert, auth_key=certs.node_keys[0]
    )
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(certs.node_keys[0])
    with pytest.raises(FedmamlError, match="needs TLS"):
        supernode_command("h:1", port=5, node_config={}, insecure=True, auth_key=certs.node_keys[0])


def test_the_device_script_passes_its_settings_file_to_fedmaml_client(tmp_path):
    _frame().to_csv(tmp_path / "d.csv", index=False)
    fedmaml = Path(sys.executable).with_name("fedmaml")
    settings = tmp_path / "client.env"
    settings.write_text(
        f"SUPERLINK=10.0.0.5:9092\nDATA={tmp_path / 'd.csv'}\nLABEL_COLUMN=y\nROLE=heldout\n"
        f"CLIENT_INDEX=4\nDEVICE=cpu\nINSECURE=1\nPRINT_COMMAND=1\nFEDMAML={fedmaml}\n"
    )
    script = Path(__file__).resolve().parents[1] / "clients" / "start-client.sh"
    done = subprocess.run(
        ["sh", str(script), str(settings)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    cmd = shlex.split(done.stdout.splitlines()[-1])
    node = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert (node["role"], node["client-index"], node["device"]) == ("heldout", 4, "cpu")
    missing = subprocess.run(["sh", str(script), str(tmp_path / "none.env")], capture_output=True)
    assert missing.returncode == 2


def test_decoded_data_is_cached_per_file_version_and_bad_files_are_not(tmp_path):
    cache, csv = tmp_path / "cache", tmp_path / "d.csv"
    _frame().to_csv(csv, index=False)
    first = load_local(csv, label_column="y", num_classes=3, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    stat = csv.stat()
    csv.write_text("x" * stat.st_size)  # unreadable, but the same size and time: the cache
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = load_local(csv, label_column="y", num_classes=3, cache_dir=cache)
    assert torch.equal(first.x, again.x) and torch.equal(first.y_test, again.y_test)
    with pytest.raises(FedmamlError, match="no data rows"):  # other settings: read again
        load_local(csv, label_column="y", num_classes=2, cache_dir=cache)
    _frame(60).assign(f0=np.nan).to_csv(csv, index=False)
    with pytest.raises(FedmamlError, match="NaN"):
        load_local(csv, label_column="y", num_classes=3, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    _frame(60).to_csv(csv, index=False)
    assert len(load_local(csv, label_column="y", num_classes=3, cache_dir=cache)) == 48
    assert len(list(cache.glob("*.npz"))) == 2
    (tmp_path / "file").write_text("a file where the cache folder should be")
    assert len(load_local(csv, label_column="y", cache_dir=tmp_path / "file" / "sub")) == 48
