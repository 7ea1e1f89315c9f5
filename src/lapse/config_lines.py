"""Where each key of a TOML document sits, by line.

``tomllib`` returns values but no positions, and pydantic reports a bad key by
its path only. ``policy check`` must still say ``lapse.toml:14: apps[1].idel:
unknown key``, so this module maps every dotted path to the line that defines
it. It is a small scanner that understands just enough TOML to step over values
correctly (all four string kinds, multi-line arrays, inline tables), so text
inside them is never taken for a key. It never raises: tomllib stays the judge
of validity, and where the scanner cannot follow the text it resumes at the
next line.

Paths use the same spelling as pydantic error locations turned into text:
``server.listen``, ``apps[1].idel``, ``apps[0].privileged[2].max_auth_age``,
``networks[0].cidrs[1]`` (an array element), ``apps[1]`` (the ``[[apps]]``
header). Keys that are not bare words are quoted: ``"a.b"``.
"""

from __future__ import annotations

import bisect
import json
import re
import tomllib
from collections.abc import Iterable

__all__ = ["format_path", "split_path", "locate", "line_of"]

Part = str | int

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN = re.compile(r'\[(\d+)\]|(?:^|\.)(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_-]+))')


def format_path(parts: Iterable[Part]) -> str:
    """Spell a key path the way errors show it: ``apps[1].idel``."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            out.append(f"[{part}]")
            continue
        text = str(part)
        segment = text if _BARE.fullmatch(text) else json.dumps(text, ensure_ascii=False)
        out.append("." + segment if out else segment)
    return "".join(out)


def split_path(path: str) -> list[Part] | None:
    """The inverse of :func:`format_path`; ``None`` for text it did not produce."""
    parts: list[Part] = []
    pos = 0
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if match is None or (match.group(0).startswith(".") and not parts):
            return None
        index, quoted, bare = match.groups()
        if index is not None:
            parts.append(int(index))
        elif quoted is not None:
            try:
                parts.append(json.loads(f'"{quoted}"'))
            except ValueError:
                return None
        else:
            parts.append(bare)
        pos = match.end()
    return parts


def line_of(locations: dict[str, int], path: str) -> int | None:
    """The line of ``path``, else of its nearest recorded parent.

    A missing required key has no line of its own; pointing at its table's
    header (``[[apps]]``) is the most useful place to send the reader.
    """
    if path in locations:
        return locations[path]
    parts = split_path(path)
    if parts is None:
        return None
    for end in range(len(parts) - 1, 0, -1):
        line = locations.get(format_path(parts[:end]))
        if line is not None:
            return line
    return None


def locate(text: str) -> dict[str, int]:
    """Map every key, table header and array element path to its 1-based line."""
    scanner = _Scanner(text)
    scanner.run()
    return scanner.found


class _Confused(Exception):
    """The scanner met text it cannot follow (invalid TOML); skip the line."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.newlines = [m.start() for m in re.finditer("\n", text)]
        self.found: dict[str, int] = {}
        self.table: list[Part] = []
        # Entries seen so far per array of tables, keyed by the array's resolved
        # path: "apps" and "apps[0].privileged" count separately, which is why
        # a [[apps.privileged]] index restarts under each [[apps]].
        self.arrays: dict[str, int] = {}

    # -- positions -------------------------------------------------------

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_left(self.newlines, self.i if pos is None else pos) + 1

    def record(self, parts: list[Part], line: int) -> None:
        self.found.setdefault(format_path(parts), line)

    def record_all(self, parts: list[Part], line: int) -> None:
        """Record ``parts`` and each prefix (implicit parent tables)."""
        for end in range(1, len(parts) + 1):
            self.record(parts[:end], line)

    # -- low-level movement ------------------------------------------------

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < self.n else ""

    def skip_ws(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t":
            self.i += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.s.find("\n", self.i)
            self.i = self.n if end < 0 else end

    def skip_blank(self) -> None:
        """Whitespace, newlines and comments, as allowed inside arrays."""
        while self.i < self.n:
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                self.skip_comment()
            else:
                return

    def skip_line(self) -> None:
        end = self.s.find("\n", self.i)
        self.i = self.n if end < 0 else end + 1

    def expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise _Confused
        self.i += len(token)

    # -- statements ------------------------------------------------------

    def run(self) -> None:
        while self.i < self.n:
            start = self.i
            try:
                self.statement()
            except _Confused:
                self.skip_line()
            if self.i == start:  # always make progress
                self.skip_line()

    def statement(self) -> None:
        self.skip_ws()
        c = self.peek()
        if c == "\n":
            self.i += 1
            return
        if c == "\r" and self.peek(1) == "\n":
            self.i += 2
            return
        if c == "#":
            self.skip_comment()
            return
        if c == "":
            return
        if c == "[":
            self.header()
        else:
            self.keyval(self.table)
        self.end_of_line()

    def end_of_line(self) -> None:
        self.skip_ws()
        self.skip_comment()
        if self.peek() == "\n":
            self.i += 1
        elif self.s.startswith("\r\n", self.i):
            self.i += 2
        elif self.i < self.n:
            raise _Confused

    def header(self) -> None:
        line = self.line()
        if self.s.startswith("[[", self.i):
            self.i += 2
            self.skip_ws()
            parts = self.key()
            self.skip_ws()
            self.expect("]]")
            array = self.resolve(parts[:-1]) + [parts[-1]]
            key = format_path(array)
            index = self.arrays.get(key, 0)
            self.arrays[key] = index + 1
            self.table = array + [index]
        else:
            self.i += 1
            self.skip_ws()
            parts = self.key()
            self.skip_ws()
            self.expect("]")
            self.table = self.resolve(parts)
        self.record_all(self.table, line)

    def resolve(self, parts: list[Part]) -> list[Part]:
        """Header names point into the newest entry of any array of tables."""
        out: list[Part] = []
        for part in parts:
            out.append(part)
            count = self.arrays.get(format_path(out))
            if count:
                out.append(count - 1)
        return out

    def keyval(self, base: list[Part]) -> None:
        line = self.line()
        parts = self.key()
        self.skip_ws()
        self.expect("=")
        self.skip_ws()
        path = base + parts
        for end in range(len(base) + 1, len(path) + 1):
            self.record(path[:end], line)
        self.value(path)

    # -- keys --------------------------------------------------------------

    def key(self) -> list[Part]:
        parts: list[Part] = [self.key_segment()]
        while True:
            save = self.i
            self.skip_ws()
            if self.peek() != ".":
                self.i = save
                return parts
            self.i += 1
            self.skip_ws()
            parts.append(self.key_segment())

    def key_segment(self) -> str:
        c = self.peek()
        if c == '"':
            start = self.i
            self.basic_string()
            raw = self.s[start : self.i]
            try:
                return tomllib.loads("k = " + raw)["k"]
            except tomllib.TOMLDecodeError:
                return raw[1:-1]
        if c == "'":
            start = self.i
            self.literal_string()
            return self.s[start + 1 : self.i - 1]
        match = _BARE.match(self.s, self.i)
        if match is None:
            raise _Confused
        self.i = match.end()
        return match.group(0)

    # -- values ------------------------------------------------------------

    def value(self, path: list[Part]) -> None:
        if self.s.startswith('"""', self.i):
            self.multiline('"""', escapes=True)
        elif self.s.startswith("'''", self.i):
            self.multiline("'''", escapes=False)
        elif self.peek() == '"':
            self.basic_string()
        elif self.peek() == "'":
            self.literal_string()
        elif self.peek() == "[":
            self.array(path)
        elif self.peek() == "{":
            self.inline_table(path)
        else:
            # numbers, booleans, dates (which may contain one space)
            match = re.compile(r"[^,\]}#\r\n]*").match(self.s, self.i)
            token = match.group(0).rstrip() if match else ""
            if not token:
                raise _Confused
            self.i += len(token)

    def basic_string(self) -> None:
        j = self.i + 1
        while j < self.n:
            c = self.s[j]
            if c == "\\":
                j += 2
            elif c == '"':
                self.i = j + 1
                return
            elif c == "\n":
                raise _Confused
            else:
                j += 1
        raise _Confused

    def literal_string(self) -> None:
        end = self.s.find("'", self.i + 1)
        newline = self.s.find("\n", self.i + 1)
        if end < 0 or 0 <= newline < end:
            raise _Confused
        self.i = end + 1

    def multiline(self, quote: str, *, escapes: bool) -> None:
        j = self.i + 3
        while j < self.n:
            if escapes and self.s[j] == "\\":
                j += 2
            elif self.s.startswith(quote, j):
                end = j + 3
                # up to two quote characters may sit just before the delimiter
                while end < self.n and self.s[end] == quote[0] and end - j < 5:
                    end += 1
                self.i = end
                return
            else:
                j += 1
        self.i = self.n  # unterminated: nothing after it can be located

    def array(self, path: list[Part]) -> None:
        self.i += 1
        index = 0
        while True:
            self.skip_blank()
            if self.peek() == "]":
                self.i += 1
                return
            if self.i >= self.n:
                raise _Confused
            self.record(path + [index], self.line())
            self.value(path + [index])
            index += 1
            self.skip_blank()
            if self.peek() == ",":
                self.i += 1
            elif self.peek() == "]":
                self.i += 1
                return
            else:
                raise _Confused

    def inline_table(self, path: list[Part]) -> None:
        self.i += 1
        self.skip_blank()
        if self.peek() == "}":
            self.i += 1
            return
        while True:
            self.skip_blank()
            self.keyval(path)
            self.skip_blank()
            if self.peek() == ",":
                self.i += 1
                self.skip_blank()
                if self.peek() == "}":  # trailing comma (TOML 1.1)
                    self.i += 1
                    return
            elif self.peek() == "}":
                self.i += 1
                return
            else:
                raise _Confused
