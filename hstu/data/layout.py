"""Samples in the layout a recipe reads: `prepare synthetic|kuairand --recipe R`.

`prepare` builds rows in this project's own sample schema (hstu/data/schema.py: `uih_seq__*`,
`cand_seq__*`). A recipe may read other columns: TorchEasyRec's 27K benchmark config reads
`video_id`, `item_video_id`, `action_timestamp`, ... (standalone features, fg_mode FG_NONE),
its 1K configs read the columns their expressions name (fg_mode FG_DAG), and any recipe may
store sequences as delimited strings. plan_layout(cfg) decides, for every column the recipe
reads, which column of the sample schema fills it; apply_layout rewrites a table accordingly.

Which source fills a recipe column follows the column's role in DlrmHSTU's feature groups
(reference section 1.5), not its name:

- uih / candidate group: the first id feature is the item id; further id features (side info)
  take the sample schema's `video_cate1`, `video_cate2` (and on the candidate side
  `user_video_cross1/2`) when their field has that name, and otherwise a stand-in derived from
  the item id (item id % num_buckets), so that side info stays a function of the item;
- uih_action, uih_watchtime, uih_timestamp, candidate_timestamp: the history's action bitmask,
  watch time and action time, and the candidates' query time;
- contextual group: `user_id` and the five profile columns by name; any other feature gets a
  stand-in derived from the user id (user_id % num_buckets);
- every data_config.label_fields entry (TorchEasyRec reads them all, used by a task or not;
  always Arrow lists, even with --encoding string, as TorchEasyRec reads labels only so):
  an integer label (classification tasks) is the candidates' action bitmask, a float label
  (l2_loss tasks) their watch time; a label no task uses goes by its name (a name holding
  "watch" is the watch time, anything else the bitmask).

Ids copied from the sample schema are never folded: one at or above its table's num_buckets
stops with the column, the value and the table (change --items / --users, or the recipe's
num_buckets). Declared features that no group uses are not written (this project does not
read them; TorchEasyRec would parse them too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import Message

from hstu.config.features import (
    CANDIDATE,
    CANDIDATE_TIMESTAMP,
    CONTEXTUAL,
    UIH,
    UIH_ACTION,
    UIH_TIMESTAMP,
    UIH_WATCHTIME,
    FeatureSpec,
    LabelSpec,
    declared_features,
    feature_specs,
    group_feature_names,
    label_specs,
)
from hstu.data import schema

ENCODINGS = ("list", "string")

# Raw groups -> the sample schema column that fills them.
_RAW_SOURCES = {
    UIH_ACTION: schema.UIH_ACTION_WEIGHT,
    UIH_WATCHTIME: schema.UIH_WATCH_TIME,
    UIH_TIMESTAMP: schema.UIH_ACTION_TIMESTAMP,
    CANDIDATE_TIMESTAMP: schema.CAND_QUERY_TIME,
}
# Side-info fields the sample schema has (with --mtgr / --video-features), per side.
_UIH_SIDE_INFO = ("video_cate1", "video_cate2")
_CANDIDATE_SIDE_INFO = ("video_cate1", "video_cate2", "user_video_cross1", "user_video_cross2")


@dataclasses.dataclass(frozen=True)
class ColumnPlan:
    """One column the recipe reads, and where its values come from."""

    column: str
    source: str  # a column of the sample schema
    value_type: str  # "int64" | "float32"
    is_sequence: bool
    delimiter: str  # element separator when written as a string
    # Id columns: the table size the values must stay below (None: not an id column).
    num_buckets: int | None = None
    # A stand-in derived from `source` (side info or a contextual feature the sample schema
    # does not have): values are source % num_buckets.
    derived: bool = False
    role: str = ""  # what fills it, for the manifest
    # The --set path of the feature's num_buckets (for the error when an id does not fit).
    buckets_field: str = ""
    # Label columns stay Arrow lists under --encoding string: TorchEasyRec's reader takes
    # labels only as list columns (reference section 1.2).
    is_label: bool = False


@dataclasses.dataclass(frozen=True)
class RecipeLayout:
    recipe: str
    encoding: str
    columns: tuple[ColumnPlan, ...]
    # The recipe's specs, to check what was written exactly as training will read it.
    features: tuple[FeatureSpec, ...]
    labels: tuple[LabelSpec, ...]
    # dlrm_hstu.max_seq_len and the contextual tokens per row (to size histories).
    max_seq_len: int = 0
    contextual_tokens: int = 0

    @property
    def needs_side_info(self) -> bool:
        """Whether some column copies the sample schema's MTGR columns (--mtgr)."""
        side = {f"{schema.UIH}__{name}" for name in _UIH_SIDE_INFO} | {
            f"{schema.CAND}__{name}" for name in _CANDIDATE_SIDE_INFO
        }
        return any(plan.source in side and not plan.derived for plan in self.columns)

    def item_tables(self) -> list[ColumnPlan]:
        """The item-id columns (history and candidates)."""
        return [
            plan
            for plan in self.columns
            if plan.source in (schema.UIH_VIDEO_ID, schema.CAND_VIDEO_ID) and not plan.derived
        ]

    def item_id_buckets(self) -> int:
        """The smallest num_buckets of the item-id tables, which item ids must stay below; 0
        when they are zch tables (ids of any value, kept as they are)."""
        sizes = [plan.num_buckets for plan in self.item_tables() if plan.num_buckets]
        return min(sizes) if sizes else 0

    def user_table(self) -> ColumnPlan | None:
        for plan in self.columns:
            if plan.source == schema.USER_ID and not plan.derived:
                return plan
        return None

    def describe(self) -> dict:
        """For manifest.json: the recipe, the encoding, and each column's source."""
        return {
            "recipe": self.recipe,
            "encoding": self.encoding,
            "columns": {plan.column: plan.role for plan in self.columns},
        }


def _field(column: str) -> str:
    """The field a column names, for matching side info: "uih_seq__video_cate1" ->
    "video_cate1", "item_video_cate1" -> "video_cate1", "item_target_watchtime" ->
    "target_watchtime"."""
    field = column.rpartition("__")[2]
    return field.removeprefix("item_")


def plan_layout(cfg: Message, recipe: str, encoding: str = "list") -> RecipeLayout:
    """The columns recipe `cfg` (from load_config) reads, each with its source."""
    if encoding not in ENCODINGS:
        raise ValueError(f"--encoding must be one of {', '.join(ENCODINGS)}, not {encoding!r}")
    features = feature_specs(cfg)
    labels = label_specs(cfg)
    by_name = {spec.name: spec for spec in features}
    config_paths = {feature.name: feature.path for feature in declared_features(cfg)}
    groups = group_feature_names(cfg)
    plans: dict[str, ColumnPlan] = {}

    def add(spec: FeatureSpec, source: str, role: str, derived: bool = False) -> None:
        if spec.column in plans:
            return  # two features reading one column (FG_DAG expressions may share one)
        plans[spec.column] = ColumnPlan(
            column=spec.column,
            source=source,
            value_type="int64" if spec.kind == "id" else spec.value_dtype,
            is_sequence=spec.sequence is not None,
            delimiter=spec.sequence_delim,
            # zch tables take ids of any value: nothing to stay below.
            num_buckets=spec.num_buckets if spec.kind == "id" and spec.zch is None else None,
            derived=derived,
            role=role,
            buckets_field=f"{config_paths[spec.name]}.num_buckets",
        )

    for group, item_source, prefix, side_info in (
        (UIH, schema.UIH_VIDEO_ID, schema.UIH, _UIH_SIDE_INFO),
        (CANDIDATE, schema.CAND_VIDEO_ID, schema.CAND, _CANDIDATE_SIDE_INFO),
    ):
        for index, name in enumerate(groups.get(group, [])):
            spec = by_name[name]
            field = _field(spec.column)
            if index == 0:
                add(spec, item_source, f"{item_source} (item id)")
            elif field in side_info:
                add(spec, f"{prefix}__{field}", f"{prefix}__{field}")
            else:
                add(spec, item_source, f"{item_source} % num_buckets (stand-in)", derived=True)
    for group, source in _RAW_SOURCES.items():
        for name in groups.get(group, []):
            add(by_name[name], source, source)
    for name in groups.get(CONTEXTUAL, []):
        spec = by_name[name]
        if spec.column in (schema.USER_ID, *schema.PROFILE_COLUMNS):
            add(spec, spec.column, spec.column)
        else:
            add(spec, schema.USER_ID, "user_id % num_buckets (stand-in)", derived=True)

    label_types = {label.column: label.value_dtype for label in labels}
    delimiter = labels[0].sequence_delim if labels else ";"
    for column in cfg.data_config.label_fields:
        if column in plans:
            continue
        value_type = label_types.get(column)
        if value_type is None:  # used by no task: by its name
            value_type = "float32" if "watch" in column.lower() else "int64"
        source = schema.CAND_WATCH_TIME if value_type == "float32" else schema.CAND_ACTION_WEIGHT
        plans[column] = ColumnPlan(
            column=column,
            source=source,
            value_type=value_type,
            is_sequence=True,
            delimiter=delimiter,
            role=f"{source} (label)",
            is_label=True,
        )
    dlrm = cfg.model_config.dlrm_hstu
    contextual = len(groups.get(CONTEXTUAL, []))
    return RecipeLayout(
        recipe=recipe,
        encoding=encoding,
        columns=tuple(plans.values()),
        features=tuple(features),
        labels=tuple(labels),
        max_seq_len=int(dlrm.max_seq_len),
        contextual_tokens=min(contextual, 1) if dlrm.concat_contextual_features else contextual,
    )


def _check_ids(plan: ColumnPlan, values: np.ndarray, recipe: str) -> None:
    if plan.num_buckets is None or plan.derived or not len(values):
        return
    largest = int(values.max())
    if largest >= plan.num_buckets:
        raise ValueError(
            f"column {plan.column!r} (from {plan.source}) holds id {largest}, but {recipe} "
            f"gives it a table of num_buckets {plan.num_buckets}: ids must be < num_buckets; "
            f"make the table larger (--set {plan.buckets_field}={largest + 1}, the same --set "
            "when training) or the ids fewer"
        )


def apply_layout(table: pa.Table, layout: RecipeLayout) -> pa.Table:
    """`table` (sample schema) -> the recipe's columns, sample_id first."""
    columns: dict[str, pa.Array] = {}
    if schema.SAMPLE_ID in table.column_names:
        columns[schema.SAMPLE_ID] = table.column(schema.SAMPLE_ID).combine_chunks()
    for plan in layout.columns:
        if plan.source not in table.column_names:
            raise ValueError(
                f"column {plan.column!r} needs {plan.source}, which these samples do not have "
                "(side info needs --mtgr for synthetic data, --video-features for KuaiRand)"
            )
        source = table.column(plan.source).combine_chunks()
        arrow_type = pa.int64() if plan.value_type == "int64" else pa.float32()
        if plan.is_sequence:
            flat = source.flatten().to_numpy(zero_copy_only=False)
            offsets = np.asarray(source.offsets, dtype=np.int32)
            offsets = pa.array(offsets - offsets[0], pa.int32())  # a sliced array starts > 0
        else:
            flat = source.to_numpy(zero_copy_only=False)
        flat = flat.astype(np.dtype(plan.value_type))
        if plan.derived:
            flat = flat % plan.num_buckets
        _check_ids(plan, flat, layout.recipe)
        values = pa.array(flat, arrow_type)
        array = pa.ListArray.from_arrays(offsets, values) if plan.is_sequence else values
        if plan.is_sequence and not plan.is_label and layout.encoding == "string":
            array = pc.binary_join(pc.cast(array, pa.list_(pa.string())), plan.delimiter)
        columns[plan.column] = array
    return pa.table(columns)


def layout_schema(layout: RecipeLayout) -> Mapping[str, str]:
    """Column -> Arrow type name of what apply_layout writes (for the manifest)."""
    types = {schema.SAMPLE_ID: "int64"}
    for plan in layout.columns:
        if plan.is_sequence:
            as_string = layout.encoding == "string" and not plan.is_label
            types[plan.column] = "string" if as_string else f"list<item: {plan.value_type}>"
        else:
            types[plan.column] = plan.value_type
    return types
