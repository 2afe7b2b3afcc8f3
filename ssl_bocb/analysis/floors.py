"""Reading floors.json (written by ``tools/floors.py``, ``sweep.floors``): what every cell of a study is read
against."""
import json
import os
from typing import Dict, Optional

from ..errors import UserError


def read(path: str) -> Optional[Dict]:
    """A floors.json, or None when there is none; a damaged one is one line."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"'{path}' is not a readable floors file ({e}); run tools/floors.py again") from None
    if not isinstance(data, dict) or "pixels" not in data or "random_init" not in data:
        raise UserError(f"'{path}' lacks 'pixels' / 'random_init'; run tools/floors.py again")
    return data
