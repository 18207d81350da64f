"""Name -> class registries filled by decorators; a package's modules are imported on first use,
so adding a cache method or a decoder is one new file."""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
import types
import typing
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        self.classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        self._import_package()
        return sorted(self.classes)

    def build(self, name: str, **params) -> T:
        if name not in self.names():
            close = difflib.get_close_matches(str(name), self.names(), n=3)
            raise ValueError(f"unknown {self.kind} {name!r} (allowed: {self.names()}; close: {close or 'none'})")
        cls = self.classes[name]
        allowed = [
            p.name for p in inspect.signature(cls).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        for key in params:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=3)
                raise ValueError(
                    f"{self.kind}={name} has no parameter {self.kind}.{key} (close: {close or 'none'}; allowed: {allowed})"
                )
        hints = typing.get_type_hints(cls.__init__)
        for key, value in params.items():
            if problem := type_problem(value, hints.get(key)):
                raise ValueError(f"{self.kind}={name}: {self.kind}.{key}={value!r} must be {problem}")
        try:
            return cls(**params)
        except TypeError as err:  # a missing parameter, or a value of the wrong type
            raise ValueError(f"{self.kind}={name}: {err}") from err

    def canonical(self, name: str, params: dict) -> dict:
        """``params`` as ``name``'s class reads them: an integer given for a parameter annotated
        float alone becomes that float (``temperature=0`` is ``temperature=0.0``), so that equal
        settings spelled differently hash alike (the resume key). Unknown names and parameters are
        left as they are (:meth:`build` refuses them)."""
        if name not in self.names():
            return dict(params)
        hints = typing.get_type_hints(self.classes[name].__init__)

        def floats_only(hint) -> bool:
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = set(typing.get_args(hint)) if union else {hint}
            return float in allowed and int not in allowed

        return {key: float(value) if type(value) is int and floats_only(hints.get(key)) else value
                for key, value in params.items()}

    def _import_package(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")


# What a value of each plain annotated type must be; values of other annotations are the class's to check
# (text parameters too: a class names their allowed values, which says more than "a string").
PARAMETER_TYPES = {int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def type_problem(value, hint, names: dict = PARAMETER_TYPES) -> str | None:
    """What ``value`` must be to fit the annotation ``hint`` (a type of ``names``, or a union of them),
    or None when it fits or the annotation is another kind. Config values arrive untyped from the
    command line: ``steps=abc`` or ``k=true`` would otherwise fail deep in a run, or run (true is the
    integer 1 in Python)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if union else {hint}
    if not allowed <= set(names):
        return None
    if value is None:
        fits = type(None) in allowed
    elif isinstance(value, bool):
        fits = bool in allowed
    elif isinstance(value, int):
        fits = bool(allowed & {int, float})
    elif isinstance(value, float):
        fits = float in allowed and not math.isnan(value)
    else:
        fits = isinstance(value, str) and str in allowed
    if fits:
        return None
    expected = " or ".join(names[t] for t in names if t in allowed)
    return expected + (" (not nan)" if isinstance(value, float) and math.isnan(value) else "")
