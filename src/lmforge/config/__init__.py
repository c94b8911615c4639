"""The recipe schema: pydantic models of every section, one file per concern, and the plain YAML helpers
around them. Every name is re-exported here, so `from lmforge.config import Recipe` is how the rest of
lmforge reads it.

- rules.py: ConfigError, the base Section (unknown keys refused), how a setting counts for a run (`counts`)
- inputs.py: tokenizer, data, packing;  model.py: model, objective, method;  training.py: trainer, early
  stopping, QAT, regularize, generate, rollout, reward;  recipe.py: Recipe, the checks across sections
- evaluation.py: the eval suite (`lmforge eval`, eval stages);  errors.py: pydantic's errors as messages
  naming the key;  files.py: YAML files and KEY=VALUE overrides

The package imports nothing of lmforge above data types: resolving a recipe against presets, objectives,
models and packages is recipe_files.py's (`load_recipe`, `validate_recipe`).
"""

from lmforge.config.errors import HF_NAMES, explain_error, flatten
from lmforge.config.evaluation import EvalConfig, EvalTaskConfig, validate_eval
from lmforge.config.files import (
    ALTERNATIVES,
    TRAINING_LENGTH,
    WARMUP,
    apply_overrides,
    is_pipeline,
    read_yaml,
)
from lmforge.config.inputs import DataConfig, MixtureSource, MultitaskConfig, PackingConfig, TokenizerConfig
from lmforge.config.model import (
    ADAPTER_METHODS,
    PROMPT_METHODS,
    AdapterConfig,
    Ia3Config,
    LlrdConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    PromptConfig,
)
from lmforge.config.recipe import Recipe
from lmforge.config.rules import NAMING, OUTSIDE, RESUMABLE, WEIGHTS, ConfigError, Section, counts
from lmforge.config.training import (
    EarlyStoppingConfig,
    GenerateConfig,
    QatConfig,
    RegularizeConfig,
    RewardConfig,
    RewardTermConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ADAPTER_METHODS", "ALTERNATIVES", "HF_NAMES", "NAMING", "OUTSIDE", "PROMPT_METHODS", "RESUMABLE", "TRAINING_LENGTH", "WARMUP", "WEIGHTS",
    "AdapterConfig", "ConfigError", "DataConfig", "EarlyStoppingConfig", "EvalConfig", "EvalTaskConfig",
    "GenerateConfig", "Ia3Config", "LlrdConfig", "LoraConfig", "MethodConfig", "MixtureSource", "ModelConfig",
    "MultitaskConfig", "ObjectiveConfig", "PackingConfig", "PromptConfig", "QatConfig", "Recipe", "RegularizeConfig",
    "RewardConfig", "RewardTermConfig", "RolloutConfig", "Section", "TokenizerConfig", "TrainerConfig",
    "apply_overrides", "counts", "explain_error", "flatten", "is_pipeline", "read_yaml", "validate_eval",
]
