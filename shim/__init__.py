"""Front ends over one task service: the containerd runtime v2 shim and the runuvm CLI."""
