"""The control plane as a Python API (`ControlPlaneManager`), with the types SAGE applications write requests and
instances in."""

from sagellm.control_plane.manager import ControlPlaneManager, SyncControlPlane
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
    "ControlPlaneManager",
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
