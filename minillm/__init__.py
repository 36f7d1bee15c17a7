"""minillm: a from-scratch Transformer library to read, train and benchmark.

    from minillm import preset, build_model
    model = build_model(preset("tiny"), "causal-lm")

Start reading at `minillm/model.py`.
"""

from minillm.config import ModelConfig, preset, PRESETS
from minillm.model import CausalLM, MaskedLM, ModelOutput, Seq2SeqLM, SequenceClassifier, XLNetClassifier, XLNetLM
from minillm.tasks import TASKS, build_model, get_task

__all__ = [
    "ModelConfig", "preset", "PRESETS", "build_model", "TASKS", "get_task",
    "CausalLM", "MaskedLM", "SequenceClassifier", "Seq2SeqLM", "XLNetLM", "XLNetClassifier", "ModelOutput",
]
__version__ = "0.1.0"
