"""The typed trial config: schema (the dataclass tree), presets, loading (defaults < preset < file <
overrides), validation and the trial key. Import the public names from here."""

from txlab.config.errors import ConfigError, UnusedKey
from txlab.config.identity import canonical, run_only_keys, trial_key
from txlab.config.loading import (
    all_keys,
    build_config,
    config_from_flat,
    load_config,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)
from txlab.config.presets import MODEL_SIZES, POLICY_PRESETS
from txlab.config.schema import (
    SECTIONS,
    DataConfig,
    MeasureConfig,
    ModelConfig,
    ParallelConfig,
    PolicyConfig,
    TrainConfig,
    TrialConfig,
    WorkloadConfig,
)
from txlab.config.tree import expand_dotted, flatten, merge
from txlab.config.validate import BYTE_VOCAB

__all__ = [
    "BYTE_VOCAB",
    "MODEL_SIZES",
    "POLICY_PRESETS",
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "MeasureConfig",
    "ModelConfig",
    "ParallelConfig",
    "PolicyConfig",
    "TrainConfig",
    "TrialConfig",
    "UnusedKey",
    "WorkloadConfig",
    "all_keys",
    "build_config",
    "canonical",
    "config_from_flat",
    "expand_dotted",
    "flatten",
    "load_config",
    "merge",
    "parse_override",
    "read_yaml_mapping",
    "run_only_keys",
    "set_dotted",
    "trial_key",
]
