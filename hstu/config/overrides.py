"""--set overrides: `path.to.field=value` applied to a parsed config.

Paths are field names joined by dots. A repeated field takes a selector: an index
(`feature_groups[0]`) or, for messages, the element's name (`feature_groups[candidate]`,
`task_configs[is_click]`, `feature_configs[user_id]`, `features[video_id]`), matched against
group_name / task_name / sequence_name / feature_name. Values are written as in the config
file: numbers, enum names, true/false, strings with or without quotes, lists `[1, 2]` for
repeated fields, and `{ ... }` (text format) for a whole message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf import descriptor, text_format
from google.protobuf.message import Message

from hstu.config import schema, support
from hstu.config.errors import ConfigError, Location, one_of, suggest
from hstu.config.locations import Locator

_SEGMENT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<selector>[^\]]*)\])?$")
_NAME_FIELDS = ("group_name", "task_name", "sequence_name", "feature_name")


def _element_name(element: Message) -> str | None:
    """The name an element of a repeated message field is selected by, if it has one."""
    for field_name in _NAME_FIELDS:
        if field_name in element.DESCRIPTOR.fields_by_name:
            return getattr(element, field_name)
    # FeatureConfig / SeqFeatureConfig wrap the feature in a oneof.
    for oneof in element.DESCRIPTOR.oneofs:
        which = element.WhichOneof(oneof.name)
        if which is not None:
            inner = getattr(element, which)
            for field_name in _NAME_FIELDS:
                if field_name in inner.DESCRIPTOR.fields_by_name:
                    return getattr(inner, field_name)
    return None


def _select(container, selector: str, field_path: str, origin: Location) -> int:
    size = len(container)
    if re.fullmatch(r"-?\d+", selector.strip()):
        index = int(selector)
        if not -size <= index < size:
            raise ConfigError(
                origin, field_path, f"index {index} out of range: it has {size} element(s)"
            )
        return index % size
    if size == 0 or not isinstance(container[0], Message):
        raise ConfigError(origin, field_path, f"expected an integer index, got [{selector}]")
    names = [_element_name(element) for element in container]
    matches = [index for index, name in enumerate(names) if name == selector]
    if len(matches) == 1:
        return matches[0]
    known = [name for name in names if name is not None]
    if not matches:
        raise ConfigError(
            origin,
            field_path,
            f"no element named {selector!r}{suggest(selector, known)}; names: {one_of(known)}",
        )
    raise ConfigError(origin, field_path, f"{len(matches)} elements are named {selector!r}")


def _quote_if_bare(field: descriptor.FieldDescriptor, value: str) -> str:
    """Strings may be given without quotes on the command line."""
    if field.type != descriptor.FieldDescriptor.TYPE_STRING:
        return value
    stripped = value.strip()
    if stripped[:1] in ('"', "'") or (field.is_repeated and stripped[:1] == "["):
        return stripped
    return '"' + stripped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_into(parent: Message, field: descriptor.FieldDescriptor, value: str) -> Message:
    """A fresh message of the parent's type with only `field` parsed from `value`."""
    from hstu.config.loader import explain_parse_error

    scratch = type(parent)()
    if field.message_type is not None and not field.is_repeated:
        text = f"{field.name} {value}"
    else:
        text = f"{field.name}: {_quote_if_bare(field, value)}"
    try:
        text_format.Parse(text, scratch, descriptor_pool=schema.pool())
    except text_format.ParseError as error:
        message = str(error)
        if error.GetLine() is not None:
            message = message.removeprefix(f"{error.GetLine()}:{error.GetColumn()} : ")
            message = message.removeprefix(f"'{text}': ")
        raise ValueError(explain_parse_error(message)) from None
    return scratch


def _assign(parent: Message, field: descriptor.FieldDescriptor, value: str) -> None:
    value = value.strip()
    if field.message_type is not None and not field.is_repeated and not value.startswith("{"):
        raise ValueError(
            f"{field.name} is a message ({field.message_type.name}): give {{ ... }} "
            "or set one of its fields"
        )
    if field.is_repeated and not value.startswith("["):
        raise ValueError(
            f"{field.name} is repeated: give a list [a, b, ...] or select one element "
            f"with {field.name}[index]"
        )
    scratch = _parse_into(parent, field, value)
    if field.is_repeated:
        parent.ClearField(field.name)
        getattr(parent, field.name).extend(getattr(scratch, field.name))
    elif field.message_type is not None:
        getattr(parent, field.name).CopyFrom(getattr(scratch, field.name))
        getattr(parent, field.name).SetInParent()
    else:
        setattr(parent, field.name, getattr(scratch, field.name))


def apply_override(config: Message, spec: str, locator: Locator) -> None:
    origin = Location(f"--set {spec!r}")
    if "=" not in spec:
        raise ConfigError(origin, "", "expected path.to.field=value")
    path_text, value = spec.split("=", 1)
    segments = path_text.strip().split(".")
    message, path = config, ""
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        match = _SEGMENT.match(segment.strip())
        if match is None:
            raise ConfigError(
                origin, path, f"bad path element {segment!r}: expected name or name[selector]"
            )
        name, selector = match["name"], match["selector"]
        field = message.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            unsupported = support.unsupported_ancestor(path) if path else None
            if unsupported is not None:
                raise ConfigError(origin, unsupported[0], unsupported[1])
            names = [f.name for f in message.DESCRIPTOR.fields]
            raise ConfigError(
                origin,
                path,
                f'unknown field "{name}" in {message.DESCRIPTOR.name}{suggest(name, names)}',
            )
        field_path = f"{path}.{name}" if path else name
        try:
            if selector is not None:
                if not field.is_repeated:
                    raise ConfigError(origin, field_path, "not a repeated field: drop the [...]")
                container = getattr(message, name)
                index = _select(container, selector, field_path, origin)
                field_path = f"{field_path}[{index}]"
                if field.message_type is None:
                    if not last:
                        raise ConfigError(origin, field_path, "a number or string has no fields")
                    scratch = _parse_into(message, field, f"[{value}]")
                    if len(getattr(scratch, name)) != 1:
                        raise ValueError("expected one value")
                    container[index] = getattr(scratch, name)[0]
                elif last:
                    element = container[index]
                    if not value.strip().startswith("{"):
                        raise ValueError(f"an element of {name} is a message: give {{ ... }}")
                    scratch = _parse_into(message, field, f"[{value.strip()}]")
                    element.CopyFrom(getattr(scratch, name)[0])
                else:
                    message = container[index]
            elif last:
                _assign(message, field, value)
            elif field.is_repeated:
                raise ConfigError(
                    origin,
                    field_path,
                    f"{name} is repeated: select an element with {name}[index] or {name}[name]",
                )
            elif field.message_type is None:
                raise ConfigError(origin, field_path, f"{name} is a value, it has no fields")
            else:
                message = getattr(message, name)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(
                origin, field_path, f"cannot set {value.strip()!r}: {error}"
            ) from None
        path = field_path
    # Anything validation later reports about this field should point at the override.
    locator.set_by_override(path, origin)


def apply_overrides(config: Message, overrides: Sequence[str], locator: Locator) -> None:
    for spec in overrides:
        apply_override(config, spec, locator)
