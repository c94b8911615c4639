"""Train a byte-level BPE or Unigram tokenizer and save it as a `transformers` tokenizer directory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmforge.outputs import ensure_replaceable, has_stamp, replace_dir, temporary_sibling, write_stamp

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}


def sentinel_tokens(count: int) -> list[str]:
    """T5-style sentinels for span corruption: <extra_id_0>, <extra_id_1>, ..."""
    return [f"<extra_id_{i}>" for i in range(count)]


def _build(kind: str, vocab_size: int, min_frequency: int, specials: list[str]) -> tuple[Tokenizer, trainers.Trainer]:
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=True,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            unk_token=SPECIAL_TOKENS["unk_token"],
            show_progress=True,
        )
    else:
        raise ValueError(f"unknown tokenizer kind '{kind}' (use 'bpe' or 'unigram')")
    return tok, trainer


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
    num_sentinels: int = 0,
) -> PreTrainedTokenizerFast:
    """Train on `texts` and save to `out_dir`; `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    sentinels = sentinel_tokens(num_sentinels)
    specials = [*SPECIAL_TOKENS.values(), *sentinels]
    minimum = len(specials) + (len(pre_tokenizers.ByteLevel.alphabet()) if kind == "bpe" else 1)
    if vocab_size < minimum:
        what = "the 256-symbol byte alphabet" if kind == "bpe" else "one ordinary token"
        raise ValueError(f"tokenizer.vocab_size: {vocab_size} is below {minimum}, the {len(specials)} special tokens "
                         f"plus {what}; a tokenizer that small cannot encode every text")
    out_dir = Path(out_dir).absolute()
    ensure_replaceable(out_dir, has_stamp, "a tokenizer lmforge trained")
    tok, trainer = _build(kind, vocab_size, min_frequency, specials)
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if sentinels:
        wrapped.add_special_tokens({"additional_special_tokens": sentinels})
    if len(wrapped) < vocab_size:  # the text ran out of pairs to merge (or of pieces) before the size asked
        print(f"tokenizer: {len(wrapped):,} tokens, not the {vocab_size:,} asked: the training text holds no more "
              f"{'merges' if kind == 'bpe' else 'pieces'} seen at least min_frequency ({min_frequency}) times; "
              "more text, or a smaller vocab_size")
    save_tokenizer(wrapped, out_dir)
    return wrapped


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path, key: str | None = None, **info) -> None:
    """Write the tokenizer whole under a temporary name, stamped as lmforge's, then rename it into place."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out_dir)
    try:
        save_portable(tokenizer, tmp)
        write_stamp(tmp, key, **info)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def save_portable(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """`save_pretrained`, with `tokenizer_class` set to the fast tokenizer class that transformers 4.x
    and 5.x both load (5.x writes `TokenizersBackend`, which 4.x does not know)."""
    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`; for an adapter folder saved without one, its base model's."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder (a tokenizer or model folder was expected)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        adapter = path / "adapter_config.json"
        if adapter.is_file():
            import json

            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            if base and Path(base).is_dir():
                return load_tokenizer(base, trust_remote_code)
        raise FileNotFoundError(f"{path}: no tokenizer here (expected tokenizer.json)")
    vocab_files = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")
    if not any((path / name).is_file() for name in vocab_files):  # else transformers asks for sentencepiece
        raise FileNotFoundError(f"{path / 'tokenizer.json'}: missing; tokenizer_config.json alone is no tokenizer "
                                "(copy the whole tokenizer folder again)")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # a damaged file surfaces as a JSON, Rust or sentencepiece error
        damaged = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path
        raise ValueError(f"{damaged}: cannot be read as a tokenizer ({type(exc).__name__}: {exc}); the file is damaged "
                         "or truncated: copy it again, or train the tokenizer again") from None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the vocabulary, merges and pipeline: two tokenizers that encode alike hash alike.

    Truncation and padding are left out: they are per-call settings (a `truncation=True` call
    switches them on in the backend), not part of what the tokenizer is.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        content = repr(sorted(tokenizer.get_vocab().items()))
    else:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        # not ASCII-escaped: escaping a byte-level vocabulary took 0.13 s of the 0.14 (a tenth of
        # preparing Brown); fingerprints of earlier versions differ, so their corpora are prepared again
        content = json.dumps(state, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def domain_tokens(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], count: int, min_frequency: int = 5) -> list[str]:
    """The `count` domain words that would save the most tokens if they were single tokens.

    Words are the tokenizer's own pre-tokenized pieces (with their leading space, so that
    " function" is learned and "dysfunction" is left alone); a candidate must be split into two or
    more tokens today and occur at least `min_frequency` times.
    """
    from collections import Counter

    pre = tokenizer.backend_tokenizer.pre_tokenizer
    words: Counter[str] = Counter()
    for text in texts:
        for _, (start, end) in pre.pre_tokenize_str(text):
            word = text[start:end]
            if len(word.strip()) >= 3 and word.strip().replace("_", "").isalnum():
                words[word] += 1
    vocab = tokenizer.get_vocab()
    saved = {}
    for word, freq in words.items():
        if freq < min_frequency or word in vocab:
            continue
        pieces = len(tokenizer(word, add_special_tokens=False).input_ids)
        if pieces >= 2:
            saved[word] = freq * (pieces - 1)
    return sorted(saved, key=lambda w: (-saved[w], w))[:count]


def merge_domain_pieces(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], count: int,
                        min_frequency: int = 5) -> tuple[Tokenizer, list[str], list[int], list[list[int]]]:
    """Chinese-LLaMA's vocabulary extension, for a BPE tokenizer: a BPE model is trained on the domain text
    under the base tokenizer's own normalizer and pre-tokenizer, and each of its merges that makes a token
    the base lacks (from two tokens it has, or pieces merged before) is appended to the base's merges
    (after them: the base's own cuts come first), up to `count` new tokens.

    Returns the new backend tokenizer, the new tokens (as the model's vocabulary spells them), their ids
    and, for each, the base tokens it is made of (whose embedding rows start its own). Unlike added tokens
    (whole strings matched in the raw text before the model), merged pieces are sub-words: where words
    are not separated by spaces (Chinese), a pre-tokenized "word" is a whole clause, and only pieces
    learned from the text shorten it."""
    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.extend_method bpe: the base tokenizer is a {model.get('type')} model, not BPE "
                         "(use extend_method words)")
    domain = Tokenizer(models.BPE())
    if backend.normalizer is not None:
        domain.normalizer = backend.normalizer
    if backend.pre_tokenizer is not None:
        domain.pre_tokenizer = backend.pre_tokenizer
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer"))
    # room for `count` pieces the base lacks among the domain's merges (many of its first ones the base has)
    trainer = trainers.BpeTrainer(vocab_size=(256 if byte_level else 0) + 4 * count + 1000, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
                                  show_progress=False)
    domain.train_from_iterator(texts, trainer=trainer)
    vocab, merges = model["vocab"], model["merges"]
    base_ids = dict(vocab)
    next_id = max([*vocab.values(), *(t["id"] for t in state.get("added_tokens", []))]) + 1
    parts: dict[str, tuple[str, str]] = {}
    for merge in json.loads(domain.to_str())["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = left + right
        if piece in vocab or left not in vocab or right not in vocab:
            continue
        vocab[piece] = next_id
        next_id += 1
        merges.append(f"{left} {right}" if merges and isinstance(merges[0], str) else [left, right])
        parts[piece] = (left, right)
        if len(parts) == count:
            break

    def base_pieces(token: str) -> list[int]:
        return [base_ids[token]] if token in base_ids else [i for part in parts[token] for i in base_pieces(part)]

    new = list(parts)
    return Tokenizer.from_str(json.dumps(state)), new, [vocab[t] for t in new], [base_pieces(t) for t in new]


def tokens_per_character(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Tokens per character of `texts` (no special tokens): what a vocabulary extension should lower."""
    ids = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
    return sum(map(len, ids)) / max(sum(map(len, texts)), 1)


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, new_tokens: list[str]) -> list[int]:
    """Add `new_tokens` (matched in raw text before the model's merges) and return their ids."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in new_tokens])
    return tokenizer.convert_tokens_to_ids(new_tokens)
