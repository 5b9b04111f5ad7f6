"""Feature drafts that read several of the oracle's hidden states, and their training-time test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from specd.core.errors import InvalidArgument
from specd.models.artifact import DraftManifest, save_draft_artifact
from specd.models.feature_draft import FeatureDraftModel
from specd.models.loader import load_model
from specd.models.tiny import write_tiny_model
from specd.runtime.feature_session import FeatureSession
from specd.training.features import oracle_hidden, recipe_layers, ttt_mask

LAYERS = 4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("feature-layers")
    write_tiny_model(root / "oracle", seed=5, layers=LAYERS, hidden=64)
    return load_model(str(root / "oracle"))


def trained_like(model: FeatureDraftModel, seed: int = 0) -> FeatureDraftModel:
    """Random trained tensors, so that no part of the draft is the identity it starts as."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trained_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


def test_feature_layers_are_checked_and_the_final_state_alone_is_the_plain_draft(oracle):
    assert FeatureDraftModel(oracle.model, None, (LAYERS,)).feature_layers == ()
    assert FeatureDraftModel(oracle.model, None, [0, 2, LAYERS]).feature_layers == (0, 2, LAYERS)
    for bad in ((2, 2), (LAYERS + 1,), (-1, 2)):
        with pytest.raises(InvalidArgument, match="hidden state"):
            FeatureDraftModel(oracle.model, None, bad)
    assert recipe_layers("eagle3", 30) == (2, 15, 30)
    assert recipe_layers("eagle", 30) == ()


def test_a_multi_layer_draft_starts_where_the_plain_one_does(oracle):
    """reduce starts as the identity on the final state and the norm as a scale: the same first guesses."""
    decoder = oracle.model.get_decoder()
    ids = torch.tensor([[1, 5, 9, 12, 7, 3, 40, 41]])
    positions = torch.arange(ids.shape[1] - 1)[None]
    plain = FeatureDraftModel(oracle.model, None).eval()
    read = FeatureDraftModel(oracle.model, None, (2, LAYERS), head_norm=True).eval()
    assert read.feature_width == 2 * read.hidden_size and plain.feature_width == plain.hidden_size
    with torch.no_grad():
        _, plain_logits = plain(oracle_hidden(decoder, ids, ())[:, :-1], ids[:, 1:], positions)
        features = oracle_hidden(decoder, ids, (2, LAYERS))
        _, read_logits = read(features[:, :-1], ids[:, 1:], positions)
    assert torch.equal(plain_logits.argmax(-1), read_logits.argmax(-1))
    out = decoder(input_ids=ids, output_hidden_states=True)
    assert torch.equal(features[..., 64:], out.last_hidden_state)  # N: the state the head reads
    assert torch.equal(features[..., :64], out.hidden_states[2])
    with pytest.raises(InvalidArgument, match="width"):
        read.feature_input(torch.zeros(1, 3 * 64))


def test_training_time_test_attends_as_serving_does(oracle):
    """Step n of training-time test at position j computes what the draft computes at serving time for the
    (n+1)-th token of a block that starts after position j - n, its tokens forced to the sequence's."""
    torch.manual_seed(0)
    model = trained_like(FeatureDraftModel(oracle.model, None, (2, LAYERS), head_norm=True))
    decoder = oracle.model.get_decoder()
    sequence = [1, 5, 9, 12, 7, 3, 40, 41, 50, 60, 70]
    ids = torch.tensor([sequence])
    features = oracle_hidden(decoder, ids, model.feature_layers)[:, :-1]  # f_0..f_{T-2}
    next_ids = ids[:, 1:]
    length = features.shape[1]
    positions = torch.arange(length)[None]
    steps = 3
    trained: list[torch.Tensor] = []
    with torch.no_grad():
        cache, inputs = DynamicCache(), features
        for step in range(steps):
            g, _ = model(inputs, next_ids, positions, cache, logits="none", mask=ttt_mask(length, step))
            trained.append(g[0])
            if step == 0:
                first = model.feature_input(features[:, :1])
            inputs = torch.cat([first, g[:, :-1]], dim=1)
        for start in (3, 5):  # a block after real positions 0..start-1
            session = FeatureSession(model, torch.device("cpu"))
            session.receive(0, features[0, :start])
            session.catch_up(sequence[: start + 1])
            g = session.last[0]
            assert torch.allclose(g[0], trained[0][start - 1], atol=1e-5)
            for step in range(1, steps):
                position = start - 1 + step
                g, _ = session.step(g, sequence[position + 1])
                assert torch.allclose(g[0], trained[step][position], atol=1e-5), (start, step)


def test_the_artifact_records_what_the_draft_reads(oracle, tmp_path: Path):
    model = trained_like(FeatureDraftModel(oracle.model, [1, 2, 3, 40, 41], (0, 2, LAYERS), head_norm=True), seed=1)
    manifest = DraftManifest(
        base=str(Path(oracle.model.name_or_path).resolve()) if oracle.model.name_or_path else "",
        layers=1, vocab_fingerprint=oracle.vocab_fingerprint, head_token_ids=[1, 2, 3, 40, 41], kind="features",
        feature_layers=list(model.feature_layers), head_norm=True,
    )
    save_draft_artifact(tmp_path / "draft", model, manifest, dtype=torch.float32)
    loaded = load_model(str(tmp_path / "draft"))
    assert loaded.feature_layers == (0, 2, LAYERS) and loaded.feature_dim == 64
    assert "hidden states 0, 2, 4" in loaded.model_id
    ids = torch.tensor([[1, 5, 9, 12]])
    features = oracle_hidden(oracle.model.get_decoder(), ids, (0, 2, LAYERS))[:, :-1]
    with torch.no_grad():
        _, want = model(features, ids[:, 1:], torch.arange(3)[None])
        _, got = loaded.model(features, ids[:, 1:], torch.arange(3)[None])
    assert torch.allclose(want, got, atol=1e-6)
    assert DraftManifest.read(tmp_path / "draft").feature_layers == [0, 2, LAYERS]
