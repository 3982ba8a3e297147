"""Model registry: builders by name, plain-twin aliases, and helpful errors for unknown names."""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    plain_of: str | None  # for a plain-twin alias such as "plain20", the residual model's name

    @property
    def description(self) -> str:
        if self.plain_of is not None:
            return f"plain twin of {self.plain_of} (no shortcuts)"
        doc = (self.builder.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_MODELS: dict[str, ModelEntry] = {}


class UnknownModelError(ValueError):
    """Raised for a name that is not registered; the message lists the closest names."""


def register_model(builder: Builder) -> Builder:
    """Decorator: register ``builder`` under its function name."""
    _add(ModelEntry(builder.__name__, builder, None))
    return builder


def register_plain_twin(name: str, residual_name: str) -> None:
    """Register ``name`` as ``create_model(residual_name, plain=True)``."""
    _add(ModelEntry(name, _MODELS[residual_name].builder, residual_name))


def _add(entry: ModelEntry) -> None:
    if entry.name in _MODELS:
        raise ValueError(f"model {entry.name!r} is already registered")
    _MODELS[entry.name] = entry


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; :class:`UnknownModelError` lists close names if absent."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (`resnetlab list` shows all {len(_MODELS)})") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; keyword arguments override the builder's defaults.

    ``plain=True`` builds any model's plain twin; a plain alias (``plain20``) implies it.
    """
    entry = model_entry(name)
    if entry.plain_of is not None:
        if kwargs.get("plain", True) is not True:
            raise ValueError(f"{name!r} is a plain twin; plain=False contradicts it")
        kwargs["plain"] = True
    return entry.builder(**kwargs)


def check_arguments(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of ``kwargs`` whose value does not have the type that
    ``name``'s builder (or the model class it returns) annotates: int, float, bool, str, a Literal's
    choices, sequences of those. Unknown names and values the annotations cannot judge (callables,
    classes) are left to the builder. For arguments from a command line, whose mistakes would otherwise
    surface deep inside the model as an unrelated error."""
    builder = model_entry(name).builder
    hints = typing.get_type_hints(builder)
    model_class = hints.pop("return", None)
    if isinstance(model_class, type):
        hints = {**typing.get_type_hints(model_class.__init__), **hints}
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise ValueError(f"{key}={value!r}: {name} takes {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    return True  # callables, classes, Any: the builder judges


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and hint.__module__ == "builtins":
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}.get(
            hint.__name__, hint.__name__
        )
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern``, in natural order (resnet50 < resnet101)."""
    names = [name for name in _MODELS if fnmatch.fnmatchcase(name, pattern)]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def is_model(name: str) -> bool:
    return name in _MODELS
