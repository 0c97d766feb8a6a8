"""The namespace lab: the design doc's topology (client, steering node, hosts) on one machine."""

from pysteer.lab.plan import LabPlan, PlanError, load
from pysteer.lab.topology import DEFAULT_PREFIX, Lab, LabError, known_labs

__all__ = ["DEFAULT_PREFIX", "Lab", "LabError", "LabPlan", "PlanError", "known_labs", "load"]
