"""How trm-export reaches a device: its runtime as a wheel inside every bundle (and the dependencies' wheels)."""
