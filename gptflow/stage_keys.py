"""Stage keys: what identifies a stage's product (its stage name, inputs, config and code) and how two keys are
compared and told apart in the one line a decision logs."""

from __future__ import annotations

from typing import Any, Mapping


def is_key(obj: Any) -> bool:
    """A stage key (or a manifest holding one), as gptflow writes it."""
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("stage"), str)
        and all(k in obj for k in ("inputs", "config", "code"))
    )


def without_code(key: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in key.items() if k != "code"}


def stored_key(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in ("stage", "inputs", "config", "code")}


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two stage keys, e.g. "input train.bin changed; config lr 0.001 -> 0.002"."""
    parts = []
    if old.get("stage") != new.get("stage"):
        return f"belongs to stage {old.get('stage')!r}, not {new.get('stage')!r}"
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    parts += [f"input {k} changed" for k in sorted(set(old_in) | set(new_in)) if old_in.get(k) != new_in.get(k)]
    old_cfg, new_cfg = _flatten(old.get("config") or {}), _flatten(new.get("config") or {})
    parts += [
        f"config {k} {old_cfg.get(k, '(unset)')!r} -> {new_cfg.get(k, '(unset)')!r}"
        for k in sorted(set(old_cfg) | set(new_cfg))
        if old_cfg.get(k) != new_cfg.get(k)
    ]
    old_code, new_code = old.get("code") or {}, new.get("code") or {}
    changed = sorted(m for m in set(old_code) | set(new_code) if old_code.get(m) != new_code.get(m))
    if changed:
        parts.append(f"code of {', '.join(changed)} changed")
    return "; ".join(parts) or "was written under another key"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
