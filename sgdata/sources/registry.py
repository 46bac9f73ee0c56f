"""The one list of sources: `sgdata build <command>`, `api.build` and the workers all look sources up here.

A source is a module under `sgdata.sources` with a `SOURCE` object that follows
`sgdata.sources.base.Source`. Adding one means writing that module and naming it in `SOURCE_MODULES`;
the CLI makes its command and flags from the declared options, the API takes the same names as
keywords, and the build record keeps their values.

Several sources may serve one command (a dataset in two layouts): the command takes the union of
their options, and the layout options the user gives pick the source (`select`).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from sgdata.format.errors import UserError
from sgdata.sources.base import Option, Source

SOURCE_MODULES = (
    "sgdata.sources.refcoco",
    "sgdata.sources.refcoco_hub",
    "sgdata.sources.captions",
    "sgdata.sources.phrasecut",
)


@functools.cache
def sources() -> tuple[Source, ...]:
    """Every registered source, in registry order (the order `sgdata build --help` lists commands)."""
    return tuple(importlib.import_module(module).SOURCE for module in SOURCE_MODULES)


def source(name: str) -> Source:
    """The source registered under `name` (a plan's `kind` names the source whose finalize() it needs)."""
    for candidate in sources():
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown source kind {name!r}; expected one of {sorted(s.name for s in sources())}")


def commands() -> dict[str, list[Source]]:
    """command -> the sources that serve it, in registry order."""
    grouped: dict[str, list[Source]] = {}
    for candidate in sources():
        grouped.setdefault(candidate.command, []).append(candidate)
    return grouped


def command_options(command: str) -> list[Option]:
    """The union of the options of a command's sources, each once; required only where every source needs it."""
    group = commands()[command]
    merged: dict[str, Option] = {}
    for candidate in group:
        for option in candidate.options:
            merged.setdefault(option.name, option)
    needed_by_all = {name for name in merged if all(
        any(o.name == name and o.required for o in s.options) for s in group)}
    return [Option(o.name, o.help, o.type, o.name in needed_by_all, o.argument) for o in merged.values()]


def _flags(group: list[Source], names) -> str:
    options = {o.name: o for s in group for o in s.options}
    return " / ".join(options[name].flag if name in options else repr(name) for name in names)


def select(command: str, given: dict[str, Any]) -> Source:
    """The source of `command` that the given options name; a UserError when none, two, or a misfit."""
    group = commands().get(command)
    if group is None:
        raise UserError(f"there is no source '{command}'; sources: {', '.join(commands())}.")
    present = {name for name, value in given.items() if value is not None}
    if len(group) == 1:
        chosen = group[0]
    else:
        matching = [s for s in group if present & set(s.layout)]
        if len(matching) != 1:
            layouts = " or ".join(_flags(group, s.layout) for s in group)
            if not matching:
                raise UserError(f"sgdata build {command} needs one of {layouts}.")
            raise UserError(f"{_flags(group, sorted(present & {n for s in matching for n in s.layout}))} name "
                            f"different layouts of {command}; give only one of {layouts}.")
        chosen = matching[0]
    names = {o.name for o in chosen.options}
    foreign = sorted(present - names)
    if foreign:
        with_layout = f" with {_flags(group, chosen.layout)}" if chosen.layout else ""
        raise UserError(f"{_flags(group, foreign)} does not apply to sgdata build {command}{with_layout}.")
    missing = [o for o in chosen.options if o.required and o.name not in present]
    if missing:
        with_layout = f" with {_flags(group, chosen.layout)}" if chosen.layout else ""
        raise UserError(f"sgdata build {command}{with_layout} needs {' and '.join(o.flag for o in missing)}.")
    return chosen


def plan_and_record(command: str, given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the source's plan, the command record that decides the bytes) for `sgdata build COMMAND` with `given`."""
    chosen = select(command, given)
    values = {o.name: given.get(o.name) for o in chosen.options}
    record = {"source": chosen.name, **{o.name: o.record(values[o.name]) for o in chosen.options}}
    plan = chosen.plan(**{o.name: o.parse(values[o.name]) for o in chosen.options})
    return plan, record
