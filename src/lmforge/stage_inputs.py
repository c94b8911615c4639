"""What a stage is built from, by its recipe: the tokenizer (loaded, trained or extended), the prepared
corpora, and the model (loaded or built, its head sized to the labels). Each part skips itself when its
output exists for the same inputs (a content hash)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.config import Recipe
from lmforge.data.formats import expand_inputs, file_fingerprints, iter_corpus
from lmforge.data.labeled import iter_labeled
from lmforge.data.prepare import PreparedCorpus, prepare_corpus, retokenized
from lmforge.data.tagged import iter_tagged
from lmforge.data.tokenizer import (
    domain_tokens,
    extend_tokenizer,
    load_tokenizer,
    merge_domain_pieces,
    save_tokenizer,
    tokenizer_fingerprint,
    tokens_per_character,
    train_tokenizer,
)
from lmforge.engine.distributed import init_strategy, say
from lmforge.models.factory import (
    build_model,
    ensure_family_fits,
    ensure_fits_length,
    init_new_embeddings,
    load_model,
    preset_config,
)
from lmforge.objectives import OBJECTIVES, objective_data
from lmforge.objectives.classify import label_word_head
from lmforge.outputs import (
    content_hash,
    ensure_replaceable,
    ensure_run_folder,
    has_stamp,
    read_stamp,
    stamp_matches,
    write_stamp,
)


# ---------------------------------------------------------------- tokenizer
def tokenizer_stage(recipe: Recipe) -> PreTrainedTokenizerBase:
    cfg = recipe.tokenizer
    out = recipe.tokenizer_dir
    if cfg.extend_count:
        return _extended_tokenizer(recipe)
    if not cfg.train_files:
        source = cfg.path or recipe.model.path
        if source is None:
            raise ValueError("tokenizer: set tokenizer.train_files to train one, or tokenizer.path / model.path to load one")
        return load_tokenizer(source, recipe.model.trust_remote_code)
    files = expand_inputs(cfg.train_files)
    key = content_hash({"cfg": cfg.model_dump(), "inputs": file_fingerprints(files)})
    if stamp_matches(out, key):
        return load_tokenizer(out)
    say(f"tokenizer: training {cfg.kind} (vocab {cfg.vocab_size}) on {len(files)} file(s)")
    tokenizer = train_tokenizer(iter_corpus(files, cfg.column, max_docs=cfg.max_docs), out, cfg.kind,
                                cfg.vocab_size, cfg.min_frequency, cfg.num_sentinels)
    write_stamp(out, key, fingerprint=tokenizer_fingerprint(tokenizer))
    return tokenizer


def _extended_tokenizer(recipe: Recipe) -> PreTrainedTokenizerBase:
    cfg = recipe.tokenizer
    base_dir = cfg.path or recipe.model.path
    if base_dir is None or not cfg.extend_files:
        raise ValueError("tokenizer.extend_count: extending needs tokenizer.path (or model.path) and tokenizer.extend_files")
    out = recipe.tokenizer_dir
    files = expand_inputs(cfg.extend_files)
    key = content_hash({"cfg": cfg.model_dump(), "inputs": file_fingerprints(files)})
    if stamp_matches(out, key):
        return load_tokenizer(out)
    ensure_replaceable(out.absolute(), has_stamp, "a tokenizer lmforge wrote")
    tokenizer = load_tokenizer(base_dir, recipe.model.trust_remote_code)
    # every 50th document is held out of the extension, to measure what it saves on text it did not see
    docs = list(iter_corpus(files, cfg.column))  # read once: both the learning and the measurement need it
    held_out = docs[::50][:400]
    before = tokens_per_character(tokenizer, held_out)
    learned_from = [doc for i, doc in enumerate(docs) if i % 50]
    pieces = None
    if cfg.extend_method == "bpe":
        backend, new_tokens, new_ids, pieces = merge_domain_pieces(tokenizer, learned_from, cfg.extend_count,
                                                                   cfg.extend_min_frequency)
        tokenizer._tokenizer = backend  # transformers' fast tokenizer keeps its tokenizers.Tokenizer here
        shown = [t for t in (tokenizer.convert_tokens_to_string([t]) for t in new_tokens) if "\ufffd" not in t]
    else:
        new_tokens = domain_tokens(tokenizer, learned_from, cfg.extend_count, cfg.extend_min_frequency)
        new_ids = extend_tokenizer(tokenizer, new_tokens)
        shown = new_tokens
    after = tokens_per_character(tokenizer, held_out)
    save_tokenizer(tokenizer, out, key, base=str(base_dir), new_tokens=new_tokens, new_ids=new_ids, new_pieces=pieces,
                   tokens_per_char={"before": before, "after": after, "held_out_docs": len(held_out)})
    what = "pieces merged into its BPE" if pieces is not None else "domain tokens"
    say(f"tokenizer: {len(new_tokens)} {what} added to {base_dir} (e.g. {shown[:6]}); tokens per character of held-out "
        f"domain text {before:.3f} -> {after:.3f}" + (f" ({before / after:.2f}x fewer)" if after else "") + f"; saved to {out}")
    return load_tokenizer(out)


# ---------------------------------------------------------------- prepare
def _prepare_one(recipe: Recipe, tokenizer, files: list[str], column: str, out: Path, label: str,
                 val_files: list[str] | None = None, name: str = "main") -> PreparedCorpus:
    cfg = recipe.data
    if not files:  # a prepared corpus (another stage's); prepared again if its tokenizer is not the run's
        return retokenized(out, tokenizer, Path(recipe.output_dir).absolute() / f"retokenized_{name}",
                           recipe.trainer.progress, say)
    corpus = prepare_corpus(files, tokenizer, out, column, cfg.format, cfg.val_fraction, cfg.max_docs,
                            cfg.shard_tokens, progress=recipe.trainer.progress,
                            val_files=val_files)
    splits = corpus.manifest["splits"]
    say(f"data{label}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
          f"({splits['train']['docs']:,} / {splits['val']['docs']:,} docs) in {corpus.directory}")
    return corpus


def prepare_stage(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> dict[str, PreparedCorpus]:
    """The run's corpora by name: one ("main") or the sources of `data.mixture`."""
    cfg = recipe.data
    if objective_data(recipe.objective) in ("pairs", "labeled", "tagged", "spans", "instructions", "preferences", "prompts"):  # small sets: tokenized in memory at train time
        return {}
    if not cfg.mixture:
        return {"main": _prepare_one(recipe, tokenizer, cfg.train_files, cfg.column, recipe.prepared_dir, "", cfg.val_files)}
    return {
        m.name: _prepare_one(recipe, tokenizer, m.train_files, m.column,
                             Path(m.prepared_dir or Path(recipe.output_dir) / f"data_{m.name}"), f" [{m.name}]",
                             name=m.name)
        for m in cfg.mixture
    }


# ---------------------------------------------------------------- model
def label_names(recipe: Recipe) -> list[str]:
    """The classification labels: `data.labels`, or the sorted labels found in the data."""
    cfg = recipe.data
    if cfg.labels is not None:
        return list(cfg.labels)
    if recipe.objective.name == "token_classify":  # the tags of every word
        return sorted({t for row in iter_tagged(cfg.train_files, cfg.column, cfg.label_column, None)
                       if not isinstance(row, Exception) for t in row[2]})
    return sorted({row[1] for row in iter_labeled(cfg.train_files, cfg.column, cfg.label_column, None)
                   if not isinstance(row, Exception)})


def _head_config(recipe: Recipe, head: str) -> dict:
    objective = OBJECTIVES[recipe.objective.name]
    if hasattr(objective, "head_config"):  # a fixed head, e.g. the reward model's single score
        return objective.head_config
    if head not in ("classifier", "token_classifier"):
        return {}
    names = label_names(recipe)
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def model_stage(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, head: str) -> PreTrainedModel:
    cfg = recipe.model
    seq_len = recipe.packing.seq_len
    head_config = _head_config(recipe, head)
    if cfg.path:
        say(f"model: loading {cfg.path} with trust_remote_code "
              + ("ON (the recipe asked for it): code from the checkpoint will run" if cfg.trust_remote_code else "off"))
        model = load_model(cfg.path, head, cfg.trust_remote_code, **head_config)
        if model.config.pad_token_id is None:  # sequence classifiers find each row's end by the pad id
            model.config.pad_token_id = tokenizer.pad_token_id
        added = read_stamp(recipe.tokenizer_dir) if recipe.tokenizer.extend_count else {}
        if added.get("new_tokens"):
            init_new_embeddings(model, load_tokenizer(added["base"]), added["new_tokens"], added["new_ids"],
                                added.get("new_pieces"))
        elif len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        trained_head = any(a.endswith("ForSequenceClassification") for a in model.config.architectures or [])
        if recipe.objective.label_prompt and head == "classifier" and not trained_head:  # a new head, not a trained one
            # the language model's output rows: the input embedding when tied, else its own lm_head
            rows = (model.get_input_embeddings().weight if model.config.tie_word_embeddings
                    else load_model(cfg.path, "causal_lm", cfg.trust_remote_code).get_output_embeddings().weight)
            ids = label_word_head(model, tokenizer, list(model.config.id2label.values()), recipe.objective.label_prompt, rows)
            say(f"model: the classifier head starts from the label names' tokens {ids} after the prompt "
                f"{recipe.objective.label_prompt!r} (objective.label_prompt)")
    else:
        ensure_family_fits(cfg.family, head, recipe.objective.name)
        # Embedding rows rounded up to a multiple of 64 keep the output matmul on fast kernel shapes.
        vocab = (len(tokenizer) + 63) // 64 * 64
        config = preset_config(cfg.family, cfg.preset, vocab, max(1024, seq_len), **{**head_config, **cfg.overrides})
        model = build_model(config, head, tokenizer)
    ensure_fits_length(model.config, seq_len, recipe.method.virtual_positions)
    return model


def model_tokenizer(model_dir: Path, tokenizer_dir: Path | None) -> PreTrainedTokenizerBase:
    """The tokenizer beside a model, or the one given (training checkpoints hold no tokenizer)."""
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    if tokenizer_dir is None and not (Path(model_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer here (a training checkpoint?); pass --tokenizer DIR")
    return load_tokenizer(tokenizer_dir or model_dir)


def inputs_stage(recipe: Recipe) -> tuple[PreTrainedTokenizerBase, dict[str, PreparedCorpus]]:
    """Tokenizer and corpora; under torchrun rank 0 builds them while the other ranks wait."""
    ensure_run_folder(Path(recipe.output_dir))  # before any stage writes into it
    init_strategy().ensure_shared_folder(Path(recipe.output_dir))

    def build():
        tokenizer = tokenizer_stage(recipe)
        return tokenizer, prepare_stage(recipe, tokenizer)

    return init_strategy().main_first(build)
