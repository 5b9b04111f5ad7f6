"""Tiny random-weight models and a matching tokenizer, built offline from a config.

Used by the tests and by quick benchmark runs. Speculative decoding is lossless whatever the
weights, so exactness checks hold on these as on real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from specd.models.artifact import DraftManifest, save_draft_artifact
from specd.models.feature_draft import FeatureDraftModel
from specd.models.loader import load_model

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding lets a small draft model propose tokens that a large oracle verifies.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a lighthouse keeper who loved the sea.",
    "Summarize the following text in one sentence: the meeting moved to Tuesday.",
    "Question: what is two plus two? Answer: four.",
    "import torch\nx = torch.zeros(3)\nprint(x)\n",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on a fixed corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE)


def build_model(
    vocab_size: int, *, seed: int, layers: int = 2, hidden: int = 64, heads: int = 4, max_context: int = 512,
    logit_scale: float = 100.0, kv_heads: int = 0,
) -> LlamaForCausalLM:
    """A random-weight llama; kv_heads > 0 gives grouped-query attention (kv_heads must divide heads)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_context,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives nearly flat logits; widen them so greedy argmax has clear winners
    # (ties between near-equal logits would make exactness checks depend on float rounding).
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model.eval()


def write_tiny_model(path: Path, *, seed: int, layers: int = 2, hidden: int = 64, max_context: int = 512) -> Path:
    """Save a tiny random-weight causal LM with the shared tiny tokenizer to `path`."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed, layers=layers, hidden=hidden, max_context=max_context)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_feature_draft(
    oracle_dir: Path, path: Path, feature_layers: tuple[int, ...] = (), head_norm: bool = False
) -> Path:
    """An untrained feature draft (specd.models.feature_draft) for the tiny oracle at `oracle_dir`; with
    `feature_layers`, one that reads those hidden states of the oracle."""
    oracle = load_model(str(oracle_dir))
    model = FeatureDraftModel(oracle.model, None, feature_layers, head_norm=head_norm)
    manifest = DraftManifest(
        base=str(Path(oracle_dir).resolve()), layers=1, vocab_fingerprint=oracle.vocab_fingerprint, kind="features",
        feature_layers=list(model.feature_layers), head_norm=head_norm,
    )
    return save_draft_artifact(path, model, manifest, dtype=torch.float32)
