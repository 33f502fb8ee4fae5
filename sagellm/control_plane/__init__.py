"""The control plane as a Python API (`ControlPlaneManager`), with the types SAGE applications write requests and
instances in."""

from sagellm.control_plane.manager import ControlPlaneManager, SyncControlPlane
from sagellm.control_plane.policies import (
    AdaptivePolicy,
    CostOptimizedPolicy,
    FIFOPolicy,
    PriorityPolicy,
    SchedulingDecision,
    SchedulingPolicy,
    SLOAwarePolicy,
)
from sagellm.control_plane.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PerformanceMetrics,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
    RequestResult,
    RequestStatus,
)

__all__ = [
    "AdaptivePolicy",
    "ControlPlaneManager",
    "CostOptimizedPolicy",
    "FIFOPolicy",
    "PriorityPolicy",
    "SLOAwarePolicy",
    "SchedulingDecision",
    "SchedulingPolicy",
    "DecodingConfig",
    "ExecutionInstance",
    "ExecutionInstanceType",
    "PDSeparationConfig",
    "PerformanceMetrics",
    "PrefillingConfig",
    "RequestMetadata",
    "RequestPriority",
    "RequestResult",
    "RequestStatus",
    "SyncControlPlane",
]
