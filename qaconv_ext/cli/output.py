"""What the sub-commands share for their result files."""
from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as indented JSON to ``path`` (creating its folder); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
    return path
