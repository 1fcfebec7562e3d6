"""The one way kvsqueeze extends SGLang: every replacement of an SGLang symbol goes through :func:`patch`.

A patch names its owner (a class, a module, or one object such as a running scheduler's allocator),
the attribute, and a key that says which kvsqueeze part it belongs to. :func:`patch`

- refuses, with the symbol named, when SGLang is not a version these patches were written for
  (:data:`WRITTEN_FOR`) or the attribute does not exist;
- applies once: a second call with the same owner, attribute and key changes nothing;
- records the original and hands it to the wrapper, which calls it (chaining): two parts that patch
  one symbol (DMS's and fusion's output streamer, say) both run, in the order they were applied;
- keeps a record of every patch (:func:`applied`), which tests and ``docs/architecture.md`` list.

A wrapper that does not call what it replaces must say why (``chains=False, why=...``); the reason is
kept in the record. Values that are not callables (a module flag, a class attribute) are set with
:func:`set_value`, which records the old value the same way.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from kvsqueeze.errors import KvsqueezeError

logger = logging.getLogger(__name__)

WRITTEN_FOR = ("0.5.23",)
ANY_VERSION_ENV = "KVSQUEEZE_SGLANG_ANY_VERSION"  # "1": apply the patches on another SGLang anyway


@dataclass(frozen=True)
class Patch:
    owner: str
    name: str
    key: str
    chains: bool
    why: str = ""


_RECORDS: list[Patch] = []
_MARK = "__kvsqueeze_patch__"
_ORIGINAL = "__kvsqueeze_original__"
_checked: list[str] = []


def sglang_version() -> str:
    import sglang

    return str(getattr(sglang, "__version__", "unknown"))


def check_version() -> str:
    """The SGLang version, if kvsqueeze's patches were written for it; else a clear error."""
    if _checked:
        return _checked[0]
    v = sglang_version()
    if v not in WRITTEN_FOR and os.environ.get(ANY_VERSION_ENV) != "1":
        raise KvsqueezeError(
            f"SGLang {v}: kvsqueeze's SGLang integration was written for SGLang "
            f"{', '.join(WRITTEN_FOR)}; expected that version (pip install sglang=={WRITTEN_FOR[-1]}), or "
            f"{ANY_VERSION_ENV}=1 to try it anyway")
    _checked.append(v)
    return v


def _owner_name(owner) -> str:
    if inspect.ismodule(owner):
        return owner.__name__
    if inspect.isclass(owner):
        return f"{owner.__module__}.{owner.__qualname__}"
    return f"<{type(owner).__qualname__} object>"


def _chain(value) -> list[str]:
    keys = []
    while value is not None:
        key = getattr(value, _MARK, None)
        if key is None:
            break
        keys.append(key)
        value = getattr(value, _ORIGINAL, None)
    return keys


def is_applied(owner, name: str, key: str) -> bool:
    value = inspect.getattr_static(owner, name, None)
    value = getattr(value, "__func__", value)
    return key in _chain(value)


def patch(owner, name: str, key: str, wrap: Callable[[Callable], Callable], *, chains: bool = True,
          why: str = "") -> Callable:
    """Replace ``owner.name`` by ``wrap(original)`` once per ``key``; returns what ``owner.name`` is now.

    ``original`` is what was there (an earlier kvsqueeze patch included), unbound for a method of a
    class. ``chains=False`` declares a wrapper that does not call it, ``why`` saying why."""
    check_version()
    if not chains and not why:
        raise ValueError(f"patch {key} of {name}: a wrapper that does not chain must say why")
    if not hasattr(owner, name):
        raise KvsqueezeError(
            f"SGLang {sglang_version()}: {_owner_name(owner)}.{name} not found; kvsqueeze's {key} patch "
            f"was written for SGLang {', '.join(WRITTEN_FOR)}")
    if is_applied(owner, name, key):
        return getattr(owner, name)
    static = inspect.getattr_static(owner, name)
    kind = type(static) if isinstance(static, (staticmethod, classmethod)) else None
    original = static.__func__ if kind is not None else (static if inspect.isclass(owner) else getattr(owner, name))
    new = wrap(original)
    if not callable(new):
        raise TypeError(f"patch {key} of {name}: the wrapper returned {type(new).__name__}, not a callable")
    setattr(new, _MARK, key)
    setattr(new, _ORIGINAL, original)
    setattr(owner, name, kind(new) if kind is not None else new)
    _RECORDS.append(Patch(_owner_name(owner), name, key, chains, why))
    logger.debug("kvsqueeze: patched %s.%s (%s)", _owner_name(owner), name, key)
    return getattr(owner, name)


def set_value(owner, name: str, key: str, value: Any) -> Any:
    """Set a non-callable attribute (a module flag, a class attribute); returns the old value."""
    check_version()
    if not hasattr(owner, name):
        raise KvsqueezeError(
            f"SGLang {sglang_version()}: {_owner_name(owner)}.{name} not found; kvsqueeze's {key} patch "
            f"was written for SGLang {', '.join(WRITTEN_FOR)}")
    old = getattr(owner, name)
    setattr(owner, name, value)
    if not any(r.owner == _owner_name(owner) and r.name == name and r.key == key for r in _RECORDS):
        _RECORDS.append(Patch(_owner_name(owner), name, key, False, f"value {old!r} -> {value!r}"))
    return old


def provide(owner, name: str, key: str, value: Any) -> None:
    """Give ``owner`` an attribute SGLang only defines on other platforms (it is left as it is where
    present)."""
    check_version()
    if hasattr(owner, name):
        return
    setattr(owner, name, value)
    _RECORDS.append(Patch(_owner_name(owner), name, key, False, "missing on this platform; provided"))


def patch_item(mapping: dict, item: str, key: str, wrap: Callable[[Any], Any], owner: str) -> Any:
    """Replace ``mapping[item]`` (a registry entry, e.g. SGLang's model classes) by
    ``wrap(original)`` once per ``key``; ``owner`` names the mapping in errors and records."""
    check_version()
    if item not in mapping:
        raise KvsqueezeError(f"SGLang {sglang_version()}: {owner}[{item!r}] not found; kvsqueeze's {key} "
                             f"patch was written for SGLang {', '.join(WRITTEN_FOR)}")
    current = mapping[item]
    if key in _chain(current):
        return current
    new = wrap(current)
    setattr(new, _MARK, key)
    setattr(new, _ORIGINAL, current)
    mapping[item] = new
    _RECORDS.append(Patch(owner, item, key, True))
    return new


def original(value) -> Callable | None:
    """What a patched callable replaced (None for an unpatched one)."""
    return getattr(getattr(value, "__func__", value), _ORIGINAL, None)


def applied() -> list[Patch]:
    """Every patch applied in this process, in order."""
    return list(_RECORDS)
