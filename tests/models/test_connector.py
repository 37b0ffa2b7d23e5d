"""The connector: temporal inputs (each frame with its change since the previous one) and weight files."""

from __future__ import annotations

import pytest
import torch

from vrex.models.connector import Connector


def test_temporal_connector_chains_across_calls():
    """Embedding a stream in pieces (passing the previous frame) equals embedding it at once, and the
    first frame of a stream is compared with nothing (zeros)."""
    conn = Connector(16, 8, seed=1, temporal=True)
    feats = torch.randn(6, 3, 16)
    whole = conn(feats)
    pieces = torch.cat([conn(feats[:1]), conn(feats[1:4], previous=feats[0]), conn(feats[4:], previous=feats[3])])
    torch.testing.assert_close(pieces, whole)
    manual = conn.fc2(conn.act(conn.fc1(torch.cat([feats[2], feats[2] - feats[1]], -1))))
    torch.testing.assert_close(whole[2], manual)
    torch.testing.assert_close(whole[0], conn.fc2(conn.act(conn.fc1(torch.cat([feats[0], feats[0]], -1)))))
    # the change matters: the same frame after a different one embeds differently
    assert not torch.allclose(conn(feats[2:3], previous=feats[0]), conn(feats[2:3], previous=feats[1]))
    plain = Connector(16, 8, seed=1)
    assert plain(feats[2:3], previous=feats[0]).shape == (1, 3, 8)
    torch.testing.assert_close(plain(feats[2:3], previous=feats[0]), plain(feats[2:3], previous=feats[1]))


def test_weight_file_decides_the_architecture(tmp_path):
    temporal, plain = Connector(16, 8, seed=1, temporal=True), Connector(16, 8, seed=2)
    temporal.save(tmp_path / "t.safetensors")
    plain.save(tmp_path / "p.safetensors")
    loaded = Connector(16, 8).load(tmp_path / "t.safetensors")
    assert loaded.temporal and loaded.trained
    feats = torch.randn(4, 3, 16)
    torch.testing.assert_close(loaded(feats), temporal(feats))
    back = loaded.load(tmp_path / "p.safetensors")
    assert not back.temporal
    torch.testing.assert_close(back(feats), plain(feats))
    with pytest.raises(ValueError, match="have shapes"):
        Connector(32, 8).load(tmp_path / "p.safetensors")
    with pytest.raises(FileNotFoundError):
        Connector(16, 8).load(tmp_path / "missing.safetensors")
