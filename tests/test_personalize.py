"""Personalization API: MAML vs FedAvg vs random init on unseen sinusoids, vmap vs loop, learned
step sizes, save / load, refusals of another architecture or data shape, tables and folders."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedmaml.centralized import meta_train
from fedmaml.checkpoint import Checkpoint, save_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta import model_params, with_inner_lrs
from fedmaml.models import build_model
from fedmaml.personalize import (
    load_personalized,
    personalize,
    personalize_client,
    personalize_many,
)
from fedmaml.tasks import ClientData, EpisodeSpec
from fedmaml.tasks.sine import SineFamily

SINE = SineFamily(seed=0, num_train=1000, num_heldout=100)
K = 10  # support points per unseen task, as in MAML's 10-shot sinusoid protocol
STEPS = 10


def _config(algorithm: str) -> dict:
    return RunConfig(algorithm=algorithm, inner_lr=0.01, eval_steps=STEPS).to_mapping()


def _init() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_params(build_model("sine_mlp"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """MAML and FedAvg trained with the same budget (1000 meta-steps of 25 tasks, K = 10, one
    inner step at lr 0.01, Adam 1e-3), and the shared random initialisation."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ckpt")
    model, start = build_model("sine_mlp"), _init()
    paths = {"random": save_checkpoint(folder / "random.pt", Checkpoint(start, "sine_mlp"))}
    for algorithm in ("maml", "fedavg"):
        trained = meta_train(
            model, start, SINE, EpisodeSpec(support=K, query=K), loss_fn=F.mse_loss,
            meta_steps=1000, meta_batch=25, algorithm=algorithm, inner_lr=0.01, seed=0,
        )  # fmt: skip
        paths[algorithm] = save_checkpoint(
            folder / f"{algorithm}.pt",
            Checkpoint(trained.params, "sine_mlp", {}, _config(algorithm), round=1000),
        )
    return paths


def _unseen(n: int = 100) -> list[ClientData]:
    return [SINE.client(i, "heldout") for i in range(n)]


def test_maml_personalizes_unseen_tasks_better_than_fedavg_and_random(checkpoints):
    after, seen = {}, {}
    for name, path in checkpoints.items():
        df = personalize_many(path, _unseen(), support_size=K, steps=STEPS, lr=0.01)
        assert len(df) == 100 and (df["n_support"] == K).all()
        after[name] = df["metric_after"].mean()
        trained_on = [SINE.client(i, "train") for i in range(100)]
        seen[name] = personalize_many(path, trained_on, support_size=K)["metric_after"].mean()
        print(f"{name}: unseen MSE {df['metric_before'].mean():.3f} -> {after[name]:.3f}; "
              f"seen -> {seen[name]:.3f}")  # fmt: skip
    assert after["maml"] < 0.5 * after["fedavg"], after
    assert after["maml"] < 0.3 * after["random"], after
    assert after["fedavg"] < after["random"], after
    assert seen["maml"] < 0.5 * seen["fedavg"], seen


def test_vmap_matches_the_loop_and_a_single_user(checkpoints):
    users = _unseen(12)
    users.append(ClientData("short", users[0].x[:20], users[0].y[:20], users[0].x_test[:7],
                            users[0].y_test[:7]))  # fmt: skip
    vmapped = personalize_many(checkpoints["maml"], users, support_size=K, batching="vmap")
    looped = personalize_many(checkpoints["maml"], users, support_size=K, batching="loop")
    assert list(vmapped["user"]) == [u.client_id for u in users]
    assert vmapped["n_eval"].iloc[-1] == 7
    cols = ["metric_before", "metric_after", "gain"]
    assert torch.allclose(
        torch.tensor(vmapped[cols].to_numpy()), torch.tensor(looped[cols].to_numpy()), atol=1e-5
    )
    one = personalize(checkpoints["maml"], users[3], support_size=K, user="u3")
    assert one.steps == STEPS and len(one.curve) == STEPS + 1  # eval-steps of the checkpoint
    assert math.isclose(one.metric_after, vmapped["metric_after"].iloc[3], rel_tol=1e-5)
    assert one.gain == pytest.approx(one.metric_before - one.metric_after)
    assert vmapped.attrs["metric"] == "mse" and len(vmapped.attrs["curve"]) == STEPS + 1


def test_learned_step_sizes_are_used_then_dropped():
    theta = _init()
    model = build_model("sine_mlp")
    user = SINE.client(0, "heldout")
    learned = personalize(
        Checkpoint(with_inner_lrs(theta, 0.03), "sine_mlp"), user, steps=3, support_size=K
    )
    plain = personalize((model, theta), user, steps=3, lr=0.03, support_size=K)
    default = personalize((model, theta), user, steps=3, support_size=K)  # lr 0.01
    assert learned.lr is None and plain.lr == 0.03
    assert learned.metric_after == pytest.approx(plain.metric_after, rel=1e-6)
    assert default.metric_after != pytest.approx(plain.metric_after, rel=1e-3)
    assert set(learned.params) == set(theta)  # no inner_lr.* in the personalized model
    overridden = personalize(
        Checkpoint(with_inner_lrs(theta, 0.03), "sine_mlp"), user, steps=3, lr=0.01,
        support_size=K,
    )  # fmt: skip
    assert overridden.metric_after == pytest.approx(default.metric_after, rel=1e-6)


def test_saved_model_reproduces_predictions(checkpoints, tmp_path):
    result = personalize(checkpoints["maml"], SINE.client(5, "heldout"), support_size=K, seed=3)
    path = result.save(tmp_path / "user5.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user5.pt"]  # no temp file left
    assert result.user == "sine-heldout-5"
    again = load_personalized(path)
    x = torch.linspace(-5, 5, 41).unsqueeze(1)
    assert torch.equal(again.predict(x), result.predict(x))
    assert again.curve == result.curve and again.metric == "mse" and again.round == 1000
    assert not torch.equal(result.predict(x), personalize(checkpoints["maml"], SINE.client(
        6, "heldout"), support_size=K).predict(x))  # fmt: skip
    with pytest.raises(FedmamlError, match="training checkpoint"):
        load_personalized(checkpoints["maml"])
    damaged = Checkpoint(result.params, "sine_mlp", config={"personalization": {"user": "x"}})
    with pytest.raises(FedmamlError, match="damaged personalization record"):
        load_personalized(save_checkpoint(tmp_path / "damaged.pt", damaged))
    with pytest.raises(FedmamlError, match="already a personalized model"):
        personalize(path, SINE.client(5, "heldout"))
    with pytest.raises(FedmamlError, match="shape"):
        again.predict(torch.zeros(3, 2))
    with pytest.raises(FedmamlError, match="cannot be rebuilt"):
        personalize((build_model("sine_mlp"), _init()), SINE.client(0, "heldout")).save(
            tmp_path / "x.pt"
        )


def test_on_device_client_returns_metrics_only(checkpoints, tmp_path):
    client = SINE.client(7, "heldout")
    ckpt = torch.load(checkpoints["maml"], weights_only=True)
    metrics = personalize_client(
        ckpt["params"], "sine_mlp", client, save_to=tmp_path / "me.pt", config=_config("maml"),
        support_size=K,
    )  # fmt: skip
    assert set(metrics) == {"n_support", "n_eval", "steps", "mse_before", "mse_after", "gain"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["n_eval"] == len(client.x_test) and metrics["gain"] > 0
    saved = load_personalized(tmp_path / "me.pt")
    assert saved.metric_after == pytest.approx(metrics["mse_after"])
    with pytest.raises(FedmamlError, match="held-out pool"):
        personalize_client(
            ckpt["params"], "sine_mlp", ClientData("c", client.x, client.y),
            save_to=tmp_path / "no.pt",
        )  # fmt: skip


def test_another_architecture_is_refused(checkpoints, tmp_path):
    conv = model_params(build_model("conv4"))
    user = SINE.client(0, "heldout")
    with pytest.raises(FedmamlError, match=r"another architecture|do not match"):
        personalize((build_model("sine_mlp"), conv), user)
    with pytest.raises(FedmamlError, match="do not match"):
        personalize_client(conv, "sine_mlp", user, save_to=tmp_path / "x.pt")
    mlp = Checkpoint(_init(), "mlp", {"in_features": 1, "out_features": 1})
    with pytest.raises(FedmamlError, match="checkpoint of model 'mlp'"):
        personalize(mlp, user)
    assert not (tmp_path / "x.pt").exists()


def test_another_data_shape_is_refused(checkpoints):
    with pytest.raises(FedmamlError, match="3 feature"):
        personalize(checkpoints["maml"], (torch.randn(20, 3), torch.randn(20, 1)))
    with pytest.raises(FedmamlError, match="one label column"):
        personalize(checkpoints["maml"], (torch.randn(20, 1), torch.randn(20, 2)))
    classifier = Checkpoint(
        model_params(build_model("mlp", in_features=2, out_features=3)), "mlp",
        {"in_features": 2, "out_features": 3},
    )  # fmt: skip
    # rows are named, label values never (on a device this message goes to the server)
    with pytest.raises(FedmamlError, match=r"4 label\(s\) are not among the 3 classes.*row 3"):
        personalize(classifier, (torch.randn(10, 2), torch.tensor([0, 1, 2, 3, 7] * 2)))
    with pytest.raises(FedmamlError, match="not whole numbers"):
        personalize(classifier, (torch.randn(10, 2), torch.rand(10)))


def test_bad_user_data_is_refused(checkpoints):
    ck = checkpoints["maml"]
    x, y = torch.randn(8, 1), torch.randn(8, 1)
    with pytest.raises(FedmamlError, match="8 rows but needs more than the support size 10"):
        personalize(ck, (x, y), support_size=10)
    with pytest.raises(FedmamlError, match="50 training rows but the support size is 60"):
        personalize(ck, SINE.client(0, "heldout"), support_size=60)
    with pytest.raises(FedmamlError, match="NaN"):
        personalize(ck, (torch.cat([x, torch.tensor([[math.nan]])]), torch.randn(9, 1)))
    with pytest.raises(FedmamlError, match="labels contain NaN"):
        personalize(ck, (x, torch.full((8, 1), math.inf)))
    with pytest.raises(FedmamlError, match="not both"):
        personalize(ck, (x, y), support_size=2, support_fraction=0.5)
    with pytest.raises(FedmamlError, match=r"in \(0, 1\)"):
        personalize(ck, (x, y), support_fraction=1.0)
    with pytest.raises(FedmamlError, match="adaptation steps"):
        personalize(ck, (x, y), steps=-1)
    with pytest.raises(FedmamlError, match="diverged"):
        personalize(ck, (x * 1e3, y * 1e6), lr=10.0, steps=5)


def test_classification_reports_accuracy_and_batches():
    torch.manual_seed(1)
    model = build_model("mlp", in_features=2, out_features=3)
    ckpt = Checkpoint(model_params(model), "mlp", {"in_features": 2, "out_features": 3})
    users = {}
    for u in range(6):
        x = torch.randn(30, 2)
        users[f"u{u}"] = (x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())
    vm = personalize_many(ckpt, users, support_fraction=0.5, steps=20, lr=0.5, batching="vmap")
    lp = personalize_many(ckpt, users, support_fraction=0.5, steps=20, lr=0.5, batching="loop")
    assert vm.attrs["metric"] == "accuracy"
    assert {"loss_before", "loss_after"} <= set(vm.columns)
    cols = ["metric_before", "metric_after", "loss_before", "loss_after"]
    assert torch.allclose(torch.tensor(vm[cols].to_numpy()), torch.tensor(lp[cols].to_numpy()),
                          atol=1e-5)  # fmt: skip
    assert ((vm["metric_after"] >= 0) & (vm["metric_after"] <= 1)).all()
    assert (vm["gain"] == vm["metric_after"] - vm["metric_before"]).all()
    assert vm["metric_after"].mean() > vm["metric_before"].mean()
    one = personalize(ckpt, users["u0"], steps=20, lr=0.5, support_fraction=0.5)
    assert one.predict(users["u0"][0]).dtype == torch.long


def test_many_users_from_a_table_and_a_folder(checkpoints, tmp_path):
    frames = []
    for i in range(4):
        c = SINE.client(i, "heldout")
        frames.append(pd.DataFrame({"user": f"u{i}", "x": c.x[:, 0], "y": c.y[:, 0]}))
        frames[-1][["x", "y"]].to_csv(tmp_path / f"u{i}.csv", index=False)
    table = pd.concat(frames)
    by_table = personalize_many(
        checkpoints["maml"], table, user_column="user", plot=tmp_path / "plots" / "gain.png"
    )
    assert list(by_table["user"]) == ["u0", "u1", "u2", "u3"]
    assert (by_table["n_support"] == 25).all() and (by_table["n_eval"] == 25).all()
    assert (tmp_path / "plots" / "gain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_folder = personalize_many(checkpoints["maml"], tmp_path)
    pd.testing.assert_frame_equal(by_table, by_folder, check_exact=False, rtol=1e-5)
    with pytest.raises(FedmamlError, match="holds 4 users in column 'user'"):
        personalize(checkpoints["maml"], table)
    with pytest.raises(FedmamlError, match="needs its user column"):
        personalize_many(checkpoints["maml"], table)
    one = personalize(checkpoints["maml"], frames[2].drop(columns="user"), user="u2")
    assert one.metric_after == pytest.approx(by_table["metric_after"].iloc[2], rel=1e-5)
    assert one.columns == {"label_column": "y", "feature_columns": ["x"]}
    new = pd.DataFrame({"x": [-2.0, 0.0, 2.0], "note": ["a", "b", "c"]})
    out = one.predict_table(new)
    expected = one.predict(torch.tensor([[-2.0], [0.0], [2.0]])).numpy()
    assert list(out.columns) == ["x", "note", "prediction"]
    assert (out["prediction"].to_numpy() == expected).all()
    with pytest.raises(FedmamlError, match=r"lacks the feature column\(s\) \['x'\]"):
        one.predict_table(pd.DataFrame({"z": [1.0]}))
