"""vrex.cluster with ``sessions_dir``: an engine actor killed with SIGKILL is restarted and its session
rebuilt from its last save; the stream goes on exactly as one that was never interrupted (real local
Ray cluster on 127.0.0.1, the real default model with the untrained connector, real photos)."""

from __future__ import annotations

import os
import signal

import pytest
from cluster_helpers import CONFIG, alone, texts

from vrex.cluster import Cluster, SessionLost


def test_killed_actor_restarts_from_the_last_save(videollm, photos, tmp_path):
    frames = [(0.5 * i, photos[i]) for i in range(6)]
    sessions = tmp_path / "sessions"
    with Cluster(actors=1, num_cpus=2, cpus_per_actor=1, threads=1, connector=None, sessions_dir=sessions) as cluster:
        a = cluster.open_session("resv", **CONFIG)
        got = [e for tf in frames[:3] for e in a.push_frame(*tf)]
        assert (sessions / a.id / "manifest.json").exists()
        pid = a.where["pid"]
        os.kill(pid, signal.SIGKILL)  # the actor's process dies between two frames
        with pytest.raises(SessionLost, match=rf"session '{a.id}' is lost: its actor .*pid {pid}.*cluster.restart"):
            a.push_frame(*frames[3])
        info = a.restart()
        assert (info["frame"], info["t"]) == (3, 1.0) and info["cached_tokens"] >= [e for e in got if e["kind"] == "frame"][-1]["stats"]["cached_tokens"]
        new_pid = a.where["pid"]
        assert new_pid != pid  # a new actor, the same RemoteSession
        got += [e for tf in frames[3:] for e in a.push_frame(*tf)]
        # A live actor: the session is reloaded there from its last save (as after a failed step).
        assert (a.restart()["frame"], a.where["pid"]) == (6, new_pid)
        got += a.ask("What do you see?")
        a.close()
        assert not (sessions / a.id).exists()
        with pytest.raises(ValueError, match="policy 'bogus'"):
            cluster.open_session("bogus")
        b = cluster.open_session("full", **CONFIG)
        got_b = [e for tf in frames[:2] for e in b.push_frame(*tf)]
        # A new driver on the same directory (its own actor; the first cluster's actor stops stepping b).
        with Cluster(actors=1, cpus_per_actor=1, threads=1, connector=None, sessions_dir=sessions) as driver2:
            with pytest.raises(ValueError, match="no saved session 'nope'"):
                driver2.resume("nope")
            assert driver2.open_session("full", **CONFIG).id != b.id  # automatic ids skip saved ones
            b2 = driver2.resume(b.id)
            assert b2.resumed["frame"] == 2 and b2.where["pid"] != b.where["pid"]
            got_b += [e for tf in frames[2:4] for e in b2.push_frame(*tf)] + b2.ask("What do you see?")
    assert texts(got_b) == texts(alone(videollm, "full", frames[:4]))
    ref = alone(videollm, "resv", frames)
    assert texts(got) == texts(ref)
    assert [e["stats"]["p_interval"] for e in got if e["kind"] == "frame"] == \
        pytest.approx([e["stats"]["p_interval"] for e in ref if e["kind"] == "frame"], abs=1e-4)


def test_bad_sessions_dir_is_named_before_ray_starts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="sessions_dir .*file/sub.*cannot create"):
        Cluster(sessions_dir=blocker / "sub")
