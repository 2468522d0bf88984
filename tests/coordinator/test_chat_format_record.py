"""RUN/chat_format.json: written by a run's first start, and a resumed run must render prompts as it did."""

import json

import pytest

from coordinator.run_dir import CHAT_FORMAT_FILE, ChatFormatChanged, record_chat_format


def test_the_first_start_writes_it_and_a_resume_with_the_same_format_keeps_it(tmp_path):
    described = {"format": "template", "template": "{{ x }}", "sha256": "ab" * 32}
    assert record_chat_format(tmp_path, described)
    assert json.loads((tmp_path / CHAT_FORMAT_FILE).read_text()) == described
    assert not record_chat_format(tmp_path, dict(described))


def test_a_resume_whose_checkpoint_renders_otherwise_is_refused_naming_both(tmp_path):
    record_chat_format(tmp_path, {"format": "template", "sha256": "ab" * 32})
    with pytest.raises(ChatFormatChanged, match=r"trained in chat format template .* now gives builtin"):
        record_chat_format(tmp_path, {"format": "builtin", "sha256": "cd" * 32})
