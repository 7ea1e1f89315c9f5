"""The line locator: every key's dotted path -> the line that defines it."""

from __future__ import annotations

import itertools
import json
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lapse.config_lines import format_path, line_of, locate, split_path

DOC = """\
# lapse.toml
[server]
listen = "127.0.0.1:8080"   # trailing comment

  [[apps]]
  name = "billing"
  note = \"\"\"
idel = "this is text, not a key"
[[apps]]
\"\"\"
  hosts = [
    "billing.example.test",  # a comment with = and [brackets]
    'x]',
  ]
    [[apps.privileged]]
    paths = ["/a"]
    [[apps.privileged]]
    max_auth_age = "5m"
[[apps]]
name = "wiki"
idel = "1h"
  [[apps.privileged]]
  mfa = true
"a.b" = 1
c . d = 2
inline = { e = 1, f = { g = 2 } }
lit = '''
[networks]
'''
[[networks]]
cidrs = ["10.0.0.0/8"]
[defaults]
idle = "30m"
"""


def test_the_paths_the_brief_names() -> None:
    tomllib.loads(DOC)  # the fixture itself is valid TOML
    where = locate(DOC)
    assert where["server"] == 2
    assert where["server.listen"] == 3
    assert where["apps"] == 5
    assert where["apps[0]"] == 5
    assert where["apps[0].note"] == 7
    assert where["apps[0].hosts"] == 11
    assert where["apps[0].hosts[0]"] == 12
    assert where["apps[0].hosts[1]"] == 13
    assert where["apps[0].privileged[0]"] == 15
    assert where["apps[0].privileged[0].paths"] == 16
    assert where["apps[0].privileged[1].max_auth_age"] == 18
    assert where["apps[1]"] == 19
    assert where["apps[1].idel"] == 21
    # the [[apps.privileged]] index restarts under each [[apps]]
    assert where["apps[1].privileged[0]"] == 22
    assert where["apps[1].privileged[0].mfa"] == 23
    assert where['apps[1].privileged[0]."a.b"'] == 24
    assert where["apps[1].privileged[0].c.d"] == 25
    assert where["apps[1].privileged[0].inline.f.g"] == 26
    assert where["apps[1].privileged[0].lit"] == 27
    assert where["networks[0]"] == 30
    assert where["networks[0].cidrs"] == 31
    assert where["networks[0].cidrs[0]"] == 31
    assert where["defaults.idle"] == 33
    # text inside multi-line strings is never taken for keys or headers
    assert "apps[0].idel" not in where
    assert "apps[2]" not in where
    assert "networks" in where and where["networks"] == 30


def test_line_of_falls_back_to_the_nearest_parent() -> None:
    where = locate(DOC)
    assert line_of(where, "apps[1].idel") == 21
    assert line_of(where, "apps[1].name.nonsense") == 20
    assert line_of(where, "apps[1].privileged[0].max_auth_age") == 22  # missing key -> its header
    assert line_of(where, "networks[0].name") == 30
    assert line_of(where, "oidc.issuer") is None
    assert line_of(where, "not a path[") is None


def test_crlf_and_unterminated_text_do_not_raise() -> None:
    crlf = DOC.replace("\n", "\r\n")
    assert locate(crlf)["apps[1].idel"] == 21
    assert locate('a = """never closed\nb = 1\n') == {"a": 1}
    assert locate("[broken\nx = 1\n")["x"] == 2


def test_format_path_and_split_path() -> None:
    assert format_path(("apps", 1, "idel")) == "apps[1].idel"
    assert format_path(("apps", 0, "privileged", 2, "max_auth_age")) == "apps[0].privileged[2].max_auth_age"
    assert format_path(("a.b", "c")) == '"a.b".c'
    assert format_path(()) == ""
    assert split_path('apps[1]."a.b"[0].c') == ["apps", 1, "a.b", 0, "c"]
    assert split_path(".x") is None


@given(st.lists(st.one_of(st.text(min_size=1, max_size=6), st.integers(0, 99)), min_size=1, max_size=5).filter(
    lambda parts: isinstance(parts[0], str)
))
def test_split_path_inverts_format_path(parts: list[str | int]) -> None:
    assert split_path(format_path(parts)) == parts


@given(st.text(max_size=200))
def test_locate_never_raises(text: str) -> None:
    assert isinstance(locate(text), dict)


# -- random documents: the line of every key is known while rendering ------

_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=6)
_QUOTED = st.text(alphabet="ab .=#[]{}'\"\\,xyz", min_size=1, max_size=6)
_TRICKY = "ab =#[]{},.'\"\\x"
_SCALARS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(
        ["true", "false", "1.5", "-0.25", "inf", "nan", "1e6", "0x1F", "1_000", "1979-05-27 07:32:00",
         "1979-05-27T07:32:00Z", "07:32:00", '""', "''"]
    ),
    st.text(alphabet=_TRICKY, max_size=8).map(lambda s: json.dumps(s)),
    st.text(alphabet=_TRICKY.replace("'", ""), max_size=8).map(lambda s: f"'{s}'"),
)
_FAKE_LINES = st.sampled_from(
    ["fake = 1", "[fake.table]", "[[fake]]", '  indented = "x"', "# not a comment", 'quote " inside',
     'two "" quotes', "a.b = 2", "", "{ x = 1 }", "]"]
)

Sub = tuple[tuple[str | int, ...], int]  # (path below the key, line offset)


@st.composite
def _inline_table(draw: st.DrawFn) -> tuple[str, list[Sub]]:
    entries: list[str] = []
    subs: list[Sub] = []
    for index in range(draw(st.integers(0, 3))):
        name = f"k{index}"
        if draw(st.booleans()):
            entries.append(f"{name} = {draw(_SCALARS)}")
            subs.append(((name,), 0))
        else:
            entries.append(f"{name} . inner = {draw(_SCALARS)}")
            subs += [((name,), 0), ((name, "inner"), 0)]
    return "{ " + ", ".join(entries) + " }" if entries else "{}", subs


@st.composite
def _values(draw: st.DrawFn) -> tuple[str, list[Sub]]:
    kind = draw(st.sampled_from(["scalar", "ml-basic", "ml-literal", "array", "ml-array", "inline"]))
    if kind == "scalar":
        return draw(_SCALARS), []
    if kind in ("ml-basic", "ml-literal"):
        quote = '"""' if kind == "ml-basic" else "'''"
        fake = st.one_of(_FAKE_LINES, st.just('escaped \\""" quotes')) if kind == "ml-basic" else _FAKE_LINES
        body = "\n".join(draw(st.lists(fake, max_size=4)))
        lead = draw(st.sampled_from(["", "\n"]))
        # up to two quotes may sit right before the closing delimiter
        tail = draw(st.sampled_from(["", '"', '""'])) if kind == "ml-basic" and not body.endswith('"') else ""
        return f"{quote}{lead}{body}{tail}{quote}", []
    if kind == "array":
        items = draw(st.lists(_SCALARS, max_size=4))
        return "[" + ", ".join(items) + "]", [((i,), 0) for i in range(len(items))]
    if kind == "inline":
        return draw(_inline_table())
    lines = ["["]
    subs: list[Sub] = []
    for index in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["  # comment, with = sign", "", "  # ]"])))
        if draw(st.booleans()):
            text, inner = draw(_inline_table())
        else:
            text, inner = draw(_SCALARS), []
        subs.append(((index,), len(lines)))
        subs += [((index, *below), len(lines) + offset) for below, offset in inner]
        lines.append(f"  {text},")
    lines.append("]")
    return "\n".join(lines), subs


@st.composite
def _documents(draw: st.DrawFn) -> tuple[str, dict[str, int]]:
    counter = itertools.count()
    lines: list[str] = []
    expected: dict[str, int] = {}

    def emit(text: str) -> int:
        start = len(lines) + 1
        lines.extend(text.split("\n"))
        return start

    def filler() -> None:
        for _ in range(draw(st.integers(0, 2))):
            emit(draw(st.sampled_from(["", "# comment = 1", "   # [not.a.table]", "\t", "#[[x]]"])))

    def unique() -> str:
        return f"{draw(_NAME)}_{next(counter)}"

    def key() -> tuple[str, list[str]]:
        kind = draw(st.sampled_from(["bare", "basic", "literal", "dotted"]))
        if kind == "bare":
            name = unique()
            return name, [name]
        if kind == "basic":
            content = f"{draw(_QUOTED)} {next(counter)}" if draw(st.booleans()) else unique()
            return json.dumps(content), [content]
        if kind == "literal":
            content = f"{draw(_QUOTED).replace(chr(39), '')} {next(counter)}"
            return f"'{content}'", [content]
        parts = [unique() for _ in range(draw(st.integers(2, 3)))]
        return draw(st.sampled_from([".", " . ", ". "])).join(parts), parts

    def keyvals(table: list[str | int]) -> None:
        for _ in range(draw(st.integers(0, 4))):
            filler()
            text, parts = key()
            value, subs = draw(_values())
            indent = draw(st.sampled_from(["", "  ", "\t"]))
            comment = draw(st.sampled_from(["", "  # trailing", " #x = 2"]))
            line = emit(f"{indent}{text} = {value}{comment}")
            for end in range(1, len(parts) + 1):
                expected[format_path(table + parts[:end])] = line
            for below, offset in subs:
                expected[format_path(table + parts + list(below))] = line + offset

    def header(text: str, path: list[str | int]) -> None:
        filler()
        indent = draw(st.sampled_from(["", "  ", "\t"]))
        line = emit(f"{indent}{text}{draw(st.sampled_from(['', '  # header']))}")
        expected[format_path(path)] = line

    keyvals([])
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            parts = [unique() for _ in range(draw(st.integers(1, 2)))]
            header("[" + draw(st.sampled_from([".", " . "])).join(parts) + "]", parts)
            keyvals(parts)
            continue
        array = unique()
        children = [unique() for _ in range(draw(st.integers(0, 2)))]
        for index in range(draw(st.integers(1, 3))):
            header(draw(st.sampled_from([f"[[{array}]]", f"[[ {array} ]]"])), [array, index])
            keyvals([array, index])
            for child in children:
                if draw(st.booleans()):
                    header(f"[{array}.{child}]", [array, index, child])
                    keyvals([array, index, child])
                else:
                    for k in range(draw(st.integers(0, 3))):
                        header(f"[[{array}.{child}]]", [array, index, child, k])
                        keyvals([array, index, child, k])
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline, expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_locate_finds_every_key_of_random_documents(case: tuple[str, dict[str, int]]) -> None:
    text, expected = case
    tomllib.loads(text)  # the generator writes valid TOML
    where = locate(text)
    wrong = {path: (line, where.get(path)) for path, line in expected.items() if where.get(path) != line}
    assert not wrong, f"(expected, located) by path: {wrong}\n---\n{text}"
