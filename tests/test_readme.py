"""README's table of supported architectures lists exactly the architectures the tests run through real servers."""

from __future__ import annotations

import re
from pathlib import Path

import transformers

from tests.test_architectures import ARCHITECTURES
from tests.test_depth import MODELS as DEPTH_MODELS
from tests.test_encoders import MODELS as ENCODERS

ROOT = Path(__file__).resolve().parents[1]
OWN_TESTS = {"llama", "mixtral", "t5", "whisper", "speecht5", "UNet2DConditionModel"}  # each has test files of its own


def table_rows() -> list[list[str]]:
    section = ROOT.joinpath("README.md").read_text().split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| `")]
    return rows[1:]  # after the header


def test_the_table_lists_every_tested_architecture():
    tested = {getattr(transformers, config_class)().model_type for config_class, _ in ARCHITECTURES.values()}
    tested |= {getattr(transformers, config_class)().model_type for _, config_class, _ in ENCODERS.values()}
    tested |= {make_config().model_type for _, make_config, _ in DEPTH_MODELS.values()}
    listed = [row[0].strip("`") for row in table_rows()]
    assert sorted(listed) == sorted(tested | OWN_TESTS)


def test_the_tests_the_table_names_exist():
    for row in table_rows():
        files = re.findall(r"`(tests/\S+\.py)`", row[-1])
        assert files and all(ROOT.joinpath(file).is_file() for file in files), row
