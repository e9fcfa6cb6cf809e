"""docs/configuration.md must describe the schemas the code enforces."""

from pathlib import Path

from spoa import config


def test_configuration_reference_is_current():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert config.reference_markdown("`python -m spoa agent`", config.AGENT_SCHEMA) in doc
    assert config.reference_markdown("`python -m spoa lbnode`", config.LBNODE_SCHEMA) in doc
