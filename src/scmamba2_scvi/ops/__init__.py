"""Low-level operators: the SSD scan (torch reference, GPU kernel dispatch) and the short conv."""

from ._conv import depthwise_conv1d
from ._fused import bidirectional_blocks
from ._ssd import mamba_ssm_available, segment_ids, ssd_scan, ssd_scan_torch, triton_available

__all__ = [
    "bidirectional_blocks",
    "depthwise_conv1d",
    "mamba_ssm_available",
    "segment_ids",
    "ssd_scan",
    "ssd_scan_torch",
    "triton_available",
]
