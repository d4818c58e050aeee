"""Every wire and config format of uvmshim, defined once.

This package imports nothing at import time: the guest agent imports the stdlib-only modules
(``framing``, ``agent``) without the host's libraries; the host adds pydantic models on top
(``agent_models``, ``uvm_config``).
"""
