"""Settings declared once: a dataclass field carries its help text, choices, flag and group.

The command line (argument groups, ``--config recipe.yaml``), the pipeline's parameter descriptions and
SageMaker's hyperparameters are all read from those fields, so a setting cannot mean one thing in one
interface and another elsewhere. Torch-free: parsers and checks run before anything heavy loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from components.common import ConfigError

_MISSING: Any = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    group: str,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | None = None,
    cli: bool = True,
    hyperparameter: bool = False,
) -> Any:
    """A dataclass field with what every interface needs to offer it.

    ``flag`` defaults to ``--field-name`` (``--no-field-name`` for a setting on by default);
    ``parse`` turns the flag's text into the value (e.g. ``1,2,3`` into a tuple); ``cli=False`` keeps a
    setting out of the command line (set by callers only); ``hyperparameter`` offers it to a SageMaker
    training job.
    """
    meta = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "metavar": metavar,
        "parse": parse,
        "nargs": nargs,
        "cli": cli,
        "hyperparameter": hyperparameter,
    }
    return dataclasses.field(default=default, metadata=meta)


def declared(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` declared with :func:`setting` (those with help)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved type (``from __future__ import annotations`` leaves strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls)}


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def flag_of(f: dataclasses.Field[Any]) -> str:
    """The command-line spelling of a setting."""
    if f.metadata.get("flag"):
        return str(f.metadata["flag"])
    dashed = f.name.replace("_", "-")
    return f"--no-{dashed}" if f.default is True else f"--{dashed}"


def help_of(cls: type, name: str) -> str:
    """A setting's help text, with its choices (for the pipeline's parameter descriptions)."""
    f = {f.name: f for f in declared(cls)}[name]
    choices = f.metadata.get("choices")
    text = f.metadata["help"]
    return f"{text} (one of: {', '.join(map(str, choices))})" if choices else text


def choices_of(cls: type, name: str) -> tuple[Any, ...] | None:
    """A setting's allowed values, or None when any value of its type will do."""
    return {f.name: f for f in declared(cls)}[name].metadata.get("choices")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per command-line setting of ``cls``, in argument groups, defaults from the fields."""
    hints = field_types(cls)
    groups: dict[str, Any] = {}
    for f in declared(cls):
        m = f.metadata
        if not m["cli"]:
            continue
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        base, _ = _unwrap_optional(hints[f.name])
        text = m["help"].replace("%", "%%")
        kw: dict[str, Any] = {"dest": f.name, "help": text}
        if f.default is _MISSING and f.default_factory is _MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default if f.default is not _MISSING else f.default_factory()
            if base is not bool and kw["default"] not in (None, ()):
                kw["help"] = f"{text} (default: {_shown(kw['default'])})"
        if base is bool:
            kw["action"] = "store_false" if f.default is True else "store_true"
            if f.default is True:
                kw["help"] = f"turn off: {text}"
        else:
            if m["nargs"]:
                kw["nargs"] = m["nargs"]
            kw["type"] = m["parse"] or (base if base in (int, float, str, Path) else str)
            if m["choices"]:
                kw["choices"] = m["choices"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
        group.add_argument(flag_of(f), **kw)


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def values_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings of ``cls`` from a parsed namespace (lists become tuples)."""
    out = {}
    for f in declared(cls):
        if f.metadata["cli"] and hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


def hyperparameters(cls: type) -> dict[str, type]:
    """Flag name (without ``--``) -> type of the settings offered to a SageMaker training job."""
    hints = field_types(cls)
    out = {}
    for f in declared(cls):
        if f.metadata["hyperparameter"]:
            base, _ = _unwrap_optional(hints[f.name])
            out[flag_of(f).removeprefix("--")] = base if base in (int, float, str) else str
    return out


def coerce_text(text: str, hint: Any, *, where: str) -> Any:
    """Parse ``text`` as a value of the type ``hint`` (int, float, bool, str, Path, optional, tuple);
    ``where`` names the setting the way the user wrote it, for the error."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.strip().lower() in ("none", "null", "") and len(args) < len(typing.get_args(hint)):
            return None
        errors = []
        for arg in args:
            try:
                return coerce_text(text, arg, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot parse {text!r}")
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = args[0] if args else str
        values = [coerce_text(v.strip(), item, where=where) for v in text.split(",") if v.strip()]
        return tuple(values) if origin is tuple else values
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is Path:
            return Path(text)
    except ValueError as e:
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {text!r}") from e
    return text


def coerce_value(value: Any, hint: Any, *, where: str) -> Any:
    """A value read from YAML (already typed) checked against ``hint``; text goes through
    :func:`coerce_text`, lists become tuples of the item type."""
    if isinstance(value, str):
        return coerce_text(value, hint, where=where)
    base, optional = _unwrap_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is needed, got null")
    if typing.get_origin(base) in (tuple, list):
        if not isinstance(value, list):
            value = [value]
        item = next((a for a in typing.get_args(base) if a is not Ellipsis), str)
        return tuple(coerce_value(v, item, where=where) for v in value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}")
    return float(value) if base is float else value


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """A YAML mapping of settings (field names, or flags without ``--``) -> typed values, checked."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(data).__name__}")
    fields = {f.name: f for f in declared(cls) if f.metadata["cli"]}
    # a setting by its field name or by its flag's (``train`` for ``--train``), never by a ``--no-`` flag
    aliases = {
        flag_of(f).removeprefix("--").replace("-", "_"): n for n, f in fields.items() if f.default is not True
    }
    hints = field_types(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).removeprefix("--").replace("-", "_")
        name = name if name in fields else aliases.get(name, name)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else f"settings: {', '.join(fields)}"
            raise ConfigError(f"--config {path}: unknown setting {key!r}; {hint}")
        where = f"--config {path}: {key}"
        parse = fields[name].metadata["parse"]
        if parse is not None and isinstance(value, list):
            value = ",".join(map(str, value))
        if parse is not None and isinstance(value, str | int):
            try:
                value = parse(str(value))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{where}: {e}") from e
        else:
            value = coerce_value(value, hints[name], where=where)
        choices = fields[name].metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
        out[name] = value
    return out


def apply_config_file(parser: argparse.ArgumentParser, argv: Iterable[str] | None, cls: type) -> None:
    """``--config FILE`` in ``argv``: its settings become the parser's defaults (flags still win), and
    the flags it supplies are no longer required (timm's pattern)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, _ = pre.parse_known_args(list(argv) if argv is not None else None)
    if known.config is None:
        return
    values = read_config_file(known.config, cls)
    parser.set_defaults(**values)
    for action in parser._actions:  # argparse has no public way to relax `required`
        if action.dest in values:
            action.required = False


def settings_table(cls: type) -> str:
    """The Markdown table of the command-line settings: flag, default, meaning (docs, tested)."""

    def cell(value: Any) -> str:
        if value is None or value == ():
            return ""
        return f"`{str(value).lower() if isinstance(value, bool) else _shown(value)}`"

    rows = ["| group | flag | default | meaning |", "|---|---|---|---|"]
    for f in sorted(
        (f for f in declared(cls) if f.metadata["cli"]), key=lambda f: _group_order(cls, f.metadata["group"])
    ):
        default = "(required)" if f.default is _MISSING and f.default_factory is _MISSING else cell(f.default)
        text = help_of(cls, f.name).replace("|", "\\|")
        rows.append(f"| {f.metadata['group']} | `{flag_of(f)}` | {default} | {text} |")
    return "\n".join(rows)


def _group_order(cls: type, group: str) -> int:
    order = list(dict.fromkeys(f.metadata["group"] for f in declared(cls)))
    return order.index(group)


def to_argv(cfg: Any) -> list[str]:
    """The command-line flags of a config of declared settings (``python -m components.train``'s for a
    TrainConfig): every command-line setting that differs from its default (the required ones always).
    Parsing them back gives the same config; a setting the command line cannot express (no flag, or
    unset to None) is a :class:`ConfigError`."""
    out: list[str] = []
    for f in declared(type(cfg)):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is not dataclasses.MISSING and value == default:
            continue
        if not f.metadata.get("cli", True):
            raise ConfigError(f"{f.name}={value!r} has no command-line flag: a command line cannot pass it")
        flag = flag_of(f)
        if isinstance(value, bool):
            out.append(flag)
        elif value is None:
            raise ConfigError(f"{f.name} is None (default {default!r}): {flag} cannot unset it")
        elif isinstance(value, tuple | list):
            items = [_text(v) for v in value]
            if f.metadata.get("nargs"):
                if not items:
                    raise ConfigError(f"{f.name} is empty (default {default!r}): {flag} cannot empty it")
                out += [flag, *items]
            else:
                out += [flag, ",".join(items)]
        else:
            out += [flag, _text(value)]
    return out


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
