"""Command-line overrides checked before Hydra composes them.

Hydra refuses ``cache.kk=3`` with "Key 'kk' is not in struct" and suggests appending it with
``+cache.kk=3``, which only moves the failure; it never names the keys that exist. This names them,
with the close ones first, for keys of the selected model / cache / decoding / task / logger.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

GROUPS = ("model", "cache", "decoding", "task", "logger")
CONF = Path(__file__).resolve().parents[1] / "conf"
_KEY_OVERRIDE = re.compile(rf"^({'|'.join(GROUPS)})\.([A-Za-z_][\w.]*)=")
_SELECTION = re.compile(rf"^\+?(?:{'|'.join(GROUPS)}|experiment)=")


def unknown_key_message(args: list[str]) -> str | None:
    """One line naming the first ``group.key=value`` override whose key the selected group config
    lacks (with the keys it has), or None. Sweeps (``a,b``) are checked against their first value."""
    wanted = [m for m in map(_KEY_OVERRIDE.match, args) if m]
    if not wanted:
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    selections = [a.split(",")[0] for a in args if _SELECTION.match(a)]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=selections)
    except Exception:  # noqa: BLE001 - a bad selection: Hydra's own message names it
        return None
    for match in wanted:
        group, key = match.groups()
        if OmegaConf.select(cfg, f"{group}.{key}", default="<missing>") == "<missing>":
            node = cfg[group]
            keys = sorted(OmegaConf.to_container(node, resolve=False)) if node is not None else []
            close = difflib.get_close_matches(key, keys, n=3)
            return (
                f"{group}.{key}: {group}={cfg[group].get('name', '?')} has no key {key!r} "
                f"(close: {close or 'none'}; keys: {keys})"
            )
    return None
