"""What each stage of an export covers, sized from the work (the model's FLOPs and the data), never the clock."""

from trm_export.planning.plan import Plan, describe, plan_export, plan_quantize, read_plan

__all__ = ["Plan", "describe", "plan_export", "plan_quantize", "read_plan"]
