"""Low-level operators: the SSD scan (torch reference, GPU kernel dispatch) and the short conv."""

from ._conv import depthwise_conv1d
from ._fused import bidirectional_blocks, gather_rows
from ._ssd import (
    Backend,
    mamba_ssm_available,
    segment_ids,
    ssd_scan,
    ssd_scan_torch,
    triton_available,
)

__all__ = [
    "Backend",
    "bidirectional_blocks",
    "depthwise_conv1d",
    "gather_rows",
    "mamba_ssm_available",
    "segment_ids",
    "ssd_scan",
    "ssd_scan_torch",
    "triton_available",
]
