"""Fuzzing the command line with hypothesis (issue 18, item 5): whatever the options, `vrex run` and
`vrex bench soak` print clear ``error:`` lines and exit 2, or get as far as loading the model. Never a
traceback, never another exit code.

The model load is where checking ends and the run begins, so it is replaced by a sentinel that stops the
command there: a fuzzed example costs milliseconds instead of seconds, and an example that reaches the
sentinel is one whose options were all accepted (the real load is run end to end in tests/engine/test_cli.py).
"""

from __future__ import annotations

import os
import signal
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vrex.cli import app
from vrex.io import list_demo_clips


class ModelLoadReached(Exception):
    """Raised instead of loading the model: every option was accepted."""


def _stop(*args, **kwargs):
    raise ModelLoadReached


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Paths of every kind an option can point at."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "dir").mkdir()
    (root / "file.txt").write_text("not a model\n")
    (root / "w.safetensors").write_bytes(b"\0" * 8)
    clip = list_demo_clips().get("cockatoo")
    if clip is None:
        pytest.skip("cockatoo.mp4 not available (run `make setup`)")
    return {"root": root, "clip": str(clip)}


@pytest.fixture(scope="module", autouse=True)
def cwd_in_temp(tmp_path_factory):
    """Relative paths the fuzzer draws ('../..', '~', random text) land in a temporary directory, two
    levels deep so '../..' stays inside it: from the repository, `--out ../..` wrote a file to '/'."""
    cwd = tmp_path_factory.mktemp("fuzz_cwd") / "a" / "b"
    cwd.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield


@pytest.fixture(scope="module", autouse=True)
def no_model_load():
    import vrex.bench.soak as soak
    import vrex.models.videollm as videollm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(videollm, "load_videollm", _stop)
        mp.setattr(soak, "run_soak_isolated", _stop)  # the soak's run starts in a child process
        yield


def _float_text() -> st.SearchStrategy[str]:
    junk = st.sampled_from(["nan", "inf", "-inf", "-0", "1e309", "-1e-320", "0x10", "", " ", "1,5", "2 fps", "½", "+1"])
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), junk, st.integers(-10**30, 10**30).map(str))


def _int_text() -> st.SearchStrategy[str]:
    return st.one_of(st.integers(-10**30, 10**30).map(str), st.sampled_from(["1.5", "nan", "", "ten", "0b11", "-0"]))


def _size_text() -> st.SearchStrategy[str]:
    units = st.sampled_from(["", "B", "K", "KB", "KiB", "M", "MB", "MiB", "G", "GB", "GiB", "T", "TB", "XB", "mb", " MB"])
    number = st.one_of(st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr))
    return st.one_of(st.builds(lambda n, u: n + u, number, units), st.text(max_size=12))


def _policy_text() -> st.SearchStrategy[str]:
    names = st.sampled_from(["full", "flexgen", "infinigen", "rekv", "streamingllm", "resv", "resv-noclust", "bogus", "RESV", ""])
    keys = st.sampled_from(["ratio", "hamming_threshold", "n_hyperplanes", "score_norm", "scope_frames", "seed", "nonsense", ""])
    values = st.one_of(st.sampled_from(["0.2", "2", "-1", "nan", "inf", "abc", "'softmax'", "softmax", "None", "True", "[1]",
                                        "1e999", "()", "{}", "__import__('os')", "'", "]"]), _float_text())
    params = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values), max_size=3).map(",".join)
    structured = st.builds(lambda n, p, close: f"{n}[{p}{close}", names, params, st.sampled_from(["]", "", "]]", "[", "]x"]))
    return st.one_of(names, structured, st.text(alphabet=string.printable, max_size=30))


def _path_text(places) -> st.SearchStrategy[str]:
    root = places["root"]
    return st.one_of(
        st.sampled_from([str(root / "dir"), str(root / "file.txt"), str(root / "w.safetensors"), str(root / "missing" / "x"),
                         str(root / "dir" / "new.jsonl"), "/proc/version", "/proc/nope/x", "/", "", "-", "owner/name",
                         "owner//name", "../..", "~"]),
        st.text(alphabet=string.ascii_letters + string.digits + "/._-~ ", max_size=20),
    )


def _run_options(places) -> st.SearchStrategy[list[str]]:
    path = _path_text(places)
    word = st.text(alphabet=string.printable, max_size=15)
    options = {
        "--fps": _float_text(), "--theta": _float_text(), "--min-gap": _float_text(),
        "--max-frames": _int_text(), "--recent-tokens": _int_text(),
        "--policy": _policy_text(),
        "--lm": st.one_of(st.just("smollm2-135m"), path), "--base-lm": path,
        "--encoder": st.one_of(st.just("efficientnet-lite0"), path),
        "--connector": st.one_of(st.sampled_from(["auto", "tags", "long", "plain", "none", "bogus"]), path),
        "--positions": st.one_of(st.sampled_from(["compress", "absolute"]), word),
        "--kernels": st.one_of(st.sampled_from(["fast", "reference"]), word),
        "--kv-dtype": st.one_of(st.sampled_from(["auto", "bfloat16", "float32", "float16"]), word),
        "--trace": path, "--disk-dir": path, "--session": path,
        "--device-budget": _size_text(), "--host-budget": _size_text(),
        "--ask": st.one_of(st.sampled_from(["3:What?", "1:30:What?", "what", ":", "nan:x", "-1:x", "99999999999999:x"]), word),
        "--bogus-option": word,
    }
    pair = st.sampled_from(sorted(options)).flatmap(lambda name: options[name].map(lambda value: [name, value]))
    flags = st.sampled_from([["--json"], ["--sample"], ["--realtime"], ["--"], ["-x"], []])
    return st.lists(st.one_of(pair, flags), max_size=7).map(lambda parts: [token for part in parts for token in part])


def _check(result) -> None:
    """One example's outcome: the sentinel (accepted), or exit 2 with a message; never a traceback."""
    output = result.output  # stdout and stderr (click >= 8.2)
    assert "Traceback" not in output, output
    if isinstance(result.exception, ModelLoadReached):
        return
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, output)
    assert "error" in output.lower(), output


def _invoke(argv: list[str]):
    """Run the command in this process; `vrex run` installs SIGINT/SIGTERM handlers once its options
    pass (a clean stop), and the sentinel leaves before they are restored: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return CliRunner().invoke(app, argv)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_vrex_run_options_never_traceback(places, data):
    source = data.draw(st.sampled_from([places["clip"], str(places["root"] / "missing.mp4"), str(places["root"] / "dir"),
                                        str(places["root"] / "file.txt")]), label="source")
    argv = ["run", source, *data.draw(_run_options(places), label="options")]
    _check(_invoke(argv))


def test_a_bad_option_is_named_in_the_error(places):
    """What the fuzzer relies on: a refusal names the option (so 'exit 2 + error' is a real check)."""
    result = _invoke(["run", places["clip"], "--theta", "nan"])
    assert result.exit_code == 2
    assert "--theta" in result.output
    reached = _invoke(["run", places["clip"], "--max-frames", "1"])
    assert isinstance(reached.exception, ModelLoadReached)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_vrex_bench_soak_options_never_traceback(places, data):
    options = {
        "--minutes": _float_text(), "--fps": _float_text(), "--stride": _int_text(), "--ask-every": _float_text(),
        "--size": _int_text(), "--policies": _policy_text(), "--device-budget": _size_text(), "--host-budget": _size_text(),
        "--disk-dir": _path_text(places), "--out": _path_text(places), "--kv-dtype": st.text(max_size=10),
    }
    pair = st.sampled_from(sorted(options)).flatmap(lambda name: options[name].map(lambda value: [name, value]))
    argv = ["bench", "soak", *[t for p in data.draw(st.lists(pair, max_size=5), label="options") for t in p]]
    _check(_invoke(argv))


def test_a_trace_file_even_root_cannot_write_is_refused_before_loading(places):
    """access() says yes for root on /proc files; writing them fails (EINVAL) once the model has loaded.
    The check opens the file for appending instead (found by thinking past this fuzzer's sentinel)."""
    if not os.path.isfile("/proc/version"):
        pytest.skip("needs Linux /proc")
    result = _invoke(["run", places["clip"], "--trace", "/proc/version"])
    assert result.exit_code == 2 and "--trace '/proc/version': cannot be written" in result.output


_BEFORE_THE_ENGINE = """
import sys
from vrex.cli import app
try:
    app(sys.argv[1:], prog_name="vrex")
except SystemExit as e:
    code = e.code
print("EXIT", code, "TRANSFORMERS", "transformers" in sys.modules)
"""


@pytest.mark.parametrize("argv, option", [
    (["bench", "kv", "--policies", "resv[ratio=abc]"], "--policies"),
    (["bench", "stream", "--policies", "resv[ratio=2]"], "--policies"),
    (["bench", "stream", "--sizes", "1q"], "size '1q'"),
    (["bench", "streams", "--policies", "bogus"], "--policies"),
    (["bench", "stream", "--policies", " ; "], "names no policy"),
    (["bench", "streams", "--counts", "0"], "--counts"),
    (["bench", "engine", "--sizes", "bogus"], "size 'bogus'"),
])
def test_bench_options_are_refused_before_the_engine_is_imported(argv, option):
    """The benchmarks check their options before importing transformers and the engine (seconds of
    imports): a fresh interpreter exits 2 naming the option, with transformers never imported."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BEFORE_THE_ENGINE, *argv], capture_output=True, text=True, timeout=120)
    assert "EXIT 2 TRANSFORMERS False" in done.stdout, done.stdout + done.stderr
    assert option in " ".join((done.stdout + done.stderr).split()), done.stdout + done.stderr


def test_an_output_directory_that_cannot_be_made_is_refused_by_name(places):
    """The fuzz test's find: root passes every access() check, so /proc/nope/x looked creatable and
    `vrex bench soak --out` died in mkdir with a traceback. Now one error line naming the option."""
    result = _invoke(["bench", "soak", "--minutes", "1", "--out", "/proc/nope/x"])
    _check(result)
    assert "--out '/proc/nope/x'" in result.output
