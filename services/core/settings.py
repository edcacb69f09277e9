"""Settings of a process, each declared once: on its field of the frozen config
(``setting(...)`` in ``services.core.config``) or, for the few without a field, as a ``Setting``.
Its command-line flag, environment variable and TOML key derive from its name
(``redis_timeout_ms``: ``--redis-timeout-ms``, ``$SHARDREC_REDIS_TIMEOUT_MS``,
``redis_timeout_ms = 200``); a value comes from the flag, else the environment, else the
``--config`` file, else the default, and is validated at start, naming the setting and where
its value came from (docs/configuration.md).

Pure: the environment is handed in (``services.core.config`` is the one module that reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.core.errors import ConfigError

ENV_PREFIX = "SHARDREC_"
REQUIRED = dataclasses.MISSING
Check = Callable[[Any], "str | None"]  # a complaint ("must be > 0"), or None
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def positive(v: Any) -> str | None:
    return None if v is None or v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v is None or v >= 0 else "must be >= 0"


def between(lo: float, hi: float) -> Check:
    return lambda v: None if v is None or lo <= v <= hi else f"must be between {lo:g} and {hi:g}"


def tcp_port(v: Any) -> str | None:
    return None if v is None or 0 <= v <= 65535 else "must be a port, 0 to 65535 (0 = any free port)"


@dataclass(frozen=True)
class Shorthand:
    """Another flag for one value of a setting (``--inproc`` = ``--lookup inproc``)."""

    flag: str
    value: Any
    help: str


@dataclass(frozen=True)
class Setting:
    """One setting. ``default`` is in the setting's own unit (REQUIRED: no default); ``field``
    the config field it fills ("zk.session_timeout_s"; "" = none, read by ``convert`` of
    another); ``ms``: the setting is in milliseconds, the field in seconds; ``convert(value,
    values)`` makes the field's value (a file read, a split list); ``secret``: masked when
    shown, never a flag or a file key; ``switch``: a flag without a value, True when given;
    ``onoff``: a boolean whose flag takes on or off; ``processes``: the processes that have it
    (empty: every process of its config)."""

    name: str
    kind: type
    default: Any
    help: str
    field: str = ""
    optional: bool = False
    ms: bool = False
    choices: tuple[str, ...] = ()
    check: Check | None = None
    secret: bool = False
    switch: bool = False
    onoff: bool = False
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None
    default_text: str | None = None
    shorthands: tuple[Shorthand, ...] = ()
    convert: Callable[[Any, Mapping[str, Any]], Any] | None = None
    processes: tuple[str, ...] = ()

    @property
    def flag(self) -> str | None:
        return None if self.secret else "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def shown(self, value: Any) -> str:
        """``value`` as docs and ``config show`` print it."""
        if self.secret:
            return "(set)" if value else "(unset)"
        if value is None or value is REQUIRED or value == "":
            return self.default_text or ("(required)" if value is REQUIRED else "(none)")
        if isinstance(value, bool):
            return ("on" if value else "off") if self.onoff else str(value).lower()
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        return str(value)

    def from_text(self, text: str) -> Any:
        """A flag's or an environment variable's text -> value (ValueError saying why)."""
        text = text.strip()
        if self.parse is not None:
            return self.parse(text)
        if self.optional and text == "":
            return None
        if self.kind is bool:
            if text.lower() in _TRUE or text.lower() in _FALSE:
                return text.lower() in _TRUE
            raise ValueError(f"want on or off, got {text!r}")
        if self.kind is tuple:
            return tuple(p.strip() for p in text.split(",") if p.strip())
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"want {'an integer' if self.kind is int else 'a number'}, got {text!r}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"want one of {', '.join(self.choices)}, got {text!r}")
        return value

    def from_file(self, value: Any) -> Any:
        """A TOML value -> value (ValueError saying why)."""
        if isinstance(value, str) and (self.parse is not None or self.kind is bool or self.kind is tuple):
            return self.from_text(value)
        if self.kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise ValueError(f"want {self.kind.__name__}, got {type(value).__name__} {value!r}")
        if self.choices and value not in self.choices:
            raise ValueError(f"want one of {', '.join(self.choices)}, got {value!r}")
        return value

    def to_config(self, value: Any, values: Mapping[str, Any]) -> Any:
        if self.convert is not None:
            return self.convert(value, values)
        return value / 1000.0 if self.ms and value is not None else value


def setting(field_default: Any, help: str, *, name: str | None = None, ms: bool = False, **more: Any) -> Any:  # noqa: A002
    """A config field that is a setting: ``field_default`` in the field's unit (seconds when
    ``ms``: the setting itself is in milliseconds; REQUIRED: none); ``name`` when it differs from
    the field's (a flag spelled otherwise); more: ``Setting``'s options, and ``default`` /
    ``kind`` when the setting's differ from the field's (a file name that ``convert`` reads)."""
    options = {"repr": more.pop("repr")} if "repr" in more else {}
    spec = {"help": help, "setting_name": name, "ms": ms, **more}
    if field_default is REQUIRED:
        return dataclasses.field(metadata={"setting": spec}, **options)
    return dataclasses.field(default=field_default, metadata={"setting": spec}, **options)


def nested(cls: type, **kwargs: Any) -> Any:
    """A config field holding another config whose fields are settings too."""
    return dataclasses.field(metadata={"nested": cls}, **kwargs)


def fed_by(name: str, default: Any) -> Any:
    """A config field that takes another setting's value (one setting, two fields)."""
    return dataclasses.field(default=default, metadata={"fed_by": name})


def _kind(hint: Any) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field's annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    origin = typing.get_origin(base) or base
    return (tuple if origin is tuple else origin), optional


@dataclass(frozen=True)
class SettingTable:
    """The settings of one process (``process``: "frontend", "shard"; the TOML table of its own
    keys), collected from its config class, and the fields that take another setting's value."""

    process: str
    config_cls: type
    settings: tuple[Setting, ...]
    feeds: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, process: str, config_cls: type, extras: tuple[tuple[str, Setting], ...] = ()) -> SettingTable:
        """The settings of ``config_cls``'s fields, in their order, and ``extras``: (the name of
        the setting it follows, a setting without a field of its own)."""
        found: list[Setting] = []
        feeds: list[tuple[str, str]] = []
        _collect(process, config_cls, "", found, feeds)
        for after, extra in extras:
            if not extra.processes or process in extra.processes:
                at = next((i + 1 for i, s in enumerate(found) if s.name == after), len(found))
                found.insert(at, extra)
        names = [s.name for s in found]
        dupes = {n for n in names if names.count(n) > 1}
        assert not dupes, f"settings declared twice: {dupes}"
        return cls(process, config_cls, tuple(found), tuple(feeds))

    def __getitem__(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)

    def add_arguments(self, parser: argparse.ArgumentParser, *, config_file: bool = True) -> None:
        """A flag per setting (none for secrets), each with its help, default and variable,
        and ``--config FILE``. Flags not given stay unset, so the environment and the file count."""
        if config_file:
            self._config_flag(parser)
        for s in self.settings:
            if s.flag is None:
                continue
            tail = ("required" if s.default is REQUIRED else f"default: {s.shown(s.default)}") + f"; env {s.env}"
            tail = tail.replace("%", "%%")
            help_text = f"{s.help.replace('%', '%%')} ({tail})"
            if s.switch:
                parser.add_argument(s.flag, dest=s.name, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text)
            else:
                choices = ("on", "off") if s.onoff else s.choices
                metavar = s.metavar or ("{" + ",".join(choices) + "}" if choices else None)
                parser.add_argument(s.flag, dest=s.name, type=_flag_type(s), default=argparse.SUPPRESS, metavar=metavar, help=help_text)
            for short in s.shorthands:
                parser.add_argument(short.flag, dest=f"{s.name}__{short.flag}", action="store_const", const=short.value,
                                    default=argparse.SUPPRESS, help=f"{short.help} (= {s.flag} {s.shown(short.value)})")  # fmt: skip

    def _config_flag(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", default=argparse.SUPPRESS, metavar="TOML",
                            help=f"settings file: keys as listed in docs/configuration.md, [{self.process}] for this process only "
                            f"(flags win over ${ENV_PREFIX}* variables, which win over the file; env {ENV_PREFIX}CONFIG)")  # fmt: skip

    def resolve(self, args: argparse.Namespace, env: Mapping[str, str]) -> Resolved:
        """Each setting's value and source: the flag, else ``$SHARDREC_NAME``, else the
        ``--config`` file, else the default; then every setting's check. ConfigError names the
        setting and the source of the bad value."""
        given = vars(args)
        config_path = (given.get("config") or env.get(ENV_PREFIX + "CONFIG", "")) if self.process in PROCESSES else ""
        in_file = _read_file(config_path, self) if config_path else {}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for s in self.settings:
            value, source = self._one(s, given, env, in_file, config_path)
            values[s.name], sources[s.name] = value, source
        for s in self.settings:
            if values[s.name] is REQUIRED:
                raise ConfigError(f"{s.flag or s.name} is required ({s.env}, or {s.name} in --config)")
            complaint = s.check(values[s.name]) if s.check is not None else None
            if complaint:
                raise ConfigError(f"{_where(s, sources[s.name])} {complaint}, got {s.shown(values[s.name])}")
        return Resolved(self, values, sources, config_path)

    def _one(self, s: Setting, given: Mapping, env: Mapping[str, str], in_file: Mapping, config_path: str) -> tuple[Any, str]:
        shorts = [(sh, given[f"{s.name}__{sh.flag}"]) for sh in s.shorthands if f"{s.name}__{sh.flag}" in given]
        if s.name in given:
            for sh, value in shorts:
                if value != given[s.name]:
                    raise ConfigError(f"{sh.flag} means {s.flag} {s.shown(sh.value)}; it cannot go with {s.flag} {s.shown(given[s.name])}")
            return given[s.name], f"flag {s.flag}"
        if shorts:
            return shorts[0][1], f"flag {shorts[0][0].flag}"
        if s.env in env:
            try:
                return s.from_text(env[s.env]), f"env {s.env}"
            except ValueError as e:
                raise ConfigError(f"{_where(s, 'env ' + s.env)} {e}") from None
        if s.name in in_file:
            try:
                return s.from_file(in_file[s.name]), f"file {config_path}"
            except ValueError as e:
                raise ConfigError(f"{_where(s, 'file ' + config_path)} {e}") from None
        return s.default, "default"

    def build(self, resolved: Resolved, **overrides: Any) -> Any:
        """The frozen config of the resolved values (``overrides``: top-level fields set by the
        process's own rules, e.g. derived from several settings)."""
        return _build(self.config_cls, "", resolved.values, self, overrides)


@dataclass(frozen=True)
class Resolved:
    """The value of every setting of a process and where it came from ("flag --x",
    "env SHARDREC_X", "file PATH" or "default")."""

    table: SettingTable
    values: Mapping[str, Any]
    sources: Mapping[str, str]
    config_path: str = ""

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def lines(self) -> list[str]:
        """``config show``: one TOML line per setting with its source, secrets masked."""
        out = []
        for s in self.table.settings:
            value, source = self.values[s.name], self.sources[s.name]
            if s.secret or value is None:
                out.append(f"# {s.name}: {s.shown(value)}  ({source})")
            else:
                out.append(f"{s.name} = {_toml(value)}  # {source}")
        return out


def _flag_type(s: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return s.from_text(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = s.name  # argparse names the type in its messages
    return parse


def _where(s: Setting, source: str) -> str:
    return f"{s.flag or s.name} (from {source}):" if source != f"flag {s.flag}" else f"{s.flag}:"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _read_file(path: str, table: SettingTable) -> dict[str, Any]:
    """The TOML file's keys for this process: top-level ones, then its own table over them.
    Tables of other processes are skipped; an unknown key or a secret is a ConfigError."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from e
    known = {s.name: s for s in table.settings}
    own = doc.pop(table.process, {})
    merged = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in PROCESSES)}
    merged.update(own if isinstance(own, dict) else {})
    for key in merged:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else f" (settings of another process go under its table, e.g. [{table.process}])"
            raise ConfigError(f"--config {path}: {key!r} is not a setting of {table.process} serve{hint}")
        if known[key].secret:
            raise ConfigError(f"--config {path}: {key} is a secret: give it in ${known[key].env} or a file of its own, not here")
    return merged


PROCESSES = ("frontend", "shard")


def _collect(process: str, cls: type, prefix: str, out: list[Setting], feeds: list[tuple[str, str]]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if "nested" in f.metadata:
            _collect(process, f.metadata["nested"], path + ".", out, feeds)
        elif "fed_by" in f.metadata:
            feeds.append((path, f.metadata["fed_by"]))
        elif "setting" in f.metadata:
            spec = dict(f.metadata["setting"])
            kind, optional = _kind(hints[f.name])
            kind = spec.pop("kind", kind)
            name = spec.pop("setting_name") or f.name
            default = spec.pop("default", f.default if f.default is not dataclasses.MISSING else REQUIRED)
            if spec.get("ms") and isinstance(default, float):
                default = round(default * 1000.0, 9)
            s = Setting(name=name, kind=kind, default=default, field=path, optional=optional or default is None, **spec)
            if not s.processes or process in s.processes:
                out.append(s)


def _build(cls: type, prefix: str, values: Mapping[str, Any], table: SettingTable, overrides: Mapping[str, Any]) -> Any:
    by_field = {s.field: s for s in table.settings if s.field}
    feeds = dict(table.feeds)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if not prefix and f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif "nested" in f.metadata:
            kwargs[f.name] = _build(f.metadata["nested"], path + ".", values, table, {})
        elif path in feeds:
            source = table[feeds[path]]
            kwargs[f.name] = source.to_config(values[source.name], values)
        elif path in by_field:
            kwargs[f.name] = by_field[path].to_config(values[by_field[path].name], values)
    return cls(**kwargs)
