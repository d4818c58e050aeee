"""Templates built with the VM that boots for them: uvm/template.py's logic composed with uvm/vm.py's
UtilityVM (neither module imports the other's side: the VM imports template, template is given the VM).

``python -m uvm.template_builder CONFIG_JSON`` builds the template for that UVM config in a process of its
own: what uvm.template.build_in_background starts for ``start = "auto"`` with ``template_autobuild``.
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from schemas.uvm_config import UvmConfig
from uvm import template
from uvm.errors import TemplateError
from uvm.vm import UtilityVM


async def build(config: UvmConfig, *, force: bool = False) -> template.Template:
    """uvm.template.build with a UtilityVM. Raises TemplateError (nothing left behind)."""
    return await template.build(config, UtilityVM, force=force)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m uvm.template_builder CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        config = UvmConfig.model_validate_json(args[0])
        t = asyncio.run(build(config))
    except (TemplateError, ValidationError) as e:
        print(f"template: {e}", file=sys.stderr)
        return 1
    print(t.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
