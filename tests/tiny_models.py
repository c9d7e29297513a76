"""Tiny models and tokenizers built offline, for tests.

Everything here is made from a `transformers` config and a `tokenizers` model
trained in memory, then saved with `save_pretrained` (safetensors), so tests
load it back through `from_pretrained`: the same path a hub model takes.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

KINDS = ("gpt2", "gpt_neox", "llama", "bert")

# A few hundred words of plain English: enough for a tokenizer to learn merges.
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Sparse autoencoders learn a dictionary of features from the activations of a model.",
    "Every morning she walked to the river, counted the boats and wrote their names down.",
    "A transformer reads tokens, mixes them with attention and refines them with MLPs.",
    "The weather today is cold, with light rain in the north and clear skies in the south.",
    "He opened the old book and found a letter that nobody had read for fifty years.",
    "Numbers such as 12, 345 and 6789 appear in tables, prices and dates like 2024.",
    "Researchers measure the fraction of variance unexplained and the average L0 norm.",
    "Children played football in the park until the lights came on and parents called.",
    "Good software is simple to read, easy to test and honest about what it does.",
    "The museum opened a new gallery of paintings from the early twentieth century.",
    "Rivers carry water from mountains to the sea, shaping valleys over millions of years.",
]

CAUSAL_SPECIAL = ["[BOS]", "[EOS]", "[PAD]", "[UNK]"]
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(dir: str | Path, style: str = "causal", vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a small tokenizer in memory and save it to `dir`.

    style "causal": byte-level BPE (like GPT-2) with [BOS]/[EOS]/[PAD]/[UNK];
    it never produces [UNK]. style "bert": lowercase WordPiece with
    [CLS]/[SEP]/[PAD]/[UNK]/[MASK] and the `[CLS] text [SEP]` template.
    """
    if style == "causal":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=CAUSAL_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="[BOS]",
            eos_token="[EOS]",
            pad_token="[PAD]",
            unk_token="[UNK]",
        )
    elif style == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL, show_progress=False)
        tok.train_from_iterator(CORPUS, trainer=trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    else:
        raise ValueError(f"make_tokenizer: unknown style {style!r}; expected 'causal' or 'bert'")
    fast.model_max_length = 512
    fast.save_pretrained(str(dir))
    return fast


def _build(kind: str, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    vocab, d, layers, heads = len(tok), 32, 4, 4
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=d, n_layer=layers, n_head=heads, **special)
        return GPT2LMHeadModel(cfg)
    if kind == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * d, max_position_embeddings=128, **special,
        )
        return GPTNeoXForCausalLM(cfg)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=2, intermediate_size=2 * d, max_position_embeddings=128, **special,
        )
        return LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * d, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        )
        return BertModel(cfg)
    raise ValueError(f"make_tiny_model: unknown kind {kind!r}; expected one of {list(KINDS)}")


def make_tiny_model(kind: str, dir: str | Path, seed: int = 0) -> str:
    """Build a tiny random `kind` model (hidden 32, 4 layers, 4 heads) and its
    tokenizer, save both into `dir` and return the path as a string.

    kind: one of "gpt2", "gpt_neox", "llama" (saved with their causal-LM head)
    or "bert" (a bare `BertModel`).
    """
    if kind not in KINDS:
        raise ValueError(f"make_tiny_model: unknown kind {kind!r}; expected one of {list(KINDS)}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(dir, style="bert" if kind == "bert" else "causal")
    torch.manual_seed(seed)
    model = _build(kind, tok)
    model.save_pretrained(str(dir), safe_serialization=True)
    return str(dir)


def write_jsonl(path: str | Path, texts: list[str], column: str = "text") -> str:
    """Write one JSON object per line, `{column: text}`; return the path."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({column: text}) + "\n")
    return str(path)
