"""Deep Delta Learning (arXiv 2601.00417) as a Hugging Face Transformers model family.

Importing `ddl_hf` registers `model_type="ddl"` with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`
and `AutoModelForQuestionAnswering`, and marks the classes for remote code, so `save_pretrained`
writes the modeling files and an `auto_map` next to the weights.
"""

import ddl_hf_launch as _launch

# `python -m ddl_hf ...` is the `ddl` command: its CPU defaults must be set before torch is imported.
# A program that imports ddl_hf keeps its environment.
if _launch.running_ddl_hf_as_main():
    _launch.apply_cpu_defaults()

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .delta_stats import DeltaStatsRecorder, record_delta_stats  # noqa: E402

# The model folder's public names (its `__all__`), then the classes registered below.
from .models.ddl import *  # noqa: E402, F403
from .models.ddl import (  # noqa: E402
    DDLConfig,
    DDLForCausalLM,
    DDLForQuestionAnswering,
    DDLForSequenceClassification,
    DDLForTokenClassification,
    DDLModel,
)
from .models.ddl import __all__ as _model_names  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register("ddl", DDLConfig, exist_ok=True)
DDLConfig.register_for_auto_class()
for _auto_class, _model_class in (
    (AutoModel, DDLModel),
    (AutoModelForCausalLM, DDLForCausalLM),
    (AutoModelForSequenceClassification, DDLForSequenceClassification),
    (AutoModelForTokenClassification, DDLForTokenClassification),
    (AutoModelForQuestionAnswering, DDLForQuestionAnswering),
):
    _auto_class.register(DDLConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

__all__ = [*_model_names, "record_delta_stats", "DeltaStatsRecorder", "__version__"]
