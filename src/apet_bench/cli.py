"""One command-line convention and one error format for every command.

Arguments are Hydra-style ``key=value`` overrides, parsed by :class:`Command` with Hydra's own override
grammar (``hydra.core.override_parser.overrides_parser.OverridesParser``, facebookresearch/hydra v1.3), so
quoting, lists, ``null``, booleans and numbers mean what they mean to ``run.py``. Bad input ends as one
line ``apet-bench: error: <one line naming the bad value>`` on stderr, exit code 2.

The error format is used by ``run.py``, ``python -m apet_bench.sweep`` and the ``key=value`` commands
(``score``, ``flops``, ``latency``, ``plots``, ``viz``, ``bias``, ``tables``, ``inspect``), which
declare their keys once with :class:`Command` / :class:`Key` (``docs/cli.md`` lists them). Hydra's own
errors (an override of a key that does not exist such as ``methd=apet``, a bad override syntax, an
output directory that cannot be created)
are caught by :func:`run_hydra` and reported the same way instead of Hydra's multi-line report (Hydra
re-raises them when ``HYDRA_FULL_ERROR=1``, as ``hydra/_internal/utils.py::run_and_report`` does in
facebookresearch/hydra v1.3.2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from apet_bench.config import run_keys

__all__ = ["PREFIX", "REQUIRED", "Args", "CliError", "Command", "Key", "one_line", "error", "fail", "run_hydra"]

PREFIX = "apet-bench: error: "


def one_line(msg: Any) -> str:
    """``msg`` (a string or an exception) as one line: whitespace runs, newlines included, become one space;
    an exception without a message gives its type name."""
    if isinstance(msg, BaseException):
        text = str(msg.args[0]) if isinstance(msg, KeyError) and msg.args else str(msg)
        if isinstance(msg, OSError) and msg.strerror and msg.filename:
            text = f"cannot write or read {msg.filename}: {msg.strerror}"
        text = text or type(msg).__name__
    else:
        text = str(msg)
    return " ".join(text.split())


def error(msg: Any, code: int = 2) -> int:
    """Print ``apet-bench: error: <msg as one line>`` to stderr and return ``code`` (for ``main() -> int``)."""
    print(PREFIX + one_line(msg), file=sys.stderr, flush=True)
    return code


def fail(msg: Any, code: int = 2) -> NoReturn:
    """:func:`error`, then ``sys.exit(code)``."""
    sys.exit(error(msg, code))


def run_hydra(main: Callable[[], Any]) -> Any:
    """Call a ``@hydra.main`` function so that Hydra's own errors end as one line and exit 2.

    Caught: ``hydra.errors.HydraException`` (unknown key, bad override, missing config),
    ``omegaconf`` errors, and ``OSError`` raised while Hydra prepares the job (its output directory under
    ``results_dir`` cannot be created). Any other exception propagates with its traceback (a bug).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its multi-line report
    try:
        return main()
    except (HydraException, OmegaConfBaseException, OSError) as exc:
        msg = one_line(exc)
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException) and one_line(cause).split(" full_key:")[0] not in msg:
            msg = f"{msg} ({one_line(cause).split(' full_key:')[0]})"
        fail(msg)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of a :class:`Key` that must be given.
REQUIRED: Any = _Required()

_KINDS = ("str", "int", "float", "number", "bool", "list", "any")
_WORD = {"str": "a string", "int": "an integer", "float": "a number", "number": "a number", "bool": "true or false",
         "list": "a list", "any": "a value"}


@dataclass(frozen=True)
class Key:
    """One ``key=value`` argument of a command.

    Parameters
    ----------
    name
        The key as typed (dotted for nested keys, e.g. ``benchmark.protocol``). A name ending in ``.``
        (``method.params.``) is a prefix: every ``method.params.<p>=<value>`` lands in one dict under
        the name without the dot (``method.params``).
    default
        Value when the key is not given; :data:`REQUIRED` makes it mandatory. ``None`` also allows
        ``key=null``.
    kind
        ``str`` (the value as typed, quotes removed; ``a,b`` stays ``"a,b"``), ``int``, ``float``,
        ``number`` (int or float), ``bool``, ``list`` (``[a,b]``, ``a,b`` or one value) or ``any``
        (whatever Hydra's grammar gives).
    help
        One line for ``--help`` and ``docs/cli.md``.
    metavar
        The value's name in messages (``model=<name> is required``).
    """

    name: str
    default: Any = None
    kind: str = "str"
    help: str = ""
    metavar: str = "value"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Key {self.name!r}: kind {self.kind!r} is not one of {', '.join(_KINDS)}")

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith(".")


@dataclass(frozen=True)
class Command:
    """A module command's declared arguments, parsed once for every command.

    Parameters
    ----------
    prog
        ``python -m apet_bench.<module>``, shown in ``--help``.
    summary
        One line saying what the command does.
    keys
        The accepted :class:`Key` s.
    positional
        Name of the bare words the command takes (``tables``: the table names); empty: none allowed.
        For such a command an argument naming an existing file or directory is a bare word too (run
        directories such as ``random-stage=llm__64__demo`` contain ``=``).
    extra
        What a ``key=value`` with an undeclared key does: ``error`` (one-line error listing the accepted
        keys), ``ignore`` (kept aside and returned, the command prints a note) or ``overrides`` (kept as
        Hydra override strings for ``run.py``'s config, e.g. ``model=...`` for ``inspect``).
    """

    prog: str
    summary: str
    keys: tuple[Key, ...] = ()
    positional: str = ""
    extra: str = "error"
    _by_name: dict[str, Key] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.extra not in ("error", "ignore", "overrides"):
            raise ValueError(f"Command {self.prog!r}: extra {self.extra!r} is not error, ignore or overrides")
        object.__setattr__(self, "_by_name", {k.name: k for k in self.keys})

    # ------------------------------------------------------------------ text
    def accepted(self) -> str:
        """The accepted keys as one comma-separated list (``method.params.<p>`` for a prefix)."""
        names = [k.name + "<p>" if k.is_prefix else k.name for k in self.keys]
        if self.extra == "overrides":
            names.append("any run.py override")
        return ", ".join(names)

    def usage(self) -> str:
        """The ``--help`` text: usage line, summary, one line per key with its default."""
        pos = f" {self.positional}..." if self.positional else ""
        lines = [f"usage: {self.prog}{pos} [key=value ...]", "", self.summary, "", "keys:"]
        width = max((len(k.name) + 3 for k in self.keys), default=4)
        for k in self.keys:
            name = k.name + "<p>" if k.is_prefix else k.name
            if k.is_prefix:
                default = "default: the config file's value"
            else:
                default = "required" if k.default is REQUIRED else f"default {_show(k.default)}"
            lines.append(f"  {name:<{width}}  {k.help} ({k.kind}; {default})")
        if self.extra == "ignore":
            lines.append("  other keys are ignored with a note")
        elif self.extra == "overrides":
            lines.append("  other keys are run.py overrides (e.g. model=llava15 benchmark=mme data_root=...)")
        lines += ["", "Values follow Hydra's override grammar: quote a value with spaces or commas "
                  "(key='a, b'), null, true/false, [a,b] lists."]
        return "\n".join(lines)

    # ------------------------------------------------------------------ parsing
    def parse(self, argv: Sequence[str]) -> Args:
        """Parse ``argv`` (without the program name).

        ``--help``, ``-h`` or ``help`` prints :meth:`usage` and exits 0.

        Raises
        ------
        CliError
            One line naming the bad argument: not ``key=value``, a Hydra grammar error, an unknown key
            (listing the accepted keys), a value of the wrong kind, a missing required key.
        """
        from hydra.errors import HydraException

        argv = list(argv)
        if any(a in ("-h", "--help", "help") for a in argv):
            print(self.usage())
            sys.exit(0)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
        values: dict[str, Any] = {}
        words: list[str] = []
        extra: list[str] = []
        given: set[str] = set()
        for arg in argv:
            if ("=" not in arg and not arg.startswith("~")) or (self.positional and Path(arg).exists()):
                if self.positional and not arg.startswith("-"):
                    words.append(arg)
                    continue
                raise CliError(f"argument {arg!r} is not key=value (keys: {self.accepted()})")
            try:
                ov = parser.parse_override(arg)
            except HydraException as exc:
                raise CliError(f"argument {arg!r} is not a valid override: {one_line(exc)}") from None
            key = ov.key_or_group
            if ov.package is not None:
                raise CliError(f"argument {arg!r}: a package (@...) is not allowed here (keys: {self.accepted()})")
            spec = self._by_name.get(key) or next(
                (k for k in self.keys if k.is_prefix and key.startswith(k.name) and len(key) > len(k.name)), None)
            if spec is None:
                if self.extra == "overrides":
                    if key.split(".")[0] not in run_keys():
                        raise CliError(f"unknown key {key!r} (keys: {self.accepted()}: "
                                       f"{', '.join(k for k in run_keys() if k not in self._by_name)})")
                elif self.extra == "error":
                    raise CliError(f"unknown key {key!r} (keys: {self.accepted()})")
                extra.append(arg)
                continue
            if ov.is_delete():  # back to the default
                if spec.is_prefix:
                    values.get(spec.name[:-1], {}).pop(key[len(spec.name):], None)
                else:
                    values.pop(key, None)
                    given.discard(key)
                continue
            raw = arg.split("=", 1)[1]
            value = _convert(spec, key, ov, raw)
            if spec.is_prefix:
                values.setdefault(spec.name[:-1], {})[key[len(spec.name):]] = value
            else:
                values[key] = value
                given.add(key)
        missing = [k for k in self.keys if k.default is REQUIRED and k.name not in values]
        if missing:
            k = missing[0]
            raise CliError(f"{k.name}=<{k.metavar}> is required" + (f": {k.help}" if k.help else ""))
        for k in self.keys:
            if k.is_prefix:
                values.setdefault(k.name[:-1], {})
            elif k.name not in values and k.default is not REQUIRED:
                values[k.name] = _copy(k.default)
        return Args(values, words, extra, given)

    def run(self, argv: Sequence[str] | None, body: Callable[[Args], int | None],
            errors: tuple[type[BaseException], ...] = ()) -> int:
        """Parse ``argv`` (``sys.argv[1:]`` when None) and call ``body(args)``.

        A :class:`CliError`, or one of ``errors`` raised by ``body``, is printed as one line (:func:`error`)
        and gives exit code 2; otherwise the return value of ``body`` (``None`` -> 0).
        """
        try:
            args = self.parse(sys.argv[1:] if argv is None else argv)
            rc = body(args)
        except (CliError, *errors) as exc:
            return error(exc)
        return 0 if rc is None else int(rc)


class CliError(ValueError):
    """A bad command-line argument; the message is one line naming it."""


class Args(dict):
    """Parsed arguments: a dict of declared keys (defaults filled in), plus ``words`` (bare words, for
    commands that take some), ``extra`` (undeclared ``key=value`` strings kept as typed, for
    ``extra='ignore'`` / ``'overrides'`` commands) and ``given`` (the keys given on the command line)."""

    def __init__(self, values: dict[str, Any], words: list[str], extra: list[str], given: set[str] | None = None) -> None:
        super().__init__(values)
        self.words = words
        self.extra = extra
        self.given = set(given or ())


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return str(v)


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict) else v


def _convert(spec: Key, key: str, ov: Any, raw: str) -> Any:
    """The value of one parsed override as ``spec.kind`` asks, or :class:`CliError` naming it."""
    if ov.is_sweep_override() and not ov.is_choice_sweep():
        raise CliError(f"{key}={raw}: a range/interval sweep is not allowed here")
    value = list(ov.value().list) if ov.is_choice_sweep() else ov.value()
    kind = spec.kind
    if value is None:
        if spec.default is None or kind == "any" or spec.is_prefix:
            return None
        raise CliError(f"{key}=null is not allowed ({key} takes {_WORD[kind]})")
    if kind == "any":
        return value
    if kind == "str":
        if isinstance(value, str) and not ov.is_choice_sweep():
            return value
        text = raw.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    if kind == "list":
        return [v for v in value] if isinstance(value, list) else [value]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("yes", "no"):
            return value.lower() == "yes"
        raise CliError(f"{key}={raw}: {raw!r} is not true or false")
    ok = {"int": (int,), "float": (int, float), "number": (int, float)}[kind]
    if isinstance(value, bool) or not isinstance(value, ok):
        raise CliError(f"{key}={raw}: {raw!r} is not {_WORD[kind]}")
    return float(value) if kind == "float" else value
