"""Name -> class registries filled by decorators; a package's modules are imported on first use,
so adding a cache method or a decoder is one new file."""
from __future__ import annotations

import importlib
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
            raise ValueError(f"unknown {self.kind} {name!r} (allowed: {self.names()})")
        try:
            return self.classes[name](**params)
        except TypeError as err:  # an unknown or missing parameter
            raise ValueError(f"{self.kind}={name}: {err}") from err

    def _import_package(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
