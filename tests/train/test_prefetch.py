"""DevicePrefetcher: every batch handed out once, in order, on the device; host lengths kept."""

from __future__ import annotations

import pytest
import torch

from hstu.train.prefetch import DevicePrefetcher
from tests.test_model import make_batch
from tests.train.test_flops import smoke_model


def batches(model, count):
    return [make_batch(model, [3 + i, 1], [2, 1 + i], seed=i) for i in range(count)]


class Closing:
    """An iterable whose iterator records whether it was closed (as the data pipeline's stops
    its producer thread). The test keeps a reference to the iterator, so only an explicit
    close() by the prefetcher, not garbage collection, can close it."""

    def __init__(self, items):
        self.items = items
        self.iterator = None

    def __iter__(self):
        self.iterator = _ClosingIterator(self.items)
        return self.iterator

    @property
    def closed(self):
        return self.iterator is not None and self.iterator.closed


class _ClosingIterator:
    def __init__(self, items):
        self.items = iter(items)
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def close(self):
        self.closed = True


def check_same(moved, original, device):
    assert moved.batch_size == original.batch_size
    assert moved.sparse.values().device.type == device.type
    assert torch.equal(moved.sparse.values().cpu(), original.sparse.values())
    for name, tensor in original.raw.items():
        assert torch.equal(moved.raw[name].cpu(), tensor)
    for name, tensor in original.labels.items():
        assert torch.equal(moved.labels[name].cpu(), tensor)
    # The host keeps the lengths: the model reads sizes from them without a device read.
    host = moved.lengths_on_host()
    assert host is not None and all(v.device.type == "cpu" for v in host.values())
    assert {k: v.tolist() for k, v in host.items()} == {
        k: v.tolist() for k, v in original.seq_lengths.items()
    }


@pytest.mark.parametrize(
    "device",
    [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=pytest.mark.gpu)],
)
def test_every_batch_once_in_order(device):
    model = smoke_model()
    originals = batches(model, 4)
    source = Closing(originals)
    handed = list(DevicePrefetcher(source, device))
    assert len(handed) == len(originals)
    for moved, original in zip(handed, originals):
        check_same(moved, original, device)
    assert source.closed


def test_stopping_early_closes_the_source():
    model = smoke_model()
    source = Closing(batches(model, 3))
    handed = iter(DevicePrefetcher(source, torch.device("cpu")))
    next(handed)
    assert not source.closed
    handed.close()  # what leaving a for loop early does
    assert source.closed


def test_empty_source():
    assert list(DevicePrefetcher([], torch.device("cpu"))) == []
