"""Policy specs: ``"resv[ratio=0.2,hamming_threshold=4]"`` -> ``("resv", {"ratio": 0.2, "hamming_threshold": 4})``.

One grammar for every command and the Python API (``make_policy``): ``NAME`` or
``NAME[key=value,...]``. Values are Python literals (``0.2``, ``4``, ``None``, ``True``,
``'softmax'``); a bare word is a string (``score_norm=softmax``), ``true``/``false`` a bool.

Everything here runs without a model: the name against the registry, each parameter against the
policy dataclass's fields (name and type), and the ranges in each dataclass's ``__post_init__``
(through :func:`check`, so direct construction gets them too). Every failure is one
:class:`PolicySpecError` naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import types
import typing
from typing import Any, Callable

_BARE_WORD = re.compile(r"^[A-Za-z_][\w.\-]*$")


class PolicySpecError(ValueError):
    """A policy spec or parameter that cannot be used (the message says what is allowed)."""


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"resv[ratio=0.2]"`` -> ``("resv", {"ratio": 0.2})``: the registry name and typed keyword
    arguments. Checks the syntax, the name, the parameter names and their types (not the ranges:
    :func:`build_policy` runs the dataclass's own checks)."""
    if not isinstance(spec, str):
        raise PolicySpecError(f"a policy spec is a string like 'resv[ratio=0.2]', got {spec!r}")
    text = spec.strip()
    name, bracket, rest = text.partition("[")
    if bracket and not rest.endswith("]"):
        raise PolicySpecError(f"policy spec '{spec}': expected NAME[key=value,...] ending with ']'")
    cls = lookup(name)
    kwargs: dict[str, Any] = {}
    for item in _split_items(rest[:-1], spec) if bracket else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PolicySpecError(f"policy spec '{spec}': '{item.strip()}' is not key=value")
        if key in kwargs:
            raise PolicySpecError(f"policy spec '{spec}': parameter '{key}' is given twice")
        kwargs[key] = _literal(value.strip(), key, spec)
    return cls.name, check_params(cls.name, kwargs)


def check_params(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of policy ``name`` checked against its dataclass fields: unknown names and
    wrong types raise :class:`PolicySpecError`; ints become floats where a float is expected."""
    cls = lookup(name)
    fields = _init_fields(cls)
    out = {}
    for key, value in kwargs.items():
        if key not in fields:
            raise PolicySpecError(f"KV policy '{cls.name}' has no parameter '{key}'; its parameters: {_listing(cls)}")
        out[key] = _coerce(cls, key, value, fields[key])
    return out


def build_policy(name: str, kwargs: dict[str, Any]):
    """The policy dataclass built from checked arguments; its ``__post_init__`` range checks are
    reported as :class:`PolicySpecError` naming the policy."""
    cls = lookup(name)
    try:
        return cls(**kwargs)
    except PolicySpecError:
        raise
    except (ValueError, TypeError) as e:  # a policy's own check phrased without this module's helpers
        raise PolicySpecError(f"KV policy '{cls.name}': {e}") from e


def check(policy: str, param: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """For ``__post_init__``: raise :class:`PolicySpecError` unless ``ok(value)``; ``allowed`` says
    what is accepted, e.g. ``"a number in (0, 1]"``. A non-number where a number is expected fails
    the check instead of raising ``TypeError``."""
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise PolicySpecError(f"KV policy '{policy}': {param}={value!r} is not allowed; {param} must be {allowed}")


def number_in(lo: float | None, hi: float | None, *, lo_open: bool = False, none_ok: bool = False) -> Callable[[Any], bool]:
    """A predicate for :func:`check`: a real number (not bool, not NaN) within ``[lo, hi]``
    (``(lo, hi]`` with ``lo_open``), or ``None`` when ``none_ok``."""

    def ok(v: Any) -> bool:
        if v is None:
            return none_ok
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)

    return ok


def integer_at_least(lo: int, *, none_ok: bool = False) -> Callable[[Any], bool]:
    """A predicate for :func:`check`: an integer (not bool) ``>= lo``, or ``None`` when ``none_ok``."""
    return lambda v: (v is None and none_ok) or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)


def check_budget(policy: str, ratio: float, max_ratio: float, count_name: str, count: int | None, counted: str) -> None:
    """The budget parameters of the top-k baselines (infinigen, rekv): ``ratio`` and ``max_ratio`` in
    (0, 1], and ``count_name`` (None: use ratio) an integer >= 1 of ``counted``."""
    check(policy, "ratio", ratio, number_in(0, 1, lo_open=True), "a number in (0, 1]")
    check(policy, "max_ratio", max_ratio, number_in(0, 1, lo_open=True), "a number in (0, 1]")
    check(policy, count_name, count, integer_at_least(1, none_ok=True), f"None (use ratio) or an integer >= 1 ({counted})")


def lookup(name: str):
    """The policy class registered as ``name`` (case and ``_``/``-`` insensitive)."""
    from vrex.kv.policies import POLICIES  # the registry imports the policy files, which import this module

    key = str(name).strip().lower().replace("_", "-")
    if key not in POLICIES:
        what = f"unknown KV policy '{name}'" if str(name).strip() else "no KV policy name given"
        raise PolicySpecError(f"{what}; valid policies: {', '.join(POLICIES)}")
    return POLICIES[key]


def describe(name: str) -> str:
    """One line about the policy: the first sentence of its module docstring, name prefix removed."""
    cls = lookup(name)
    doc = (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()
    first = doc[0] if doc else ""
    return re.sub(r"^``[\w-]+``:\s*", "", first)


def split_spec_list(text: str) -> list[str]:
    """``"all,resv[ratio=0.2,seed=1],rekv"`` -> ``["all", "resv[ratio=0.2,seed=1]", "rekv"]``."""
    return [item.strip() for item in _split_items(text, text)]


def _split_items(body: str, spec: str) -> list[str]:
    """Split on commas outside quotes and brackets (a quoted value may contain a comma)."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(body):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    if quote or depth:
        raise PolicySpecError(f"policy spec '{spec}': unbalanced quotes or brackets")
    items.append(body[start:])
    return [it for it in items if it.strip()]


def _literal(text: str, key: str, spec: str) -> Any:
    if not text:
        raise PolicySpecError(f"policy spec '{spec}': parameter '{key}' has no value")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if _BARE_WORD.match(text):
            return {"true": True, "false": False, "none": None}.get(text.lower(), text)
        raise PolicySpecError(f"policy spec '{spec}': {key}={text} is neither a Python literal nor a bare word") from None


def _init_fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def policy_params(name: str) -> dict[str, Any]:
    """The keyword arguments a policy accepts, with their defaults (``None`` when it has none)."""
    cls = lookup(name)
    return {f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(cls) if f.init}


def param_table(name: str) -> list[tuple[str, Any, str]]:
    """``[(parameter, default, accepted type)]`` of policy ``name``, in field order."""
    fields = _init_fields(lookup(name))
    return [(k, default, type_name(fields[k])) for k, default in policy_params(name).items()]


def _listing(cls) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in policy_params(cls.name).items()) or "(none)"


def _alternatives(hint: Any) -> tuple:
    """``int | None`` -> ``(int, NoneType)``; a plain type -> ``(type,)``."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def type_name(hint: Any) -> str:
    """``int | None`` -> ``"an integer or None"``, for messages and ``vrex policies``."""
    args = _alternatives(hint)
    words = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    return " or ".join(words.get(a, getattr(a, "__name__", str(a))) for a in args)


def _coerce(cls, key: str, value: Any, hint: Any) -> Any:
    allowed = _alternatives(hint)
    if hint is Any:
        return value
    if value is None and type(None) in allowed:
        return value
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value if int in allowed else float(value)
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, str) and str in allowed:
        return value
    default = policy_params(cls.name)[key]
    raise PolicySpecError(f"KV policy '{cls.name}': {key}={value!r} has the wrong type; {key} takes "
                          f"{type_name(hint)} (default {default!r})")
