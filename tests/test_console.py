"""The run log: what ``info`` prints reaches log.txt as plain text."""

from __future__ import annotations

from seg.core import console
from seg.core.console import info, log_to, progress_bar


def test_log_file_holds_plain_text_not_console_markup(tmp_path):
    path = tmp_path / "log.txt"
    with log_to(path):
        info("[yellow]skipped unreadable scan[/yellow] a\\[1].nii.gz: truncated, patch [16, 32, 32]")
    text = path.read_text()
    assert "skipped unreadable scan a[1].nii.gz: truncated, patch [16, 32, 32]" in text
    assert "[yellow]" not in text and "[/yellow]" not in text


def test_progress_bar_total_can_be_set_after_the_start(monkeypatch):
    monkeypatch.setattr(console, "_quiet", False)
    with console.console.capture() as captured:
        with progress_bar("evaluating", None) as advance:
            advance(0, total=3)
            advance(1)
            advance(2, dice=0.5)
    assert "3/3" in captured.get() and "dice=0.5" in captured.get()
