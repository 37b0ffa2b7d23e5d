"""Durable sessions through the Python API, on the real model: save as it goes, load, continue exactly.

The crash tests that kill a real ``vrex run --session`` process are in test_durable_cli.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from vrex.engine.persist import SessionDamagedError, SessionMismatchError, SessionSaveError
from vrex.engine.positions import PositionConfig
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.kv.policies import POLICIES, make_policy

# Small windows so a few frames cross every path: positions re-indexed (max_position), blocks
# offloaded to host and disk (device/host budgets), questions and narrations.
QUESTIONS = [(1.0, "What do you see?"), (3.0, "What was shown before?")]
# Short narrations and answers: the suite's untrained connector narrates at every frame up to the
# 48/64-token limits, and decoding them was ~90% of these tests' time (streamingllm: 70 s). Six tokens
# still run every decode path (selection, tiers, saved dialogue) and still cross max_position by the save.
SHORT = dict(max_response_tokens=6, max_answer_tokens=6)


def _config(tmp_path, **kw) -> SessionConfig:
    base = dict(positions=PositionConfig(max_position=100), device_budget_bytes=30 * 46080,
                host_budget_bytes=40 * 46080, disk_dir=str(tmp_path / "tiers"), **SHORT)
    return SessionConfig(**{**base, **kw})


def _key(events) -> list[tuple]:
    """What a resumed run must reproduce exactly (timings and RSS excepted)."""
    return [(e.t, e.kind, e.text, e.stats.get("cached_tokens"), e.stats.get("p_interval"), e.stats.get("kv_bytes"),
             e.stats.get("host_bytes"), e.stats.get("disk_bytes"), e.stats.get("selected_ratio")) for e in events]


def _frames(photos, n):
    return [(0.5 * i, photos[i % len(photos)]) for i in range(n)]


def _uninterrupted(model, spec, config, frames):
    session = StreamingSession(model, make_policy(spec), config)
    for t, q in QUESTIONS:
        session.ask(q, t)
    return [_key(session.push_frame(t, im)) for t, im in frames], session


@pytest.mark.parametrize("spec", ["resv", "rekv", "streamingllm[window=40]"])
def test_load_continues_exactly_like_the_uninterrupted_run(videollm, photos, tmp_path, spec):
    """Saved after every frame (3 of them), dropped, loaded: the next frames' events equal the
    uninterrupted run's bit for bit (p_interval, tiers, selected ratio), across re-indexing."""
    config = _config(tmp_path)
    frames = _frames(photos, 7)
    reference, _ = _uninterrupted(videollm, spec, config, frames)
    session = StreamingSession(videollm, make_policy(spec), config)
    session.save(tmp_path / "s")
    for t, q in QUESTIONS:
        session.ask(q, t)
    events = list(session.run(frames, should_stop=lambda: session.frames >= 3))  # saved after each frame
    assert [e for e in _key(events)] == [x for frame in reference[:3] for x in frame]
    assert session.saved_frames == 3
    assert session.cached_tokens > 100  # so positions past max_position were re-indexed before the save
    session.close()
    loaded = StreamingSession.load(tmp_path / "s", videollm)
    assert loaded.frames == 3 and loaded.t == frames[2][0] and loaded.cached_tokens == session.cached_tokens
    assert int(loaded.positions.max()) < 100  # re-indexed before the save, replayed the same way
    assert torch.equal(loaded.state.stored_at, session.state.stored_at)  # where each token arrived (forks index there)
    assert loaded.dialogue == session.dialogue and loaded.dialogue  # narrations/answers so far
    for i, (t, im) in enumerate(frames[3:], 3):
        assert _key(loaded.push_frame(t, im)) == reference[i], f"frame {i}"
    loaded.close()


@pytest.fixture(scope="module")
def resident_resv(videollm, photos, tmp_path_factory) -> tuple[SessionConfig, list, list]:
    """ReSV with the device tier only (no host or disk budget): config, 6 frames and the uninterrupted
    run's events per frame, computed once for the two tests that continue from it."""
    config = _config(tmp_path_factory.mktemp("resident"), disk_dir=None, host_budget_bytes=None)
    frames = _frames(photos, 6)
    reference, _ = _uninterrupted(videollm, "resv", config, frames)
    return config, frames, reference


def test_a_second_load_continues_from_the_later_save(videollm, resident_resv, tmp_path):
    config, frames, reference = resident_resv
    session = StreamingSession(videollm, make_policy("resv"), config)
    session.save(tmp_path / "s")
    for t, q in QUESTIONS:
        session.ask(q, t)
    list(session.run(frames, should_stop=lambda: session.frames >= 2))
    session = StreamingSession.load(tmp_path / "s", videollm)
    list(session.run(frames[2:], should_stop=lambda: session.frames >= 4))
    session = StreamingSession.load(tmp_path / "s", videollm)
    assert session.frames == 4
    got = [_key(session.push_frame(t, im)) for t, im in frames[4:]]
    assert got == reference[4:]


def test_save_of_a_running_session_writes_a_checkpoint(videollm, resident_resv, tmp_path):
    """save(dir) on a session that was never saved: the checkpoint path (policy state_dict + store)."""
    config, frames, reference = resident_resv
    frames, reference = frames[:5], reference[:5]
    session = StreamingSession(videollm, make_policy("resv"), config)
    for t, q in QUESTIONS:
        session.ask(q, t)
    for t, im in frames[:3]:
        session.push_frame(t, im)
    session.save(tmp_path / "s")
    loaded = StreamingSession.load(tmp_path / "s", videollm)
    assert [_key(loaded.push_frame(t, im)) for t, im in frames[3:]] == reference[3:]


def test_fork_equals_the_original_on_the_following_frames(videollm, photos):
    """fork goes through from_state: with the same policy it continues exactly as the original (no
    re-indexing before the fork: a forked policy indexes the keys as they are cached now)."""
    config = SessionConfig(**SHORT)
    a = StreamingSession(videollm, make_policy("resv"), config)
    for t, im in _frames(photos, 3):
        a.push_frame(t, im)
    b = a.fork(make_policy("resv"), config)
    assert b.state is not a.state and torch.equal(b.positions, a.positions) and b.spans == a.spans
    for t, im in _frames(photos, 6)[3:]:
        assert _key(b.push_frame(t, im)) == _key(a.push_frame(t, im))


def test_settings_that_differ_are_named(videollm, photos, tmp_path):
    session = StreamingSession(videollm, make_policy("resv"), SessionConfig(theta=0.5))
    session.save(tmp_path / "s", settings={"source": "a.mp4", "fps": 2.0})
    session.push_frame(0.0, photos[0])
    session.save()
    with pytest.raises(SessionMismatchError, match=r"policy\.params\.ratio: saved 0\.3, given 0\.2"):
        StreamingSession.load(tmp_path / "s", videollm, policy=make_policy("resv[ratio=0.2]"))
    with pytest.raises(SessionMismatchError, match=r"policy\.name: saved 'resv', given 'rekv'"):
        StreamingSession.load(tmp_path / "s", videollm, policy=make_policy("rekv"))
    with pytest.raises(SessionMismatchError, match=r"config\.theta: saved 0\.5, given 0\.725"):
        StreamingSession.load(tmp_path / "s", videollm, config=SessionConfig())
    with pytest.raises(SessionMismatchError, match=r"run\.fps: saved 2\.0, given 1\.0"):
        StreamingSession.load(tmp_path / "s", videollm, settings={"source": "a.mp4", "fps": 1.0})
    from vrex.models.videollm import load_videollm

    other = load_videollm(connector="plain")  # another connector: other weights, 10 tokens per frame
    with pytest.raises(SessionMismatchError, match=r"model\.(describe|tokens_per_frame|weights_crc32)"):
        StreamingSession.load(tmp_path / "s", other)
    assert StreamingSession.load(tmp_path / "s", videollm, settings={"source": "a.mp4", "fps": 2.0}).frames == 1


def test_damaged_and_partial_directories_are_refused(videollm, photos, tmp_path):
    session = StreamingSession(videollm, make_policy("full"), SessionConfig())
    d = tmp_path / "s"
    session.save(d)
    for i in range(2):
        session.push_frame(0.5 * i, photos[i])
        session.save()
    log = (d / "log.bin").read_bytes()
    # bytes past the manifest's length: an interrupted save, ignored
    (d / "log.bin").write_bytes(log + b"half a record")
    assert StreamingSession.load(d, videollm).frames == 2
    # a flipped byte inside a committed record
    (d / "log.bin").write_bytes(log[:100] + bytes([log[100] ^ 0xFF]) + log[101:])
    with pytest.raises(SessionDamagedError, match=r"log\.bin': record 0 .*checksum"):
        StreamingSession.load(d, videollm)
    # a log shorter than the manifest says (a partial copy)
    (d / "log.bin").write_bytes(log[: len(log) // 2])
    with pytest.raises(SessionDamagedError, match="shorter"):
        StreamingSession.load(d, videollm)
    (d / "log.bin").write_bytes(log)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["frames"] = 5  # edited by hand
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SessionDamagedError, match="manifest.json fails its checksum"):
        StreamingSession.load(d, videollm)
    (d / "manifest.json").unlink()
    with pytest.raises(SessionDamagedError, match="no manifest.json"):
        StreamingSession.load(d, videollm)


def test_a_failed_save_leaves_the_last_good_one(videollm, photos, tmp_path, monkeypatch):
    """The disk refusing a save (ENOSPC from the log file's write) raises SessionSaveError naming the
    directory; the directory still loads at the previous save, and a later save succeeds."""
    import errno

    from vrex.engine import persist

    session = StreamingSession(videollm, make_policy("resv"), SessionConfig())
    d = tmp_path / "s"
    session.save(d)
    session.push_frame(0.0, photos[0])
    session.save()
    session.push_frame(0.5, photos[1])
    real_append = persist.LogAppender.append

    def full_disk(self, record):
        self._f = self._f or open(self.path, "r+b", buffering=0)
        self._f.seek(self.committed)
        self._f.write(record[:1000])  # part of it landed, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(persist.LogAppender, "append", full_disk)
    with pytest.raises(SessionSaveError, match=r"saving frame 2 failed \(disk full\)") as info:
        session.save()
    assert str(d) in str(info.value)
    assert StreamingSession.load(d, videollm).frames == 1
    monkeypatch.setattr(persist.LogAppender, "append", real_append)
    session.save()  # space again: the journal was kept, the partial bytes are cut off
    assert StreamingSession.load(d, videollm).frames == 2


def test_save_cost_per_frame_is_bounded(videollm, photos, tmp_path):
    """Incremental: a save writes what the frame added, not the session: the 12th frame's save is no
    bigger than the 2nd's (same frame, same silent gate), however much is cached."""
    session = StreamingSession(videollm, make_policy("resv"), SessionConfig(theta=0.0))
    session.save(tmp_path / "s")
    sizes = []
    for i in range(12):
        session.push_frame(0.5 * i, photos[0])
        session.save()
        sizes.append(session._durable.last_save_bytes)
    assert sizes[11] <= sizes[1] * 1.01
    log = (tmp_path / "s" / "log.bin").stat().st_size
    assert log == pytest.approx(sum(sizes))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_state_dict_round_trip(name):
    """state_dict -> load_state_dict into a fresh policy: the same selections and the same state on
    the following steps (synthetic keys; no model needed)."""
    gen = torch.Generator().manual_seed(0)
    a = make_policy(name)
    b = make_policy(name)
    for p in (a, b):
        p.setup(2, 2, 4, 16)
    n = 0
    for frame in range(4):
        keys = torch.randn(2, 6, 16, generator=gen)
        for layer in range(2):
            a.on_append(layer, keys, n, frame)
            a.evictable(layer, n + 6)
        n += 6
    b.load_state_dict(a.state_dict())
    for frame in range(4, 6):
        keys = torch.randn(2, 6, 16, generator=gen)
        q = torch.randn(4, 3, 16, generator=gen)
        for layer in range(2):
            sa, sb = a.select(layer, q, n, "frame"), b.select(layer, q, n, "frame")
            if sa.indices is None:
                assert sb.indices is None
            else:
                assert all(torch.equal(x, y) for x, y in zip(sa.indices, sb.indices))
            for p in (a, b):
                p.on_append(layer, keys, n, frame)
            ea, eb = a.evictable(layer, n + 6), b.evictable(layer, n + 6)
            assert (ea is None and eb is None) or torch.equal(ea, eb)
        n += 6
    assert json.dumps(_plain(a.state_dict())) == json.dumps(_plain(b.state_dict()))


def test_policy_state_of_other_parameters_is_refused():
    a, b = make_policy("resv"), make_policy("resv[ratio=0.2]")
    for p in (a, b):
        p.setup(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"ratio=0\.3 \(this policy: 0\.2\)"):
        b.load_state_dict(a.state_dict())


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
