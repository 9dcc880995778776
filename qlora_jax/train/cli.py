"""One parser for CLI flags and config files over a frozen dataclass of frozen sections (draccus style).

A config class such as ``TrainConfig`` has one field per section, each a frozen
dataclass; a setting is addressed by its dotted path ``section.field``:

    --lora.rank 64 --optim.learning_rate 2e-4 --optim.offload true --config run.yaml

``--config FILE`` is YAML or JSON (by suffix ``.json``; anything else is read as
YAML) holding a nested mapping with the same section and field names.
Precedence: the class's defaults < the file < CLI flags. Values are parsed by
the field's annotation (``coerce``): bool takes true/false/1/0/yes/no in any case
(a bare bool flag means true), tuples take comma-separated strings (lists in
files), ``X | None`` takes "none". Unknown sections or keys are errors that list
the valid ones. ``--help`` prints every flag, its type, default and help text,
taken from ``dataclasses.field(metadata={"help": ..., "choices": ...})`` or from
an ``extra`` mapping of dotted path to such metadata (for sections that carry none).

This module knows no particular config (``qlora_jax.train.config`` builds on it),
so it imports nothing from the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import textwrap
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

_TRUE, _FALSE, _NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")


@functools.cache
def hints(cls) -> dict[str, Any]:
    """The resolved annotations of a dataclass (``from __future__ import annotations`` safe)."""
    return typing.get_type_hints(cls)


def type_name(tp) -> str:
    """``int``, ``float``, ``bool``, ``str``, ``list of str``, ``float or none``."""
    args = typing.get_args(tp)
    if type(None) in args:
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " or none"
    if typing.get_origin(tp) is tuple:
        return f"list of {type_name(args[0])}"
    return tp.__name__


def coerce(value, tp, path: str, parse_strings: bool = True):
    """``value`` as the annotation ``tp`` asks, or ``ValueError`` naming ``path``.

    Strings are parsed only when ``parse_strings`` (CLI and files; not direct
    construction). An int is accepted as a float; bool and int never mix, except
    0/1 for a bool from a file.
    """
    bad = ValueError(f"{path}={value!r} is not a valid {type_name(tp)}")
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None or (parse_strings and isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, path, parse_strings)
    if typing.get_origin(tp) is tuple:
        if parse_strings and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return tuple(coerce(v, args[0], f"{path}[{i}]", parse_strings) for i, v in enumerate(value))
    if isinstance(value, str) and tp is not str:
        if not parse_strings:
            raise bad
        text = value.strip().lower()
        if tp is bool:
            if text in _TRUE + _FALSE:
                return text in _TRUE
            raise ValueError(f"{path}={value!r} must be a bool: one of {'/'.join(_TRUE + _FALSE)}")
        try:
            return tp(text)
        except ValueError:
            raise bad from None
    if tp is float and type(value) is int:
        return float(value)
    if tp is bool and parse_strings and type(value) is int and value in (0, 1):
        return bool(value)
    if type(value) is not tp:
        raise bad
    return value


def section_classes(cls) -> dict[str, type]:
    """``{section name: section dataclass}`` of a config class, in field order."""
    return {f.name: hints(cls)[f.name] for f in dataclasses.fields(cls)}


def unknown_key_message(cls, section: str, key: str) -> str:
    valid = [f.name for f in dataclasses.fields(section_classes(cls)[section])]
    return f"unknown key {section}.{key}; valid keys of {section}: {', '.join(valid)}"


def to_tree(config) -> dict[str, dict[str, Any]]:
    """Nested plain values of a config instance (tuples as lists: what JSON gives back)."""
    return {name: {f.name: list(v) if isinstance(v := getattr(getattr(config, name), f.name), tuple) else v
                   for f in dataclasses.fields(getattr(config, name))} for name in section_classes(type(config))}


def from_tree(cls, tree: dict):
    """``cls()`` with the sections and keys of ``tree`` replaced (values parsed by ``coerce``)."""
    if not isinstance(tree, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    classes, base, built = section_classes(cls), cls(), {}
    for name, values in tree.items():
        if name not in classes:
            raise ValueError(f"unknown section {name!r}; valid sections: {', '.join(classes)}")
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise ValueError(f"section {name} must be a mapping of keys, got {type(values).__name__}")
        valid = {f.name for f in dataclasses.fields(classes[name])}
        for key in values:
            if key not in valid:
                raise ValueError(unknown_key_message(cls, name, key))
        kw = {k: coerce(v, hints(classes[name])[k], f"{name}.{k}") for k, v in values.items()}
        try:
            built[name] = dataclasses.replace(getattr(base, name), **kw)
        except ValueError as err:  # sections that do not name their own path (e.g. OptimizerConfig)
            msg = str(err)
            raise ValueError(msg if msg.startswith(f"{name}.") else f"{name}.{msg}") from None
    return dataclasses.replace(base, **built)


class FieldDoc(NamedTuple):
    path: str  # "lora.rank"
    type: Any
    default: Any  # the config class's default (which may differ from the section's own)
    help: str
    choices: tuple | None


def field_docs(cls, extra: dict[str, dict] | None = None) -> list[FieldDoc]:
    """Every field of every section of ``cls``, in order; ``extra[path]`` fills in missing metadata."""
    base, docs = cls(), []
    for name, section in section_classes(cls).items():
        for f in dataclasses.fields(section):
            path = f"{name}.{f.name}"
            meta = {**f.metadata, **(extra or {}).get(path, {})}
            docs.append(FieldDoc(path, hints(section)[f.name], getattr(getattr(base, name), f.name),
                                 meta.get("help", ""), meta.get("choices")))
    return docs


def format_value(value) -> str:
    """A value as one would type it on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    return '""' if value == "" else str(value)


def load_file(path: str) -> dict:
    """The nested mapping in a YAML or JSON file (empty file: ``{}``)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    try:
        tree = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"--config {path}: must hold a mapping of sections, got {type(tree).__name__}")
    return tree


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=36)

    def _split_lines(self, text, width):  # never break a default such as q_proj,k_proj,... inside
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def _metavar(doc: FieldDoc) -> str:
    if doc.choices is not None:
        return "{" + ",".join(map(str, doc.choices)) + "}"
    return type_name(doc.type).upper().replace(" OR NONE", "|none").replace("LIST OF STR", "A,B,..")


def build_parser(cls, extra: dict[str, dict] | None = None, description: str = "") -> argparse.ArgumentParser:
    """``--config FILE`` and one ``--section.field`` flag per field; every default is ``SUPPRESS``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=_Formatter, allow_abbrev=False, exit_on_error=False,
        usage="%(prog)s [-h] [--config FILE] [--SECTION.FIELD VALUE ...]",
        epilog="Precedence: defaults < --config FILE < flags. Bools: true/false/1/0/yes/no (a bare bool flag "
               "means true); lists: comma-separated; 'none' for an optional value.")
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of sections and keys, as the flags below")
    docs = field_docs(cls, extra)
    for name, section in section_classes(cls).items():
        summary = (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else ""
        group = parser.add_argument_group(f"{name}", summary.replace("%", "%%"))
        for doc in (d for d in docs if d.path.split(".")[0] == name):
            text = f"{doc.help} (default: {format_value(doc.default)})".replace("%", "%%")
            kw = dict(nargs="?", const="true") if doc.type is bool else {}
            group.add_argument(f"--{doc.path}", dest=doc.path, default=argparse.SUPPRESS, metavar=_metavar(doc),
                               help=text, **kw)
    return parser


def _unknown_argument(cls, token: str) -> str:
    if not token.startswith("--"):
        return f"unexpected argument {token!r}: settings are flags such as --lora.rank 64"
    key = token[2:].split("=", 1)[0]
    section, _, field = key.partition(".")
    classes = section_classes(cls)
    if section in classes and field:
        return unknown_key_message(cls, section, field)
    return f"unknown flag {token!r}: flags are --config FILE and --SECTION.FIELD with sections {', '.join(classes)}"


def parse(cls, argv: list[str] | None = None, extra: dict[str, dict] | None = None, description: str = "",
          exit_on_error: bool = False):
    """An instance of ``cls`` from ``argv`` (``sys.argv[1:]`` when None); see the module docstring.

    Errors raise ``ValueError``, or with ``exit_on_error`` print the usage and the
    message and exit with status 2 (what an entry point wants). ``--help`` exits 0.
    """
    parser = build_parser(cls, extra, description)
    try:
        try:
            args, rest = parser.parse_known_args(argv)
        except argparse.ArgumentError as err:
            raise ValueError(str(err)) from None
        if rest:
            raise ValueError(_unknown_argument(cls, rest[0]))
        flags = vars(args)
        tree = load_file(flags.pop("config")) if flags.get("config") else {}
        flags.pop("config", None)
        for path, value in flags.items():
            section, key = path.split(".", 1)
            values = tree.setdefault(section, {})
            if values is None:
                values = tree[section] = {}
            if isinstance(values, dict):
                values[key] = value
        return from_tree(cls, tree)
    except ValueError as err:
        if exit_on_error:
            parser.error(str(err))
        raise
