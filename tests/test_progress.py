import io

from pipeline.progress import progress_bar


def test_progress_bar_yields_every_item_and_is_on_or_off_as_asked():
    assert list(progress_bar(range(5), "items", progress=True)) == [0, 1, 2, 3, 4]
    assert not progress_bar(range(5), "items", progress=True).disable
    assert progress_bar(range(5), "items", progress=False).disable


def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # as in CI and in DVC's captured stage output
    assert progress_bar(range(5), "items").disable
