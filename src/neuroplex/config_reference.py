"""The README's config reference: a markdown table of every config key, its default and its
meaning, generated from the pydantic models in neuroplex.config (scripts/update_readme.py
writes it into README.md; a test checks it is current)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from neuroplex.config import STAGE_CONFIGS, Config, model_in


def reference_markdown() -> str:
    """Markdown table of every config key, its default and its meaning (for the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += _reference_rows("", Config)
    for model in STAGE_CONFIGS.values():
        rows += _reference_rows("model.stages.N.", model)
    return "\n".join(rows) + "\n"


def _reference_rows(prefix: str, model: type[BaseModel]) -> list[str]:
    rows, sections = [], []
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            sections.append((f"{prefix}{name}.", type(default)))  # listed after this section
            continue
        optional = model_in(field.annotation)
        if default is None and optional is not None:  # an optional section, off by default
            sections.append((f"{prefix}{name}.", optional))
        shown = yaml.safe_dump(_plain(default), default_flow_style=True, width=1000).strip()
        shown = shown.removesuffix("...").strip()
        meaning = (field.description or "").replace("|", "\\|")
        literal = _literal_values(field.annotation)
        if literal and literal not in meaning:
            meaning = f"{meaning} ({literal})" if meaning else literal
        rows.append(f"| `{prefix}{name}` | `{shown}` | {meaning} |")
    for sub_prefix, sub_model in sections:
        rows += _reference_rows(sub_prefix, sub_model)
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} x {value[0].kind}"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _literal_values(annotation: Any) -> str:
    if getattr(annotation, "__origin__", None) is Literal:
        return " / ".join(str(a) for a in annotation.__args__)
    return ""
