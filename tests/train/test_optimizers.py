"""Optimizers and learning-rate schedules read from train_config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hstu.config.loader import load_config
from hstu.train.optimizers import (
    OptimizerConfigError,
    dense_optimizer_factory,
    schedule_from_config,
    sparse_optimizer_spec,
)

CPU = torch.device("cpu")
GPU = torch.device("cuda")  # only the device type is read: no GPU needed


def train_config(smoke_recipe, *overrides):
    return load_config(smoke_recipe, list(overrides)).train_config


def test_rowwise_adagrad_becomes_the_fused_kernel_with_its_settings(smoke_recipe):
    import torchrec.optim as trec_optim
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

    cfg = train_config(
        smoke_recipe,
        "train_config.sparse_optimizer.rowwise_adagrad_optimizer.weight_decay=0.01",
        "train_config.sparse_optimizer.rowwise_adagrad_optimizer.weight_decay_mode=DECOUPLE",
        "train_config.sparse_optimizer.rowwise_adagrad_optimizer.lr=0.0123",
    )
    spec = sparse_optimizer_spec(cfg.sparse_optimizer, CPU)
    assert spec.optimizer_class is trec_optim.RowWiseAdagrad
    assert spec.lr == pytest.approx(0.0123)
    assert spec.kwargs["weight_decay"] == pytest.approx(0.01)
    assert spec.kwargs["weight_decay_mode"] is WeightDecayMode.DECOUPLE


@pytest.mark.parametrize(
    "block, class_name",
    [("sgd_optimizer { lr: 0.1 }", "SGD"), ("adagrad_optimizer { lr: 0.1 }", "Adagrad")],
)
def test_sgd_and_adagrad_map_to_fused_kernels(smoke_recipe, block, class_name):
    import torchrec.optim as trec_optim

    cfg = train_config(smoke_recipe, f"train_config.sparse_optimizer={{ {block} }}")
    spec = sparse_optimizer_spec(cfg.sparse_optimizer, CPU)
    assert spec.optimizer_class is getattr(trec_optim, class_name)
    assert spec.kwargs == {"lr": pytest.approx(0.1)}


def test_fused_adam_is_refused_on_cpu_with_the_way_out(smoke_recipe):
    cfg = train_config(
        smoke_recipe, "train_config.sparse_optimizer={ adam_optimizer { lr: 0.01 beta2: 0.99 } }"
    )
    with pytest.raises(OptimizerConfigError) as error:
        sparse_optimizer_spec(cfg.sparse_optimizer, CPU)
    message = str(error.value)
    assert message.startswith("train_config.sparse_optimizer.adam_optimizer:")
    assert "CPU" in message and "rowwise_adagrad_optimizer" in message
    spec = sparse_optimizer_spec(cfg.sparse_optimizer, GPU)
    assert spec.kwargs["beta2"] == pytest.approx(0.99)


def test_dense_adam_gets_its_betas(smoke_recipe):
    cfg = train_config(
        smoke_recipe,
        "train_config.dense_optimizer.adam_optimizer.beta1=0.8",
        "train_config.dense_optimizer.adam_optimizer.lr=0.0042",
    )
    factory, lr = dense_optimizer_factory(cfg.dense_optimizer)
    optimizer = factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["betas"] == pytest.approx((0.8, 0.999))
    assert lr == pytest.approx(0.0042)


def test_constant_schedule_keeps_the_base_rate(smoke_recipe):
    schedule = schedule_from_config(train_config(smoke_recipe).dense_optimizer, "dense")
    assert schedule.learning_rate_at(0.5, step=1000, epoch=3) == 0.5


def test_exponential_decay_with_warmup_staircase_and_floor(smoke_recipe):
    cfg = train_config(
        smoke_recipe,
        "train_config.dense_optimizer.exponential_decay_learning_rate={ decay_size: 10 "
        "decay_factor: 0.5 warmup_size: 4 warmup_learning_rate: 0.02 min_learning_rate: 0.01 }",
    )
    schedule = schedule_from_config(cfg.dense_optimizer, "dense")
    rate = lambda step: schedule.learning_rate_at(0.1, step=step, epoch=0)
    assert rate(0) == pytest.approx(0.02)
    assert rate(2) == pytest.approx(0.06)  # halfway through the warmup
    assert rate(4) == pytest.approx(0.1)
    assert rate(13) == pytest.approx(0.1)  # staircase: no decay before 10 steps past warmup
    assert rate(14) == pytest.approx(0.05)
    assert rate(100) == pytest.approx(0.01)  # floored at min_learning_rate


def test_exponential_decay_by_epoch_without_staircase(smoke_recipe):
    cfg = train_config(
        smoke_recipe,
        "train_config.sparse_optimizer.exponential_decay_learning_rate={ decay_size: 2 "
        "decay_factor: 0.5 staircase: false by_epoch: true }",
    )
    schedule = schedule_from_config(cfg.sparse_optimizer, "sparse")
    assert schedule.learning_rate_at(1.0, step=999, epoch=1) == pytest.approx(math.sqrt(0.5))


def test_manual_steps_with_warmup(smoke_recipe):
    cfg = train_config(
        smoke_recipe,
        "train_config.dense_optimizer.manual_step_learning_rate={ schedule_sizes: [10, 20] "
        "learning_rates: [0.05, 0.01] warmup: true }",
    )
    schedule = schedule_from_config(cfg.dense_optimizer, "dense")
    rate = lambda step: schedule.learning_rate_at(0.1, step=step, epoch=0)
    assert rate(5) == pytest.approx(0.075)  # linear from the base rate towards 0.05
    assert rate(11) == pytest.approx(0.05)
    assert rate(21) == pytest.approx(0.01)


def test_manual_steps_of_unequal_lengths_are_refused(smoke_recipe):
    cfg = train_config(
        smoke_recipe,
        "train_config.dense_optimizer.manual_step_learning_rate={ schedule_sizes: [10, 20] "
        "learning_rates: [0.05] }",
    )
    with pytest.raises(OptimizerConfigError, match="equal length"):
        schedule_from_config(cfg.dense_optimizer, "train_config.dense_optimizer")


def test_a_scheduled_rate_reaches_the_fused_embedding_kernels(smoke_recipe, one_process_group):
    """set_learning_rate + step() on DMP's fused optimizer changes the FBGEMM kernels' rate."""
    from hstu.config.features import feature_specs, label_specs
    from hstu.train.optimizers import set_learning_rate
    from hstu.train.trainable import build_trainable

    cfg = load_config(smoke_recipe)
    fused = build_trainable(cfg, feature_specs(cfg), label_specs(cfg), CPU, world_size=1,
                            local_world_size=1, batch_size=4).model.fused_optimizer

    def kernel_rates(optimizer):
        for _, sub in getattr(optimizer, "optimizers", []):
            kernel = getattr(sub, "_emb_module", None)
            if kernel is not None:
                yield kernel.get_learning_rate()
            yield from kernel_rates(sub)

    configured = cfg.train_config.sparse_optimizer.rowwise_adagrad_optimizer.lr
    assert list(kernel_rates(fused)) and all(
        r == pytest.approx(configured) for r in kernel_rates(fused))
    set_learning_rate(fused, 0.0456)
    fused.step()
    assert all(r == pytest.approx(0.0456) for r in kernel_rates(fused))


# ---- the fused sparse optimizers, numerically ---------------------------------------------------

def _fused_step(block: str, tmp_path):
    """One table (10 x 4) under DMP with the fused optimizer `block` (a sparse_optimizer
    config), one backward of the linear loss sum(lookup * coefficient). Returns (weights
    before, weights after, the exact gradient of the table)."""
    import torch.distributed as dist
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hstu.config.loader import load_config
    from hstu.train.sharding import shard_model

    class OneTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding_collection = EmbeddingCollection(
                tables=[EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=10,
                                        feature_names=["f"])],
                device=torch.device("meta"))

        def forward(self, features):
            return self.embedding_collection(features)["f"].values()

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "smoke.config")
    sparse_cfg = load_config(recipe, [f"train_config.sparse_optimizer={{ {block} }}"]
                             ).train_config.sparse_optimizer
    spec = sparse_optimizer_spec(sparse_cfg, CPU)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = OneTable()
        apply_optimizer_in_backward(spec.optimizer_class, model.parameters(), dict(spec.kwargs))
        dmp = shard_model(model, CPU, world_size=1, local_world_size=1, batch_size=4,
                          overrides={"t": ["table_wise"]}).model

        def weights():
            (tensor,) = [t for n, t in dmp.state_dict().items() if n.endswith("t.weight")]
            return tensor.local_shards()[0].tensor.detach().clone()

        ids = torch.tensor([1, 3, 3, 7, 1, 1])  # rows 1 and 3 repeat; 0, 2, 4-6, 8, 9 unused
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=ids, lengths=torch.tensor([2, 1, 3]))
        coefficient = torch.randn(len(ids), 4, generator=torch.Generator().manual_seed(0))
        before = weights()
        (dmp(features) * coefficient).sum().backward()
        gradient = torch.zeros(10, 4).index_add_(0, ids, coefficient)
        return before, weights(), gradient
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fused_sparse_optimizers_apply_their_update_rule(optimizer, tmp_path):
    """SGD: -lr g. Adagrad, first step: -lr g / sqrt(g^2) per element. Row-wise Adagrad,
    first step: -lr g / sqrt(mean over the row of g^2). Rows not looked up stay as they were."""
    lr = 0.05
    before, after, g = _fused_step(f"{optimizer}_optimizer {{ lr: {lr} }}", tmp_path)
    if optimizer == "sgd":
        expected = -lr * g
    elif optimizer == "adagrad":
        expected = -lr * g / g.abs().clamp_min(1e-12)
    else:
        expected = -lr * g / g.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    touched = g.abs().sum(dim=1) > 0
    assert touched.tolist() == [i in (1, 3, 7) for i in range(10)]
    torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(after[~touched], before[~touched])
