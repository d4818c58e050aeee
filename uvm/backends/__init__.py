"""Hypervisor backends behind one narrow Protocol (``base.Backend``)."""
