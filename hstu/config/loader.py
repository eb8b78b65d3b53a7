"""load_config: text-format pipeline config -> validated EasyRecConfig message.

Steps: parse (protobuf's text-format parser, errors rewritten to name the field path and
suggest names) -> --set overrides -> fields this project does not implement -> required
fields -> shorthands, the token_budget alias and defaults -> cross-field rules (validate.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from hstu.config import schema, support
from hstu.config.errors import ConfigError, Location, one_of, suggest
from hstu.config.locations import Locator, scan
from hstu.config.overrides import apply_overrides

_UNKNOWN_FIELD = re.compile(r'Message type "(?P<type>[\w.]+)" has no field named "(?P<name>[^"]*)"')
_UNKNOWN_ENUM = re.compile(
    r'Enum type "(?P<type>[\w.]+)" has no value '
    r"(?:named (?P<name>\S+?)|with number (?P<number>-?\d+))\."
)


def root_descriptor():
    return schema.message_descriptor("EasyRecConfig")


def _short(full_name: str) -> str:
    return full_name.rpartition(".")[2]


_REPEATED_SINGULAR = re.compile(r'should not have multiple "(?P<name>\w+)" fields')
_ONEOF_CONFLICT = re.compile(
    r'Field "(?P<field>\w+)" is specified along with field "(?P<other>\w+)", another member '
    r'of oneof "(?P<oneof>\w+)"'
)


def explain_parse_error(message: str) -> str:
    """Readable text for a text_format error message (enum values, repeats, oneofs)."""
    match = _REPEATED_SINGULAR.search(message)
    if match:
        return f'"{match["name"]}" is set more than once; it takes one value'
    match = _ONEOF_CONFLICT.search(message)
    if match:
        return (
            f'"{match["field"]}" and "{match["other"]}" are both set, but they are '
            f"alternatives ({match['oneof']}): keep one"
        )
    match = _UNKNOWN_ENUM.search(message)
    if match:
        enum = schema.pool().FindEnumTypeByName(match["type"])
        names = [value.name for value in enum.values]
        given = match["name"] if match["name"] is not None else match["number"]
        return (
            f"{given} is not a value of {_short(match['type'])}; expected one of "
            f"{one_of(names)}{suggest(given, names) if match['name'] else ''}"
        )
    return message


def _parse_error(error: text_format.ParseError, text: str, source: str) -> ConfigError:
    line, column = error.GetLine(), error.GetColumn()
    message = str(error)
    if line is not None:
        message = message.removeprefix(f"{line}:{column} : ")
        lines = text.splitlines()
        if 0 < line <= len(lines):
            # The tokenizer quotes the whole offending line before some messages.
            message = message.removeprefix(f"'{lines[line - 1]}': ")
    where = Location(source, line, column)
    if line is None:
        return ConfigError(where, "", message)

    scanned = scan(text, root_descriptor(), stop=(line, column))
    open_path = scanned.open_messages[-1] if scanned.open_messages else ""
    path = scanned.pending_field or open_path

    match = _UNKNOWN_FIELD.search(message)
    if match:
        # Inside a message this project keeps only as a placeholder (e.g. combo_feature {...}):
        # say that the enclosing field is not supported rather than that its contents are unknown.
        unsupported = support.unsupported_ancestor(open_path)
        if unsupported is not None:
            unsupported_path, problem = unsupported
            locator = Locator(source, scanned.positions)
            return ConfigError(locator.where(unsupported_path), unsupported_path, problem)
        message_type = schema.pool().FindMessageTypeByName(match["type"])
        names = [field.name for field in message_type.fields]
        return ConfigError(
            where,
            open_path,
            f'unknown field "{match["name"]}" in {message_type.name}'
            f"{suggest(match['name'], names)}",
        )
    conflict = _ONEOF_CONFLICT.search(message)
    if conflict and not scanned.pending_field:
        path = f"{open_path}.{conflict['field']}" if open_path else conflict["field"]
    return ConfigError(where, path, explain_parse_error(message))


def parse_config(text: str, source: str) -> tuple[Message, Locator]:
    """Parse text-format `text` (named `source` in errors) without any checks beyond syntax."""
    config = schema.message_class("EasyRecConfig")()
    try:
        # Parse (not Merge): a singular field written twice is an error, as in TorchEasyRec.
        text_format.Parse(text, config, descriptor_pool=schema.pool())
    except text_format.ParseError as error:
        raise _parse_error(error, text, source) from None
    return config, Locator(source, scan(text, root_descriptor()).positions)


def _check_required(message: Message, path: str, locator: Locator) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.is_required and not message.HasField(field.name):
            raise ConfigError(locator.where(path), path, f'missing required field "{field.name}"')
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        field_path = f"{path}.{field.name}" if path else field.name
        if field.is_repeated:
            for index, element in enumerate(value):
                _check_required(element, f"{field_path}[{index}]", locator)
        else:
            _check_required(value, field_path, locator)


def _messages(message: Message, path: str):
    """(path, message) of `message` and every message under it."""
    yield path, message
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        field_path = f"{path}.{field.name}" if path else field.name
        if field.is_repeated:
            for index, element in enumerate(value):
                yield from _messages(element, f"{field_path}[{index}]")
        else:
            yield from _messages(value, field_path)


def _expand_shorthands(config: Message, locator: Locator) -> None:
    for path, message in list(_messages(config, "")):
        if message.DESCRIPTOR.name != "MLP":
            continue
        if message.HasField("hidden_dim"):
            if len(message.hidden_units):
                raise ConfigError(
                    locator.where(f"{path}.hidden_dim"),
                    f"{path}.hidden_dim",
                    "set hidden_units or hidden_dim (shorthand for one layer), not both",
                )
            message.hidden_units.append(message.hidden_dim)
            message.ClearField("hidden_dim")
        if len(message.dropout_ratio) == 1 and len(message.hidden_units) > 1:
            ratio = message.dropout_ratio[0]
            message.dropout_ratio.extend([ratio] * (len(message.hidden_units) - 1))


def _merge_batch_cost_alias(config: Message, locator: Locator) -> None:
    """data_config.token_budget is this project's earlier name of TorchEasyRec's
    batch_cost_size: either one set gives both the same value, so that the saved config and
    every reader of either field agree. Both set to different values is an error. Runs before
    the defaults are written (token_budget has a default of 0; batch_cost_size has none)."""
    if not config.HasField("data_config"):
        return
    data = config.data_config
    alias = data.token_budget if data.HasField("token_budget") else None
    budget = data.batch_cost_size if data.HasField("batch_cost_size") else None
    if alias is not None and budget is not None and alias != budget:
        raise ConfigError(
            locator.where("data_config.token_budget"),
            "data_config.token_budget",
            f"token_budget {alias} disagrees with batch_cost_size {budget} "
            f"({locator.where('data_config.batch_cost_size')}); token_budget is this project's "
            "earlier name of batch_cost_size: set batch_cost_size only",
        )
    value = budget if budget is not None else alias
    if value:
        data.batch_cost_size = value
        data.token_budget = value


def _fill_defaults(config: Message) -> None:
    """Write every explicit proto2 default into the present messages, plus derived defaults.

    Reading an unset field already yields its default; writing them out makes the effective
    config (as saved with a run, or printed) show every value that is in force.
    """
    config.eval_config.SetInParent()
    config.export_config.SetInParent()
    for _, message in list(_messages(config, "")):
        for field in message.DESCRIPTOR.fields:
            if (
                field.is_repeated
                or field.message_type is not None
                or field.containing_oneof is not None
                or not field.has_default_value
                or message.HasField(field.name)
            ):
                continue
            setattr(message, field.name, field.default_value)

    # Derived defaults, only inside blocks that are present (validation reports missing ones).
    data = config.data_config
    if config.HasField("data_config") and not data.HasField("eval_batch_size"):
        data.eval_batch_size = data.batch_size
    for feature_config in config.feature_configs:
        if feature_config.WhichOneof("feature") == "sequence_feature":
            sequence = feature_config.sequence_feature
            if not sequence.HasField("sequence_pk"):
                sequence.sequence_pk = f"user:{sequence.sequence_name}"
    train = config.train_config
    for name in ("sparse_optimizer", "dense_optimizer"):
        optimizer = getattr(train, name)
        if train.HasField(name) and optimizer.WhichOneof("learning_rate") is None:
            optimizer.constant_learning_rate.SetInParent()


def load_config_text(text: str, source: str = "<config>", overrides: Sequence[str] = ()) -> Message:
    """load_config for a config given as text; `source` names it in error messages."""
    from hstu.config.validate import validate

    config, locator = parse_config(text, source)
    apply_overrides(config, overrides, locator)
    support.check_unsupported(config, locator)
    _check_required(config, "", locator)
    _expand_shorthands(config, locator)
    _merge_batch_cost_alias(config, locator)
    _fill_defaults(config)
    validate(config, locator)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Message:
    """Load, complete and validate a TorchEasyRec pipeline config (protobuf text format).

    `overrides` are "path.to.field=value" strings (launch.py --set). Raises ConfigError, whose
    message reads `<file>:<line>:<col>: <field path>: <what was expected>`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(str(path), "", f"cannot read the config: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(
            Location(str(path), line, column), "", f"not UTF-8 text ({error.reason})"
        ) from None
    return load_config_text(text, str(path), overrides)
