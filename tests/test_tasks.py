"""hstu/tasks.py: the losses TorchEasyRec's DlrmHSTU task towers accept, against values worked
out by hand from TorchEasyRec's formulas (tzrec/loss/focal_loss.py, tzrec/loss/jrc_loss.py)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.config import load_config_text
from hstu.tasks import (
    FocalParams,
    JrcParams,
    TaskSpec,
    binary_focal_loss,
    jrc_loss,
    parse_tasks,
    row_feature_values,
    session_index,
    task_losses,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- binary_focal_loss -------------------------------------------------------------------


def test_focal_loss_by_hand():
    logits = [2.0, -1.0, 0.5, 0.0]
    labels = [1, 0, 0, 1]
    gamma, alpha = 2.0, 0.25
    expected = 0.0
    for x, y in zip(logits, labels):
        p = sigmoid(x)
        if y == 1:  # alpha (1-p)^gamma * -log p
            expected += alpha * (1 - p) ** gamma * -math.log(p)
        else:  # (1-alpha) p^gamma * -log(1-p)
            expected += (1 - alpha) * p**gamma * -math.log(1 - p)
    expected /= len(logits)

    x = torch.tensor(logits, requires_grad=True)
    loss = binary_focal_loss(x, torch.tensor(labels), gamma, alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    # The weight is a constant (TorchEasyRec detaches it): d loss / dx_i = w_i (p_i - y_i) / N.
    loss.backward()
    for i, (xi, y) in enumerate(zip(logits, labels)):
        p = sigmoid(xi)
        w = alpha * (1 - p) ** gamma if y else (1 - alpha) * p**gamma
        assert x.grad[i].item() == pytest.approx(w * (p - y) / len(logits), rel=1e-5)


def test_focal_loss_with_gamma_0_and_alpha_half_is_half_the_bce():
    x = torch.tensor([0.3, -2.0, 1.5])
    y = torch.tensor([1, 1, 0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y.float())
    assert binary_focal_loss(x, y, 0.0, 0.5).item() == pytest.approx(0.5 * bce.item(), rel=1e-6)


# ---- jrc_loss ----------------------------------------------------------------------------

# TorchEasyRec's own JRC test data (tzrec/loss/jrc_loss_test.py): two sessions of four.
TZREC_LOGITS = [
    [0.9, 0.1], [0.5, 0.5], [0.3, 0.7], [0.2, 0.8],
    [0.8, 0.2], [0.55, 0.45], [0.33, 0.67], [0.55, 0.45],
]
TZREC_LABELS = [0, 0, 1, 1, 0, 0, 1, 1]


def jrc_by_hand(logits, labels, sessions, alpha=0.5) -> float:
    """TorchEasyRec's JRC written out per candidate with math only.

    CE: -log softmax(l_i)[y_i]. GE: a positive i competes on the class-1 logit with the
    negatives of its session, a negative on the class-0 logit with the positives of its
    session; -log(exp(own) / (exp(own) + sum exp(competitors)))."""
    n = len(labels)
    ce = ge = 0.0
    for i in range(n):
        l0, l1 = logits[i]
        own = l1 if labels[i] == 1 else l0
        ce += -(own - math.log(math.exp(l0) + math.exp(l1)))
        channel = 1 if labels[i] == 1 else 0
        rivals = [
            logits[j][channel]
            for j in range(n)
            if sessions[j] == sessions[i] and labels[j] != labels[i]
        ]
        ge += -(own - math.log(math.exp(own) + sum(math.exp(r) for r in rivals)))
    return alpha * ce / n + (1 - alpha) * ge / n


def test_jrc_loss_by_hand_matches_torcheasyrecs_own_test_value():
    session = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss = jrc_loss(torch.tensor(TZREC_LOGITS), torch.tensor(TZREC_LABELS), session, 0.5)
    by_hand = jrc_by_hand(TZREC_LOGITS, TZREC_LABELS, session.tolist())
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert round(loss.item(), 4) == 0.7199  # TorchEasyRec's jrc_loss_test asserts this value


def test_jrc_sessions_with_one_class_and_other_alphas():
    torch.manual_seed(0)
    logits = torch.randn(9, 2, dtype=torch.float64)
    labels = [1, 1, 1, 0, 0, 1, 0, 1, 0]  # session 0 all positive, 1 all negative, 2 mixed
    sessions = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for alpha in (0.0, 0.3, 1.0):
        loss = jrc_loss(logits, torch.tensor(labels), torch.tensor(sessions), alpha)
        assert loss.item() == pytest.approx(
            jrc_by_hand(logits.tolist(), labels, sessions, alpha), rel=1e-5
        )


def test_jrc_gradient_matches_the_session_mask_formulation():
    # TorchEasyRec's earlier JRC built a [N, N] session mask; the segment form must agree.
    torch.manual_seed(1)
    logits = torch.randn(7, 2, requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1])
    sessions = torch.tensor([0, 0, 1, 1, 1, 2, 2])

    def masked(logits):
        same = sessions[:, None] == sessions[None, :]
        rival = same & (labels[:, None] != labels[None, :])
        keep = rival | torch.eye(7, dtype=torch.bool)
        channel = labels  # own class channel
        rows = logits[:, channel].T  # row i: every candidate's logit on i's channel
        rows = rows.masked_fill(~keep, -1e9)
        ge = torch.nn.functional.cross_entropy(rows, torch.arange(7))
        ce = torch.nn.functional.cross_entropy(logits, labels)
        return 0.5 * ce + 0.5 * ge

    ours = jrc_loss(logits, labels, sessions, 0.5)
    (grad,) = torch.autograd.grad(ours, logits)
    reference = masked(logits)
    (expected_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad, expected_grad)


def test_session_index_joins_rows_of_one_user():
    # Rows of users 5, 8, 5: rows 0 and 2 are one session (the first row's index).
    index = session_index(torch.tensor([5, 8, 5]), torch.tensor([2, 1, 3]), total=6)
    assert index.tolist() == [0, 0, 1, 0, 0, 0]


# ---- task_losses over a batch --------------------------------------------------------------


def fake_batch(user_ids, num_targets, action_weights):
    """The parts of a JaggedBatch task_losses reads: labels, the KJT, batch_size."""
    rows = len(user_ids)
    history = [1] * rows  # one history video per row, before user_id in the KJT
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["uih_seq__video_id", "user_id"],
        values=torch.tensor([11 * (r + 1) for r in range(rows)] + list(user_ids)),
        lengths=torch.tensor(history + [1] * rows),
    )
    return types.SimpleNamespace(
        sparse=sparse,
        labels={"cand_seq__action_weight": torch.tensor(action_weights)},
        batch_size=rows,
        num_targets=torch.tensor(num_targets),
    )


def test_row_feature_values_reads_the_scalar_feature_by_position():
    batch = fake_batch([40, 7, 40], [1, 1, 1], [0, 0, 0])
    assert row_feature_values(batch, "user_id").tolist() == [40, 7, 40]
    with pytest.raises(KeyError, match="'age'"):
        row_feature_values(batch, "age")


TASKS_TEXT = """
task_configs { task_name: "is_click" label_name: "a" task_bitmask: 1
               losses { binary_cross_entropy {} } }
task_configs { task_name: "is_like" label_name: "a" task_bitmask: 2 num_class: 2 weight: 0.5
               losses { jrc_loss { session_name: "user_id" alpha: 0.3 } } }
task_configs { task_name: "is_follow" label_name: "a" task_bitmask: 4
               losses { binary_focal_loss { gamma: 1.5 alpha: 0.25 } } }
task_configs { task_name: "is_hate" label_name: "a" task_bitmask: 8
               losses { binary_cross_entropy {} } }
"""


def tower(text: str):
    from hstu.config import schema

    from google.protobuf import text_format

    message = schema.message_class("FusionMTLTower")()
    text_format.Parse(text, message, descriptor_pool=schema.pool())
    return message


def test_parse_tasks_reads_the_loss_parameters():
    tasks = {task.name: task for task in parse_tasks(tower(TASKS_TEXT))}
    (kind, jrc), = tasks["is_like"].losses
    assert (kind, jrc.session, jrc.alpha) == ("jrc_loss", "user_id", pytest.approx(0.3))
    assert tasks["is_follow"].losses == (
        ("binary_focal_loss", FocalParams(gamma=1.5, alpha=0.25)),  # exact in float32
    )


def test_task_losses_mixes_the_shared_bce_path_with_per_task_losses():
    tasks = parse_tasks(tower(TASKS_TEXT.replace('label_name: "a"', 'label_name: '
                                                 '"cand_seq__action_weight"')))
    # Two rows of user 3 (one session) and one of user 9; 6 candidates.
    batch = fake_batch([3, 9, 3], [2, 1, 3], [1, 6, 2, 15, 0, 4])
    torch.manual_seed(2)
    logits = {
        "is_click": torch.randn(6),
        "is_like": torch.randn(6, 2),
        "is_follow": torch.randn(6),
        "is_hate": torch.randn(6),
    }
    total, losses = task_losses(tasks, logits, batch, 1.0, num_targets=batch.num_targets)
    def bits(bit):
        return [int(a & bit != 0) for a in batch.labels["cand_seq__action_weight"]]

    def bce(x, y):
        return sum(-math.log(sigmoid(v)) if t else -math.log(1 - sigmoid(v))
                   for v, t in zip(x.tolist(), y)) / len(y)

    assert losses["is_click"].item() == pytest.approx(bce(logits["is_click"], bits(1)), rel=1e-5)
    assert losses["is_hate"].item() == pytest.approx(bce(logits["is_hate"], bits(8)), rel=1e-5)
    sessions = [3, 3, 9, 3, 3, 3]  # each candidate's row's user
    like = 0.5 * jrc_by_hand(logits["is_like"].tolist(), bits(2), sessions, alpha=0.3)
    assert losses["is_like"].item() == pytest.approx(like, rel=1e-5)
    # The focal task shares the label column with the BCE tasks but not their fast path.
    follow = binary_focal_loss(logits["is_follow"], torch.tensor(bits(4)), 1.5, 0.25)
    assert losses["is_follow"].item() == pytest.approx(follow.item(), rel=1e-6)
    assert follow.item() != pytest.approx(bce(logits["is_follow"], bits(4)), rel=1e-3)
    assert total.item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-6)


def test_jrc_without_num_targets_says_what_it_needs():
    tasks = [
        TaskSpec("is_like", "a", 2, 2, 1.0, (("jrc_loss", JrcParams("user_id", 0.5)),), ())
    ]
    batch = fake_batch([1], [2], [2, 0])
    batch.labels = {"a": batch.labels["cand_seq__action_weight"]}
    with pytest.raises(ValueError, match="jrc_loss needs num_targets"):
        task_losses(tasks, {"is_like": torch.zeros(2, 2)}, batch, 1.0)


def test_the_1k_configs_tasks_parse(tmp_path):
    # TorchEasyRec's 1K config: is_like is jrc_loss with 2 classes and grouped AUC by user.
    from pathlib import Path

    text = (
        Path(__file__).parent / "config" / "tzrec_configs" / "dlrm_hstu_kuairand_1k.config"
    ).read_text()
    cfg = load_config_text(text)
    tasks = {t.name: t for t in parse_tasks(cfg.model_config.dlrm_hstu.fusion_mtl_tower)}
    assert tasks["is_like"].num_class == 2
    assert tasks["is_like"].losses == (("jrc_loss", JrcParams("user_id", 0.5)),)
    assert tasks["is_like"].metrics == (("grouped_auc", "user_id"),)
    assert tasks["watchtime"].is_regression


# ---- the task metrics besides AUC, grouped AUC and MAE (hstu/metrics.py) -------------------

from hstu.metrics import (  # noqa: E402
    XAUC,
    Accuracy,
    GroupedXAUC,
    MeanSquaredError,
    MulticlassAUC,
    TaskMetrics,
    exact_xauc,
)


def test_mean_squared_error_by_hand():
    metric = MeanSquaredError()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]))
    metric.update(torch.tensor([4.0]), torch.tensor([2.0]))
    assert metric.compute() == pytest.approx((0.25 + 0 + 4) / 3)


def test_binary_accuracy_uses_a_strict_threshold():
    metric = Accuracy(num_class=1, threshold=0.5)
    # 0.5 is not above 0.5: predicted negative (torchmetrics compares preds > threshold).
    metric.update(torch.tensor([0.5, 0.51, 0.2, 0.9]), torch.tensor([1, 1, 0, 0]))
    assert metric.compute() == pytest.approx(2 / 4)


def test_multiclass_accuracy_top_k():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.5, 0.1]])
    labels = torch.tensor([0, 1, 0])
    top1, top2 = Accuracy(3, top_k=1), Accuracy(3, top_k=2)
    top1.update(probabilities, labels)
    top2.update(probabilities, labels)
    assert (top1.compute(), top2.compute()) == (pytest.approx(1 / 3), 1.0)


MULTICLASS_PROBS = torch.tensor(
    [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]
)
MULTICLASS_LABELS = torch.tensor([0, 1, 2, 1])


def test_multiclass_auc_macro_and_weighted_by_hand():
    # One-vs-rest AUCs: class 0: 1 (0.6 above every other); class 1: positives 0.5, 0.1 against
    # negatives 0.3, 0.3: 2 of 4 pairs won = 0.5; class 2: positive 0.4 against 0.1, 0.3, 0.4:
    # 2 won + 1 tie (1/2) of 3 = 5/6. Supports 1, 2, 1.
    macro, weighted = MulticlassAUC(3, 0, "macro"), MulticlassAUC(3, 0, "weighted")
    for metric in (macro, weighted):
        metric.update(MULTICLASS_PROBS, MULTICLASS_LABELS)
    assert macro.compute() == pytest.approx((1 + 0.5 + 5 / 6) / 3)
    assert weighted.compute() == pytest.approx((1 * 1 + 0.5 * 2 + 5 / 6 * 1) / 4)


XAUC_PREDICTIONS = torch.tensor([0.1, 0.4, 0.35, 0.8])
XAUC_TARGETS = torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_xauc_by_hand():
    # 6 pairs; only (1, 2) is ordered against its targets (0.4 > 0.35 but 2 < 3): 5/6.
    assert exact_xauc(XAUC_PREDICTIONS, XAUC_TARGETS) == pytest.approx(5 / 6)
    # A tie in the targets orders nothing: counted wrong, as TorchEasyRec counts it.
    assert exact_xauc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0])) == 0.0
    whole = XAUC(sample_ratio=1.0)
    whole.update(XAUC_PREDICTIONS[:2], XAUC_TARGETS[:2])
    whole.update(XAUC_PREDICTIONS[2:], XAUC_TARGETS[2:])
    assert whole.compute() == pytest.approx(5 / 6)  # every pair covered: exact


def test_xauc_in_batch_averages_the_batches():
    metric = XAUC(in_batch=True)
    metric.update(XAUC_PREDICTIONS, XAUC_TARGETS)  # 5/6
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))  # 0
    assert metric.compute() == pytest.approx(5 / 12)


def test_sampled_xauc_estimates_the_exact_value_and_repeats():
    generator = torch.Generator().manual_seed(5)
    targets = torch.rand(400, generator=generator)
    predictions = targets + 0.3 * torch.randn(400, generator=generator)
    exact = exact_xauc(predictions, targets)
    metric = XAUC(max_pairs=20_000)  # of 79,800 pairs
    metric.update(predictions, targets)
    first = metric.compute()
    assert abs(first - exact) < 0.02
    assert metric.compute() == first  # a fixed seed: the same value each time


def test_grouped_xauc_weights_groups_by_size_and_skips_singletons():
    metric = GroupedXAUC(max_pairs_per_group=100)
    predictions = torch.cat([XAUC_PREDICTIONS, torch.tensor([1.0, 2.0, 3.0, 7.0])])
    targets = torch.cat([XAUC_TARGETS, torch.tensor([1.0, 2.0, 3.0, 0.0])])
    groups = torch.tensor([4, 4, 4, 4, 9, 9, 9, 1])  # group 1 has a single candidate
    metric.update(predictions, targets, groups)
    assert metric.compute() == pytest.approx((5 / 6 * 4 + 1.0 * 3) / 7)


def test_task_metrics_feed_softmax_probabilities_to_multiclass_metrics():
    task = TaskSpec(
        "kind",
        "a",
        None,
        3,
        1.0,
        (("softmax_cross_entropy", 0.0),),
        (("multiclass_auc", (0, "macro")), ("accuracy", (0.5, 2))),
    )
    regression = TaskSpec(
        "watch", "w", None, 1, 1.0, (("l2_loss", 0.0),),
        (("mean_squared_error", None), ("xauc", (1.0, None, False)),
         ("grouped_xauc", ("user_id", 100))),
    )
    metrics = TaskMetrics([task, regression])
    logits = torch.log(MULTICLASS_PROBS)  # softmax gives the probabilities back
    watch = XAUC_PREDICTIONS
    output = types.SimpleNamespace(
        logits={"kind": logits, "watch": watch},
        probs={"kind": MULTICLASS_PROBS[:, 1], "watch": watch},
        num_targets=torch.tensor([4]),
    )
    model = types.SimpleNamespace(
        task_labels=lambda batch: {"kind": MULTICLASS_LABELS, "watch": XAUC_TARGETS},
        grouping_key=lambda batch, name, num_targets: torch.tensor([7, 7, 7, 7]),
    )
    metrics.update(model, output, batch=None)
    values = metrics.compute()
    assert values["multiclass_auc_kind"] == pytest.approx((1 + 0.5 + 5 / 6) / 3)
    # Label among the top 2 classes: all but the 4th candidate (0.1 for its class 1).
    assert values["accuracy_kind"] == pytest.approx(3 / 4)
    assert values["mse_watch"] == pytest.approx(
        float(((XAUC_PREDICTIONS - XAUC_TARGETS) ** 2).mean())
    )
    assert values["xauc_watch"] == pytest.approx(5 / 6)
    assert values["grouped_xauc_watch"] == pytest.approx(5 / 6)
