"""The dense model's last steps, shared by DlrmHSTU (hstu/model.py) and the exported serving
module (hstu/export/serving.py), so that training and serving compute the same scores. Imports
no TorchRec: the serving side must not need it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def score_candidates(
    encoder: nn.Module,
    item_tower: nn.Module,
    fusion_tower: nn.Module,
    encoder_inputs: dict[str, torch.Tensor | int | None],
    *,
    ascending: bool,
    graphed=None,
) -> list[torch.Tensor]:
    """The dense model after the embedding lookups: encoder (user side) and item tower into the
    fusion tower; per-task logits over all candidates, in batch order. Shared by DlrmHSTU and
    the exported serving module (hstu/export/serving.py), so both compute the same thing.

    Newest-first rows (ascending=False): reversing every input along dim 0 reverses the batch
    order and the order inside each row, making the histories oldest-first; the outputs are
    flipped back.

    graphed: a hstu.modules.graphed_scoring.GraphedScoring to run the three modules from CUDA
    graphs (training steps only), or None to run them as they are.
    """
    if not ascending:
        encoder_inputs = {
            k: (v.flip(0) if isinstance(v, torch.Tensor) else v) for k, v in encoder_inputs.items()
        }
    if graphed is not None:
        per_task = graphed(encoder, item_tower, fusion_tower, encoder_inputs)
    else:
        user = encoder(**encoder_inputs)
        item = item_tower(encoder_inputs["candidates"])
        per_task = fusion_tower(user, item)
    if not ascending:
        per_task = [logits.flip(0) for logits in per_task]
    return per_task


def task_outputs(
    tasks: Sequence, per_task: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(logits, probs) per task name: sigmoid for binary tasks, P(class 1) for 2-class ones,
    the value itself for regression (l2_loss) tasks."""
    logits, probs = {}, {}
    for task, task_logits in zip(tasks, per_task):
        if task.num_class == 1:
            task_logits = task_logits.squeeze(1)
            probs[task.name] = task_logits if task.is_regression else torch.sigmoid(task_logits)
        else:
            probs[task.name] = torch.softmax(task_logits, dim=1)[:, 1]
        logits[task.name] = task_logits
    return logits, probs
