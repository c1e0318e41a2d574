import pytest

from swarm.errors import ConfigurationError, MissingBlocksError
from swarm.spans import BlockSpan


def test_parse_half_open_span():
    span = BlockSpan.parse("10:20")
    assert (span.start, span.end, len(span), str(span)) == (10, 20, 10, "10:20")
    assert 10 in span and 19 in span and 20 not in span


@pytest.mark.parametrize("text", ["5", "a:b", "3:3", "4:2", "-1:2", ""])
def test_bad_spans_are_rejected(text):
    with pytest.raises(ConfigurationError):
        BlockSpan.parse(text)


def test_missing_blocks_error_names_ranges():
    error = MissingBlocksError("m", [0, 1, 2, 7], waited=1.0)
    assert "[0, 3)" in str(error) and "[7, 8)" in str(error) and "'m'" in str(error)
