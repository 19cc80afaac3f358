"""Parameter sets: ``params/nyc.yaml`` holds every key and the real study's defaults.

Other files (``params/fixture.yaml``, your own) and command-line or papermill
overrides change a subset. A key that ``nyc.yaml`` does not define is an
error with a suggestion, never a silent no-op (papermill itself only warns
about unknown ``-p`` names). Relative paths resolve against the repository
root, so results do not depend on the working directory.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import functools
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError, create_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
DEFAULTS_FILE = PARAMS_DIR / "nyc.yaml"


class ParamError(ValueError):
    """A parameter is unknown, mistyped or inconsistent; the message names it."""


def defaults() -> dict[str, Any]:
    """params/nyc.yaml: every key and the real study's values (a fresh copy on each call)."""
    return copy.deepcopy(_defaults_file())


@functools.lru_cache(maxsize=1)
def _defaults_file() -> dict[str, Any]:
    return _read_yaml(DEFAULTS_FILE)


def load_params(*files: str | Path, overrides: Mapping[str, Any] | None = None) -> "Params":
    """Defaults, then each params file in order, then the ``params_file`` parameter's file (when a file or
    ``overrides`` set one; relative to the repository root), then ``overrides``; every key and type checked, once."""
    params = defaults()
    for path in files:
        _merge(params, _read_yaml(Path(path)), source=str(path))
    overrides = dict(overrides or {})
    chosen = overrides.get("params_file") or params["params_file"]
    if chosen:
        path = resolve_path(chosen)
        if not path.is_file():
            raise ParamError(f"parameter params_file: {path} not found; give a params YAML such as "
                             f"'params/fixture.yaml' (relative paths start at {REPO_ROOT}), or '' for none")
        _merge(params, {**_read_yaml(path), "params_file": chosen}, source=str(path))
    _merge(params, overrides, source="overrides")
    return Params(params)


def non_default(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters whose values differ from params/nyc.yaml: what a run set, all that a notebook needs injected."""
    nyc = defaults()  # an unknown name is kept, for the notebook to reject it
    return {key: value for key, value in params.items() if key not in nyc or value != nyc[key]}


_FIELD_TYPES = {bool: StrictBool, int: StrictInt, float: float, str: StrictStr, list: list}


@functools.lru_cache(maxsize=1)
def _schema() -> type[BaseModel]:
    """The parameters as a frozen pydantic model: params/nyc.yaml's keys, each typed like its default."""
    fields = {key: (_FIELD_TYPES.get(type(value), Any), value) for key, value in defaults().items()}
    return create_model("StudyParameters", __config__=ConfigDict(frozen=True, extra="forbid"), **fields)


class Params(Mapping):
    """A run's parameters, validated once and frozen: ``params.lr`` or ``params["lr"]``.

    It reads like the mapping it replaces (``{**params, "seed": 1}`` is a plain dict again, checked when it is
    turned back into :class:`Params`); :meth:`replace` derives a checked one.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]):
        check_known(values)
        try:
            model = _schema().model_validate(dict(values))
        except ValidationError as err:
            raise ParamError(f"invalid parameters: {err}") from err
        object.__setattr__(self, "_values", model)

    def __getitem__(self, key: str) -> Any:
        if key not in type(self._values).model_fields:
            raise KeyError(key)
        return getattr(self._values, key)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no parameter {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise ParamError(f"parameters are frozen: use params.replace({key}=...) for a changed copy")

    def __iter__(self):
        return iter(type(self._values).model_fields)

    def __len__(self) -> int:
        return len(type(self._values).model_fields)

    def __repr__(self) -> str:
        return f"Params({dict(self)!r})"

    def replace(self, **changes: Any) -> "Params":
        """A copy with ``changes``, checked like any parameters (unknown names and wrong types fail)."""
        merged = dict(self)
        _merge(merged, changes, source="replace")
        return Params(merged)


def check_known(names, source: str = "parameters") -> None:
    """Raise :class:`ParamError` for any name that is not a known parameter."""
    known = defaults()
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParamError(f"unknown parameter(s) in {source}: {', '.join(hints)}. Known parameters are the keys of {DEFAULTS_FILE}.")


def resolve_path(value: str | Path) -> Path:
    """A params path: absolute as given, relative to the repository root otherwise."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _merge(params: dict, new: Mapping[str, Any], source: str) -> None:
    check_known(new, source)
    for key, value in new.items():
        expected = params[key]
        if isinstance(expected, str) and isinstance(value, dt.date):
            value = value.isoformat()  # YAML reads an unquoted 2021-04-01 as a date
        if expected is not None and value is not None and not _same_kind(expected, value):
            raise ParamError(f"parameter {key!r} in {source}: expected {type(expected).__name__} like {expected!r}, got {value!r}")
        params[key] = value


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamError(f"params file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"params file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamError(f"params file {path} must be a mapping of parameter names to values")
    return data
