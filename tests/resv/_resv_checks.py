"""Shared checks for the ReSV tests (imported by test modules in this directory)."""

import torch

from vrex.resv.table import HCTable

from _synthetic_keys import correlated_frames  # noqa: F401  (shared with tests/kv; imported from here by this folder's tests)


def check_invariants(tab: HCTable, keys: torch.Tensor):
    """keys: all keys added so far [H, N, D]."""
    H, N, D = keys.shape
    assert tab.n_tokens == N
    mean, valid = tab.mean_keys()
    cnt = tab.counts()
    for h in range(H):
        nc = int(tab.n_clusters[h])
        tc = tab.token_cluster[h, :N]
        # every token in exactly one cluster, ids in range, every cluster non-empty
        assert int(tc.min()) >= 0 and int(tc.max()) < nc
        assert torch.equal(torch.bincount(tc, minlength=nc), cnt[h, :nc])
        assert int(cnt[h].sum()) == N
        assert valid[h, :nc].all() and not valid[h, nc:].any()
        for c in range(nc):
            m = tab.members(h, c)
            assert torch.allclose(mean[h, c], keys[h, m].mean(0), atol=1e-5)
            # leader token is the first member
            assert int(tab.leader_tok[h, c]) == int(m[0])
