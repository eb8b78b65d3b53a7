"""The batch the gloo worker scripts of test_sharding.py and test_reshard.py train on, and the
shard pieces test_reshard.py, test_equivalence.py and test_sharding.py take apart and put
back together.

Not a test module: each of those tests copies this file next to the worker script it writes,
which imports it from there (the workers are separate Python processes).
"""

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import JaggedBatch


def local_pieces(tensor) -> list:
    """[(global offsets, values)] of this rank's part of a ShardedTensor; a plain tensor whole
    (the tests reassemble tables from every rank's pieces)."""
    if hasattr(tensor, "local_shards"):
        return [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                for s in tensor.local_shards()]
    return [([0] * tensor.dim(), tensor.detach().clone())]


def assemble(pieces: list) -> torch.Tensor:
    """One tensor from [(global offsets, values)] pieces that tile it (float gaps left NaN, so
    a piece that no rank held shows)."""
    first = pieces[0][1]
    shape = [max(offset[d] + values.shape[d] for offset, values in pieces)
             for d in range(first.dim())]
    whole = (torch.full(shape, float("nan"), dtype=first.dtype) if first.is_floating_point()
             else torch.zeros(shape, dtype=first.dtype))
    for offset, values in pieces:
        whole[tuple(slice(o, o + n) for o, n in zip(offset, values.shape))] = values
    return whole


def synthetic_batch(model, features, labels, seed: int, history_lengths) -> JaggedBatch:
    """4 rows with these history lengths and 2, 1, 3, 2 candidates. Every id feature's values
    include 0 and num_buckets - 1, so both row-wise halves of every table are looked up."""
    g = torch.Generator().manual_seed(seed)
    uih, cand = torch.tensor(history_lengths), torch.tensor([2, 1, 3, 2])
    uih_seq = model.features[model.groups["uih"][0]].sequence
    cand_seq = model.features[model.groups["candidate"][0]].sequence
    lengths = {uih_seq: uih, cand_seq: cand, None: torch.ones(4, dtype=torch.int64)}

    def values(s):
        n = int(lengths[s.sequence].sum())
        if s.kind == "id":
            v = torch.randint(0, s.num_buckets, (n,), generator=g)
            v[0], v[-1] = 0, s.num_buckets - 1
            return v
        if s.name in model.groups["uih_timestamp"]:
            return 1_700_000_000 + torch.arange(n) * 60
        if s.name in model.groups["candidate_timestamp"]:
            return torch.repeat_interleave(torch.full((4,), 1_701_000_000), cand)
        if s.name in model.groups["uih_action"]:
            return torch.randint(0, 256, (n,), generator=g)
        return torch.rand(n, generator=g) * 600

    ids = [s for s in features if s.kind == "id"]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=[s.name for s in ids], values=torch.cat([values(s) for s in ids]),
        lengths=torch.cat([lengths[s.sequence] for s in ids]))
    n = int(cand.sum())
    label_values = {
        s.column: torch.randint(0, 256, (n,), generator=g) if s.value_dtype == "int64"
        else torch.rand(n, generator=g) for s in labels}
    return JaggedBatch(sparse=sparse, raw={s.name: values(s) for s in features if s.kind == "raw"},
                       seq_lengths={uih_seq: uih, cand_seq: cand}, labels=label_values,
                       batch_size=4)
