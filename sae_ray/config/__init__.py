"""Run configuration: pydantic models for every section, YAML loading, `--set` overrides.

A config is checked in two passes before anything expensive starts:

1. `load_config` / `validate_config` (`config.load`) — types, ranges and the rules between
   fields (`config.sections`, built from `config.fields`), with no I/O beyond reading the YAML
   (`config.yamlload`). Every problem is collected and reported at once as
   ``field.path: value ...: what is accepted``.
2. `sae_ray.preflight.preflight` — the checks that need to look at the world (the model path,
   the hook points, the dataset, an existing buffer, the machine's resources, the tracking server).
"""

from sae_ray.config.fields import ConfigError
from sae_ray.config.load import apply_overrides, load_config, validate_config
from sae_ray.config.sections import (
    BufferConfig,
    DataConfig,
    HookPointConfig,
    ModelConfig,
    ProducerConfig,
    ResourcesConfig,
    RunConfig,
    Section,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = ["BufferConfig", "ConfigError", "DataConfig", "HookPointConfig", "ModelConfig", "ProducerConfig",
           "ResourcesConfig", "RunConfig", "Section", "SweepConfig", "TrackingConfig", "TrainConfig",
           "apply_overrides", "load_config", "validate_config"]
