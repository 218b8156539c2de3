"""The one exception type a user ever sees from taskhead, and how any error becomes its one-line message."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml


class TaskheadError(Exception):
    """Bad input from the user: a file, a line, a field or an option.

    The CLI prints the message alone (no traceback) and exits with status 2. The message names what is wrong and
    where: ``path:line: field 'text' is missing``.
    """


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA/MPS out-of-memory error, or the CPU allocator failing (a RuntimeError from ``DefaultCPUAllocator``)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e).lower())


def user_error(e: BaseException | None, argv: list[str] = ()) -> TaskheadError | None:
    """The TaskheadError behind ``e`` (jsonargparse wraps errors raised while instantiating classes), or jsonargparse's
    parse error as one TaskheadError line naming the option (and the ``--config`` file and line that set it)."""
    seen, first = set(), e
    while e is not None and id(e) not in seen:
        if isinstance(e, TaskheadError):
            # raised in a DataLoader worker, torch re-raises it with the worker's traceback: keep the message
            text = str(e)
            if text.startswith("Caught TaskheadError in DataLoader worker") and "TaskheadError: " in text:
                return TaskheadError(text.rsplit("TaskheadError: ", 1)[1].strip())
            return e
        if is_out_of_memory(e):  # the DataModule's on_exception noted the batch options that set activation memory
            notes = " ".join(getattr(e, "__notes__", []))
            return TaskheadError(f"out of memory ({str(e).strip().splitlines()[0]}) {notes}".strip())
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if isinstance(first, argparse.ArgumentError):
        return TaskheadError(parse_error_line(str(first), argv))
    return None


# ---- jsonargparse's nested parse errors → one line ------------------------------------------------------------------

_SKIP = re.compile(r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value)")
_EXPECTED = re.compile(r"^Expected an? (?:<class '([\w.]+)'>|typing\.Literal\[(.*)\]|(\S+))(?:\. Got value: (.*))?$")


def parse_error_line(message: str, argv: list[str]) -> str:
    """``Parser key "model": ... Parser key "loss": ... Expected a typing.Literal['ce', 'focal']. Got value: hinge``
    → ``config.yaml:7: model.loss.name: expected one of 'ce', 'focal', got 'hinge'`` (the first failing branch)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines and lines[0].startswith("Problems parsing config"):
        for path in _config_files(argv):
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as e:
                mark, opened = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
                line = f":{mark.line + 1}" if mark else ""
                why = getattr(e, "problem", None) or str(e).splitlines()[0]
                if opened and getattr(e, "context", None):  # e.g. "while parsing a flow sequence" opened on line 6
                    why += f"; {e.context} started on line {opened.line + 1}"
                return f"{path}{line}: not valid YAML ({why})"
            except OSError:
                continue
    keys: list[str] = []
    owner = detail = None
    for line in lines:
        line = line.removeprefix("- ")
        if m := re.match(r'Parser key "([^"]+)":\s*(.*)$', line):
            keys += m[1].split(".")
            detail = m[2] or None
        elif m := re.match(r"Problem with given class_path '([^']+)':", line):
            owner = m[1]
            continue
        elif not _SKIP.match(line):
            detail = line
        if detail:
            break
    detail = detail or " ".join(lines)
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
    if m := re.match(r"Option '([^']+)' is not accepted", detail):
        keys.append(m[1])
        detail = f"unknown option for {owner} (see taskhead {argv[0] if argv else ''} --help)"
    elif m := re.match(r"Subcommand '(\w+)' does not accept option '([^']+)'", detail):
        keys = m[2].split(".")
        detail = f"unknown option (see taskhead {m[1]} --help)"
    elif m := _EXPECTED.match(detail):
        kind = m[1] or (f"one of {m[2]}" if m[2] else m[3])
        value = m[4] if m[4] is not None else given
        detail = f"expected {kind}" + (f", got {value!r}" if value is not None else "")
    if not keys:
        return detail
    dotted = ".".join(k for k in keys if k != "init_args")
    if m := re.match(r"File does not exist: '(.+)'$", detail):
        return f"{m[1]}: file not found (--{dotted})"
    where = f"--{dotted}"
    for i, arg in enumerate(argv):  # the last place that sets the key wins, as in jsonargparse
        name, _, value = arg.partition("=")
        if name == "--config" and (value or i + 1 < len(argv)):
            path = value or argv[i + 1]
            line = _yaml_line(path, [k for k in keys if k != "init_args"])
            where = f"{path}:{line}: {dotted}" if line else where
        elif name.startswith("--") and name[2:].replace(".init_args.", ".") == dotted:
            where = name
    return f"{where}: {detail}"


def _config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _yaml_line(path: str, keys: list[str]) -> int | None:
    """Line (1-based) of ``keys`` (a path of nested keys, ``init_args`` levels skipped) in a YAML file; None if absent."""
    try:
        node = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        while isinstance(node, yaml.MappingNode):
            found = {k.value: (k, v) for k, v in node.value}
            if key in found:
                break
            if "init_args" not in found:
                return None
            node = found["init_args"][1]
        else:
            return None
        k, node = found[key]
        line = k.start_mark.line + 1
    return line
