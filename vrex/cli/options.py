"""Option checks of the ``vrex`` commands, all in one pass, before anything heavy is imported or loaded,
and the two ways a command stops on a user error (``fail``, ``require_extra``).

Each check returns ``None`` or one line naming the option, the value and what is allowed. Only a
non-default ``--policy`` imports the policy registry (torch, about a second); nothing here imports
transformers or loads weights, so a bad option is refused in about a second instead of after the
model has loaded.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import typer

from vrex.models.dtypes import DEFAULT_LM_DTYPE, KV_DTYPES, LM_DTYPES
from vrex.sizes import parse_bytes

# Mirrors of the model presets (vrex.models imports torch and transformers); tests/engine/test_cli.py
# holds them equal to vrex.models.lm.SMOLLM2_PRESET, encoders.EFFNET_PRESET and videollm.SHIPPED_VARIANTS.
LM_PRESETS = ("smollm2-135m",)
ENCODER_PRESETS = ("efficientnet-lite0",)
CONNECTOR_NAMES = ("auto", "narrate", "tags", "long", "plain", "none")
POSITION_MODES = ("compress", "absolute")
POLICY_NAMES = ("full", "flexgen", "infinigen", "rekv", "streamingllm", "resv", "resv-noclust")  # for --help only

# Hugging Face repo ids: owner/name, letters, digits, '-', '_', '.', no '--' or '..', no leading or trailing '-' or '.'.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_PART}/{_PART}$")


def fail(message: str) -> NoReturn:
    """Stop the command with one ``error:`` line and exit code 2 (a user error, never a traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def log(line: str) -> None:
    """A progress line of a long command (the benchmarks) on stderr, printed as is (policy specs hold
    brackets, so nothing is read as markup)."""
    typer.echo(line, err=True)


def require_extra(command: str, extra: str, *modules: str) -> None:
    """An optional extra's modules must be installed for ``command``; if one is missing, say which extra
    installs it. Only *absence* is caught: a module that is there but fails to import raises as usual."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"{command} needs the optional extra '{extra}' ({', '.join(missing)} not installed): "
             f"pip install -e '.[{extra}]'")


def number_error(option: str, value: float | None, *, lo: float, hi: float | None = None, meaning: str = "") -> str | None:
    """A finite number in ``[lo, hi]`` (``hi`` None: no upper bound); ``None`` values pass (option unset)."""
    if value is None or (math.isfinite(value) and value >= lo and (hi is None or value <= hi)):
        return None
    allowed = f"a number in [{lo:g}, {hi:g}]" if hi is not None else f"a finite number >= {lo:g}"
    return f"{option} {value:g}: not allowed; {option} takes {allowed}{meaning}"


def integer_error(option: str, value: int | None, *, lo: int, meaning: str = "") -> str | None:
    if value is None or value >= lo:
        return None
    return f"{option} {value}: not allowed; {option} takes an integer >= {lo}{meaning}"


def recent_tokens_error(value: int | None) -> str | None:
    """``--recent-tokens`` of every command (run, eval live, bench kv): ``SessionConfig.recent_tokens``."""
    return integer_error("--recent-tokens", value, lo=0, meaning=" (0 = the policy alone)")


def choice_error(option: str, value: str, choices: tuple[str, ...]) -> str | None:
    return None if value in choices else f"{option} '{value}': not allowed; choose one of {', '.join(choices)}"


def policy_error(spec: str) -> str | None:
    """The spec through the policy parser and the policy's own range checks (no model)."""
    if spec == "full":
        return None  # the default: skip importing the registry (torch)
    from vrex.kv.policies import PolicySpecError, make_policy

    try:
        make_policy(spec)
    except PolicySpecError as e:
        return f"--policy '{spec}': {e} (`vrex policies` lists every parameter)"
    return None


def check_policy_specs(specs: list[str], option: str) -> None:
    """Each spec through the policy parser and its range checks (no model); the first bad one exits 2
    as a usage error naming ``option`` (the benchmarks' and ``vrex eval``'s lists of specs)."""
    from vrex.kv.policies import PolicySpecError, make_policy

    for spec in specs:
        try:
            make_policy(spec)
        except PolicySpecError as e:
            raise typer.BadParameter(str(e), param_hint=option)


def model_ref_error(option: str, value: str, presets: tuple[str, ...], what: str) -> str | None:
    """A preset name, an existing directory, or something shaped like a hub repo id ``owner/name``
    (only a download can tell whether the hub has it; a path that does not exist is an error)."""
    if value in presets:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{option} '{value}': is a file; {option} takes a directory with the {what}"
    if _HUB_ID.match(value):
        return None
    preset = f"a preset ({', '.join(presets)}), " if presets else ""
    return (f"{option} '{value}': no such directory, and not a Hugging Face repo id (owner/name); {option} takes "
            f"{preset}an existing directory or a repo id for the {what}")


def lm_errors() -> tuple[type[Exception], ...]:
    """What loading ``--lm`` raises for a user's model (each message names the model and the problem):
    catch these around the load and ``fail(f"--lm: {e}")``. Imports the model code: call after the checks."""
    from vrex.kv.layers import UnsupportedModel
    from vrex.models.live_format import LiveFormatError
    from vrex.models.videollm_online import UnknownModelLayout
    from vrex.models.weights import WeightsNotFound

    return (WeightsNotFound, UnknownModelLayout, UnsupportedModel, LiveFormatError)


def connector_error(value: str) -> str | None:
    if value in CONNECTOR_NAMES:
        return None
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        return None
    problem = "is not a .safetensors file" if path.is_file() else "is a directory" if path.is_dir() else "no such file"
    return (f"--connector '{value}': {problem}; --connector takes a shipped model ({', '.join(CONNECTOR_NAMES)}) "
            f"or an existing .safetensors weights file")


def writable_file_error(option: str, path: Path | None) -> str | None:
    """A file that can be created or overwritten: its directory exists, is writable and has room."""
    if path is None:
        return None
    if path.is_dir():
        return f"{option} '{path}': is a directory; {option} takes a file path (written as JSON lines)"
    parent = path.parent
    if not parent.is_dir():
        return f"{option} '{path}': the directory '{parent}' does not exist"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{option} '{path}': the file is not writable"
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{option} '{path}': cannot create a file in '{parent}' (not writable)"
    why = _append_error(path)
    if why:
        return f"{option} '{path}': cannot be written ({why})"
    return _no_space(option, path, parent)


def _append_error(path: Path) -> str | None:
    """Open a regular (or new) file for appending and close it: what access() cannot tell, e.g. files
    of /proc and /sys that even root cannot write (found by tests/fuzz). Nothing is written; a file the
    probe created is removed. Pipes and devices are not probed (opening them may block)."""
    existed = path.exists()
    if existed and not path.is_file():
        return None
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    if not existed:
        path.unlink(missing_ok=True)
    return None


def directory_error(option: str, path: Path | None) -> str | None:
    """A directory that exists and is writable, or can be created (its nearest existing parent is writable)."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        return f"{option} '{path}': is a file; {option} takes a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} '{path}': '{existing}' is not a writable directory"
    return _no_space(option, path, existing)


def make_directory(option: str, path: Path) -> None:
    """Create an output directory, or stop with one ``error:`` line naming the option: a parent that
    ``directory_error`` passed can still refuse (root passes every access() check, and /proc refuses
    a mkdir all the same)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{option} '{path}': cannot create the directory ({e.strerror or e})")


def _no_space(option: str, path: Path, directory: Path) -> str | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_bavail == 0 and st.f_blocks > 0:
        return f"{option} '{path}': no space left on the file system of '{directory}'"
    return None


def size_error(option: str, text: str | None) -> str | None:
    """A byte size such as 512MB or 2GiB (``vrex.sizes.parse_bytes``); ``None`` = option unset."""
    if text is None:
        return None
    try:
        parse_bytes(text)
    except ValueError as e:
        return f"{option} {e}"
    return None


def session_error(path: Path | None) -> str | None:
    """``--session DIR``: a saved session to resume, or a new or empty directory that can be created
    (a directory left by a first save that never finished counts as empty)."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        return f"--session '{path}': is a file; --session takes a directory (a saved session to resume, or a new one)"
    if path.is_dir():
        if (path / "manifest.json").exists():
            return None if os.access(path, os.W_OK | os.X_OK) else f"--session '{path}': the directory is not writable"
        names = {p.name for p in path.iterdir()}
        if names - {"checkpoint.bin", "checkpoint.bin.tmp", "log.bin", "manifest.json.tmp"}:
            return (f"--session '{path}': the directory is not empty and holds no vrex session (no manifest.json); "
                    "give a new or empty directory, or the directory of a session to resume")
    return directory_error("--session", path)


def run_option_errors(o: dict[str, Any]) -> list[str]:
    """Every problem with ``vrex run``'s options (keys: the option names without dashes, '-' -> '_')."""
    errors = [
        number_error("--fps", o["fps"], lo=0, meaning=" (frames per second; 0 = every frame at the source's native rate)"),
        integer_error("--max-frames", o["max_frames"], lo=1),
        number_error("--theta", o["theta"], lo=0, hi=1, meaning=" (a probability threshold; 0 = never narrate)"),
        number_error("--min-gap", o["min_gap"], lo=0, meaning=" (seconds)"),
        recent_tokens_error(o["recent_tokens"]),
        choice_error("--positions", o["positions"], POSITION_MODES),
        integer_error("--reindex-spread", o.get("reindex_spread", 1), lo=1),
        model_ref_error("--lm", o["lm"], LM_PRESETS, "language model or VideoLLM-online checkpoint"),
        model_ref_error("--encoder", o["encoder"], ENCODER_PRESETS, "SigLIP/CLIP vision tower"),
        None if o["base_lm"] is None else model_ref_error("--base-lm", o["base_lm"], (), "VideoLLM-online checkpoint's base LM"),
        connector_error(o["connector"]),
        writable_file_error("--trace", o["trace"]),
        directory_error("--disk-dir", o["disk_dir"]),
        policy_error(o["policy"]),
        choice_error("--kernels", o.get("kernels", "fast"), ("fast", "reference")),
        choice_error("--kv-dtype", o.get("kv_dtype", "auto"), KV_DTYPES),
        choice_error("--lm-dtype", o.get("lm_dtype", DEFAULT_LM_DTYPE), LM_DTYPES),
        session_error(o.get("session")),
    ]
    if o["base_lm"] is not None and o["lm"] in LM_PRESETS:
        errors.append(f"--base-lm '{o['base_lm']}': applies only when --lm is a VideoLLM-online checkpoint, not the preset '{o['lm']}'")
    errors += [size_error("--device-budget", o["device_budget"]), size_error("--host-budget", o["host_budget"])]
    if o["host_budget"] is not None and o["disk_dir"] is None:
        errors.append(f"--host-budget {o['host_budget']}: needs --disk-dir (tokens beyond the host budget go to disk)")
    return [e for e in errors if e]
