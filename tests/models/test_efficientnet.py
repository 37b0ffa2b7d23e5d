"""The fused EfficientNet-Lite0 (BatchNorms folded, channels-last) against the plain module, on the
real checkpoint and the shared photos: the encoder runs fused, the plain module is the reference."""

import pytest
import torch

from vrex.models.efficientnet_lite import EfficientNetLite0, load_lukemelas_state_dict
from vrex.models.encoders import EfficientNetLite0Encoder
from vrex.models.weights import efficientnet_lite0_checkpoint


@pytest.fixture(scope="module")
def plain() -> EfficientNetLite0:
    path = efficientnet_lite0_checkpoint()
    if not path.is_file():
        pytest.skip(f"EfficientNet-Lite0 weights not found at {path}")
    model = EfficientNetLite0()
    load_lukemelas_state_dict(model, torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def encoder(plain) -> EfficientNetLite0Encoder:
    return EfficientNetLite0Encoder()


def test_encoder_runs_fused(encoder):
    bb = encoder.backbone
    assert bb.channels_last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())


@torch.no_grad()
def test_fused_features_and_classes_equal_the_plain_module(plain, encoder, photos):
    x = encoder.preprocess(photos)
    ref = plain.features(x)
    got = encoder.backbone.features(x)
    assert got.shape == ref.shape
    # float32 reassociation only: the folded scale multiplies the weights instead of the outputs
    assert (got - ref).norm() / ref.norm() < 1e-4
    assert torch.equal(plain(x).argmax(-1), encoder.backbone(x).argmax(-1))
    # the tokens the LM sees: fused encoder against the plain backbone pooled the same way
    from vrex.models.encoders import pool_tokens

    tokens = pool_tokens(ref.mean(dim=(2, 3)), ref, encoder.grid)
    torch.testing.assert_close(encoder(photos), tokens, rtol=1e-4, atol=1e-4)


def test_fusing_needs_eval_and_a_fused_module_refuses_a_checkpoint(plain):
    fresh = EfficientNetLite0()
    with pytest.raises(RuntimeError, match="eval"):
        fresh.fuse_for_inference()
    fused = EfficientNetLite0().eval().fuse_for_inference()
    with pytest.raises(ValueError, match="tensors, expected"):
        load_lukemelas_state_dict(fused, {k: v for k, v in plain.state_dict().items()})
