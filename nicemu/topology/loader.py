"""Reading a topology file: a regular, size-limited UTF-8 file (`read_config`) and YAML
composed with bounded nesting and alias expansion, every mapping remembering its lines
(`_yaml_load`), so messages can say where a problem is.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from nicemu.topology.schema import (MAX_DEPTH, MAX_FILE_BYTES, MAX_NUMBER_DIGITS, MAX_VALUES, HugeNumber, Problem,
                                    TopologyError, _describe, _excerpt)


class _MarkedDict(dict):
    """A mapping that remembers its YAML line and the line of each key, for error messages."""

    key_lines: dict[Any, int]
    line: int | None = None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers, duplicate-key detection and bounded input.

    YAML 1.1 reads an unquoted `52:54:00:12:34:56` as a base-60 integer; a MAC written the way
    everybody writes it must stay a string, so the sexagesimal forms are not resolved.

    Bounds, checked while the document is composed (before any value is built): nesting depth
    (MAX_DEPTH; PyYAML's composer recurses, so 10,000 levels would be a RecursionError) and
    the number of values with aliases expanded (MAX_VALUES): a "billion laughs" alias bomb is
    refused when its size passes the limit, never expanded. An alias to the value containing
    it is refused too.
    """

    duplicate_keys: list[tuple[str, int]]

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicate_keys = []
        self._depth = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height) once composed

    def fetch_flow_collection_start(self, token_class: type) -> None:
        """Flow nesting ([[[[...) is bounded in the scanner already: its look-ahead for simple
        keys would otherwise scan a thousand openers before the composer saw the first."""
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                            self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise yaml.composer.ComposerError(
                    None, None, f"the alias *{_excerpt(event.anchor)} refers to the value that "
                                "contains it", event.start_mark)
            return super().compose_node(parent, index)  # an undefined alias is its error
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Values and height of a composed node, aliases counted as what they stand for."""
        if isinstance(node, yaml.ScalarNode):
            size, height = 1, 1
        else:
            kids = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            known = [self._sizes[id(k)] for k in kids]
            size = 1 + sum(k[0] for k in known)
            height = 1 + max((k[1] for k in known), default=0)
        if size > MAX_VALUES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_VALUES} values once its "
                                                          "aliases are expanded", node.start_mark)
        if height > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels "
                                                          "once its aliases are expanded", node.start_mark)
        self._sizes[id(node)] = (size, height)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A value PyYAML cannot build (a 13th month, `!!int ""`) is a YAML error at its line."""
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {_excerpt(str(e), 80)}", node.start_mark) from None


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int | HugeNumber:
    """An integer as YAML 1.2 writes it; a very long one is a HugeNumber, not a giant int."""
    text = loader.construct_scalar(node).replace("_", "")
    digits = len(text.lstrip("+-"))
    if digits > MAX_NUMBER_DIGITS:
        return HugeNumber(digits)
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-").lower()
    for prefix, base in (("0b", 2), ("0x", 16), ("0o", 8)):
        if body.startswith(prefix):
            return sign * int(body[2:], base)  # "0x" alone: ValueError, a YAML error at its line
    return sign * int(body, 8 if len(body) > 1 and body.startswith("0") else 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _MarkedDict:
    loader.flatten_mapping(node)
    result = _MarkedDict()
    result.key_lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        line = key_node.start_mark.line + 1
        if key in result:
            loader.duplicate_keys.append((_describe(key), line))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, source: str) -> Any:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # (the reader already refuses control characters here)
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        if getattr(exc, "context", None):
            reason = f"{exc.context}: {reason}"
        raise TopologyError([Problem("", f"not valid YAML: {_excerpt(reason, 160)}", line)], source) from None
    except RecursionError:  # a bound above failed to hold; still no traceback
        raise TopologyError([Problem("", f"nested deeper than {MAX_DEPTH} levels")], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicate_keys:
        raise TopologyError(
            [Problem("", f"key {k} appears more than once", line) for k, line in loader.duplicate_keys],
            source,
        )
    return data


def read_config(path: str | os.PathLike) -> str:
    """The text of a topology file: a regular file of at most MAX_FILE_BYTES, UTF-8.

    Opened without blocking (a FIFO would otherwise wait for a writer forever) and checked with
    fstat before a byte is read (/dev/zero would be read until memory runs out); a device or a
    FIFO is refused, and at most MAX_FILE_BYTES + 1 bytes are ever read."""
    def refuse(why: str) -> TopologyError:
        return TopologyError([Problem("", why)], str(path))

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror}") from None
    except ValueError:  # a NUL in the name
        raise refuse("cannot read the file: the name contains a NUL byte") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"not a regular file ({_file_kind(st.st_mode)}); a topology is read from a file")
        if st.st_size > MAX_FILE_BYTES:
            raise refuse(f"the file has {st.st_size} bytes; a topology file may have at most {MAX_FILE_BYTES}")
        chunks: list[bytes] = []
        got = 0
        while got <= MAX_FILE_BYTES:  # the size may have changed since fstat: read at most limit + 1
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > MAX_FILE_BYTES:
            raise refuse(f"the file has more than {MAX_FILE_BYTES} bytes, the limit of a topology file")
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"the file is not UTF-8 text (byte {exc.start})") from None


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"
