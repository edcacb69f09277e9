"""Transitional alias of the planner's names, for ``services/admin/cmd_rebalance.py`` until it
imports them from ``services.core.placement``; then delete this module. New code imports
``services.core.placement``.
"""

from services.core.placement import (  # noqa: F401
    Move,
    MoveKind,
    NodeCapacity,
    NodeSummary,
    PlannerConfig,
    TableLoad,
    diff,
    plan,
    summarize,
)
