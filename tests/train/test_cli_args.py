"""`vrex train` / `vrex eval live` refuse bad arguments with a message naming the option, before any work."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vrex.cli import app


@pytest.mark.parametrize("args, option, why", [
    (["train", "--needle-frames", "40"], "--needle-frames", "not MIN,MAX"),
    (["train", "--needle-frames", "60,20"], "--needle-frames", "8 <= MIN <= MAX"),
    (["train", "--narration-segments", "4"], "--narration-segments", "not MIN,MAX"),
    (["train", "--narration-segments", "0,3"], "--narration-segments", "1 <= MIN <= MAX"),
    (["train", "--narration-frames", "9,3"], "--narration-frames", "1 <= MIN <= MAX"),
    (["train", "--long-frames", "600"], "--long-frames", "not MIN,MAX"),
    (["train", "--long-narration-fraction", "2"], "--long-narration-fraction", "not a fraction"),
    (["train", "--long-narration-frames", "12"], "--long-narration-frames", "not MIN,MAX"),
    (["train", "--long-fraction", "0.5", "--memory-refresh", "30"], "--memory-refresh", "multiple of --memory-refresh"),
    (["train", "--long-fraction", "1.5"], "--long-fraction", "not a fraction"),
    (["train", "--init", "no/such/connector.safetensors"], "--init", "is not a file"),
    (["train", "--tag-label-fraction", "0.5"], "--tag-label-fraction", "add --tag-tokens"),
    (["train", "--tag-tokens", "3", "--tag-min-prob", "1.5"], "--tag-min-prob", "not a probability"),
    (["train", "--tag-tokens", "-1"], "--tag-tokens", "must be >= 0"),
    (["train", "--extra-media", "no/such/media.json"], "--extra-media", "is not a file"),
    (["train", "--extra-media", "vrex/train/media.json"], "--extra-media", "names already in the catalog"),
    (["eval", "live", "--recent-tokens", "-1"], "--recent-tokens -1", "integer >= 0"),
    (["eval", "live", "--only", "both"], "--only", "'trained' or 'untrained'"),
    (["eval", "live", "--narration-streams", "0"], "--narration-streams", "must be >= 1"),
    (["eval", "live", "--connector", "no/such.safetensors"], "--connector", "neither a weights file"),
    (["eval", "live", "--needle-sets", "heldout,unseen"], "--needle-sets", "'heldout' and/or 'seen'"),
    (["eval", "live", "--long-minutes", "-1"], "--long-minutes", "minutes >= 0"),
    (["eval", "live", "--long-minutes", "nan"], "--long-minutes", "minutes >= 0"),
    (["eval", "tags", "--thresholds", "0.5,1.5"], "--thresholds", "in [0, 1]"),
    (["eval", "tags", "--thresholds", "half"], "--thresholds", "comma-separated probabilities"),
])
def test_bad_arguments_are_named(args, option, why, tmp_path):
    result = CliRunner().invoke(app, args + (["--run", str(tmp_path / "run")] if args[0] == "train" else []))
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # rich may wrap the message inside its box
    assert option in text and why in text


def test_unknown_lora_target_is_named(tmp_path):
    result = CliRunner().invoke(app, ["train", "--lora", "--lora-targets", "q_proj,attn", "--run", str(tmp_path / "run")])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--lora-targets" in text and "attn" in text


def test_eval_connector_names_shipped_variants():
    from vrex.cli.eval import resolve_eval_connector
    from vrex.train.trainer import DEFAULT_WEIGHTS

    assert resolve_eval_connector("plain") == DEFAULT_WEIGHTS  # the default recipe's --out
    assert resolve_eval_connector(None) == resolve_eval_connector("narrate")  # the shipped default model
    long = resolve_eval_connector("long")
    assert long != DEFAULT_WEIGHTS and long.is_file() and long.parent == DEFAULT_WEIGHTS.parent
    files = {long, DEFAULT_WEIGHTS, resolve_eval_connector("tags"), resolve_eval_connector("narrate")}
    assert len(files) == 4 and all(f.is_file() for f in files)


def test_eval_connector_maps_a_run_directory_to_its_checkpoint(tmp_path):
    from vrex.cli.eval import resolve_eval_connector

    (tmp_path / "checkpoint.safetensors").write_bytes(b"")
    assert resolve_eval_connector(str(tmp_path)) == tmp_path / "checkpoint.safetensors"
    assert resolve_eval_connector(str(tmp_path / "checkpoint.safetensors")) == tmp_path / "checkpoint.safetensors"
