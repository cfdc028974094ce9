"""Where things run: the Ray runtime, placement groups and resource checks."""

import rlhf  # noqa: F401  (keeps a local Ray on loopback: must run before ray is imported)
