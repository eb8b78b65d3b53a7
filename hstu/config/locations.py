"""Where each field of a text-format config sits (line:column), by field path.

The protobuf text parser does the real parsing; this module only re-reads the same text to map
field paths such as `model_config.feature_groups[2].group_type` to the line and column where
they were written, so that errors found after parsing (cross-field rules) can point at them. It
follows the nesting of `{ }`, `< >` and `[ ]` and uses the message descriptors to know which
fields are repeated (and so get an index in the path).
"""

from __future__ import annotations

import collections
import dataclasses
import re

from google.protobuf import descriptor

from hstu.config.errors import Location

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?)
  | (?P<word>[A-Za-z0-9_.+\-]+)
  | (?P<other>.)
    """,
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class _Token:
    text: str
    line: int  # 1-based, like protobuf's ParseError
    column: int  # 1-based
    is_string: bool


def _tokens(text: str) -> list[_Token]:
    tokens = []
    line, line_start = 1, 0
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind not in ("space", "comment"):
            tokens.append(
                _Token(match.group(), line, match.start() - line_start + 1, kind == "string")
            )
        newlines = match.group().count("\n")
        if newlines:
            line += newlines
            line_start = match.start() + match.group().rindex("\n") + 1
    return tokens


class _Stopped(Exception):
    pass


@dataclasses.dataclass
class ScanResult:
    # field path -> (line, column) where the field's name was written. Repeated fields get one
    # entry per element ("a.b[0]", "a.b[1]") plus one for the first occurrence ("a.b").
    positions: dict[str, tuple[int, int]]
    # Only when scanning stopped at a position: the paths of the messages open there, outermost
    # first, and the field whose value was being read (None between fields).
    open_messages: list[str]
    pending_field: str | None


class _Scanner:
    def __init__(self, text: str, stop: tuple[int, int] | None):
        self.tokens = _tokens(text)
        self.index = 0
        self.stop = stop
        self.positions: dict[str, tuple[int, int]] = {}
        self.open_messages: list[str] = []
        self.pending_field: str | None = None

    def peek(self) -> _Token | None:
        if self.index >= len(self.tokens):
            return None
        token = self.tokens[self.index]
        if self.stop is not None and (token.line, token.column) >= self.stop:
            raise _Stopped
        return token

    def take(self) -> _Token | None:
        token = self.peek()
        self.index += 1
        return token

    def message_body(self, path: str, message: descriptor.Descriptor | None, closer: str | None):
        counts: collections.Counter[str] = collections.Counter()
        while True:
            token = self.peek()
            if token is None:
                return
            if closer is not None and token.text == closer:
                self.index += 1
                return
            if token.text in (",", ";"):
                self.index += 1
                continue
            self.field(path, message, counts)

    def field(self, path: str, message: descriptor.Descriptor | None, counts: collections.Counter):
        name_token = self.take()
        name = name_token.text
        field = message.fields_by_name.get(name) if message is not None else None
        repeated = field is not None and field.is_repeated
        child_type = field.message_type if field is not None else None
        base = f"{path}.{name}" if path else name
        self.positions.setdefault(base, (name_token.line, name_token.column))
        self.pending_field = base

        token = self.peek()
        if token is not None and token.text == ":":
            self.index += 1
            token = self.peek()
        if token is None:
            return
        if token.text == "[":
            self.index += 1
            while True:
                token = self.peek()
                if token is None:
                    return
                if token.text == "]":
                    self.index += 1
                    break
                if token.text == ",":
                    self.index += 1
                    continue
                element = f"{base}[{counts[name]}]"
                counts[name] += 1
                self.positions.setdefault(element, (token.line, token.column))
                if token.text in ("{", "<"):
                    self.index += 1
                    self.nested(element, child_type, "}" if token.text == "{" else ">")
                else:
                    self.value()
        else:
            element = f"{base}[{counts[name]}]" if repeated else base
            counts[name] += 1
            self.positions.setdefault(element, (name_token.line, name_token.column))
            if token.text in ("{", "<"):
                self.index += 1
                self.nested(element, child_type, "}" if token.text == "{" else ">")
            else:
                self.value()
        self.pending_field = None

    def nested(self, path: str, message: descriptor.Descriptor | None, closer: str):
        self.open_messages.append(path)
        self.pending_field = None
        self.message_body(path, message, closer)
        self.open_messages.pop()

    def value(self):
        token = self.take()
        if token is not None and token.text == "-":
            self.take()
        elif token is not None and token.is_string:
            # Adjacent string literals are concatenated by the text format.
            while (following := self.peek()) is not None and following.is_string:
                self.index += 1


def scan(text: str, root: descriptor.Descriptor, stop: tuple[int, int] | None = None) -> ScanResult:
    """Map field paths to positions; with `stop` (line, column), also report what was open there."""
    scanner = _Scanner(text, stop)
    try:
        scanner.message_body("", root, None)
    except _Stopped:
        return ScanResult(scanner.positions, list(scanner.open_messages), scanner.pending_field)
    return ScanResult(scanner.positions, [], None)


def parent_path(path: str) -> str:
    """'a.b[2].c' -> 'a.b[2]' -> 'a.b' -> 'a' -> ''."""
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path.rpartition(".")[0]


class Locator:
    """Answers `where(path)`: the file position of a field, or the --set that changed it."""

    def __init__(self, source: str, positions: dict[str, tuple[int, int]] | None = None):
        self.source = source
        self.positions = dict(positions or {})
        self.overrides: dict[str, Location] = {}

    def set_by_override(self, path: str, override: Location) -> None:
        # The override now owns this field and everything under it.
        for known in [
            p for p in self.positions if p == path or p.startswith((path + ".", path + "["))
        ]:
            del self.positions[known]
        for known in [p for p in self.overrides if p.startswith((path + ".", path + "["))]:
            del self.overrides[known]
        self.overrides[path] = override

    def where(self, path: str) -> Location:
        """Location of `path`, else of its nearest enclosing field, else the file itself."""
        current = path
        while True:
            if current in self.overrides:
                return self.overrides[current]
            if current in self.positions:
                line, column = self.positions[current]
                return Location(self.source, line, column)
            if not current:
                return Location(self.source)
            current = parent_path(current)
