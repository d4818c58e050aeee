"""The utility VM. This file imports nothing, so the guest can import ``uvm.guest`` alone."""
