"""Id-feature lookups over tables of several widths (`DlrmHSTU.embedding_collection`).

TorchRec's EmbeddingCollection requires every table it holds to have one embedding_dim, while
TorchEasyRec configs mix widths (e.g. 16-wide profile features concatenated into one contextual
token, or side-info features of another width next to the item id). This module holds one
EmbeddingCollection per distinct width (`collections["dim16"]`, ...) and looks every id
feature up in the collection of its table. DistributedModelParallel finds and shards each
collection like any other (the planner sees every table by its own name); this module itself
has no parameters and stays unsharded: it only routes the KeyedJaggedTensor's keys.

With a single width there is one collection over exactly the tables, in the order, a plain
EmbeddingCollection would have held, so tables are initialised identically for a given seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from hstu.config.features import ZchSpec
from hstu.modules.zch import ZeroCollisionRemap


def collection_key(embedding_dim: int) -> str:
    """The ModuleDict key of the collection holding tables `embedding_dim` wide."""
    return f"dim{int(embedding_dim)}"


class MultiDimEmbeddingCollection(nn.Module):
    """One TorchRec EmbeddingCollection per embedding_dim; forward(KJT) -> {feature: JaggedTensor}.

    tables: every table (TorchRec EmbeddingConfig with its feature_names), any widths. Table
    names must be unique across widths (the sharding planner and checkpoints key on them).
    device: where the tables are allocated ("meta": nothing is, the trainer shards them).
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingConfig],
        device: torch.device | None = None,
        zch: Mapping[str, ZchSpec] | None = None,
    ) -> None:
        """zch: table name -> its zero-collision hashing (hstu/modules/zch.py): the ids of
        those tables' features are mapped to rows before the lookup."""
        super().__init__()
        if not tables:
            raise ValueError("MultiDimEmbeddingCollection needs at least one table")
        names = [table.name for table in tables]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"embedding table {repeated[0]!r} is declared twice")
        self._tables = list(tables)
        by_dim: dict[int, list[EmbeddingConfig]] = {}
        for table in self._tables:
            # First-appearance order of widths: construction (and so initialisation) follows
            # the config's table order as far as the widths allow.
            by_dim.setdefault(int(table.embedding_dim), []).append(table)
        self.collections = nn.ModuleDict(
            {
                collection_key(dim): EmbeddingCollection(tables=group, device=device)
                for dim, group in by_dim.items()
            }
        )
        # Feature names per collection, in the collection's own order.
        self._features: dict[str, list[str]] = {
            collection_key(dim): [f for table in group for f in table.feature_names]
            for dim, group in by_dim.items()
        }
        seen: dict[str, str] = {}
        for table in self._tables:
            for feature in table.feature_names:
                if feature in seen:
                    raise ValueError(
                        f"feature {feature!r} is looked up in two tables, {seen[feature]!r} and "
                        f"{table.name!r}"
                    )
                seen[feature] = table.name
        self._table_of_feature = seen
        zch = dict(zch or {})
        unknown = sorted(set(zch) - set(names))
        if unknown:
            raise ValueError(f"zch for table {unknown[0]!r}, which is not a table here")
        self.zch = nn.ModuleDict(
            {name: ZeroCollisionRemap(name, spec, device) for name, spec in zch.items()}
        )
        # Per input key order: (permutation, split sizes), computed on first sight of an order.
        self._routes: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}

    # ---- description -----------------------------------------------------------------------

    def embedding_configs(self) -> list[EmbeddingConfig]:
        """Every table, in the order they were given (all widths)."""
        return list(self._tables)

    def feature_names(self) -> list[str]:
        return list(self._table_of_feature)

    def table_of(self, feature: str) -> str:
        return self._table_of_feature[feature]

    @property
    def embeddings(self) -> dict[str, nn.Module]:
        """{table name: nn.Embedding} over all collections (unsharded model only: a sharded
        collection keeps its tables inside its lookup kernels)."""
        tables: dict[str, nn.Module] = {}
        for key, collection in self.collections.items():
            # A sharded collection also has an `embeddings` ModuleDict, of shard-local
            # slices: only the unsharded class holds whole tables.
            modules = getattr(collection, "embeddings", None)
            unsharded = type(collection) is EmbeddingCollection
            if not unsharded or not isinstance(modules, nn.ModuleDict):
                raise TypeError(
                    f"embedding_collection.collections[{key!r}] is sharded "
                    f"({type(collection).__name__}); its tables are not nn.Embedding modules"
                )
            tables.update(modules.items())
        return tables

    # ---- forward ---------------------------------------------------------------------------

    def _route(self, keys: list[str]) -> tuple[list[int], list[int]]:
        """Permutation of `keys` that groups them by collection (in collection order), and the
        group sizes. Keys the model does not look up are left out; missing ones are an error."""
        cached = self._routes.get(tuple(keys))
        if cached is not None:
            return cached
        position = {key: index for index, key in enumerate(keys)}
        missing = [f for f in self._table_of_feature if f not in position]
        if missing:
            raise KeyError(
                f"the batch's sparse features lack {missing[0]!r} (table "
                f"{self._table_of_feature[missing[0]]!r}); it has {keys}"
            )
        permutation: list[int] = []
        splits: list[int] = []
        if len(self._features) == 1 and len(keys) == len(self._table_of_feature):
            # One width and exactly its features: the KJT goes over as a plain
            # EmbeddingCollection would get it (no permute, no copy).
            permutation, splits = list(range(len(keys))), [len(keys)]
        else:
            for features in self._features.values():
                permutation.extend(position[f] for f in features)
                splits.append(len(features))
        self._routes[tuple(keys)] = (permutation, splits)
        return permutation, splits

    def zch_stats(self) -> dict[str, dict[str, int]]:
        """Per zch table, its counters (ZeroCollisionRemap.stats); {} without zch."""
        return {name: remap.stats() for name, remap in self.zch.items()}

    def _remap_zch(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The KJT with every zch feature's raw ids replaced by their rows."""
        keys = list(features.keys())
        # Per-key values: on a GPU this reads the per-key lengths on the host (a sync),
        # once per step; zch's admission state is updated on the host's schedule anyway.
        values = list(features.values().split(features.length_per_key()))
        position = {key: index for index, key in enumerate(keys)}
        for table, remap in self.zch.items():
            members = [key for key in keys if self._table_of_feature.get(key) == table]
            # One call per table: a table's features (history and candidate item ids) share
            # its rows and its admission state.
            rows = remap(torch.cat([values[position[key]] for key in members]))
            for key, part in zip(members, rows.split([values[position[k]].numel()
                                                      for k in members])):
                values[position[key]] = part
        return KeyedJaggedTensor(
            keys=keys, values=torch.cat(values), lengths=features.lengths(),
            # Remapping keeps every key's value count: carry the host-side counts over.
            length_per_key=features.length_per_key(),
            offset_per_key=features.offset_per_key(),
        )

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        if len(self.zch):
            features = self._remap_zch(features)
        keys = list(features.keys())
        collections = list(self.collections.values())
        permutation, splits = self._route(keys)
        grouped = features
        if permutation != list(range(len(keys))):
            grouped = features.permute(permutation)
        parts = grouped.split(splits) if len(splits) > 1 else [grouped]
        # Start every collection's lookup before waiting on any: under DistributedModelParallel
        # each returns an awaitable whose communication can then overlap.
        pending = [
            collection(one_bag_per_value(part)) for collection, part in zip(collections, parts)
        ]
        out: dict[str, JaggedTensor] = {}
        for part, result in zip(parts, pending):
            wait = getattr(result, "wait", None)
            looked_up = wait() if callable(wait) else result
            out.update(_with_lengths_of(part, looked_up))
        return out


def one_bag_per_value(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same keys and values (in the same order), with every value in a bag of its own.

    Why: a sequence (non-pooled) lookup of TorchRec's sharded EmbeddingCollection runs
    fbgemm's "nobag" kernel, which hands each bag to one warp that walks the bag's ids one
    after another. A bag here is a row's whole history (thousands of ids), so a batch of 32
    rows kept 32 warps busy on a GPU that holds thousands: the forward lookup of 44K ids took
    ~3.7 ms on an H100 (docs/BENCHMARKS.md). With one id per bag every id gets its own warp.
    A lookup returns one embedding per value whatever the bags, so only the lengths change;
    MultiDimEmbeddingCollection puts the rows' own lengths back on the results.

    The new stride (bags per key) is the largest value count of any key, read from the KJT's
    host-side length_per_key (the data pipeline fills it), so nothing is read from the GPU.
    Left as it is when no key has more values than rows, or with variable batch sizes per key.
    """
    if features.variable_stride_per_key():
        return features
    counts = features.length_per_key()
    stride = max(counts, default=0)
    if stride <= features.stride():
        return features
    lengths = features.lengths()
    num_keys = len(features.keys())
    # Per key: count ones, then zeros up to the stride (two kernels on the device, no host read).
    values_per_key = lengths.view(num_keys, features.stride()).sum(dim=1, dtype=lengths.dtype)
    positions = torch.arange(stride, device=lengths.device, dtype=lengths.dtype)
    per_value = (positions.unsqueeze(0) < values_per_key.unsqueeze(1)).to(lengths.dtype)
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        weights=features.weights_or_none(),
        lengths=per_value.reshape(-1),
        stride=stride,
        length_per_key=list(counts),
        offset_per_key=list(features.offset_per_key()),
    )


def _with_lengths_of(
    features: KeyedJaggedTensor, looked_up: Mapping[str, JaggedTensor]
) -> dict[str, JaggedTensor]:
    """The lookup's embeddings per key with the lengths of `features` (the rows' own), whatever
    bags the lookup was given (one_bag_per_value)."""
    if features.variable_stride_per_key():
        return dict(looked_up)
    rows = features.stride()
    lengths = features.lengths().view(len(features.keys()), rows)
    out = {}
    for index, key in enumerate(features.keys()):
        embedded = looked_up[key]
        if embedded.lengths().numel() == rows:
            out[key] = embedded
        else:
            out[key] = JaggedTensor(values=embedded.values(), lengths=lengths[index])
    return out
