"""Command-line options made from dataclasses, the one way settings become flags.

``gmsa bench`` and ``gmsa serve`` take the fields of their settings dataclass as ``--options``
(:func:`add_options`, :func:`from_args`); ``gmsa train`` takes ``key=value`` overrides of its
config (:func:`parse_overrides`) and lists the keys in its help (:func:`describe`). A field's
``metadata`` (see :func:`option`) may hold ``help``, ``choices`` and ``flag``, the option's name
when it is not ``--field-name`` (``--no-plot`` for a ``plot`` field that defaults to true).
Standard library only, so building the parser loads no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from typing import Any

MISSING = dataclasses.MISSING


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **metadata: Any) -> Any:  # noqa: A002
    """A dataclass field that also describes its command-line option (``help``, ``choices``, ``flag``)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **metadata})


def default_of(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is MISSING else field.default


def _kind(annotation: Any) -> tuple[Any, bool]:
    """The value type of a field annotation and whether it is a list: ``list[int] | None`` -> ``(int, True)``."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _kind(args[0])
    if origin is list:
        return args[0], True
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``cls`` (but ``skip``): its type, default, help and choices.

    A boolean field is a switch: ``--name`` sets it when it defaults to false, ``--no-name`` (or its
    ``flag``) clears it when it defaults to true. A list field takes one or more values.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind, many = _kind(hints[field.name])
        default = default_of(field)
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        if field.metadata.get("help"):
            kwargs["help"] = field.metadata["help"]
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            name = ("no-" if default else "") + field.name.replace("_", "-")
        else:
            kwargs |= {"type": kind, "nargs": "+" if many else None, "choices": field.metadata.get("choices")}
            name = field.name.replace("_", "-")
        parser.add_argument(field.metadata.get("flag", "--" + name), **kwargs)


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of ``cls`` from the parsed options named like its fields (``values`` take precedence)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(args).items() if name in names} | values)


def parse_value(raw: str) -> Any:
    """A ``key=value`` value read as TOML (``3e-4``, ``[4, 8]``, ``true``, ``"a b"``); the raw text if it is not."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """``key=value`` items as a dict, later ones winning; ``table.key=value`` goes into ``{"table": {"key": ...}}``.

    ``--key=value`` is accepted too, and dashes in keys read as underscores.
    """
    values: dict = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        *tables, name = key.replace("-", "_").split(".")
        target = values
        for table in tables:
            target = target.setdefault(table, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {table} is not a table")
        target[name] = parse_value(raw)
    return values


def describe(cls: type, skip: tuple[str, ...] = (), indent: str = "  ") -> list[str]:
    """``name=default`` (JSON) lines, one per field of the dataclass ``cls`` but ``skip``."""
    return [
        f"{indent}{field.name}={json.dumps(default_of(field))}"
        for field in dataclasses.fields(cls)
        if field.name not in skip
    ]
