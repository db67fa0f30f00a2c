"""A module slow to import (its top level blocks 0.2 s), imported by `app.py`'s `/lazy` at first use."""

import time

time.sleep(0.2)
LOADED = True
