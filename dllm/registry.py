"""Name -> class registries filled by decorators; a package's modules are imported on first use,
so adding a cache method or a decoder is one new file."""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
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
        try:
            return cls(**params)
        except TypeError as err:  # a missing parameter, or a value of the wrong type
            raise ValueError(f"{self.kind}={name}: {err}") from err

    def _import_package(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
