"""Data: corpora, the embedded default corpus, sharding and batches for every objective.

Your own text, start to finish::

    from minillm.data.corpus import Corpus
    from minillm.data.prepare import prepare
    from minillm.data.shards import TokenShards
    from minillm.tokenizer import Tokenizer

    corpus = Corpus(["my_texts/**/*.txt"])          # or "notes.jsonl" (field "text"), "rows.csv"
    tok = Tokenizer.train(corpus, "runs/tok", vocab_size=8000)
    prepare(corpus, tok, "data/mine")               # once; a rerun with the same inputs is skipped
    train = TokenShards("data/mine", "train")       # memory-mapped tokens + document offsets

or all of it from a config, for a task: ``minillm.tasks.get_task("mlm").datasets(...)``.

Read in this order:

=====================  ===============================================================
``corpus``             readers (text files/dirs/globs, JSONL field, CSV/TSV column) -> Document
``default_corpus``     the embedded stdlib corpus and the tasks made of it (classification, seq2seq)
``minillm.tokenizer``  sentencepiece training/loading, fixed special ids
``prepare``            corpus -> memory-mapped token shards + manifest (atomic, cached)
``word_cache``         the exact per-word encoding cache that makes prepare fast
``shards``             TokenShards: read a prepared split
``collate``            padding, -100 labels, per-worker random generators
``causal``             GPT windows (+ document-aware position_ids / document_ids)
``mlm``                BERT masking (80/10/10, whole-word)
``nsp``                BERT sentence pairs
``seq2seq``            T5 span corruption and source/target pairs
``permutation``        XLNet windows with a factorisation order, perm_mask and target_mapping
``classification``     labelled texts / pairs, label maps, GLUE layouts
``config``             DataConfig
``pipeline``           the train / validation / test examples of a classification config
=====================  ===============================================================

Every collator returns a dict of torch tensors whose keys the models accept directly
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``, ``next_sentence_label``,
``decoder_input_ids``, and ``position_ids``/``document_ids`` of document-aware causal batches;
XLNet's ``perm_mask`` and ``target_mapping``).

The prepare function is not re-exported here: ``minillm.data.prepare`` must stay the module
(``from minillm.data.prepare import prepare``).
"""

from minillm.data.causal import CausalLMCollator, CausalLMDataset
from minillm.data.permutation import PermutationLMCollator, PermutationLMDataset, permutation_masks
from minillm.data.classification import (
    GLUE_TASKS,
    ClassificationCollator,
    ClassificationDataset,
    ClassificationExamples,
    LabelMap,
    examples_from_pairs,
    read_classification,
    read_glue,
    sample_examples,
)
from minillm.data.collate import IGNORE_INDEX
from minillm.data.config import DataConfig
from minillm.data.corpus import Corpus, Document
from minillm.data.default_corpus import (
    build_default_corpus,
    default_corpus_documents,
    stdlib_classification_task,
    stdlib_seq2seq_task,
)
from minillm.data.mlm import MLMCollator, MLMDataset
from minillm.data.nsp import NSPCollator, NSPDataset
from minillm.data.pipeline import classification_examples
from minillm.data.prepare import PrepareResult, prepare_from_config
from minillm.data.seq2seq import (
    Seq2SeqCollator,
    Seq2SeqPairDataset,
    SpanCorruptionDataset,
    read_seq2seq_pairs,
    span_corruption,
)
from minillm.data.shards import TokenShards

__all__ = [
    "CausalLMCollator", "CausalLMDataset", "GLUE_TASKS", "ClassificationCollator", "ClassificationDataset",
    "ClassificationExamples", "LabelMap", "examples_from_pairs", "read_classification", "read_glue", "sample_examples",
    "IGNORE_INDEX", "DataConfig", "Corpus", "Document", "build_default_corpus", "default_corpus_documents",
    "stdlib_classification_task", "stdlib_seq2seq_task", "MLMCollator", "MLMDataset", "NSPCollator", "NSPDataset", "PrepareResult",
    "prepare_from_config", "classification_examples", "Seq2SeqCollator",
    "Seq2SeqPairDataset", "SpanCorruptionDataset", "read_seq2seq_pairs", "span_corruption", "TokenShards",
    "PermutationLMCollator", "PermutationLMDataset", "permutation_masks",
]
