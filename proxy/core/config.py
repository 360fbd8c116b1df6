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
from typing import TypeVar

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from proxy.core.spec import (
    ALL_METHODS,
    MAX_WEIGHT,
    TLS_VERSIONS,
    WEBHOOK_EVENTS,
    Annotations,
    CertificateFiles,
    ConfigSpec,
    Drain,
    Endpoint,
    Fleet,
    HealthCheck,
    Limits,
    Listener,
    ListenerTls,
    Match,
    Mirror,
    Override,
    Rollout,
    RouteSpec,
    Sticky,
    Timeouts,
    UpstreamSpec,
    UpstreamTls,
    Webhook,
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
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
# RFC 9110 token: what a header or cookie name may be made of.
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_ENDPOINT_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\Z")
_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")
_LEADING_ZERO_RE = re.compile(r"[+-]?0[0-9]")
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)\Z")
_SIZE_RE = re.compile(r"([0-9]+)(B|KiB|MiB|GiB)\Z")
_JSON_PATH_RE = re.compile(r"[^.\s]+(?:\.[^.\s]+)*\Z")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Lone surrogates (only `\udc80`-style escapes make them): not Unicode, so not UTF-8 or JSON.
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_UNPRINTABLE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")

_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_SIZE_UNITS = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10, "B": 1}
# A bound on every duration: far above any sensible timeout or step, and far below the values
# that overflow event-loop timers.
_MAX_DURATION = 24 * 3600.0
_MAX_RETRIES = 10

# Limits on the file itself (docs/config.md, "Limits on the file itself"). They keep every
# input finite: parse time, memory, error messages, and what /admin/config dumps as JSON.
MAX_FILE_BYTES = 16 << 20
# Nested lists and mappings; the schema itself needs 5.
_MAX_DEPTH = 64
# Any one key or value; no string in the schema may be longer (a cookie value is up to 4096).
_MAX_SCALAR_CHARS = 4096
# Upstream and route names: a DNS label, as a Kubernetes service name is.
_MAX_NAME_CHARS = 63
_MAX_TOKEN_CHARS = 256
_MAX_HOST_CHARS = 253
_MAX_LABEL_CHARS = 63
_MAX_PATH_CHARS = 1024
# Integers in the file have at most this many digits: beyond it every range check fails anyway,
# and Python refuses to convert more than 4300.
_MAX_DIGITS = 20
_MAX_ROUTES = 100_000
_MAX_UPSTREAMS = 100_000
_MAX_ENDPOINTS = 1000
_MAX_OVERRIDES = 1000
_MAX_STEPS = 100
_MAX_IGNORE_FIELDS = 100
_MAX_WORKERS = 1024
_MAX_LISTENERS = 64
_MAX_CERTIFICATES = 1000
_MAX_CONNECTIONS = 1_000_000
_MAX_HEADERS = 10_000
_MAX_HEADER_SIZE = 1 << 20
_MAX_REQUEST_BODY = 1 << 40
# A mirrored request's body is held in memory while the copy is in flight.
_MAX_MIRROR_BODY = 1 << 30
_MAX_MIRROR_IN_FLIGHT = 10_000
_MAX_CHECK_COUNT = 1000
_MAX_MIN_REQUESTS = 1_000_000_000
_MAX_WEBHOOKS = 20
_MAX_URL_CHARS = 2048
# How often a rollout looks at its evidence when the file does not say (capped at `interval`).
_DEFAULT_CHECK = 5.0
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
    # Division, not multiplication by 0.001, so that "250ms" is exactly 0.25.
    seconds = float(number) / 1000.0 if unit == "ms" else float(number) * _SECONDS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"bad duration '{_shown(text)}' ({_DURATION_HINT})")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest duration text in the largest whole unit; parses back exactly."""
    if seconds == 0:
        return "0s"
    candidates = [(seconds / factor, unit) for unit, factor in _SECONDS.items()]
    candidates.append((seconds * 1000.0, "ms"))
    for count, unit in candidates:
        if count.is_integer() and count >= 1:
            text = f"{int(count)}{unit}"
            if parse_duration(text) == seconds:
                return text
    return f"{_positional(seconds)}s"


def _positional(value: float) -> str:
    """The shortest round-tripping decimal of a non-negative float, without an exponent."""
    text = repr(value)
    if "e" not in text:
        return text
    mantissa, _, exponent = text.partition("e")
    digits = mantissa.replace(".", "")
    point = (mantissa.index(".") if "." in mantissa else len(mantissa)) + int(exponent)
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return f"{digits[:point]}.{digits[point:]}"


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
        digits, factor = found.group(1), _SIZE_UNITS[found.group(2)]
    if len(digits) > _MAX_DIGITS:
        raise ValueError(f"size '{_shown(text)}' is too large")
    return int(digits) * factor


def format_size(size: int) -> str:
    """Bytes -> `1MiB`-style text when the size is a whole number of a unit, else plain bytes."""
    for unit, factor in _SIZE_UNITS.items():
        if factor > 1 and size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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

    def _field(
        self,
        items: _Items,
        key: str,
        path: str,
        read: Callable[[Node, str], _T | None],
        default: _T,
    ) -> _T:
        """Read an optional key with `read`; its default when absent or unreadable."""
        item = items.get(key)
        if item is None:
            return default
        value = read(item[1], _join(path, key))
        return default if value is None else value

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

    def _positive_duration(self, node: Node, path: str) -> float | None:
        return self._duration(node, path, positive=True)

    def _any_duration(self, node: Node, path: str) -> float | None:
        return self._duration(node, path, positive=False)

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

    def _header_name(self, node: Node, path: str) -> str | None:
        name = self._text_field(node, path, _check_token, "a header name")
        return None if name is None else name.lower()

    def _cookie_name(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_token, "a cookie name")

    # --- sections ---

    def check(self, root: Node) -> ConfigSpec | None:
        """The whole file; None when the root is unusable."""
        items = self._mapping(root, "", _TOP_KEYS, ("upstreams", "routes"))
        if items is None:
            return None
        default = ConfigSpec(upstreams=(), routes=())
        upstreams = self._field(items, "upstreams", "", self._upstreams, default.upstreams)
        routes = self._field(items, "routes", "", self._routes, default.routes)
        listeners: tuple[Listener, ...] = ()
        if "listen" in items and isinstance(items["listen"][1], SequenceNode):
            listeners = self._listeners(items["listen"][1], "listen") or ()
            listen = (listeners[0].host, listeners[0].port) if listeners else None
        else:
            listen = self._address_field(items, "listen", default.listen)
        admin = self._address_field(items, "admin", default.admin)
        addresses = [(x.host, x.port) for x in listeners] or ([listen] if listen else [])
        if admin is not None and any(_same_socket(a, admin) for a in addresses):
            key, other = ("admin", "listen") if "admin" in items else ("listen", "admin")
            self.error(items[key][1], key, f"must not be the same address as {other}")
        return ConfigSpec(
            upstreams=upstreams,
            routes=routes,
            listen=default.listen if listen is None else listen,
            listeners=listeners,
            admin=default.admin if admin is None else admin,
            workers=self._field(items, "workers", "", self._workers, default.workers),
            state_file=self._field(items, "state_file", "", self._state_file, None),
            via=self._field(items, "via", "", self._via, None),
            timeouts=self._field(items, "timeouts", "", self._timeouts, default.timeouts),
            limits=self._field(items, "limits", "", self._limits, default.limits),
            drain=self._field(items, "drain", "", self._drain, default.drain),
            annotations=self._field(items, "annotations", "", self._annotations, None),
            fleet=self._field(items, "fleet", "", self._fleet, None),
        )

    def _address_field(
        self, items: _Items, key: str, default: tuple[str, int]
    ) -> tuple[str, int] | None:
        """The top-level address `key`: its default when absent, None when unreadable."""
        if key not in items:
            return default
        return self._address(items[key][1], key)

    def _listeners(self, node: Node, path: str) -> tuple[Listener, ...] | None:
        """The list form of `listen`: plain and TLS listeners side by side."""
        elements = self._list(node, path, _MAX_LISTENERS, "listeners")
        if elements is None:
            return None
        if not elements:
            self.error(node, path, "at least one listener is required")
            return None
        listeners: list[Listener] = []
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._mapping(element, where, _LISTENER_KEYS, ("address",))
            if items is None or "address" not in items:
                continue
            address = self._address(items["address"][1], _join(where, "address"))
            if address is None:
                continue
            clash = next((x for x in listeners if _same_socket((x.host, x.port), address)), None)
            if clash is not None:
                self.error(
                    items["address"][1],
                    _join(where, "address"),
                    f"'{_format_address(*address)}' overlaps listener '{clash.address}'",
                )
                continue
            tls = self._field(items, "tls", where, self._listener_tls, None)
            listeners.append(Listener(host=address[0], port=address[1], tls=tls))
        return tuple(listeners)

    def _listener_tls(self, node: Node, path: str) -> ListenerTls | None:
        items = self._mapping(node, path, _LISTENER_TLS_KEYS, ("certificates",))
        if items is None or "certificates" not in items:
            return None
        certs_path = _join(path, "certificates")
        elements = self._list(
            items["certificates"][1], certs_path, _MAX_CERTIFICATES, "certificates"
        )
        if elements is None:
            return None
        if not elements:
            self.error(items["certificates"][1], certs_path, "at least one certificate is required")
            return None
        certificates: list[CertificateFiles] = []
        for index, element in enumerate(elements):
            where = f"{certs_path}[{index}]"
            pair = self._mapping(element, where, _CERTIFICATE_KEYS, ("cert", "key"))
            if pair is None:
                continue
            cert = self._field(pair, "cert", where, self._file_path, None)
            key = self._field(pair, "key", where, self._file_path, None)
            if cert is not None and key is not None:
                certificates.append(CertificateFiles(cert=cert, key=key))
        return ListenerTls(
            certificates=tuple(certificates),
            min_version=self._field(items, "min_version", path, self._tls_version, "1.2"),
            client_ca=self._field(items, "client_ca", path, self._file_path, None),
        )

    def _tls_version(self, node: Node, path: str) -> str | None:
        scalar = self._scalar(node, path, "a TLS version")
        if scalar is None:
            return None
        # `1.2` unquoted is a YAML float; read as written, it is the same version.
        text = str(scalar.value)
        if text not in TLS_VERSIONS:
            self.error(node, path, f'bad TLS version \'{_shown(text)}\' (use "1.2" or "1.3")')
            return None
        return text

    def _file_path(self, node: Node, path: str) -> str | None:
        """A file path, resolved against the config file's folder (the file is checked later)."""
        name = self._text_field(node, path, _check_file_name, "a file path")
        if name is None:
            return None
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.file), name))

    def _workers(self, node: Node, path: str) -> int | None:
        if self._placeholder(node, path):
            return None
        if isinstance(node, ScalarNode) and str(node.value) == "auto":
            return 0  # ConfigSpec's spelling of "auto"; the caller counts the CPUs.
        if isinstance(node, ScalarNode) and _is_plain(node) and _INT_RE.match(str(node.value)):
            return self._int(node, path, minimum=1, maximum=_MAX_WORKERS)
        self.error(
            node,
            path,
            f"expected an integer from 1 to {_MAX_WORKERS} or 'auto', got {_describe(node)}",
        )
        return None

    def _via(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_via, "a Via pseudonym")

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

    def _timeouts(self, node: Node, path: str) -> Timeouts | None:
        items = self._mapping(node, path, _TIMEOUT_KEYS)
        if items is None:
            return None
        d = Timeouts()
        read = self._positive_duration
        return Timeouts(
            connect=self._field(items, "connect", path, read, d.connect),
            response=self._field(items, "response", path, read, d.response),
            idle=self._field(items, "idle", path, read, d.idle),
            client_keepalive=self._field(items, "client_keepalive", path, read, d.client_keepalive),
        )

    def _limits(self, node: Node, path: str) -> Limits | None:
        items = self._mapping(node, path, _LIMIT_KEYS)
        if items is None:
            return None
        d = Limits()

        def body(n: Node, p: str) -> int | None:
            return self._size(n, p, minimum=1, maximum=_MAX_REQUEST_BODY)

        def head(n: Node, p: str) -> int | None:
            return self._size(n, p, minimum=1, maximum=_MAX_HEADER_SIZE)

        def connections(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=1, maximum=_MAX_CONNECTIONS)

        def headers(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=1, maximum=_MAX_HEADERS)

        return Limits(
            max_request_body=self._field(items, "max_request_body", path, body, d.max_request_body),
            max_connections=self._field(
                items, "max_connections", path, connections, d.max_connections
            ),
            max_header_size=self._field(items, "max_header_size", path, head, d.max_header_size),
            max_headers=self._field(items, "max_headers", path, headers, d.max_headers),
        )

    def _drain(self, node: Node, path: str) -> Drain | None:
        items = self._mapping(node, path, _DRAIN_KEYS)
        if items is None:
            return None
        d = Drain()
        read = self._any_duration
        return Drain(
            reload=self._field(items, "reload", path, read, d.reload),
            shutdown=self._field(items, "shutdown", path, read, d.shutdown),
            delay=self._field(items, "delay", path, read, d.delay),
        )

    def _annotations(self, node: Node, path: str) -> Annotations | None:
        items = self._mapping(node, path, _ANNOTATION_KEYS, ("grafana",))
        if items is None:
            return None
        d = Annotations(grafana="")

        def grafana(n: Node, p: str) -> str | None:
            return self._text_field(n, p, _check_grafana_url, "a URL")

        return Annotations(
            grafana=self._field(items, "grafana", path, grafana, d.grafana),
            timeout=self._field(items, "timeout", path, self._positive_duration, d.timeout),
        )

    def _fleet(self, node: Node, path: str) -> Fleet | None:
        items = self._mapping(node, path, _FLEET_KEYS, ("name", "redis"))
        if items is None:
            return None
        d = Fleet(name="", redis="")

        def name(n: Node, p: str) -> str | None:
            return self._text_field(n, p, _check_fleet_name, "a fleet name")

        def redis(n: Node, p: str) -> str | None:
            return self._text_field(n, p, _check_redis_url, "a Redis URL")

        def instance(n: Node, p: str) -> str | None:
            return self._text_field(n, p, _check_instance, "an instance name")

        def lease(n: Node, p: str) -> float | None:
            value = self._positive_duration(n, p)
            if value is not None and not _MIN_LEASE <= value <= _MAX_LEASE:
                self.error(n, p, f"must be from {_MIN_LEASE:g}s to {_MAX_LEASE:g}s")
                return None
            return value

        return Fleet(
            name=self._field(items, "name", path, name, d.name),
            redis=self._field(items, "redis", path, redis, d.redis),
            instance=self._field(items, "instance", path, instance, None),
            lease=self._field(items, "lease", path, lease, d.lease),
        )

    def _upstreams(self, node: Node, path: str) -> tuple[UpstreamSpec, ...] | None:
        mapping = self._map(node, path)
        if mapping is None:
            return None
        if len(mapping.value) > _MAX_UPSTREAMS:
            count = len(mapping.value)
            self.error(mapping, path, f"at most {_MAX_UPSTREAMS} upstreams (this file has {count})")
            return None
        entries = [
            (name, key, value)
            for name, key, value in self._pairs(mapping, path)
            if self._name(key, _join(path, name), "upstream") is not None
        ]
        if not mapping.value:
            self.error(mapping, path, "at least one upstream is required")
        # Set before the bodies are read so that references are checked even when a body is bad.
        self.known = frozenset(name for name, _, _ in entries)
        return tuple(self._upstream(name, value, _join(path, name)) for name, _, value in entries)

    def _upstream(self, name: str, node: Node, path: str) -> UpstreamSpec:
        items = self._mapping(node, path, _UPSTREAM_KEYS, ("endpoints",)) or {}
        return UpstreamSpec(
            name=name,
            endpoints=self._field(items, "endpoints", path, self._endpoints, ()),
            health=self._field(items, "health", path, self._health, None),
            tls=self._field(items, "tls", path, self._upstream_tls, None),
        )

    def _upstream_tls(self, node: Node, path: str) -> UpstreamTls | None:
        items = self._mapping(node, path, _UPSTREAM_TLS_KEYS)
        if items is None:
            return None
        cert = self._field(items, "cert", path, self._file_path, None)
        key = self._field(items, "key", path, self._file_path, None)
        for given, missing in (("cert", "key"), ("key", "cert")):
            if given in items and missing not in items:
                self.error(items[given][0], _join(path, given), f"needs '{missing}' too")
        return UpstreamTls(
            ca=self._field(items, "ca", path, self._file_path, None),
            server_name=self._field(items, "server_name", path, self._server_name, None),
            cert=cert,
            key=key,
            verify=self._field(items, "verify", path, self._bool, True),
        )

    def _server_name(self, node: Node, path: str) -> str | None:
        name = self._text_field(node, path, _check_server_name, "a host name")
        return None if name is None else name.lower()

    def _endpoints(self, node: Node, path: str) -> tuple[Endpoint, ...] | None:
        elements = self._list(node, path, _MAX_ENDPOINTS, "endpoints")
        if elements is None:
            return None
        if not elements:
            self.error(node, path, "at least one endpoint is required")
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

    def _health(self, node: Node, path: str) -> HealthCheck | None:
        items = self._mapping(node, path, _HEALTH_KEYS)
        if items is None:
            return None
        d = HealthCheck()

        def at_least_one(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=1, maximum=_MAX_CHECK_COUNT)

        read = self._positive_duration
        return HealthCheck(
            path=self._field(items, "path", path, self._http_path, d.path),
            interval=self._field(items, "interval", path, read, d.interval),
            timeout=self._field(items, "timeout", path, read, d.timeout),
            unhealthy_after=self._field(
                items, "unhealthy_after", path, at_least_one, d.unhealthy_after
            ),
            healthy_after=self._field(items, "healthy_after", path, at_least_one, d.healthy_after),
        )

    def _http_path(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_http_path, "a path")

    def _path_prefix(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_path_prefix, "a path")

    def _routes(self, node: Node, path: str) -> tuple[RouteSpec, ...] | None:
        elements = self._list(node, path, _MAX_ROUTES, "routes")
        if elements is None:
            return None
        if not elements:
            self.error(node, path, "at least one route is required")
        routes: list[RouteSpec] = []
        first_line: dict[str, int] = {}
        shadows = _Shadows()
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._mapping(element, where, _ROUTE_KEYS, ("name", "split"))
            if items is None:
                continue
            before = len(self.issues)
            match = self._field(items, "match", where, self._match, Match())
            # Only a match read without error says which requests the route takes.
            match_read = len(self.issues) == before
            route = self._route(items, where, match)
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

    def _route(self, items: _Items, path: str, match: Match) -> RouteSpec:
        def route_name(n: Node, p: str) -> str | None:
            return self._name(n, p, "route")

        def retries(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=0, maximum=_MAX_RETRIES)

        return RouteSpec(
            name=self._field(items, "name", path, route_name, ""),
            split=self._field(items, "split", path, self._split, ()),
            match=match,
            overrides=self._field(items, "overrides", path, self._overrides, ()),
            sticky=self._field(items, "sticky", path, self._sticky, None),
            mirror=self._field(items, "mirror", path, self._mirror, None),
            retries=self._field(items, "retries", path, retries, 2),
            rollout=self._field(items, "rollout", path, self._rollout, None),
        )

    def _match(self, node: Node, path: str) -> Match | None:
        items = self._mapping(node, path, _MATCH_KEYS)
        if items is None:
            return None
        host = self._field(items, "host", path, self._host_pattern, None)
        prefix = self._field(items, "path_prefix", path, self._path_prefix, "/")
        return Match(host=host, path_prefix=prefix)

    def _host_pattern(self, node: Node, path: str) -> str | None:
        host = self._text_field(node, path, _check_host_pattern, "a host name")
        # Stored as the request's Host is compared: lower-case, IPv6 without brackets.
        return None if host is None else host.lower().removeprefix("[").removesuffix("]")

    def _overrides(self, node: Node, path: str) -> tuple[Override, ...] | None:
        elements = self._list(node, path, _MAX_OVERRIDES, "overrides")
        if elements is None:
            return None
        overrides: list[Override] = []
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._mapping(element, where, _OVERRIDE_KEYS, ("to",))
            if items is None:
                continue
            self._one_of(element, items, where)
            overrides.append(
                Override(
                    to=self._field(items, "to", where, self._upstream_ref, ""),
                    header=self._field(items, "header", where, self._header_name, None),
                    cookie=self._field(items, "cookie", where, self._cookie_name, None),
                    value=self._field(items, "value", where, self._string, None),
                )
            )
        return tuple(overrides)

    def _one_of(self, node: Node, items: _Items, path: str) -> None:
        if "header" in items and "cookie" in items:
            self.error(node, path, "give exactly one of 'header' or 'cookie', not both")
        elif "header" not in items and "cookie" not in items:
            self.error(node, path, "missing 'header' or 'cookie' (give exactly one)")

    def _split(self, node: Node, path: str) -> tuple[tuple[str, float], ...] | None:
        mapping = self._map(node, path)
        if mapping is None:
            return None
        if not mapping.value:
            self.error(mapping, path, "at least one upstream with a weight is required")
            return None
        weights: list[tuple[str, float]] = []
        readable = True
        for name, key, value in self._pairs(mapping, path):
            where = _join(path, name)
            if self.known is not None and name not in self.known:
                self.error(key, where, _unknown_upstream(name, self.known))
            weight = self._number(value, where, 0.0, MAX_WEIGHT)
            if weight is None:
                readable = False
                continue
            weights.append((name, weight))
        if readable and weights and all(weight == 0 for _, weight in weights):
            self.error(mapping, path, "weights are all 0; at least one must be > 0")
        return tuple(weights)

    def _sticky(self, node: Node, path: str) -> Sticky | None:
        items = self._mapping(node, path, _STICKY_KEYS)
        if items is None:
            return None
        self._one_of(node, items, path)
        if "set" in items and "header" in items and "cookie" not in items:
            key = items["set"][0]
            self.error(key, f"{path}.set", "'set' is only allowed with 'cookie'")
        return Sticky(
            header=self._field(items, "header", path, self._header_name, None),
            cookie=self._field(items, "cookie", path, self._cookie_name, None),
            set=self._field(items, "set", path, self._bool, False),
        )

    def _mirror(self, node: Node, path: str) -> Mirror | None:
        items = self._mapping(node, path, _MIRROR_KEYS, ("to",))
        if items is None:
            return None
        d = Mirror(to="")

        def percent(n: Node, p: str) -> float | None:
            return self._number(n, p, 0.0, 100.0)

        def max_body(n: Node, p: str) -> int | None:
            return self._size(n, p, minimum=0, maximum=_MAX_MIRROR_BODY)

        def in_flight(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=1, maximum=_MAX_MIRROR_IN_FLIGHT)

        return Mirror(
            to=self._field(items, "to", path, self._upstream_ref, ""),
            percent=self._field(items, "percent", path, percent, d.percent),
            max_body=self._field(items, "max_body", path, max_body, d.max_body),
            methods=self._field(items, "methods", path, self._methods, None),
            max_in_flight=self._field(items, "max_in_flight", path, in_flight, d.max_in_flight),
            timeout=self._field(items, "timeout", path, self._positive_duration, d.timeout),
            compare_json=self._field(items, "compare_json", path, self._bool, d.compare_json),
            compare_json_ignore=self._field(
                items, "ignore_fields", path, self._json_paths, d.compare_json_ignore
            ),
        )

    def _methods(self, node: Node, path: str) -> frozenset[str] | None:
        elements = self._list(node, path, len(ALL_METHODS), "methods")
        if elements is None:
            return None
        if not elements:
            self.error(node, path, "must not be empty (leave 'methods' out to mirror every method)")
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

    def _json_paths(self, node: Node, path: str) -> tuple[str, ...] | None:
        elements = self._list(node, path, _MAX_IGNORE_FIELDS, "fields")
        if elements is None:
            return None
        fields = (
            self._text_field(element, f"{path}[{index}]", _check_json_path, "a JSON path")
            for index, element in enumerate(elements)
        )
        return tuple(field for field in fields if field is not None)

    def _rollout(self, node: Node, path: str) -> Rollout | None:
        items = self._mapping(node, path, _ROLLOUT_KEYS, ("baseline", "canary"))
        if items is None:
            return None
        d = Rollout(baseline="", canary="")
        baseline = self._field(items, "baseline", path, self._upstream_ref, "")
        canary = self._field(items, "canary", path, self._upstream_ref, "")
        if baseline and baseline == canary:
            self.error(items["canary"][1], f"{path}.canary", "must differ from baseline")

        def min_requests(n: Node, p: str) -> int | None:
            return self._int(n, p, minimum=1, maximum=_MAX_MIN_REQUESTS)

        def error_rate(n: Node, p: str) -> float | None:
            return self._number(n, p, 0.0, 1.0)

        read = self._positive_duration
        interval = self._field(items, "interval", path, read, d.interval)
        check = self._field(items, "check", path, read, min(_DEFAULT_CHECK, interval))
        if "check" in items and check > interval:
            self.error(
                items["check"][1],
                f"{path}.check",
                f"must be at most interval ({format_duration(interval)}): the evidence is "
                "looked at least once per interval",
            )
        return Rollout(
            baseline=baseline,
            canary=canary,
            steps=self._field(items, "steps", path, self._steps, d.steps),
            interval=interval,
            min_requests=self._field(items, "min_requests", path, min_requests, d.min_requests),
            max_error_rate=self._field(items, "max_error_rate", path, error_rate, d.max_error_rate),
            max_p99=self._field(items, "max_p99", path, read, d.max_p99),
            confidence=self._field(items, "confidence", path, self._confidence, d.confidence),
            check=check,
            webhooks=self._field(items, "webhooks", path, self._webhooks, ()),
        )

    def _confidence(self, node: Node, path: str) -> float | None:
        value = self._number(node, path, -math.inf, math.inf)
        # 1 is refused too: no test can promise never to roll back a good canary.
        if value is not None and not 0.5 < value < 1.0:
            self.error(node, path, "must be > 0.5 and < 1 (e.g. 0.99)")
            return None
        return value

    def _webhooks(self, node: Node, path: str) -> tuple[Webhook, ...] | None:
        elements = self._list(node, path, _MAX_WEBHOOKS, "webhooks")
        if elements is None:
            return None
        hooks: list[Webhook] = []
        default = Webhook(on="", url="")
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            items = self._mapping(element, where, _WEBHOOK_KEYS, ("on", "url"))
            if items is None:
                continue
            hooks.append(
                Webhook(
                    on=self._field(items, "on", where, self._webhook_event, ""),
                    url=self._field(items, "url", where, self._webhook_url, ""),
                    timeout=self._field(
                        items, "timeout", where, self._positive_duration, default.timeout
                    ),
                )
            )
        return tuple(hooks)

    def _webhook_event(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_webhook_event, "an event name")

    def _webhook_url(self, node: Node, path: str) -> str | None:
        return self._text_field(node, path, _check_webhook_url, "a URL")

    def _steps(self, node: Node, path: str) -> tuple[float, ...] | None:
        elements = self._list(node, path, _MAX_STEPS, "steps")
        if elements is None:
            return None
        if not elements:
            self.error(node, path, "at least one step is required")
            return None
        steps: list[float] = []
        for index, element in enumerate(elements):
            where = f"{path}[{index}]"
            step = self._number(element, where, 0.0, 100.0, above_minimum=True)
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


_TOP_KEYS = (
    "listen",
    "admin",
    "workers",
    "state_file",
    "via",
    "timeouts",
    "limits",
    "drain",
    "annotations",
    "fleet",
    "upstreams",
    "routes",
)
_LISTENER_KEYS = ("address", "tls")
_LISTENER_TLS_KEYS = ("certificates", "min_version", "client_ca")
_CERTIFICATE_KEYS = ("cert", "key")
_TIMEOUT_KEYS = ("connect", "response", "idle", "client_keepalive")
_LIMIT_KEYS = ("max_request_body", "max_connections", "max_header_size", "max_headers")
_DRAIN_KEYS = ("reload", "shutdown", "delay")
_ANNOTATION_KEYS = ("grafana", "timeout")
_FLEET_KEYS = ("name", "redis", "instance", "lease")
# A lease below a second is renewed faster than Redis round trips can be trusted; above an
# hour a dead leader holds rollouts for too long.
_MIN_LEASE = 1.0
_MAX_LEASE = 3600.0
_MAX_INSTANCE_CHARS = 128
ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_UPSTREAM_KEYS = ("endpoints", "health", "tls")
_UPSTREAM_TLS_KEYS = ("ca", "server_name", "cert", "key", "verify")
_HEALTH_KEYS = ("path", "interval", "timeout", "unhealthy_after", "healthy_after")
_ROUTE_KEYS = ("name", "match", "overrides", "split", "sticky", "mirror", "retries", "rollout")
_MATCH_KEYS = ("host", "path_prefix")
_OVERRIDE_KEYS = ("header", "cookie", "value", "to")
_STICKY_KEYS = ("header", "cookie", "set")
_MIRROR_KEYS = (
    "to",
    "percent",
    "max_body",
    "methods",
    "max_in_flight",
    "timeout",
    "compare_json",
    "ignore_fields",
)
_ROLLOUT_KEYS = (
    "baseline",
    "canary",
    "steps",
    "interval",
    "min_requests",
    "max_error_rate",
    "max_p99",
    "confidence",
    "check",
    "webhooks",
)
_WEBHOOK_KEYS = ("on", "url", "timeout")


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


def _check_method(text: str) -> str | None:
    if text in ALL_METHODS:
        return None
    return f"unknown method '{_shown(text)}' (use upper case: {', '.join(ALL_METHODS)})"


def _check_webhook_event(text: str) -> str | None:
    if text in WEBHOOK_EVENTS:
        return None
    return f"unknown event '{_shown(text)}' (use {', '.join(WEBHOOK_EVENTS)})"


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


def redact_redis_url(text: str) -> str:
    """`text` with the password of its user part replaced by `***` (for dumps and logs)."""
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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


def _number_out(value: float) -> float | int:
    """Whole numbers as ints, so that a dump reads `90` rather than `90.0`."""
    return int(value) if value.is_integer() else value


def spec_to_dict(spec: ConfigSpec) -> dict[str, object]:
    """The config in force as JSON-able data, in the file's own schema.

    Durations are strings (`2s`, `250ms`), sizes are ints, absent optional parts are left out,
    and `state_file` is the resolved path; dumped to YAML it parses back to an equal spec
    (given a config path in the same folder, or an absolute `state_file`).
    """
    out: dict[str, object] = {
        "listen": [_listener_dict(x) for x in spec.listeners]
        if spec.listeners
        else _format_address(*spec.listen),
        "admin": _format_address(*spec.admin),
        "workers": "auto" if spec.workers == 0 else spec.workers,
    }
    if spec.state_file is not None:
        out["state_file"] = spec.state_file
    if spec.via is not None:
        out["via"] = spec.via
    out["timeouts"] = {
        "connect": format_duration(spec.timeouts.connect),
        "response": format_duration(spec.timeouts.response),
        "idle": format_duration(spec.timeouts.idle),
        "client_keepalive": format_duration(spec.timeouts.client_keepalive),
    }
    out["limits"] = {
        "max_request_body": spec.limits.max_request_body,
        "max_connections": spec.limits.max_connections,
        "max_header_size": spec.limits.max_header_size,
        "max_headers": spec.limits.max_headers,
    }
    out["drain"] = {
        "reload": format_duration(spec.drain.reload),
        "shutdown": format_duration(spec.drain.shutdown),
        "delay": format_duration(spec.drain.delay),
    }
    if spec.annotations is not None:
        out["annotations"] = {
            "grafana": spec.annotations.grafana,
            "timeout": format_duration(spec.annotations.timeout),
        }
    if spec.fleet is not None:
        fleet: dict[str, object] = {
            "name": spec.fleet.name,
            "redis": redact_redis_url(spec.fleet.redis),
            "lease": format_duration(spec.fleet.lease),
        }
        if spec.fleet.instance is not None:
            fleet["instance"] = spec.fleet.instance
        out["fleet"] = fleet
    out["upstreams"] = {upstream.name: _upstream_dict(upstream) for upstream in spec.upstreams}
    out["routes"] = [_route_dict(route) for route in spec.routes]
    return out


def _listener_dict(listener: Listener) -> dict[str, object]:
    out: dict[str, object] = {"address": listener.address}
    tls = listener.tls
    if tls is not None:
        settings: dict[str, object] = {
            "certificates": [{"cert": c.cert, "key": c.key} for c in tls.certificates],
            "min_version": tls.min_version,
        }
        if tls.client_ca is not None:
            settings["client_ca"] = tls.client_ca
        out["tls"] = settings
    return out


def _upstream_dict(upstream: UpstreamSpec) -> dict[str, object]:
    out: dict[str, object] = {
        "endpoints": [endpoint.address for endpoint in upstream.endpoints],
    }
    if upstream.health is not None:
        health = upstream.health
        out["health"] = {
            "path": health.path,
            "interval": format_duration(health.interval),
            "timeout": format_duration(health.timeout),
            "unhealthy_after": health.unhealthy_after,
            "healthy_after": health.healthy_after,
        }
    if upstream.tls is not None:
        tls: dict[str, object] = {}
        for key in ("ca", "server_name", "cert", "key"):
            value = getattr(upstream.tls, key)
            if value is not None:
                tls[key] = value
        tls["verify"] = upstream.tls.verify
        out["tls"] = tls
    return out


def _route_dict(route: RouteSpec) -> dict[str, object]:
    match: dict[str, object] = {"path_prefix": route.match.path_prefix}
    if route.match.host is not None:
        match["host"] = route.match.host
    out: dict[str, object] = {"name": route.name, "match": match}
    if route.overrides:
        out["overrides"] = [_override_dict(override) for override in route.overrides]
    out["split"] = {name: _number_out(weight) for name, weight in route.split}
    if route.sticky is not None:
        sticky: dict[str, object] = {}
        if route.sticky.header is not None:
            sticky["header"] = route.sticky.header
        if route.sticky.cookie is not None:
            sticky["cookie"] = route.sticky.cookie
            sticky["set"] = route.sticky.set
        out["sticky"] = sticky
    if route.mirror is not None:
        out["mirror"] = _mirror_dict(route.mirror)
    out["retries"] = route.retries
    if route.rollout is not None:
        rollout = route.rollout
        out["rollout"] = {
            "baseline": rollout.baseline,
            "canary": rollout.canary,
            "steps": [_number_out(step) for step in rollout.steps],
            "interval": format_duration(rollout.interval),
            "min_requests": rollout.min_requests,
            "max_error_rate": _number_out(rollout.max_error_rate),
            "max_p99": format_duration(rollout.max_p99),
            "confidence": _number_out(rollout.confidence),
            "check": format_duration(rollout.check),
            "webhooks": [
                {"on": hook.on, "url": hook.url, "timeout": format_duration(hook.timeout)}
                for hook in rollout.webhooks
            ],
        }
    return out


def _override_dict(override: Override) -> dict[str, object]:
    out: dict[str, object] = {}
    if override.header is not None:
        out["header"] = override.header
    if override.cookie is not None:
        out["cookie"] = override.cookie
    if override.value is not None:
        out["value"] = override.value
    out["to"] = override.to
    return out


def _mirror_dict(mirror: Mirror) -> dict[str, object]:
    out: dict[str, object] = {
        "to": mirror.to,
        "percent": _number_out(mirror.percent),
        "max_body": mirror.max_body,
    }
    if mirror.methods is not None:
        out["methods"] = [method for method in ALL_METHODS if method in mirror.methods]
    out["max_in_flight"] = mirror.max_in_flight
    out["timeout"] = format_duration(mirror.timeout)
    out["compare_json"] = mirror.compare_json
    out["ignore_fields"] = list(mirror.compare_json_ignore)
    return out
