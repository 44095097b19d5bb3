"""Config files (`rmix train --config`): .toml, .json or .yaml read into dotted TrainConfig fields."""
import difflib
import json
import pathlib

from rmix import config as C
from rmix.pipelines.errors import one_line

SUFFIXES = (".toml", ".json", ".yaml", ".yml")  # what --config reads, by its suffix


def read(path, aliases: dict) -> dict:
    """The dotted fields a config file sets, each checked against its field's type.

    The file holds config.json's nested tables, or any subset of them; top-level keys may also be
    command-line option names, which `aliases` maps onto fields (`lr`, `aug-alpha` -> `mix.alpha`).
    """
    p = pathlib.Path(path)
    flat = {}
    for k, v in _parse(p).items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    types = C.field_types()
    changes = {}
    for key, value in flat.items():
        field = field_name(key, aliases)
        if field == "accum_steps" and value == "auto":  # as --accum-steps auto; config.json keeps its 0
            value = 0
        try:
            changes[field] = C.check_value(field, value, types)
        except ValueError as e:
            raise ValueError(f"--config: {p}: {e}") from None
    return changes


def _parse(p: pathlib.Path) -> dict:
    """The file's table, by its suffix; ValueError naming the file for anything else."""
    if not p.is_file():
        raise ValueError(f"--config: {p} is not a file")
    if p.suffix not in SUFFIXES:
        raise ValueError(f"--config: {p}: {p.suffix or 'a file without a suffix'} is not a supported format; "
                         f"use {'/'.join(SUFFIXES[:3])}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config: {p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
            from None
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, from PyPI
                import tomli as tomllib
            d = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"--config: {p} is YAML; install PyYAML or use .toml/.json") from None
            try:
                d = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:  # PyYAML's errors are not ValueErrors; its message spans lines
                raise ValueError(f"--config: {p} is not valid yaml: {one_line(e, None, typed=False)}") from None
        else:
            d = json.loads(text)
    except ValueError as e:
        if str(e).startswith("--config"):
            raise
        raise ValueError(f"--config: {p} is not valid {p.suffix.lstrip('.') or 'JSON'}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config: {p} must hold a table of fields")
    return d


def field_name(key: str, aliases: dict) -> str:
    """A config file's key as a dotted field: config.json's nested names, or an option's name (`aliases`)."""
    types = C.field_types()
    if key in types:
        return key
    head, _, tail = key.rpartition(".")
    if not head and key in aliases:
        return aliases[key]
    table = [k for k in types if k.rpartition(".")[0] == head]
    valid = [k.rpartition(".")[2] for k in table] + ([] if head else sorted(set(aliases) - set(types)))
    if head and not table:
        tables = sorted({k.split(".")[0] for k in types if "." in k})
        raise ValueError(f"--config: unknown table [{head}]; the tables are {', '.join(tables)}")
    close = difflib.get_close_matches(tail, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"in [{head}]" if head else "at the top level"
    raise ValueError(f"--config: unknown key {tail!r} {where}{hint}; valid keys there: {', '.join(sorted(valid))}")
