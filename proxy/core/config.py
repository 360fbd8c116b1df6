"""Routing-table file -> validated `ConfigSpec`, or every error in the file at once.

The YAML is composed, not constructed: we walk PyYAML's node tree, so every value keeps its line
and column, and we read scalars from their source text instead of trusting YAML 1.1's type
guesses (`NO` stays the string "NO", `010` is never octal 8). Each problem becomes a
`ConfigIssue` (`file:line:col: key.path: message`); checking goes on after a problem so that one
run reports all of them.

Pure core: this module never imports os, io, time, sockets or asyncio; the caller reads the file
and passes its text.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from proxy.core.schema import (
    DURATION_PATTERN,
    JSON_PATH_PATTERN,
    MATCH,
    MAX_DURATION,
    MAX_HOST_CHARS,
    MAX_INSTANCE_CHARS,
    MAX_LABEL_CHARS,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_TOKEN_CHARS,
    MAX_URL_CHARS,
    NAME_PATTERN,
    ROLLOUT,
    ROUTE,
    SECTIONS,
    SIZE_PATTERN,
    SIZE_UNITS,
    TOKEN_PATTERN,
    TOP,
    UPSTREAM,
    Key,
    Kind,
    Section,
    duration_seconds,
    format_address,
    format_duration,
    format_size,
    redact_redis_url,
    spec_to_dict,
)
from proxy.core.spec import (
    ALL_METHODS,
    TLS_VERSIONS,
    UPSTREAM_PROTOCOLS,
    WEBHOOK_EVENTS,
    ConfigSpec,
    Endpoint,
    Listener,
    Match,
    RouteSpec,
    UpstreamSpec,
)
from proxy.core.table import PathError, path_from_text

__all__ = [
    "ENV_REF_RE",
    "GRAFANA_ANNOTATIONS_PATH",
    "LOG_ISSUE_LIMIT",
    "MAX_FILE_BYTES",
    "NAME_RE",
    "SENTINEL_SCHEMES",
    "ConfigError",
    "ConfigIssue",
    "config_sha256",
    "format_duration",
    "format_issues",
    "format_size",
    "parse_config",
    "parse_duration",
    "parse_sentinel_url",
    "parse_size",
    "redact_redis_url",
    "spec_to_dict",
    "summary",
]

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

# Route and upstream names: at most 63 characters (_MAX_NAME_CHARS), like a DNS label.
NAME_RE = re.compile(NAME_PATTERN + r"\Z")
# RFC 9110 token: what a header or cookie name may be made of.
_TOKEN_RE = re.compile(TOKEN_PATTERN + r"\Z")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_ENDPOINT_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
_LEADING_ZERO_RE = re.compile(r"[+-]?0[0-9]")
_DURATION_RE = re.compile(DURATION_PATTERN + r"\Z")
_SIZE_RE = re.compile(SIZE_PATTERN + r"\Z")
_JSON_PATH_RE = re.compile(JSON_PATH_PATTERN + r"\Z")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Lone surrogates (only `\udc80`-style escapes make them): not Unicode, so not UTF-8 or JSON.
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_UNPRINTABLE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")

# Limits on the file itself (docs/config.md, "Limits on the file itself"). They keep every
# input finite: parse time, memory, error messages, and what /admin/config dumps as JSON.
# The bounds of each key are in proxy.core.schema.
MAX_FILE_BYTES = 16 << 20
# Nested lists and mappings; the schema itself needs 5.
_MAX_DEPTH = 64
# Any one key or value; no string in the schema may be longer (a cookie value is up to 4096).
_MAX_SCALAR_CHARS = 4096
# Upstream and route names: a DNS label, as a Kubernetes service name is.
_MAX_NAME_CHARS = MAX_NAME_CHARS
_MAX_TOKEN_CHARS = MAX_TOKEN_CHARS
_MAX_HOST_CHARS = MAX_HOST_CHARS
_MAX_LABEL_CHARS = MAX_LABEL_CHARS
_MAX_PATH_CHARS = MAX_PATH_CHARS
_MAX_URL_CHARS = MAX_URL_CHARS
_MAX_INSTANCE_CHARS = MAX_INSTANCE_CHARS
_MAX_DURATION = MAX_DURATION
# Integers in the file have at most this many digits: beyond it every range check fails anyway,
# and Python refuses to convert more than 4300.
_MAX_DIGITS = 20
# Values echoed in messages are cut to this many characters (a name is never cut).
_MAX_SHOWN_CHARS = 64
# Upstream names listed after "unknown upstream".
_MAX_KNOWN_SHOWN = 10
# Issues a log line or `last_error` carries; `turnout validate` prints them all.
LOG_ISSUE_LIMIT = 20

_YAML_TAG = "tag:yaml.org,2002:"
_STR = _YAML_TAG + "str"
_NULL = _YAML_TAG + "null"
_YAML_GUESSES = frozenset(_YAML_TAG + name for name in ("bool", "int", "float", "timestamp"))
# Explicit tags that only restate a core type; anything else (!!python/..., !!binary, !custom)
# is refused.
_ALLOWED_TAGS = frozenset(
    _YAML_TAG + name for name in ("str", "int", "float", "bool", "null", "seq", "map")
)
# Put on nodes the composer has already reported, so the schema check stays quiet about them.
_INVALID = "turnout:already-reported"

_DURATION_HINT = "use e.g. 250ms, 2s, 1m, 1h"
_SIZE_HINT = "use bytes or e.g. 512KiB, 1MiB, 1GiB"
_NAME_HINT = "lower-case letters, digits, '_' and '-', starting with a letter or digit"


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file; line and col are 1-based."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config file failed validation; `issues` lists every problem found, in file order.

    `turnout validate` prints them all; a log line should carry `format_issues(issues)`.
    """

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = issues


def format_issues(issues: Sequence[ConfigIssue | str], limit: int = LOG_ISSUE_LIMIT) -> list[str]:
    """The first `limit` issues as lines, then one `... and K more errors` line if any were cut.

    For logs and `last_error`: one bad file must not write an unbounded number of lines.
    """
    lines = [str(issue) for issue in issues[:limit]]
    more = len(issues) - len(lines)
    if more > 0:
        plural = "s" if more != 1 else ""
        lines.append(f"... and {more} more error{plural} (`turnout validate` lists every one)")
    return lines


def _escape(text: str) -> str:
    """Control characters and surrogates as escapes: an issue stays one printable line."""
    if text.isprintable():  # the usual case, and much faster than the regex
        return text
    return _UNPRINTABLE_RE.sub(lambda found: repr(found.group())[1:-1], text)


def _shown(text: str) -> str:
    """`text` as echoed in a message: cut to a readable length, and escaped."""
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return _escape(text)


def config_sha256(text: str) -> str:
    """Hex sha256 of the file's text (utf-8), the identity of a config generation."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- durations and sizes ---------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`250ms`, `2s`, `1.5m`, `1h` or `0` -> seconds; ValueError with a message otherwise."""
    if text == "0":
        return 0.0
    found = _DURATION_RE.match(text)
    if found is None:
        raise ValueError(f"bad duration '{_shown(text)}' ({_DURATION_HINT})")
    number, unit = found.groups()
    seconds = duration_seconds(number, unit)
    if not math.isfinite(seconds):
        raise ValueError(f"bad duration '{_shown(text)}' ({_DURATION_HINT})")
    return seconds


def parse_size(text: str) -> int:
    """`1048576`, `512B`, `512KiB`, `1MiB`, `1GiB` -> bytes; ValueError with a message otherwise.

    More than 20 digits is refused as too large: no size may be that big.
    """
    if text.isascii() and text.isdigit():
        digits, factor = text, 1
    else:
        found = _SIZE_RE.match(text)
        if found is None:
            raise ValueError(f"bad size '{_shown(text)}' ({_SIZE_HINT})")
        digits, factor = found.group(1), SIZE_UNITS[found.group(2)]
    if len(digits) > _MAX_DIGITS:
        raise ValueError(f"size '{_shown(text)}' is too large")
    return int(digits) * factor


_format_address = format_address


def _split_address(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); ValueError with the reason otherwise."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if not _IPV6_RE.match(host):
            raise ValueError(f"'{_shown(host)}' is not an IPv6 address")
        if not rest.startswith(":"):
            raise ValueError("expected [v6-address]:port, e.g. [::1]:9901")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets, e.g. [::1]:9901")
        if not host:
            raise ValueError("the host is missing")
        if len(host) > _MAX_HOST_CHARS or any(
            len(label) > _MAX_LABEL_CHARS for label in host.split(".")
        ):
            raise ValueError(
                f"the host is too long (at most {_MAX_HOST_CHARS} characters, "
                f"{_MAX_LABEL_CHARS} between dots)"
            )
        if not _ENDPOINT_HOST_RE.match(host):
            raise ValueError(f"'{_shown(host)}' is not a host name or IP address")
    if not _PORT_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_text)


# --- YAML -------------------------------------------------------------------------------------


# Placeholder nodes whose problem is still to be reported: id(node) -> (node, message).
_Unusable = dict[int, tuple[Node, str]]


class _TooDeep(Exception):
    """Nesting went past _MAX_DEPTH at `mark`: composing stops there."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__()
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """A composer that records aliases, foreign tags and extra documents instead of obeying.

    Aliases would let one node appear under two key paths (and let a small file expand to a
    huge one); refusing them keeps every value at exactly one place in the file. Scalars that
    are too long or not valid Unicode are reported here once, whatever key they sit under, and
    nesting is bounded (PyYAML composes recursively).
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.problems: list[tuple[yaml.Mark, str]] = []
        # Bad scalars by id: the checker reports each with its key path when it meets it.
        self.unusable: _Unusable = {}
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        """Compose one node, swapping aliases, foreign tags and bad scalars for placeholders."""
        if self.check_event(AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]  # unannotated in stubs
            self.problems.append(
                (event.start_mark, "YAML aliases (*name) are not supported; write the value out")
            )
            return ScalarNode(_INVALID, "", event.start_mark, event.end_mark)
        event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in stubs
        tag: str | None = getattr(event, "tag", None)
        nested = isinstance(event, CollectionStartEvent)
        if nested:
            if self.depth >= _MAX_DEPTH:
                # Stop reading at once: skipping the rest would still scan all of it.
                raise _TooDeep(event.start_mark)
            self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            if nested:
                self.depth -= 1
        if node is not None and tag is not None and tag != "!" and tag not in _ALLOWED_TAGS:
            shown = "!!" + tag[len(_YAML_TAG) :] if tag.startswith(_YAML_TAG) else tag
            self.problems.append((event.start_mark, f"YAML tag '{_shown(shown)}' is not supported"))
            node.tag = _INVALID
        elif isinstance(node, ScalarNode):
            problem = _scalar_problem(str(node.value))
            if problem is not None:
                self.unusable[id(node)] = (node, problem)
                node.tag = _INVALID
                # Nothing downstream may print or dump the raw value.
                node.value = _shown(str(node.value))
        return node

    def get_single_node(self) -> Node | None:
        """The first document's root; a second document is recorded as a problem."""
        self.get_event()  # type: ignore[no-untyped-call]  # drops the stream start
        document = None
        if not self.check_event(StreamEndEvent):
            document = self.compose_document()
        if not self.check_event(StreamEndEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in stubs
            self.problems.append((event.start_mark, "only one YAML document is allowed per file"))
        return document


def _scalar_problem(text: str) -> str | None:
    """Why a key or value cannot be used whatever its place in the schema, or None."""
    if len(text) > _MAX_SCALAR_CHARS:
        return (
            f"too long: {len(text)} characters (at most {_MAX_SCALAR_CHARS} for any key or "
            f"value, {_MAX_NAME_CHARS} for a name)"
        )
    surrogate = _SURROGATE_RE.search(text)
    if surrogate is not None:
        return (
            f"'{repr(surrogate.group())[1:-1]}' is half of a UTF-16 surrogate pair, not a "
            "character; write the character itself (or \\U0001F600 for one above U+FFFF)"
        )
    return None


def _position(text: str, index: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _compose(text: str, file: str, issues: list[ConfigIssue]) -> tuple[Node | None, _Unusable]:
    """Text -> root node (None when there is none or the YAML is broken) and the unusable
    scalars in it; other problems go to `issues`."""
    try:
        # The reader checks every character up front, so even construction can fail.
        loader = _Loader(text)
    except ReaderError as exc:
        line, col = _position(text, int(exc.position))
        issues.append(ConfigIssue(file, line, col, "", f"not readable as YAML: {exc.reason}"))
        return None, {}
    # yaml.compose() with our loader, spelled out so that the loader's problems are reachable.
    node: Node | None = None
    try:
        node = loader.get_single_node()
    except _TooDeep as exc:
        issues.append(
            ConfigIssue(
                file,
                exc.mark.line + 1,
                exc.mark.column + 1,
                "",
                f"lists and mappings are nested more than {_MAX_DEPTH} deep; "
                "the rest of the file was not read",
            )
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"YAML syntax error: {exc.problem or exc.context}"
        if exc.problem and exc.context:
            message += f" ({exc.context})"
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        issues.append(ConfigIssue(file, line, col, "", message))
    finally:
        loader.dispose()
    for mark, message in loader.problems:
        issues.append(ConfigIssue(file, mark.line + 1, mark.column + 1, "", message))
    return node, loader.unusable


def _join(path: str, key: str) -> str:
    key = _shown(key)
    return f"{path}.{key}" if path else key


def _is_plain(node: ScalarNode) -> bool:
    """Plain (unquoted, not `!!str`) scalars are the only ones that may be numbers or booleans."""
    return node.style is None and node.tag != _STR


def _describe(node: Node) -> str:
    """How a node reads in an error message: `a list`, `a string 'x'`, `nothing`."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    text = str(node.value)
    shown = _escape(text if len(text) <= 40 else text[:37] + "...")
    if not isinstance(node, ScalarNode) or not _is_plain(node):
        return f"a string '{shown}'"
    if node.tag == _NULL:
        return "nothing" if text == "" else "null"
    if text.lower() in ("true", "false"):
        return f"a boolean '{shown}'"
    if _INT_RE.match(text):
        return f"an integer '{shown}'"
    if _NUMBER_RE.match(text):
        return f"a number '{shown}'"
    if node.tag in _YAML_GUESSES:
        # YAML 1.1 reads it as a number, bool or date, we do not: name no kind at all.
        return f"'{shown}'"
    return f"a string '{shown}'"


_Items = dict[str, tuple[ScalarNode, Node]]


def _show_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class _Checker:
    """Walks the node tree against the schema, collecting issues; never stops early.

    Every `_x` method reports its own problems and returns None for a value it could not read;
    callers then carry on with a default, since the spec is thrown away when any issue exists.
    """

    def __init__(self, file: str, unusable: _Unusable) -> None:
        self.file = file
        self.issues: list[ConfigIssue] = []
        self.known: frozenset[str] | None = None
        self.unusable = unusable
        self._read = self._readers()

    def error(self, node: Node, path: str, message: str) -> None:
        """Record one issue at the node's position."""
        mark = node.start_mark
        self.issues.append(ConfigIssue(self.file, mark.line + 1, mark.column + 1, path, message))

    def _placeholder(self, node: Node, path: str) -> bool:
        """True for a node the composer replaced; its pending problem is reported at `path`."""
        if node.tag != _INVALID:
            return False
        held = self.unusable.pop(id(node), None)
        if held is not None:
            self.error(node, path, held[1])
        return True

    # --- structure ---

    def _pairs(self, node: MappingNode, path: str) -> Iterator[tuple[str, ScalarNode, Node]]:
        """The mapping's (key, key node, value node), duplicates and odd keys reported."""
        seen: dict[str, ScalarNode] = {}
        for key, value in node.value:
            if self._placeholder(key, _join(path, str(key.value))):
                continue
            if not isinstance(key, ScalarNode):
                self.error(key, path, f"keys must be plain strings, got {_describe(key)}")
                continue
            name = str(key.value)
            first = seen.get(name)
            if first is not None:
                self.error(
                    key,
                    _join(path, name),
                    f"duplicate key '{_shown(name)}' (first at line {first.start_mark.line + 1})",
                )
                continue
            seen[name] = key
            yield name, key, value

    def _map(self, node: Node, path: str) -> MappingNode | None:
        if self._placeholder(node, path):
            return None
        if not isinstance(node, MappingNode):
            self.error(node, path, f"expected a mapping, got {_describe(node)}")
            return None
        return node

    def _mapping(
        self, node: Node, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> _Items | None:
        """A mapping with a fixed set of keys -> {key: (key node, value node)}."""
        mapping = self._map(node, path)
        if mapping is None:
            return None
        items: _Items = {}
        for name, key, value in self._pairs(mapping, path):
            if name in allowed:
                items[name] = (key, value)
            else:
                self.error(
                    key,
                    _join(path, name),
                    f"unknown key '{_shown(name)}' (allowed: {', '.join(allowed)})",
                )
        for name in required:
            if name not in items:
                self.error(mapping, path, f"missing required key '{name}'")
        return items

    def _list(self, node: Node, path: str, maximum: int, what: str) -> list[Node] | None:
        """A list of at most `maximum` elements (`what` names them in the error)."""
        if self._placeholder(node, path):
            return None
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"expected a list, got {_describe(node)}")
            return None
        if len(node.value) > maximum:
            self.error(node, path, f"at most {maximum} {what} (this list has {len(node.value)})")
            return None
        return list(node.value)

    # --- scalars ---

    def _scalar(self, node: Node, path: str, expected: str) -> ScalarNode | None:
        if self._placeholder(node, path):
            return None
        if not isinstance(node, ScalarNode) or (_is_plain(node) and node.tag == _NULL):
            self.error(node, path, f"expected {expected}, got {_describe(node)}")
            return None
        return node

    def _string(self, node: Node, path: str) -> str | None:
        """Any non-null scalar, as written: a string is never re-typed by YAML 1.1 rules."""
        scalar = self._scalar(node, path, "a string")
        if scalar is None:
            return None
        text = str(scalar.value)
        if _CONTROL_RE.search(text):
            self.error(node, path, "control characters are not allowed")
            return None
        return text

    def _text_field(
        self, node: Node, path: str, check: Callable[[str], str | None], what: str = "a string"
    ) -> str | None:
        """A string checked by `check`, which returns an error message or None."""
        scalar = self._scalar(node, path, what)
        if scalar is None:
            return None
        text = str(scalar.value)
        problem = check(text)
        if problem is not None:
            self.error(node, path, problem)
            return None
        return text

    def _bool(self, node: Node, path: str) -> bool | None:
        scalar = self._scalar(node, path, "true or false")
        if scalar is None:
            return None
        text = str(scalar.value)
        if _is_plain(scalar):
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            if text.lower() in ("yes", "no", "on", "off", "y", "n"):
                self.error(node, path, f"'{text}' is ambiguous in YAML; write true or false")
                return None
        self.error(node, path, f"expected true or false, got {_describe(scalar)}")
        return None

    def _int(self, node: Node, path: str, minimum: int, maximum: int) -> int | None:
        scalar = self._scalar(node, path, "an integer")
        if scalar is None:
            return None
        text = str(scalar.value)
        if not _is_plain(scalar) or not _INT_RE.match(text):
            self.error(node, path, f"expected an integer, got {_describe(scalar)}")
            return None
        if _LEADING_ZERO_RE.match(text):
            self.error(
                node, path, f"leading zeros are ambiguous in '{_shown(text)}' (YAML 1.1 octal)"
            )
            return None
        if len(text.lstrip("+-")) > _MAX_DIGITS:
            # Out of every range; int() would refuse the longest ones with a traceback.
            self.error(node, path, f"must be from {minimum} to {maximum}")
            return None
        return self._in_range(node, path, int(text), minimum, maximum)

    def _number(
        self,
        node: Node,
        path: str,
        minimum: float,
        maximum: float,
        above_minimum: bool = False,
    ) -> float | None:
        """A decimal int or float (no exponent, no bool, no string) in [minimum, maximum].

        `above_minimum` makes the lower bound exclusive.
        """
        scalar = self._scalar(node, path, "a number")
        if scalar is None:
            return None
        text = str(scalar.value)
        if not _is_plain(scalar) or not _NUMBER_RE.match(text):
            self.error(node, path, f"expected a number, got {_describe(scalar)}")
            return None
        if _LEADING_ZERO_RE.match(text):
            self.error(
                node, path, f"leading zeros are ambiguous in '{_shown(text)}' (YAML 1.1 octal)"
            )
            return None
        value = float(text)
        if above_minimum and not minimum < value <= maximum:
            self.error(
                node, path, f"must be > {_show_number(minimum)} and <= {_show_number(maximum)}"
            )
            return None
        return self._in_range(node, path, value, minimum, maximum)

    def _in_range(
        self,
        node: Node,
        path: str,
        value: _N,
        minimum: _N,
        maximum: _N,
        show: Callable[[_N], str] = _show_number,
    ) -> _N | None:
        if not minimum <= value <= maximum:
            self.error(node, path, f"must be from {show(minimum)} to {show(maximum)}")
            return None
        return value

    def _duration(self, node: Node, path: str, positive: bool = True) -> float | None:
        scalar = self._scalar(node, path, f"a duration ({_DURATION_HINT})")
        if scalar is None:
            return None
        try:
            seconds = parse_duration(str(scalar.value))
        except ValueError as exc:
            self.error(node, path, str(exc))
            return None
        if positive and seconds == 0:
            self.error(node, path, "must be > 0")
            return None
        if seconds > _MAX_DURATION:
            self.error(node, path, "must be at most 24h")
            return None
        return seconds

    def _size(self, node: Node, path: str, minimum: int, maximum: int) -> int | None:
        scalar = self._scalar(node, path, f"a size ({_SIZE_HINT})")
        if scalar is None:
            return None
        text = str(scalar.value)
        if _is_plain(scalar) and _LEADING_ZERO_RE.match(text):
            self.error(
                node, path, f"leading zeros are ambiguous in '{_shown(text)}' (YAML 1.1 octal)"
            )
            return None
        try:
            size = parse_size(text)
        except ValueError as exc:
            self.error(node, path, str(exc))
            return None
        return self._in_range(node, path, size, minimum, maximum, format_size)

    def _address(self, node: Node, path: str) -> tuple[str, int] | None:
        scalar = self._scalar(node, path, "host:port")
        if scalar is None:
            return None
        text = str(scalar.value)
        try:
            return _split_address(text)
        except ValueError as exc:
            self.error(node, path, f"bad address '{_shown(text)}': {exc}")
            return None

    def _name(self, node: Node, path: str, what: str) -> str | None:
        scalar = self._scalar(node, path, f"a {what} name")
        if scalar is None:
            return None
        name = str(scalar.value)
        if len(name) > _MAX_NAME_CHARS:
            self.error(
                node,
                path,
                f"{what} name of {len(name)} characters; at most {_MAX_NAME_CHARS} "
                "(a DNS label, like a Kubernetes name)",
            )
            return None
        if not NAME_RE.match(name):
            self.error(node, path, f"bad {what} name '{_shown(name)}' (use {_NAME_HINT})")
            return None
        return name

    def _upstream_ref(self, node: Node, path: str) -> str | None:
        """An upstream name that must exist among `upstreams` (checked when those were read)."""
        scalar = self._scalar(node, path, "an upstream name")
        if scalar is None:
            return None
        name = str(scalar.value)
        if self.known is not None and name not in self.known:
            self.error(node, path, _unknown_upstream(name, self.known))
            return None
        return name

    # --- sections, read as `proxy.core.schema` describes them ---

    def _readers(self) -> dict[Kind, Callable[[Node, str, Key], object]]:
        """One reader per value kind; each reports its own problems and returns None then."""
        readers: dict[Kind, Callable[[Node, str, Key], object]] = {
            Kind.DURATION: self._duration_key,
            Kind.DURATION0: lambda n, p, k: self._duration(n, p, positive=False),
            Kind.SIZE: lambda n, p, k: self._size(n, p, _low(k), _high(k)),
            Kind.INT: lambda n, p, k: self._int(n, p, _low(k), _high(k)),
            Kind.NUMBER: self._number_key,
            Kind.BOOL: lambda n, p, k: self._bool(n, p),
            Kind.STRING: lambda n, p, k: self._string(n, p),
            Kind.NAME: lambda n, p, k: self._name(n, p, k.noun),
            Kind.UPSTREAM: lambda n, p, k: self._upstream_ref(n, p),
            Kind.FILE: lambda n, p, k: self._file_path(n, p),
            Kind.STATE_FILE: lambda n, p, k: self._state_file(n, p),
            Kind.ADDRESS: lambda n, p, k: self._address(n, p),
            Kind.WORKERS: self._workers,
            Kind.LISTEN: self._listen,
            Kind.UPSTREAMS: self._upstreams,
            Kind.ROUTES: self._routes,
            Kind.ENDPOINTS: self._endpoints,
            Kind.SPLIT: self._split,
            Kind.STEPS: self._steps,
            Kind.METHODS: self._methods,
            Kind.JSON_PATHS: self._json_paths,
            Kind.SECTION: self._subsection,
            Kind.SECTIONS: self._sections,
        }
        for kind, (check, what, transform) in _TEXT_KINDS.items():
            readers[kind] = self._text_reader(check, what, transform)
        return readers

    def _text_reader(
        self, check: Callable[[str], str | None], what: str, transform: Callable[[str], str] | None
    ) -> Callable[[Node, str, Key], object]:
        def read(node: Node, path: str, key: Key) -> str | None:
            text = self._text_field(node, path, check, what)
            return text if text is None or transform is None else transform(text)

        return read

    def _section_items(self, node: Node, path: str, section: Section[Any]) -> _Items | None:
        """A section's mapping: unknown, missing and conflicting keys reported."""
        items = self._mapping(node, path, section.allowed, section.required)
        if items is None:
            return None
        if section.one_of and not self._one_of(node, items, path, section.one_of):
            return items  # the rules below would only repeat that problem
        for rule in section.requires:
            if rule.key in items and rule.needs not in items:
                self.error(items[rule.key][0], _join(path, rule.key), rule.text())
        return items

    def _values(
        self, items: _Items, section: Section[Any], path: str, skip: str = ""
    ) -> dict[str, object]:
        """Spec field -> value for every key given and readable (the others keep defaults)."""
        values: dict[str, object] = {}
        for key in section.keys:
            item = items.get(key.name)
            if item is None or key.name == skip:
                continue
            value = self._read[key.kind](item[1], _join(path, key.name), key)
            if value is not None:
                values[key.attr] = value
        return values

    def _section(self, node: Node, path: str, section: Section[_T], **extra: object) -> _T | None:
        items = self._section_items(node, path, section)
        if items is None:
            return None
        values = self._values(items, section, path)
        if section is ROLLOUT:
            self._rollout_rules(items, values, path)
        return section.build(values, **extra)

    def _subsection(self, node: Node, path: str, key: Key) -> object:
        assert key.section is not None
        return self._section(node, path, key.section)

    def _elements(self, node: Node, path: str, key: Key) -> list[Node] | None:
        """A list key's elements, at most `key.max_items`, at least `key.min_items`."""
        maximum = key.max_items if key.max_items is not None else _MAX_LIST
        elements = self._list(node, path, maximum, key.noun + "s")
        if elements is None:
            return None
        if not elements and key.min_items:
            self.error(node, path, key.empty_message or f"at least one {key.noun} is required")
            return None
        return elements

    def _sections(self, node: Node, path: str, key: Key) -> tuple[object, ...] | None:
        assert key.section is not None
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        read = (
            self._section(element, f"{path}[{index}]", key.section)
            for index, element in enumerate(elements)
        )
        return tuple(value for value in read if value is not None)

    def check(self, root: Node) -> ConfigSpec | None:
        """The whole file; None when the root is unusable."""
        items = self._section_items(root, "", TOP)
        if items is None:
            return None
        values = self._values(items, TOP, "")
        default_listen: tuple[str, int] = TOP.default("listen")
        listeners: tuple[Listener, ...] = ()
        listen: tuple[str, int] | None = default_listen if "listen" not in items else None
        given = values.pop("listen", None)
        if isinstance(given, tuple) and given and isinstance(given[0], Listener):
            listeners = given
            listen = (listeners[0].host, listeners[0].port)
        elif isinstance(given, tuple):
            listen = given
        admin = values.get("admin", TOP.default("admin") if "admin" not in items else None)
        addresses = [(x.host, x.port) for x in listeners] or ([listen] if listen else [])
        if isinstance(admin, tuple) and any(_same_socket(a, admin) for a in addresses):
            key, other = ("admin", "listen") if "admin" in items else ("listen", "admin")
            self.error(items[key][1], key, f"must not be the same address as {other}")
        return TOP.build(values, listen=listen or default_listen, listeners=listeners)

    def _listen(self, node: Node, path: str, key: Key) -> object:
        """`listen`: one address, or the list form (plain and TLS listeners side by side)."""
        if not isinstance(node, SequenceNode):
            return self._address(node, path)
        assert key.section is not None
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        listeners: list[Listener] = []
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._section_items(element, where, key.section)
            if items is None or "address" not in items:
                continue
            values = self._values(items, key.section, where)
            address = values.pop("address", None)
            if not isinstance(address, tuple):
                continue
            clash = next((x for x in listeners if _same_socket((x.host, x.port), address)), None)
            if clash is not None:
                self.error(
                    items["address"][1],
                    _join(where, "address"),
                    f"'{_format_address(*address)}' overlaps listener '{clash.address}'",
                )
                continue
            listeners.append(key.section.build(values, host=address[0], port=address[1]))
        return tuple(listeners)

    def _file_path(self, node: Node, path: str) -> str | None:
        """A file path, resolved against the config file's folder (the file is checked later)."""
        name = self._text_field(node, path, _check_file_name, "a file path")
        if name is None:
            return None
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.file), name))

    def _workers(self, node: Node, path: str, key: Key) -> int | None:
        if self._placeholder(node, path):
            return None
        if isinstance(node, ScalarNode) and str(node.value) == "auto":
            return 0  # ConfigSpec's spelling of "auto"; the caller counts the CPUs.
        if isinstance(node, ScalarNode) and _is_plain(node) and _INT_RE.match(str(node.value)):
            return self._int(node, path, _low(key), _high(key))
        self.error(
            node,
            path,
            f"expected an integer from {_low(key)} to {_high(key)} or 'auto', "
            f"got {_describe(node)}",
        )
        return None

    def _state_file(self, node: Node, path: str) -> str | None:
        name = self._text_field(node, path, _check_file_name)
        if name is None:
            return None
        folder = posixpath.dirname(self.file)
        resolved = posixpath.normpath(posixpath.join(folder, name))
        if resolved == posixpath.normpath(self.file):
            self.error(node, path, "must not be the config file itself")
            return None
        return resolved

    def _duration_key(self, node: Node, path: str, key: Key) -> float | None:
        value = self._duration(node, path, positive=True)
        if value is None or (key.minimum is None and key.maximum is None):
            return value
        low = key.minimum if key.minimum is not None else 0.0
        high = key.maximum if key.maximum is not None else _MAX_DURATION
        if not low <= value <= high:
            self.error(node, path, f"must be from {low:g}s to {high:g}s")
            return None
        return value

    def _number_key(self, node: Node, path: str, key: Key) -> float | None:
        low = key.minimum if key.minimum is not None else -math.inf
        high = key.maximum if key.maximum is not None else math.inf
        if not key.exclusive_maximum:
            return self._number(node, path, low, high, above_minimum=key.exclusive_minimum)
        value = self._number(node, path, -math.inf, math.inf)
        if value is not None and not low < value < high:
            # e.g. confidence: 1 is refused too, no test can promise never to roll back a good
            # canary; the example is the default.
            example = _OWNER[id(key)].default(key.attr)
            self.error(
                node,
                path,
                f"must be > {_show_number(low)} and < {_show_number(high)} "
                f"(e.g. {_show_number(example)})",
            )
            return None
        return value

    def _upstreams(self, node: Node, path: str, key: Key) -> tuple[UpstreamSpec, ...] | None:
        mapping = self._map(node, path)
        if mapping is None:
            return None
        maximum = key.max_items or _MAX_LIST
        if len(mapping.value) > maximum:
            count = len(mapping.value)
            self.error(mapping, path, f"at most {maximum} {key.noun}s (this file has {count})")
            return None
        entries = [
            (name, key_node, value)
            for name, key_node, value in self._pairs(mapping, path)
            if self._name(key_node, _join(path, name), key.noun) is not None
        ]
        if not mapping.value:
            self.error(mapping, path, f"at least one {key.noun} is required")
        # Set before the bodies are read so that references are checked even when a body is bad.
        self.known = frozenset(name for name, _, _ in entries)
        upstreams = (
            self._section(value, _join(path, name), UPSTREAM, name=name)
            or UpstreamSpec(name=name, endpoints=())
            for name, _, value in entries
        )
        return tuple(upstreams)

    def _endpoints(self, node: Node, path: str, key: Key) -> tuple[Endpoint, ...] | None:
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        endpoints: list[Endpoint] = []
        seen: set[tuple[str, int]] = set()
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            address = self._address(element, where)
            if address is None:
                continue
            identity = (address[0].lower(), address[1])
            if identity in seen:
                self.error(element, where, f"duplicate endpoint '{_format_address(*address)}'")
                continue
            seen.add(identity)
            endpoints.append(Endpoint(host=address[0], port=address[1]))
        return tuple(endpoints)

    def _routes(self, node: Node, path: str, key: Key) -> tuple[RouteSpec, ...] | None:
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        match_key = ROUTE.key("match")
        routes: list[RouteSpec] = []
        first_line: dict[str, int] = {}
        shadows = _Shadows()
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._section_items(element, where, ROUTE)
            if items is None:
                continue
            before = len(self.issues)
            match: Match = MATCH.build({})
            if "match" in items:
                match = self._section(items["match"][1], _join(where, "match"), MATCH) or match
            # Only a match read without error says which requests the route takes.
            match_read = len(self.issues) == before
            route: RouteSpec = ROUTE.build(
                self._values(items, ROUTE, where, skip=match_key.name), match=match
            )
            if match_read:
                at = items["match"][1] if "match" in items else element
                label = f"'{route.name}'" if route.name else where
                earlier = shadows.add(match, f"{label} (line {element.start_mark.line + 1})")
                if earlier is not None:
                    self.error(
                        at,
                        _join(where, "match") if "match" in items else where,
                        f"unreachable: route {earlier} comes first and matches every request "
                        "this route matches; put this route before it, or narrow that one",
                    )
            name_node = items.get("name")
            if name_node is not None and route.name:
                seen_at = first_line.get(route.name)
                if seen_at is not None:
                    self.error(
                        name_node[1],
                        f"{where}.name",
                        f"duplicate route name '{route.name}' (first at line {seen_at})",
                    )
                else:
                    first_line[route.name] = name_node[1].start_mark.line + 1
            routes.append(route)
        return tuple(routes)

    def _one_of(self, node: Node, items: _Items, path: str, names: Sequence[str]) -> bool:
        """Exactly one of `names` is given; False (reported) otherwise."""
        given = [name for name in names if name in items]
        quoted = " or ".join(f"'{name}'" for name in names)
        if len(given) > 1:
            self.error(node, path, f"give exactly one of {quoted}, not both")
        elif not given:
            self.error(node, path, f"missing {quoted} (give exactly one)")
            return False
        return True

    def _split(self, node: Node, path: str, key: Key) -> tuple[tuple[str, float], ...] | None:
        mapping = self._map(node, path)
        if mapping is None:
            return None
        if not mapping.value:
            self.error(mapping, path, "at least one upstream with a weight is required")
            return None
        weights: list[tuple[str, float]] = []
        readable = True
        for name, key_node, value in self._pairs(mapping, path):
            where = _join(path, name)
            if self.known is not None and name not in self.known:
                self.error(key_node, where, _unknown_upstream(name, self.known))
            weight = self._number(value, where, _low(key), _high(key))
            if weight is None:
                readable = False
                continue
            weights.append((name, weight))
        if readable and weights and all(weight == 0 for _, weight in weights):
            self.error(mapping, path, "weights are all 0; at least one must be > 0")
        return tuple(weights)

    def _methods(self, node: Node, path: str, key: Key) -> frozenset[str] | None:
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        methods: set[str] = set()
        for index, element in enumerate(elements):
            method = self._text_field(element, f"{path}[{index}]", _check_method, "a method")
            if method is None:
                continue
            if method in methods:
                self.error(element, f"{path}[{index}]", f"duplicate method '{method}'")
            methods.add(method)
        return frozenset(methods)

    def _json_paths(self, node: Node, path: str, key: Key) -> tuple[str, ...] | None:
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        fields = (
            self._text_field(element, f"{path}[{index}]", _check_json_path, "a JSON path")
            for index, element in enumerate(elements)
        )
        return tuple(field for field in fields if field is not None)

    def _rollout_rules(self, items: _Items, values: dict[str, object], path: str) -> None:
        """What a rollout's keys must say together; `check` defaults to at most `interval`."""
        baseline, canary = values.get("baseline"), values.get("canary")
        if baseline and baseline == canary:
            self.error(items["canary"][1], f"{path}.canary", "must differ from baseline")
        interval = values.get("interval", ROLLOUT.default("interval"))
        check = values.get("check")
        assert isinstance(interval, float)
        if check is None:
            values["check"] = min(ROLLOUT.default("check"), interval)
        elif isinstance(check, float) and check > interval:
            self.error(
                items["check"][1],
                f"{path}.check",
                f"must be at most interval ({format_duration(interval)}): the evidence is "
                "looked at least once per interval",
            )

    def _steps(self, node: Node, path: str, key: Key) -> tuple[float, ...] | None:
        elements = self._elements(node, path, key)
        if elements is None:
            return None
        steps: list[float] = []
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            step = self._number(
                element, where, _low(key), _high(key), above_minimum=key.exclusive_minimum
            )
            if step is None:
                continue
            if steps and step <= steps[-1]:
                self.error(
                    element,
                    where,
                    f"steps must increase: {_show_number(step)} is not above "
                    f"{_show_number(steps[-1])}",
                )
                continue
            steps.append(step)
        return tuple(steps)


def _low(key: Key) -> int:
    assert key.minimum is not None
    return int(key.minimum)


def _high(key: Key) -> int:
    assert key.maximum is not None
    return int(key.maximum)


# The section each key belongs to (for messages that quote a default).
_OWNER: dict[int, Section[Any]] = {id(key): section for section in SECTIONS for key in section.keys}
# A list without its own bound (none is without one in the schema; a test checks).
_MAX_LIST = 100_000
# A lease below a second is renewed faster than Redis round trips can be trusted; above an
# hour a dead leader holds rollouts for too long (the bounds are in proxy.core.schema's FLEET).
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _unknown_upstream(name: str, known: frozenset[str]) -> str:
    names = sorted(known)
    listed = ", ".join(names[:_MAX_KNOWN_SHOWN])
    if len(names) > _MAX_KNOWN_SHOWN:
        listed += f", ... ({len(names)} in all)"
    return f"unknown upstream '{_shown(name)}' (known: {listed})"


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    wildcard = ("0.0.0.0", "::")
    return a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard or b[0] in wildcard)


def _check_via(text: str) -> str | None:
    # RFC 9110 section 7.6.3: a pseudonym is a token; a name that every instance shares would
    # make a chain of Turnouts look like a loop, so keep it per instance.
    if len(text) > _MAX_NAME_CHARS or not _TOKEN_RE.match(text):
        return (
            f"bad pseudonym '{_shown(text)}': at most {_MAX_NAME_CHARS} letters, digits and "
            "!#$%&'*+-.^_`|~"
        )
    return None


def _check_token(text: str) -> str | None:
    if len(text) > _MAX_TOKEN_CHARS:
        return f"a name of {len(text)} characters; at most {_MAX_TOKEN_CHARS}"
    if _TOKEN_RE.match(text):
        return None
    return f"bad name '{_shown(text)}' (letters, digits and !#$%&'*+-.^_`|~ only)"


def _check_path_prefix(text: str) -> str | None:
    problem = _check_http_path(text)
    if problem is not None:
        return problem
    # Requests are matched in normal form: a prefix with no normal form matches nothing.
    try:
        path_from_text(text)
    except PathError as exc:
        return f"no request can have this path: {exc}"
    return None


def _check_http_path(text: str) -> str | None:
    if len(text) > _MAX_PATH_CHARS:
        return f"a path of {len(text)} characters; at most {_MAX_PATH_CHARS}"
    if not text.startswith("/"):
        return f"must start with '/', got '{_shown(text)}'"
    if any(char in text for char in "?# ") or _CONTROL_RE.search(text):
        return f"bad path '{_shown(text)}' (no query, fragment, spaces or control characters)"
    return None


def _check_file_name(text: str) -> str | None:
    if not text or _CONTROL_RE.search(text):
        return "expected a file path"
    # Judged by the text alone (no file system here); the caller checks what exists.
    if text.endswith("/") or posixpath.basename(text) in (".", ".."):
        return f"'{_shown(text)}' names a folder; give a file, e.g. turnout.state.json"
    return None


def _check_server_name(text: str) -> str | None:
    host = text.lower()
    if len(host) > _MAX_HOST_CHARS or not _HOSTNAME_RE.match(host):
        return f"bad host name '{_shown(text)}' (a DNS name such as blue.internal)"
    return None


def _check_host_pattern(text: str) -> str | None:
    host = text.lower()
    if host.startswith("[") and host.endswith("]") and _IPV6_RE.match(host[1:-1]):
        return None
    if host.count(":") >= 2 and _IPV6_RE.match(host):
        return None  # a bare IPv6 literal: too many colons to be host:port
    if ":" in host:
        return (
            f"bad host '{_shown(text)}': a port is not allowed (the Host header's port is ignored)"
        )
    bare = host[2:] if host.startswith("*.") else host
    if "*" in bare:
        return f"bad host '{_shown(text)}': the only wildcard is a leading '*.', e.g. *.example.com"
    # A trailing dot (the fully qualified form) is allowed; the table drops it.
    bare = bare.removesuffix(".")
    if len(bare) > _MAX_HOST_CHARS or any(
        len(label) > _MAX_LABEL_CHARS for label in bare.split(".")
    ):
        return (
            f"host too long: at most {_MAX_HOST_CHARS} characters, "
            f"{_MAX_LABEL_CHARS} between dots (DNS limits)"
        )
    if not _HOSTNAME_RE.match(bare):
        return f"bad host '{_shown(text)}' (expected e.g. api.example.com or *.example.com)"
    return None


def _check_tls_version(text: str) -> str | None:
    # `1.2` unquoted is a YAML float; read as written, it is the same version.
    if text in TLS_VERSIONS:
        return None
    return f'bad TLS version \'{_shown(text)}\' (use "1.2" or "1.3")'


def _check_method(text: str) -> str | None:
    if text in ALL_METHODS:
        return None
    return f"unknown method '{_shown(text)}' (use upper case: {', '.join(ALL_METHODS)})"


def _check_webhook_event(text: str) -> str | None:
    if text in WEBHOOK_EVENTS:
        return None
    return f"unknown event '{_shown(text)}' (use {', '.join(WEBHOOK_EVENTS)})"


def _check_protocol(text: str) -> str | None:
    if text in UPSTREAM_PROTOCOLS:
        return None
    return f"unknown protocol '{_shown(text)}' (use {', '.join(UPSTREAM_PROTOCOLS)})"


def _check_webhook_url(text: str) -> str | None:
    return _check_url(text, "expected e.g. http://127.0.0.1:8000/hooks/rollout")


# Where Grafana's annotation API is, under the base URL the file gives.
GRAFANA_ANNOTATIONS_PATH = "/api/annotations"


def _check_grafana_url(text: str) -> str | None:
    hint = "expected Grafana's base URL, e.g. https://grafana.example.com/"
    problem = _check_url(text, hint)
    if problem is not None:
        return problem
    parts = urllib.parse.urlsplit(text)
    if parts.query or text.endswith("?"):
        return f"bad URL '{_shown(text)}': no query ({hint})"
    if parts.path.rstrip("/").endswith(GRAFANA_ANNOTATIONS_PATH):
        # Turnout adds the path itself; posting to .../api/annotations/api/annotations would fail.
        return (
            f"bad URL '{_shown(text)}': give Grafana's base URL, without "
            f"{GRAFANA_ANNOTATIONS_PATH} (Turnout adds it)"
        )
    return None


def _check_fleet_name(text: str) -> str | None:
    if not NAME_RE.match(text):
        return f"'{_shown(text)}' is not a name (a-z, 0-9, '_', '-'; up to 63 characters)"
    return None


def _check_instance(text: str) -> str | None:
    if not text or len(text) > _MAX_INSTANCE_CHARS:
        return f"expected 1 to {_MAX_INSTANCE_CHARS} characters"
    if _CONTROL_RE.search(text) or any(c.isspace() for c in text):
        return "no spaces or control characters"
    rest = ENV_REF_RE.sub("", text)
    if "$" in rest:
        return "write an environment variable as ${NAME}"
    return None


def _check_redis_url(text: str) -> str | None:
    hint = (
        "expected redis://host:6379/0, rediss://host:6380/0 or redis+sentinel://host:26379/name/0"
    )
    if len(text) > _MAX_URL_CHARS:
        return f"a URL of {len(text)} characters; at most {_MAX_URL_CHARS}"
    if _CONTROL_RE.search(text) or " " in text:
        return f"bad URL (no spaces or control characters; {hint})"
    shown = _shown(redact_redis_url(text)) if "@" in text else _shown(text)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return f"bad URL '{shown}' ({hint})"
    if parts.fragment or parts.query:
        return f"bad URL '{shown}': no query or fragment ({hint})"
    if parts.scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(text)
        except ValueError as exc:
            return f"bad URL '{shown}': {exc} ({hint})"
        return None
    try:
        port = parts.port
    except ValueError:
        return f"bad URL '{shown}' ({hint})"
    if parts.scheme not in ("redis", "rediss"):
        return (
            f"bad URL '{shown}': the scheme must be redis, rediss, redis+sentinel or "
            f"rediss+sentinel ({hint})"
        )
    if not parts.hostname:
        return f"bad URL '{shown}': no host ({hint})"
    if port == 0:
        return f"bad URL '{shown}': the port must be from 1 to 65535"
    database = parts.path.strip("/")
    if database and (not database.isdigit() or int(database) > 15):
        return f"bad URL '{shown}': the path is a database number from 0 to 15 ({hint})"
    return None


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


def parse_sentinel_url(text: str) -> tuple[list[tuple[str, int]], str, int]:
    """`redis+sentinel://[:password@]host[:port][,host[:port]...]/service[/db]` ->
    (sentinels, service, db); ValueError says what is wrong. Sentinels listen on 26379 by
    default."""
    parts = urllib.parse.urlsplit(text)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port_text = item.rpartition(":") if "]" not in item[-1:] else ("", "", "")
        if not colon or "]" in port_text:
            host, port_text = item, "26379"
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"'{_shown(item)}' is not host:port")
        sentinels.append((host, int(port_text)))
    path = [piece for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2:
        raise ValueError("the path is /service or /service/db (the name Sentinel monitors)")
    database = path[1] if len(path) == 2 else "0"
    if not database.isdigit() or int(database) > 15:
        raise ValueError("the database is a number from 0 to 15")
    return sentinels, path[0], int(database)


def _check_url(text: str, hint: str) -> str | None:
    """An http(s) URL with a host and no credentials, fragment or bad port; `hint` ends the
    messages that a corrected example helps with."""
    if len(text) > _MAX_URL_CHARS:
        return f"a URL of {len(text)} characters; at most {_MAX_URL_CHARS}"
    if _CONTROL_RE.search(text) or " " in text:
        return f"bad URL '{_shown(text)}' (no spaces or control characters; {hint})"
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # an unbalanced [ or ] around an IPv6 address
        return f"bad URL '{_shown(text)}' ({hint})"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme not in ("http", "https"):
        return f"bad URL '{_shown(text)}': the scheme must be http or https ({hint})"
    if not parts.hostname:
        return f"bad URL '{_shown(text)}': no host ({hint})"
    if parts.username is not None or parts.password is not None:
        # /admin/config and the logs show the URL: no place for a password.
        return f"bad URL '{_shown(text)}': user:password@ is not supported"
    if parts.fragment or text.endswith("#"):
        return f"bad URL '{_shown(text)}': no fragment ({hint})"
    if port == 0:
        return f"bad URL '{_shown(text)}': the port must be from 1 to 65535"
    return None


def _check_json_path(text: str) -> str | None:
    if _JSON_PATH_RE.match(text):
        return None
    return f"bad JSON path '{_shown(text)}' (dotted keys, e.g. meta.request_id)"


class _Shadows:
    """Finds the earlier route, if any, that takes every request a later route would match.

    The same rules as `routing.match_route`: a route without host matches every host, an
    exact host only itself, `*.example.com` (kept as the suffix `.example.com`) every longer
    name ending in that suffix; a path prefix covers itself and whatever continues it after a
    `/`, and `/` (kept as "") every path. Routes are indexed by (host, prefix) so that each
    check costs a few lookups per dot in the host and per `/` in the prefix, not a pass over
    the earlier routes.
    """

    def __init__(self) -> None:
        self._routes: dict[str | None, dict[str, tuple[int, str]]] = {}
        self._count = 0

    def add(self, match: Match, label: str) -> str | None:
        """Record a route; the label of the first earlier route that covers it, or None."""
        host = match.host.rstrip(".") if match.host is not None else None
        prefix = match.path_prefix.rstrip("/")
        hosts: list[str | None] = [None]
        if host is not None:
            own = host[1:] if host.startswith("*.") else host
            # The keys that cover it: itself, and each wildcard suffix it ends with (an exact
            # host needs a label before the suffix, as `*.example.com` is not `example.com`).
            hosts.append(own)
            start = 0 if host.startswith("*.") else 1
            hosts.extend(own[i:] for i in range(start, len(own)) if own[i] == ".")
        prefixes = [""]
        prefixes.extend(prefix[:i] for i in range(1, len(prefix)) if prefix[i] == "/")
        if prefix:
            prefixes.append(prefix)
        found: tuple[int, str] | None = None
        for key in dict.fromkeys(hosts):
            by_prefix = self._routes.get(key)
            if by_prefix is None:
                continue
            for candidate in prefixes:
                earlier = by_prefix.get(candidate)
                if earlier is not None and (found is None or earlier[0] < found[0]):
                    found = earlier
        self._routes.setdefault(hosts[1] if host is not None else None, {}).setdefault(
            prefix, (self._count, label)
        )
        self._count += 1
        return None if found is None else found[1]


def _lower_host(host: str) -> str:
    # Stored as the request's Host is compared: lower-case, IPv6 without brackets.
    return host.lower().removeprefix("[").removesuffix("]")


# Kinds of text: (check returning a message or None, what the value is called, stored form).
_TEXT_KINDS: dict[Kind, tuple[Callable[[str], str | None], str, Callable[[str], str] | None]] = {
    Kind.HEADER: (_check_token, "a header name", str.lower),
    Kind.COOKIE: (_check_token, "a cookie name", None),
    Kind.HTTP_PATH: (_check_http_path, "a path", None),
    Kind.PATH_PREFIX: (_check_path_prefix, "a path", None),
    Kind.HOST: (_check_host_pattern, "a host name", _lower_host),
    Kind.SERVER_NAME: (_check_server_name, "a host name", str.lower),
    Kind.URL: (_check_webhook_url, "a URL", None),
    Kind.GRAFANA_URL: (_check_grafana_url, "a URL", None),
    Kind.REDIS_URL: (_check_redis_url, "a Redis URL", None),
    Kind.FLEET_NAME: (_check_fleet_name, "a fleet name", None),
    Kind.INSTANCE: (_check_instance, "an instance name", None),
    Kind.VIA: (_check_via, "a Via pseudonym", None),
    Kind.TLS_VERSION: (_check_tls_version, "a TLS version", None),
    Kind.WEBHOOK_EVENT: (_check_webhook_event, "an event name", None),
    Kind.PROTOCOL: (_check_protocol, "a protocol name", None),
}


# --- entry points -----------------------------------------------------------------------------


def parse_config(text: str, path: str) -> ConfigSpec:
    """Validate a routing-table file's text; raise ConfigError listing every problem.

    `path` names the file in messages, and `state_file` is resolved relative to its folder
    (the result is absolute when `path` is).
    """
    # Characters never outnumber UTF-8 bytes: the cheap test first.
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
        limit = format_size(MAX_FILE_BYTES)
        message = f"the file is {size} bytes; at most {limit} ({MAX_FILE_BYTES} bytes) is read"
        raise ConfigError([ConfigIssue(path, 1, 1, "", message)])
    issues: list[ConfigIssue] = []
    root, unusable = _compose(text, path, issues)
    spec: ConfigSpec | None = None
    if root is None or (
        isinstance(root, ScalarNode) and root.tag == _NULL and root.value in ("", "~")
    ):
        if not issues:
            issues.append(
                ConfigIssue(
                    path,
                    1,
                    1,
                    "",
                    "the file is empty; expected a mapping with upstreams and routes",
                )
            )
    elif not isinstance(root, MappingNode):
        if root.tag != _INVALID:
            mark = root.start_mark
            issues.append(
                ConfigIssue(
                    path,
                    mark.line + 1,
                    mark.column + 1,
                    "",
                    f"the top level must be a mapping with upstreams and routes, "
                    f"got {_describe(root)}",
                )
            )
    else:
        checker = _Checker(path, unusable)
        spec = checker.check(root)
        issues.extend(checker.issues)
    # Bad scalars the schema never reached (e.g. under an unknown key): reported without path.
    for node, message in unusable.values():
        mark = node.start_mark
        issues.append(ConfigIssue(path, mark.line + 1, mark.column + 1, "", message))
    if issues or spec is None:
        raise ConfigError(sorted(issues, key=lambda issue: (issue.line, issue.col)))
    return spec


def summary(spec: ConfigSpec, path: str) -> str:
    """The one line `turnout validate` prints for a good file."""
    upstreams = len(spec.upstreams)
    routes = len(spec.routes)
    workers = "auto" if spec.workers == 0 else str(spec.workers)
    listen = ", ".join(_listener_summary(x) for x in spec.all_listeners())
    return (
        f"{path}: OK — {upstreams} upstream{'s' if upstreams != 1 else ''}, "
        f"{routes} route{'s' if routes != 1 else ''}, "
        f"listen {listen}, admin {_format_address(*spec.admin)}, "
        f"workers {workers}"
    )


def _listener_summary(listener: Listener) -> str:
    if listener.tls is None:
        return listener.address
    count = len(listener.tls.certificates)
    return f"{listener.address} (TLS, {count} certificate{'s' if count != 1 else ''})"
