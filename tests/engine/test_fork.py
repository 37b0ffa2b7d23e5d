"""A fork's policy indexes each block where it arrived (``StreamState.stored_at``), as the stream's own
policy did, not at the positions re-indexing has squeezed it into since. Benchmarks compare policies
on forks of one long fill, so a fork that clusters otherwise than a live stream measures another ReSV."""

from __future__ import annotations

import torch

from vrex.engine.positions import PositionConfig
from vrex.engine.session import SessionConfig, StreamingSession
from vrex.engine.stream_state import StreamState
from vrex.kv.policies import make_policy


def test_fork_clusters_each_block_where_it_arrived(videollm, photos):
    # max_position 200: the stream re-indexes after about 13 frames; layer 0's keys do not depend on
    # the policy (they come from the embeddings), so a live `resv` stream and a `resv` fork of a `full`
    # stream see the same keys there
    config = SessionConfig(theta=0.0, recent_tokens=0, positions=PositionConfig(mode="compress", max_position=200))
    full = StreamingSession(videollm, make_policy("full"), config)
    live = StreamingSession(videollm, make_policy("resv"), config)
    first_move = None  # tokens stored before the first re-index
    for i in range(16):
        before = full.cached_tokens
        full.push_frame(0.5 * i, photos[i % len(photos)])
        live.push_frame(0.5 * i, photos[i % len(photos)])
        if first_move is None and not torch.equal(full.state.stored_at, full.positions):
            first_move = before
    assert first_move is not None and 0 < first_move < full.cached_tokens  # it did re-index
    # stored_at: every step's positions as given, consecutive within each span, the newest not moved
    stored = full.state.stored_at
    assert stored.shape == full.positions.shape and bool((stored >= full.positions).all())  # compressing moves back
    for start, length, _ in full.spans:
        assert torch.equal(stored[start:start + length], stored[start] + torch.arange(length))
    last_start, last_length, _ = full.spans[-1]
    assert torch.equal(stored[last_start:], full.positions[last_start:])

    fork = full.fork(make_policy("resv"), config)
    mine, theirs = fork.policy.tables[0], live.policy.tables[0]
    # clustered at the arrival positions, before any re-index the table is the live one, cluster for cluster
    assert torch.equal(mine.tc.read(0, first_move), theirs.tc.read(0, first_move))
    # then rebuilt at the positions the tokens have now, as the live table was at its re-index: each
    # cluster's mean key is the mean of its members' keys as cached now (bfloat16 once out of scope)
    keys = full.cache.current_keys(0).float()
    H, N, D = keys.shape
    members = mine.tc.read(0, N)
    mean, valid = mine.mean_keys()
    C = mean.shape[1]
    sums = torch.zeros(H, C, D)
    for h in range(H):
        sums[h].index_add_(0, members[h], keys[h])
    counts = torch.zeros(H, C).scatter_add_(1, members, torch.ones(H, N))
    want = sums / counts.clamp(min=1).unsqueeze(-1)
    torch.testing.assert_close(mean[valid], want[valid], atol=2e-2, rtol=1e-2)


def test_stored_at_is_saved_and_older_saves_fall_back_to_positions():
    state = StreamState(positions=torch.tensor([0, 1, 2, 3]), spans=[(0, 4, 0)], stored_at=torch.tensor([0, 5, 6, 7]))
    again = StreamState.from_dict(state.to_dict(), "cpu")
    assert torch.equal(again.stored_at, state.stored_at) and torch.equal(state.clone().stored_at, state.stored_at)
    older = state.to_dict()
    del older["stored_at"]  # a session saved before stored_at existed
    assert torch.equal(StreamState.from_dict(older, "cpu").stored_at, state.positions)


def test_a_dropped_session_and_its_fork_free_their_kv_at_once(videollm, photos):
    """No reference cycle keeps a session's store alive once the session is dropped: a benchmark forks
    4 GB stores one after another at an hour of stream, and one left for the garbage collector to find
    ran the machine out of memory. Checked with the collector off, for `full` and ReSV."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        for spec in ("full", "resv"):
            session = StreamingSession(videollm, make_policy(spec), SessionConfig(theta=0.0))
            for i in range(2):
                session.push_frame(0.5 * i, photos[i])
            fork = session.fork(make_policy(spec), SessionConfig(theta=0.0))
            fork.push_frame(1.0, photos[2])
            refs = [weakref.ref(x) for x in (session, session.store, session.cache, fork, fork.store, fork.cache)]
            del session, fork
            assert [r() is None for r in refs] == [True] * len(refs), spec
    finally:
        gc.enable()
