"""The splits of a classification task, from a DataConfig.

Which datasets and collator a run builds is the task's business (:mod:`minillm.tasks`); what is
here is the part of it that is only about reading files: the train / validation / test examples
of a classification config, from the embedded stdlib task or from the user's files.
"""

from __future__ import annotations

from minillm.data.classification import (
    ClassificationExamples,
    examples_from_pairs,
    read_classification,
    read_glue,
    sample_examples,
)
from minillm.data.config import DataConfig


def classification_examples(config: DataConfig) -> dict[str, ClassificationExamples | None]:
    """{"train", "validation", "test"} examples of a classification config.

    ``train_file="default"``: the embedded stdlib-package task with ``config.stdlib_classes``
    named packages, and its own test split. Otherwise the train, validation and (optional) test
    files, read with the GLUE layout ``glue_task`` or the fields of ``config``, with the training
    file's label map; "test" is None without a ``test_file``.
    ``train_examples > 0`` keeps that many training examples, sampled with ``seed``.
    """
    if config.train_file == "default":  # the embedded stdlib-package task
        from minillm.data.default_corpus import stdlib_classification_task

        task = stdlib_classification_task(config.stdlib_classes)
        splits = {name: examples_from_pairs(getattr(task, name), task.labels, f"stdlib:{name}")
                  for name in ("train", "validation", "test")}
    else:
        files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
        if config.glue_task is not None:
            splits = {name: read_glue(config.glue_task, path, errors=config.encoding_errors, training=name == "train")
                      if path else None for name, path in files.items()}
        else:
            read = dict(text_field=config.text_field, label_field=config.label_field,
                        text_pair_field=config.text_pair_field, errors=config.encoding_errors)
            splits = {"train": read_classification(config.train_file, **read)}
            for name in ("validation", "test"):
                splits[name] = read_classification(files[name], label_map=splits["train"].label_map, **read) \
                    if files[name] else None
    if config.train_examples:
        splits["train"] = sample_examples(splits["train"], config.train_examples, config.seed)
    return splits
