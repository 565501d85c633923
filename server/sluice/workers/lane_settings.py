"""The engine lane's settings (``Settings.lane``) and metrics (``Metrics.lane``)."""

from sluice.lane_metrics import LaneMetrics
from sluice.settings import LaneSettings

__all__ = ["LaneMetrics", "LaneSettings"]
