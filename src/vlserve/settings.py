"""One declared configuration: each setting is a dataclass field carrying its flag, environment
variable, help and bounds; the flags, the environment, the validation and the docs are made
from that one declaration.

A config class marks its settings with :func:`option` and its nested configs with
:func:`section`; :func:`add_arguments`, :func:`build`, :func:`check`, :func:`flag_table` and
:func:`env_names` walk the tree. A value comes from the flag, else from ``VLSERVE_<FLAG>``
(then the prototype's older names, e.g. ``MODEL_PATH``), else from the field's default.
Stdlib only: the engine, the API and torch-free tools (bench, launch) all use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "VLSERVE_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Option:
    help: str
    group: str
    flag: str = ""  # default: the field name, dashed
    aliases: tuple[str, ...] = ()  # older flag names, still accepted
    env_aliases: tuple[str, ...] = ()  # the prototype's variable names, read after VLSERVE_*
    choices: tuple[str, ...] = ()
    min: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    max: float | None = None  # inclusive
    metavar: str | None = None
    repeat: bool = False  # a list: the flag is repeatable (else it takes several values)
    secret: bool = False  # never printed, never in a ConfigMap (a Secret holds it)
    infinite: bool = False  # a float that may be inf (e.g. "as fast as possible")
    doc_default: str = ""  # the default as the docs say it, when the value alone says little


def option(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A field that is a setting (see :class:`Option` for the keywords)."""
    return dataclasses.field(default=default, metadata={"option": Option(**kw)})


def section(factory: Any) -> Any:
    """A field holding a nested config whose settings are part of the same schema."""
    return dataclasses.field(default_factory=factory, metadata={"section": True})


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]  # field names from the root config
    option: Option
    kind: type  # bool, int, float, str, Path or tuple (of str)
    optional: bool  # None allowed (and the default)
    default: Any
    prefix: str = ENV_PREFIX  # the root config's ENV_PREFIX class attribute, if it has one

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.path[-1].replace("_", "-")

    @property
    def env(self) -> str:
        return self.prefix + self.flag.lstrip("-").replace("-", "_").upper()

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def settings(
    cls: type, path: tuple[str, ...] = (), prefix: str | None = None
) -> Iterator[Setting]:
    """Every setting of ``cls`` and its sections, in declaration order. Variables are named
    ``VLSERVE_<FLAG>``, or with the root class's own ``ENV_PREFIX`` (a ClassVar) if it has one."""
    prefix = getattr(cls, "ENV_PREFIX", ENV_PREFIX) if prefix is None else prefix
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            yield from settings(hints[f.name], (*path, f.name), prefix)
        elif "option" in f.metadata:
            kind, optional = _kind(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else None
            yield Setting((*path, f.name), f.metadata["option"], kind, optional, default, prefix)


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return _kind(inner)[0], True
    if typing.get_origin(hint) is tuple:
        return tuple, False
    if hint in (bool, int, float, str, Path):
        return hint, False
    raise TypeError(f"unsupported setting type {hint!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting, in groups; an absent flag leaves no attribute (see :func:`build`)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in settings(cls):
        o = s.option
        group = groups.get(o.group) or groups.setdefault(o.group, parser.add_argument_group(o.group))
        kw: dict[str, Any] = {"dest": s.dest, "default": argparse.SUPPRESS, "help": _help(s)}
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif s.kind is tuple:
            kw.update(action="append") if o.repeat else kw.update(nargs="+")
        else:
            kw["type"] = s.kind
        if o.choices:
            kw["choices"] = o.choices
        if o.metavar and s.kind is not bool:
            kw["metavar"] = o.metavar
        group.add_argument(s.flag, *o.aliases, **kw)


def _help(s: Setting) -> str:
    names = " or ".join((s.env, *s.option.env_aliases))
    return f"{s.option.help} (env {names}; default: {doc_default(s)})".replace("%", "%%")


def doc_default(s: Setting) -> str:
    o = s.option
    if o.doc_default:
        return o.doc_default
    if s.kind is bool:
        return "on" if s.default else "off"
    if s.default is None or s.default == ():
        return "none"
    return str(s.default)


def build(
    cls: type, args: argparse.Namespace | None, environ: Mapping[str, str], **fixed: Any
) -> Any:
    """``cls`` from the flags given, else the environment, else the defaults; an environment
    value that does not parse raises ``ValueError`` naming the variable. ``fixed`` gives the
    root's fields that are not settings (values a caller resolved itself)."""
    values: dict[tuple[str, ...], Any] = {}
    for s in settings(cls):
        if args is not None and hasattr(args, s.dest):
            value = getattr(args, s.dest)
            values[s.path] = tuple(value) if s.kind is tuple else value
            continue
        for name in (s.env, *s.option.env_aliases):
            text = environ.get(name, "")
            if text.strip():
                values[s.path] = _parse_env(s, name, text.strip())
                break
    return _construct(cls, (), values, fixed)


def _construct(
    cls: type,
    path: tuple[str, ...],
    values: Mapping[tuple[str, ...], Any],
    fixed: Mapping[str, Any] | None = None,
) -> Any:
    kwargs: dict[str, Any] = dict(fixed or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        if f.metadata.get("section"):
            kwargs[f.name] = _construct(hints[f.name], here, values)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)


def _parse_env(s: Setting, name: str, text: str) -> Any:
    if s.kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{name}={text!r}: expected one of 1/0, true/false, yes/no, on/off")
    if s.kind is tuple:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    try:
        return s.kind(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected {s.kind.__name__}") from None


def check(config: Any) -> None:
    """The declared bounds and choices of ``config``'s own settings (sections check
    themselves); raises ``ValueError`` naming the flag. Call it from ``__post_init__``."""
    for s in settings(type(config)):
        if len(s.path) != 1:
            continue
        value = getattr(config, s.path[0])
        if value is None and s.optional:
            continue
        _check_value(s, value)


def _check_value(s: Setting, value: Any) -> None:
    o, name = s.option, f"{s.flag} / {s.path[-1]}"
    if s.kind is tuple:
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a tuple of strings, got {value!r}")
        return
    number = s.kind in (int, float) and not isinstance(value, bool)
    if s.kind is float and number and isinstance(value, int):
        value = float(value)
    what = ("a number" if o.infinite else _WHAT[s.kind]) + _bounds(o)
    if not isinstance(value, s.kind) or (s.kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if o.choices and value not in o.choices:
        raise ValueError(f"{name} must be one of {', '.join(o.choices)}, got {value!r}")
    out = number and (
        (s.kind is float and not (math.isfinite(value) or (o.infinite and value == math.inf)))
        or (o.min is not None and value < o.min)
        or (o.above is not None and value <= o.above)
        or (o.max is not None and value > o.max)
    )
    if out:
        raise ValueError(f"{name} must be {what}, got {value!r}")


_WHAT = {
    int: "an integer", float: "a finite number", str: "a string", bool: "True or False",
    Path: "a path",
}  # fmt: skip


def _bounds(o: Option) -> str:
    parts = []
    if o.min is not None:
        parts.append(f">= {o.min:g}")
    if o.above is not None:
        parts.append(f"> {o.above:g}")
    if o.max is not None:
        parts.append(f"<= {o.max:g}")
    return (" " + " and ".join(parts)) if parts else ""


def env_names(cls: type, *, secrets: bool = True) -> list[str]:
    """The ``VLSERVE_*`` variable of every setting (and, with ``secrets=False``, without the
    secret ones: what a ConfigMap may hold)."""
    return [s.env for s in settings(cls) if secrets or not s.option.secret]


def flag_table(cls: type) -> str:
    """README's table of every flag: flag, environment variables, default, meaning."""
    rows = ["| flag | env var | default | meaning |", "| --- | --- | --- | --- |"]
    every = list(settings(cls))
    groups = list(dict.fromkeys(s.option.group for s in every))
    for s in sorted(every, key=lambda s: groups.index(s.option.group)):
        flag = " / ".join(f"`{f}`" for f in (s.flag, *s.option.aliases))
        if s.kind is bool:
            flag = f"`--[no-]{s.flag[2:]}`"
        env = ", ".join(f"`{e}`" for e in (s.env, *s.option.env_aliases))
        meaning = s.option.help + (f" ({', '.join(s.option.choices)})" if s.option.choices else "")
        rows.append(f"| {flag} | {env} | {doc_default(s)} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the marker lines ``begin`` and ``end`` replaced."""
    head, sep, rest = text.partition(begin + "\n")
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"markers {begin!r} … {end!r} not found")
    return head + begin + "\n" + body + end + tail


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlserve.settings readme``: rewrite README.md's flag table from the schema."""
    import sys
    from pathlib import Path

    from vlserve.config import README_BEGIN, README_END, ServerConfig

    args = list(sys.argv[1:] if argv is None else argv)
    readme = Path(args[1] if len(args) > 1 else "README.md")
    if not args or args[0] != "readme":
        print("usage: python -m vlserve.settings readme [README.md]", file=sys.stderr)
        return 2
    text = readme.read_text()
    readme.write_text(replace_between(text, README_BEGIN, README_END, flag_table(ServerConfig)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
