"""The control plane as a Python API (`ControlPlaneManager`), with the types SAGE applications write requests and
instances in."""

from sagellm.control_plane.manager import ControlPlaneManager, SyncControlPlane
from sagellm.control_plane.parallelism import ParallelismConfig, ParallelismOptimizer
from sagellm.control_plane.policies import (
    AdaptivePolicy,
    CostOptimizedPolicy,
    FIFOPolicy,
    HybridSchedulingConfig,
    HybridSchedulingPolicy,
    PriorityPolicy,
    SchedulingDecision,
    SchedulingPolicy,
    SLOAwarePolicy,
)
from sagellm.control_plane.routing import LoadBalancer, PDRoutingStrategy, RequestRouter
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
    "HybridSchedulingConfig",
    "HybridSchedulingPolicy",
    "LoadBalancer",
    "ParallelismConfig",
    "ParallelismOptimizer",
    "PDRoutingStrategy",
    "PriorityPolicy",
    "RequestRouter",
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
