"""nycdata.console: deliberate warnings once each, progress as widget or plain lines, and the executed notebooks."""

import sys
import types
import warnings

import nbformat
import pytest

from nycdata import console


@pytest.fixture(autouse=True)
def fresh_warnings():
    console.forget_warnings()
    yield
    console.forget_warnings()


class FakePublisher:
    def __init__(self):
        self.published = []

    def publish(self, data, metadata=None, **kwargs):
        self.published.append(data)


def test_a_warning_is_shown_once_per_message_until_forgotten():
    with pytest.warns(UserWarning, match="first thing"):
        assert console.warn("first thing") is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert console.warn("first thing") is False  # said already: nothing, however often it is found
        assert not caught
    with pytest.warns(UserWarning, match="second thing"):
        console.warn("second thing")
    console.forget_warnings()
    with pytest.warns(UserWarning, match="first thing") as record:
        console.warn("first thing")
    assert record[0].filename == __file__, "attributed to the caller"


def test_in_a_kernel_a_warning_is_one_display_with_plain_text_and_a_red_box(monkeypatch):
    publisher = FakePublisher()
    monkeypatch.setattr(console, "_ipython", lambda: types.SimpleNamespace(display_pub=publisher))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.warn("RANDOM <generator> & noise")
        console.warn("RANDOM <generator> & noise")
    assert not caught, "no stderr warning next to the display"
    assert len(publisher.published) == 1
    bundle = publisher.published[0]
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"] == "RANDOM <generator> & noise"
    assert "RANDOM &lt;generator&gt; &amp; noise" in bundle["text/html"] and "border:3px solid #c00" in bundle["text/html"]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_headless_progress_prints_rate_limited_lines_and_a_final_line_on_stdout_only(capsys):
    clock = Clock()
    with console.Progress(10, "thought cache", unit="chips", every_s=5, clock=clock, widget=False) as bar:
        for step in range(10):
            clock.now += 2  # 2 s per chip: a line at most every 5 s
            bar.update()
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[:3] == ["thought cache: 3/10 chips (30 %), 6 s elapsed, ETA 14 s",
                         "thought cache: 6/10 chips (60 %), 12 s elapsed, ETA 8 s",
                         "thought cache: 9/10 chips (90 %), 18 s elapsed, ETA 2 s"]
    assert lines[3:] == ["thought cache: 10/10 chips in 20 s"]


def test_a_short_step_prints_only_its_final_line_and_a_failed_one_says_where_it_stopped():
    lines, clock = [], Clock()
    with console.Progress(4, "build", unit="parents", every_s=30, log=lines.append, clock=clock, widget=False) as bar:
        bar.update(4)
    assert lines == ["build: 4/4 parents in 0 s"]
    lines.clear()
    with pytest.raises(RuntimeError):
        for _ in console.track(range(5), "testing", unit="runs", log=lines.append):
            raise RuntimeError("a run failed")
    assert lines == ["testing: stopped at 0/5 runs after 0 s"]
    lines.clear()
    assert list(console.track(["a", "b"], "quiet", log=lines.append, final=False)) == ["a", "b"] and lines == []


class FakeZMQShell:
    display_pub = None


@pytest.fixture
def kernel(monkeypatch):
    """This process dressed as an IPython kernel (a ZMQ shell); JPY_SESSION_NAME is each test's choice."""
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.SimpleNamespace(ZMQInteractiveShell=FakeZMQShell))
    monkeypatch.setattr(console, "_ipython", FakeZMQShell)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)


def test_widgets_only_in_a_kernel_that_a_jupyter_server_started(monkeypatch, kernel):
    assert not console.live_frontend(), "papermill's kernel: no JPY_SESSION_NAME"
    monkeypatch.setenv("JPY_SESSION_NAME", "/work/notebooks/03_finetune.ipynb")
    assert console.live_frontend()
    monkeypatch.setattr(console, "_ipython", lambda: None)
    assert not console.live_frontend(), "a plain process with the variable inherited"
    monkeypatch.setattr(console, "_ipython", object)
    assert not console.live_frontend(), "a terminal IPython"


def test_progress_under_a_live_frontend_drives_a_widget_and_prints_only_the_final_line(monkeypatch, kernel):
    import tqdm.notebook

    bars = []

    class FakeBar:
        def __init__(self, total, desc, unit, initial):
            self.total, self.n, self.closed = total, initial, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.notebook, "tqdm", FakeBar)
    monkeypatch.setenv("JPY_SESSION_NAME", "/work/notebooks/03_finetune.ipynb")
    lines, clock = [], Clock()
    with console.Progress(8, "fine-tuning", unit="batches", every_s=0, log=lines.append, initial=2, clock=clock) as bar:
        for _ in range(6):
            clock.now += 60
            bar.update()
    assert len(bars) == 1 and bars[0].n == 8 and bars[0].closed
    assert lines == ["fine-tuning: 8/8 batches in 360 s"], "no plain progress lines next to the widget"
    early = console.progress(8, "fine-tuning", log=lines.append, final=False)
    early.update(3)
    early.close(failed=False)  # early stopping: the bar ends at its count, green
    assert bars[1].total == 3 and bars[1].closed


# --- the executed notebooks of the session's chain (conftest's `run`)
RANDOM_GENERATOR = "thinks with a RANDOM generator"  # nycdata.model.tim.check_generator
RANDOM_RUN = "every TiM thought in this run comes from a RANDOM generator"  # nycdata.notebook.notebook_params


def _texts(output) -> str:
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return "\n".join(str(data.get(kind, "")) for kind in ("text/plain", "text/html"))


def test_executed_notebooks_have_no_stderr_no_widgets_and_each_warning_once(run):
    notebooks = sorted((run / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 8
    problems = []
    for path in notebooks:
        outputs = [o for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code" for o in cell.outputs]
        problems += [f"{path.name}: stderr {o.text[:200]!r}" for o in outputs
                     if o.output_type == "stream" and o.name == "stderr"]
        problems += [f"{path.name}: widget output" for o in outputs
                     if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        expected = {RANDOM_RUN: 1, RANDOM_GENERATOR: int(path.name.startswith(("02_smoke", "03_finetune_tim")))}
        said = [o for o in outputs if o.output_type in ("stream", "display_data")]  # not a cell's value (a report dict)
        for phrase, count in expected.items():
            shown = [o for o in said if phrase in _texts(o)]
            if len(shown) != count:
                problems.append(f"{path.name}: {phrase!r} shown {len(shown)} times, expected {count}")
            elif shown and not (shown[0].output_type == "display_data" and "text/html" in shown[0].data):
                problems.append(f"{path.name}: {phrase!r} not shown as a red box")
    assert not problems, "\n".join(problems)
