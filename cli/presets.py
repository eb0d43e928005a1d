"""Help texts of the options whose defaults come from --preset: each preset's value, as the table holds it."""

from __future__ import annotations


def preset_help(presets: dict[str, dict], key: str, text: str) -> str:
    """``text`` and e.g. ``[default: imagenet 100, cifar 800]``, or ``[default: 512]`` where the presets agree."""
    values = {name: _shown(table[key]) for name, table in presets.items() if key in table}
    if len(set(values.values())) == 1 and len(values) == len(presets):  # every preset agrees
        return f"{text} [default: {next(iter(values.values()))}]"
    return f"{text} [default: {', '.join(f'{name} {value}' for name, value in values.items()) or 'from --preset'}]"


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
