from pathlib import Path

from neuroplex.config import STAGE_CONFIGS, Config
from neuroplex.config_reference import reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    marker = "<!-- config-reference:start -->\n"
    start = readme.index(marker) + len(marker)
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == reference_markdown(), "run: python scripts/update_readme.py"


def test_reference_lists_every_key_with_default_and_choices():
    rows = reference_markdown().splitlines()
    keys = [row.split("`")[1] for row in rows[2:]]
    top = [k for k in keys if not k.startswith("model.stages.N.")]
    assert len(top) == len(set(top))  # each key once
    for name in Config.model_fields:
        assert name in top or any(k.startswith(f"{name}.") for k in top)
    for model in STAGE_CONFIGS.values():  # every stage kind's fields, under model.stages.N.
        for name in model.model_fields:
            assert f"model.stages.N.{name}" in keys
    kinds = [row for row in rows if row.startswith("| `model.stages.N.kind` |")]
    assert [row.split("`")[3] for row in kinds] == list(STAGE_CONFIGS)
    assert "| `seed` | `0` |" in rows[3]
    device = next(row for row in rows if row.startswith("| `device` |"))
    assert "(auto / cpu / cuda)" in device
