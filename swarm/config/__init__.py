"""The job file schema (pydantic v2): one typed place for every setting and its default.

A job file is YAML. Unknown keys, wrong types and impossible values are refused with a message that names the
field, so a researcher finds a typo before a swarm spends an hour on it.

One module per concern, each defining the sections of the job file it names; import every name from here
(`from swarm.config import Job, load_job`), not from the module that defines it.
"""

from swarm.config.data import BackdoorSpec, DataSpec
from swarm.config.deployment import AuditSpec, CompressionSpec, NodesSpec, SwarmSpec
from swarm.config.job import Job
from swarm.config.loading import format_validation_error, load_job, parse_job
from swarm.config.model import DEFAULT_LORA_TARGETS, LoraSpec, ModelSpec
from swarm.config.oversight import OversightSpec
from swarm.config.phases import PHASE_KINDS, PhaseKind, PhaseSpec, RLSpec
from swarm.config.strict import StrictModel
from swarm.config.sweep import ARM_SIZE_ENDS, ArmSpec, SweepSpec
from swarm.config.training import EvalSpec, OptimizerSpec, TrainingSpec

__all__ = [
    "ARM_SIZE_ENDS", "DEFAULT_LORA_TARGETS", "PHASE_KINDS", "ArmSpec", "AuditSpec", "BackdoorSpec", "CompressionSpec",
    "DataSpec", "EvalSpec", "Job", "LoraSpec", "ModelSpec", "NodesSpec", "OptimizerSpec", "OversightSpec", "PhaseKind",
    "PhaseSpec", "RLSpec", "StrictModel", "SwarmSpec", "SweepSpec", "TrainingSpec", "format_validation_error",
    "load_job", "parse_job",
]
