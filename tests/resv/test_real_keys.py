"""Clustering on real post-RoPE keys: a tiny random-weight Llama on a correlated "video" input."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vrex.resv.hashing import hamming, hash_codes, make_hyperplanes
from vrex.resv.table import HCTable

from _resv_checks import check_invariants

FRAMES, TOKENS, HIDDEN = 12, 10, 64


@pytest.fixture(scope="module")
def real_keys():
    cfg = LlamaConfig(vocab_size=32, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    # a slowly drifting scene: adjacent frames are similar; inside a frame, two groups of similar patches
    scene = torch.randn(2, HIDDEN, generator=g)
    frames = []
    for _ in range(FRAMES):
        scene = scene + 0.05 * torch.randn(2, HIDDEN, generator=g)
        patches = scene[torch.arange(TOKENS) % 2] + 0.05 * torch.randn(TOKENS, HIDDEN, generator=g)
        frames.append(patches)
    with torch.no_grad():
        out = model(inputs_embeds=torch.cat(frames)[None], use_cache=True)
    return [layer.keys[0].float() for layer in out.past_key_values.layers]  # per layer [H_kv, N, D]


def test_hamming_tracks_cosine_on_real_keys(real_keys):
    k = real_keys[0]
    H, N, D = k.shape
    planes = make_hyperplanes(1, H, D, 32, seed=0)[0]
    codes = hash_codes(k, planes)
    for h in range(H):
        kn = torch.nn.functional.normalize(k[h], dim=-1)
        cos = kn @ kn.T
        hd = hamming(codes[h], codes[h]).float()
        iu = torch.triu_indices(N, N, 1)
        r = torch.corrcoef(torch.stack([cos[iu[0], iu[1]], hd[iu[0], iu[1]]]))[0, 1]
        assert r < -0.5, float(r)  # the paper reports |r| = 0.8 on layer-3 keys of COIN


@pytest.mark.parametrize("code_update", ["leader", "majority", "mean"])
def test_clustering_real_keys_spatial_and_temporal(real_keys, code_update):
    for k in real_keys:
        H, N, D = k.shape
        planes = make_hyperplanes(1, H, D, 32, seed=1)[0]
        tab = HCTable(H, D, planes, threshold=7, code_update=code_update)
        for f in range(FRAMES):
            tab.add(k[:, f * TOKENS : (f + 1) * TOKENS], f * TOKENS)
        check_invariants(tab, k)
        frame_of = torch.arange(N) // TOKENS
        spatial = temporal = 0
        for h in range(H):
            for c in range(int(tab.n_clusters[h])):
                fr = frame_of[tab.members(h, c)]
                temporal += int(fr.unique().numel() > 1)
                spatial += int(fr.numel() > fr.unique().numel())
        assert temporal > 0 and spatial > 0
        assert int(tab.n_clusters.max()) < N  # clustering actually merges tokens
