"""Named registries: one per kind of algorithm piece, so that a new piece is one decorated function.

    ADVANTAGES         (advantages, returns) from rewards (advantages.py)        ppo.advantage
    POLICY_LOSSES      per-token policy loss from logprobs and advantages        ppo.policy_loss
    LOSS_AGGREGATIONS  per-token losses -> one micro-batch loss (losses.py)      ppo.loss_agg
    KL_ESTIMATORS      per-token KL(policy || reference) from log ratios (kl.py) ppo.kl.estimator

Each entry declares what it needs (``needs_critic``, ``needs_groups``: several samples per prompt, ...)
so that the controller asks the registry instead of naming algorithms. A user's own entries live in
their own file, listed under ``plugins:`` in any config; it is imported before the config is checked
(:func:`load_plugins`), in the controller and in the policy learners alike.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable


class Registry:
    """Entries of one kind by name, each with the facts it declared (``info``)."""

    def __init__(self, kind: str, config_key: str, defaults: dict[str, Any] | None = None) -> None:
        self.kind, self.config_key = kind, config_key
        self.defaults = dict(defaults or {})  # the facts an entry has unless it declares otherwise
        self._entries: dict[str, Callable] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[Callable], Callable]:
        """Decorator: add ``fn`` under ``name`` with the facts ``info`` (keys from ``defaults``)."""
        unknown = sorted(set(info) - set(self.defaults))
        if unknown:
            raise TypeError(f"{self.kind} {name!r}: unknown facts {unknown}; known: {', '.join(sorted(self.defaults))}")

        def add(fn: Callable) -> Callable:
            if name in self._entries and self._entries[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._entries[name].__module__})")
            self._entries[name] = fn
            self._info[name] = {**self.defaults, **info}
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else a ValueError naming the config key and the registered names."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r} ({self.config_key}); registered: {', '.join(self.names())}")
        return name

    def get(self, name: str) -> Callable:
        return self._entries[self.check(name)]

    def info(self, name: str) -> dict[str, Any]:
        """The facts ``name`` declared, with the registry's defaults for the others."""
        return dict(self._info[self.check(name)])

    def items(self):
        return self._entries.items()

    def call(self, name: str, **inputs: Any):
        """Run entry ``name`` on the subset of ``inputs`` it takes by name, so that a caller can hand
        every entry the same inputs; a required input it does not get is a TypeError naming it."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        missing = [p.name for p in params.values() if p.default is p.empty and p.name not in inputs]
        if missing:
            raise TypeError(f"{self.kind} {name!r} needs {', '.join(missing)}")
        return fn(**{k: v for k, v in inputs.items() if k in params})


def load_plugins(paths: list[str]) -> list[str]:
    """Import each Python file in ``paths`` (its decorators register its entries); returns the module
    names. A file is imported once per process, under a name derived from its resolved path."""
    names = []
    for given in paths:
        path = Path(given).expanduser().resolve()
        if not path.is_file() or path.suffix != ".py":
            raise FileNotFoundError(f"plugins: {given} is not a Python file (expected a path to a .py file)")
        name = f"rlhf_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        names.append(name)
    return names
