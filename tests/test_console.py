"""The run log: what ``info`` prints reaches log.txt as plain text."""

from __future__ import annotations

from seg.core.console import info, log_to


def test_log_file_holds_plain_text_not_console_markup(tmp_path):
    path = tmp_path / "log.txt"
    with log_to(path):
        info("[yellow]skipped unreadable scan[/yellow] a\\[1].nii.gz: truncated, patch [16, 32, 32]")
    text = path.read_text()
    assert "skipped unreadable scan a[1].nii.gz: truncated, patch [16, 32, 32]" in text
    assert "[yellow]" not in text and "[/yellow]" not in text
